"""The import paths before the subpackages (issue 21) still work for one release, with a DeprecationWarning."""
from __future__ import annotations

import subprocess
import sys

import pytest

import hcgen
from hcgen._deprecated import MOVED


@pytest.mark.parametrize("old, new, name", [
    ("hcgen.metrics", "hcgen.core.metrics", "pass_scores"),
    ("hcgen.search", "hcgen.core.search", "adversarial_search"),
    ("hcgen.directions", "hcgen.core.directions", "omega_hc"),
    ("hcgen.torch_data", "hcgen.data.torch_dataset", "GeneratedDataset"),
    ("hcgen.torch_net", "hcgen.backends.torch", "TorchNet"),
    ("hcgen.caffe_net", "hcgen.backends.caffe", "CaffeNet"),
    ("hcgen.caffe_net", "hcgen.training.solver", "render_training"),
    ("hcgen.caffe_net", "hcgen.backends.caffe_checks", "tiny_net"),
    ("hcgen.pipeline.generate", "hcgen.core.methods", "parse_methods"),
    ("hcgen.pipeline.generate", "hcgen.generate.shards", "merge_shards"),
    ("hcgen.pipeline.train", "hcgen.data.mix", "mix_training_data"),
    ("hcgen.gallery", "hcgen.report.table1_page", "write_table1_report"),
])
def test_an_old_path_warns_and_gives_the_new_code(old, new, name):
    """Checked in a fresh interpreter: an import is cached, and the warning is given once, on import."""
    code = (f"import warnings, importlib\n"
            f"with warnings.catch_warnings(record=True) as w:\n"
            f"    warnings.simplefilter('always')\n"
            f"    import {old} as old\n"
            f"new = importlib.import_module({new!r})\n"
            f"assert getattr(old, {name!r}) is getattr(new, {name!r})\n"
            f"[warning] = [x for x in w if str(x.message).startswith({old!r} + ' is')]\n"
            f"assert {old!r} + ' is deprecated' in str(warning.message) and {new!r} in str(warning.message)\n"
            f"assert warning.filename == '<string>', warning.filename  # points at the importing line\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr


def test_a_module_that_moved_whole_is_the_new_module():
    import importlib

    import hcgen.core.search

    with pytest.warns(DeprecationWarning) if "hcgen.search" not in sys.modules else _nothing():
        old = importlib.import_module("hcgen.search")
    assert old is hcgen.core.search and sys.modules["hcgen.search"] is hcgen.core.search


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_the_public_api_is_unchanged():
    from hcgen.core import directions, metrics, search

    for name in hcgen.__all__:
        assert getattr(hcgen, name) in (getattr(m, name, None) for m in (directions, metrics, search))
    assert len(hcgen.__all__) == 14


def test_every_new_module_named_exists():
    import importlib

    for old, new in MOVED.items():
        for module in new:
            importlib.import_module(module)
