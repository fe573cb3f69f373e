"""Import paths of hcgen before its subpackages, kept for one release: each warns and hands over the new code.

``import hcgen.caffe_net`` (or ``from hcgen.search import perturb``) still works, with a
`DeprecationWarning` naming where the code lives now. An old module that moved whole IS the new module
(``hcgen.search is hcgen.core.search``); one that was split into several is a read-only module holding
their names. `MOVED` is the whole list; `install` is called by ``hcgen/__init__.py``.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

MOVED: dict[str, tuple[str, ...]] = {
    # the user-facing paths that issue 21 promises to keep for one release
    "hcgen.caffe_net": ("hcgen.backends.caffe", "hcgen.backends.caffe_checks", "hcgen.training.solver"),
    "hcgen.torch_net": ("hcgen.backends.torch",),
    "hcgen.metrics": ("hcgen.core.metrics",),
    "hcgen.search": ("hcgen.core.search",),
    "hcgen.directions": ("hcgen.core.directions",),
    "hcgen.torch_data": ("hcgen.data.torch_dataset",),
    # the other modules of 0.1.0, for scripts and runs started before the move
    "hcgen.backend": ("hcgen.backends.base",),
    "hcgen.validate": ("hcgen.backends.caffe_checks", "hcgen.util.hashing"),
    "hcgen.lmdb_io": ("hcgen.data.lmdb_io", "hcgen.data.mix"),
    "hcgen.mnist": ("hcgen.data.mnist",),
    "hcgen.infimnist": ("hcgen.data.infimnist",),
    "hcgen.images": ("hcgen.data.images",),
    "hcgen.fileio": ("hcgen.util.fileio",),
    "hcgen.locks": ("hcgen.util.locks",),
    "hcgen.gallery": ("hcgen.report.gallery", "hcgen.report.table1_page", "hcgen.report.html",
                      "hcgen.data.genfolder", "hcgen.data.sources"),
    "hcgen.pipeline": (),
    "hcgen.pipeline.generate": ("hcgen.generate.run", "hcgen.generate.shards", "hcgen.core.methods",
                                "hcgen.data.genfolder", "hcgen.data.sources"),
    "hcgen.pipeline.train": ("hcgen.training.caffe_train", "hcgen.data.mix"),
    "hcgen.pipeline.evaluate": ("hcgen.training.evaluate",),
    "hcgen.pipeline.stages": ("hcgen.stages.graph",),
    "hcgen.pipeline.scale": ("hcgen.stages.dask_runner",),
    "hcgen.pipeline.table1": ("hcgen.experiments.table1.protocol", "hcgen.experiments.table1.estimate"),
    "hcgen.pipeline.report": ("hcgen.experiments.table1.results",),
}


class _OldPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the names of `MOVED` (before the file system is searched: those files are gone)."""

    def find_spec(self, name, path=None, target=None):
        if name not in MOVED:
            return None
        return importlib.util.spec_from_loader(name, self, is_package=name == "hcgen.pipeline")

    def create_module(self, spec):
        new = MOVED[spec.name]
        where = ", ".join(new) if new else "hcgen.generate, hcgen.training, hcgen.stages, hcgen.experiments"
        warnings.warn(f"{spec.name} is deprecated and will be removed in the next release; import from {where}",
                      DeprecationWarning, stacklevel=2)
        if len(new) == 1:
            return importlib.import_module(new[0])  # the module itself: patching it patches the code
        module = types.ModuleType(spec.name, f"Deprecated: the names of {where}.")
        for source in reversed(new):  # the first module named wins a name two of them define
            module.__dict__.update({k: v for k, v in vars(importlib.import_module(source)).items()
                                    if not (k.startswith("__") and k.endswith("__"))})
        return module

    def exec_module(self, module):
        pass  # nothing to run: create_module returned the finished module


_FINDER = _OldPaths()


def install() -> None:
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
