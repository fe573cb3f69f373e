"""The layers of README "Architecture": a package imports only the packages below it, and a module imports
caffe, torch, dask, matplotlib or scipy only where README says it may."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

HCGEN = Path(__file__).resolve().parents[1] / "hcgen"
ALLOWED = {  # package -> the hcgen packages it may import ("hcgen": the package's own __init__, __version__)
    "errors": set(),
    "util": {"errors"},
    "core": {"errors"},
    "backends": {"errors"},
    "data": {"core", "util", "errors"},
    "stages": {"util"},
    "generate": {"core", "backends", "data", "util", "errors", "hcgen", "torch"},  # torch: the engine, for a TorchNet
    "training": {"backends", "data", "util", "errors"},
    "report": {"data", "stages", "util", "errors", "hcgen"},
    "experiments": {"generate", "training", "data", "backends", "stages", "core", "util", "errors"},
    "torch": {"core", "backends", "errors"},  # the PyTorch user API (HardPositives), over backends/torch
    "cli": {"experiments", "generate", "training", "report", "backends", "data", "stages", "core", "util", "errors",
            "hcgen"},
}
HEAVY = {"caffe": {"backends/pycaffe.py"},
         "torch": {"backends/torch.py", "data/torch_dataset.py", "torch/__init__.py", "torch/engine.py",
                   "torch/hard_positives.py"},
         "distributed": {"stages/dask_runner.py"}, "dask": {"stages/dask_runner.py"}}


def _package(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "hcgen"
    return "cli" if parts[1] in ("cli", "commands") else parts[1].removesuffix(".py")


def _modules():
    for path in sorted(HCGEN.rglob("*.py")):
        rel = path.relative_to(HCGEN)
        if rel.name in ("__init__.py", "_deprecated.py") and len(rel.parts) == 1:
            continue
        yield rel, ast.parse(path.read_text())


def _imports(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "hcgen":
                yield from (f"hcgen.{a.name}" for a in node.names)
            else:
                yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


@pytest.mark.parametrize("rel, tree", list(_modules()), ids=lambda v: str(v) if isinstance(v, Path) else "")
def test_a_module_imports_only_what_its_layer_may(rel, tree):
    own = _package("hcgen." + ".".join(rel.with_suffix("").parts))
    for name in _imports(tree):
        top = name.split(".")[0]
        if top == "hcgen":
            target = "hcgen" if name in ("hcgen", "hcgen.__version__") else _package(name)
            assert target == own or target in ALLOWED[own], f"{rel} imports {name}: {own} may not import {target}"
        elif top in HEAVY:
            assert rel.as_posix() in HEAVY[top], f"{rel} imports {name}; only {sorted(HEAVY[top])} may"


def test_the_command_line_loads_no_heavy_dependency():
    """`hcgen --help` and every command's parser load neither caffe, torch, dask nor matplotlib."""
    import subprocess
    import sys

    code = ("import sys, hcgen.cli; hcgen.cli.build_parser(); "
            "print(sorted(m for m in ('caffe', 'torch', 'distributed', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "[]"
