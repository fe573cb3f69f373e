"""`hcgen doctor`: is this Caffe the one hcgen needs? Exits non-zero, saying what to do, if not."""
from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import tempfile
from pathlib import Path

from hcgen.training.caffe_train import caffe_executable

FIX = "run `bash scripts/bootstrap.sh setup` (or `make caffe`) in the hcgen checkout"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "doctor",
        help="check the Caffe build (pycaffe, caffe CLI, LMDB, backward_from)",
        description="Print the Caffe build hcgen uses (path, version, BLAS, LMDB support), check "
        "Net.backward_from against finite differences on a tiny net, and exit non-zero with a "
        "clear message when something is missing.",
    )
    p.set_defaults(func=run)


def _ldd(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(soname, resolved path) of each shared library `ldd` lists for `path`; [] without ldd."""
    try:
        out = subprocess.run(["ldd", str(path)], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return [(name, parts[0]) for name, _, rest in (line.strip().partition(" => ") for line in out.splitlines())
            if (parts := rest.split()) and parts[0].startswith("/")]


def caffe_blas(caffe_native: str | os.PathLike) -> str:
    """The BLAS library Caffe's libcaffe is linked against (not the one numpy or scipy loaded into this
    process): from `ldd` of the libcaffe that pycaffe's `_caffe.so` loads, through Debian's alternatives."""
    libcaffe = next((p for name, p in _ldd(caffe_native) if name.startswith("libcaffe")), None)
    linked = _ldd(libcaffe) if libcaffe else _ldd(caffe_native)
    for name, path in linked:
        if any(word in name for word in ("blas", "mkl", "atlas")):
            by = Path(libcaffe).name if libcaffe else Path(caffe_native).name
            return f"{name} => {os.path.realpath(path)} (linked by {by})"
    return f"unknown (`ldd {libcaffe or caffe_native}` names no BLAS library)"


def _line(ok: bool, name: str, detail: str) -> bool:
    print(f"[{'ok' if ok else 'FAIL'}] {name}: {detail}")
    return ok


def run(args: argparse.Namespace) -> int:
    ok = True
    for module in ("numpy", "scipy", "cv2", "lmdb", "google.protobuf"):
        try:
            mod = importlib.import_module(module)
            _line(True, module, getattr(mod, "__version__", "present"))
        except ImportError as exc:
            ok = _line(False, module, f"{exc}; {FIX}")
    try:
        from hcgen.backends import caffe_checks  # pycaffe: what this command checks
    except ImportError as exc:
        _line(False, "pycaffe", f"cannot import caffe ({exc}); {FIX}")
        return 1
    info = caffe_checks.build_info()
    info["blas"] = caffe_blas(info["caffe_native"])
    for key, value in info.items():
        _line(True, key, str(value))
    if not info["has_backward_from"]:
        ok = _line(False, "backward_from", f"this pycaffe lacks Net.backward_from (unpatched Caffe); {FIX}")
    with tempfile.TemporaryDirectory() as tmp:
        if info["has_backward_from"]:
            err = caffe_checks.check_backward_from(tmp)
            ok &= _line(err < 1e-2, "backward_from", f"max relative error vs central differences {err:.2e}")
        try:
            n = caffe_checks.check_lmdb_data_layer(tmp)
            _line(True, "lmdb", f"Caffe's Data layer read {n} records written from Python")
        except Exception as exc:  # noqa: BLE001 - any Caffe failure here is a broken build
            ok = _line(False, "lmdb", f"{exc}; Caffe must be built with USE_LMDB; {FIX}")
    exe = caffe_executable()
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True)
        _line(True, "caffe CLI", f"{exe}: {(out.stdout or out.stderr).strip()}")
    except (OSError, subprocess.CalledProcessError) as exc:
        ok = _line(False, "caffe CLI", f"{exe} does not run ({exc}); {FIX}")
    print("hcgen doctor: all checks passed" if ok else "hcgen doctor: some checks FAILED")
    return 0 if ok else 1
