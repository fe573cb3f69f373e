"""`hcgen doctor`: is this Caffe the one hcgen needs? Exits non-zero, saying what to do, if not."""
from __future__ import annotations

import argparse
import importlib
import subprocess
import tempfile

from hcgen.pipeline.train import caffe_executable

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
        from hcgen import caffe_net
    except ImportError as exc:
        _line(False, "pycaffe", f"cannot import caffe ({exc}); {FIX}")
        return 1
    info = caffe_net.build_info()
    for key, value in info.items():
        _line(True, key, str(value))
    if not info["has_backward_from"]:
        ok = _line(False, "backward_from", f"this pycaffe lacks Net.backward_from (unpatched Caffe); {FIX}")
    with tempfile.TemporaryDirectory() as tmp:
        if info["has_backward_from"]:
            err = caffe_net.check_backward_from(tmp)
            ok &= _line(err < 1e-2, "backward_from", f"max relative error vs central differences {err:.2e}")
        try:
            n = caffe_net.check_lmdb_data_layer(tmp)
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
