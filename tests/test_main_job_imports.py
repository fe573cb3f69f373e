"""The main job (`hcgen doctor`, `hcgen demo`) imports nothing from torch: `make setup` / `make demo` install
hcgen without the torch extra (only `make test` adds it), so a torch import on that path would break them."""
from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.conftest import REPO

BLOCKED = textwrap.dedent("""
    import sys
    sys.modules["torch"] = None  # `import torch` now raises ImportError, as in a venv without the extra
    from hcgen.cli import build_parser
    build_parser()
    from hcgen.commands import demo_cmd, doctor, generate_cmd, report_cmd, table1_cmd, train_cmd, export_cmd
    # everything demo_cmd.run and doctor import when they run
    import hcgen.backends.caffe, hcgen.report.gallery, hcgen.data.mnist, hcgen.generate.run, hcgen.experiments.table1.protocol
    import hcgen.training.caffe_train, hcgen.experiments.table1.results, hcgen.backends.caffe_checks
    print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision") and sys.modules[m]))
""")


def test_the_main_job_never_imports_torch():
    out = subprocess.run([sys.executable, "-c", BLOCKED], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "[]\n"


def test_setup_installs_torch_only_for_tests():
    makefile = (REPO / "Makefile").read_text()
    setup_rule = makefile.split("$(STAMP): setup.py", 1)[1].split("\n\n", 1)[0]
    assert "pip install --quiet -e .\n" in setup_rule and "torch" not in setup_rule
    test_rule = makefile.split("$(TEST_STAMP): $(STAMP)", 1)[1].split("\n\n", 1)[0]
    assert "-e '.[test,torch]'" in test_rule
    assert "\ntest: caffe $(TEST_STAMP)\n" in makefile
