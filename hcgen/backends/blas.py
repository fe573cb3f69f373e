"""The OpenBLAS kernel Caffe computes with: detect a CPU that Debian's OpenBLAS does not recognise.

Caffe links the system OpenBLAS (Debian 12: 0.3.21, built with DYNAMIC_ARCH), which picks its kernels
from the CPU's family and model. A CPU newer than the library (e.g. an Intel Xeon of model 207, seen on
these VMs) is not in its tables and falls back to the generic "Prescott" kernels (SSE3), which run
LeNet's GEMMs several times slower than the AVX-512 / AVX2 kernels the CPU supports
(benchmarks/README.md: "OpenBLAS kernels"). numpy's own OpenBLAS is newer and unaffected.

`configure_openblas()` runs before Caffe is loaded (`hcgen.backends.pycaffe` calls it) and, only when the probe
reports such a generic fallback, sets ``OPENBLAS_CORETYPE`` to the best kernel family the CPU's flags
support ("SkylakeX" with AVX-512 F/CD/BW/DQ/VL, "Haswell" with AVX2 + FMA). Child processes (`caffe
train`, Dask workers) inherit it. A kernel family is arithmetic: results differ from the generic
kernels' in float rounding, as they do between machines. Set ``OPENBLAS_CORETYPE`` yourself to choose,
or ``HCGEN_OPENBLAS=keep`` to leave OpenBLAS's own choice.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import MutableMapping, Optional

LIBRARY = "libopenblas.so.0"  # the soname libcaffe links (Debian's alternatives pick the variant)
# Kernel names OpenBLAS falls back to when it does not know the CPU (x86_64)
GENERIC = {"prescott", "core2", "katmai", "coppermine", "northwood", "banias", "unknown"}
PROBED = "HCGEN_OPENBLAS_CORE"  # set after a probe: what OpenBLAS chose by itself (children skip the probe)

_PROBE = (
    "import ctypes, sys\n"
    f"lib = ctypes.CDLL({LIBRARY!r})\n"
    "lib.openblas_get_corename.restype = ctypes.c_char_p\n"
    "sys.stdout.write(lib.openblas_get_corename().decode())\n"
)


def cpu_flags(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> set[str]:
    """The first CPU's flags from /proc/cpuinfo (empty where there is none, e.g. not Linux)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def best_coretype(flags: set[str]) -> Optional[str]:
    """The fastest OpenBLAS 0.3.21 x86_64 kernel family these CPU flags can run, or None."""
    if {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    return None


def probe_corename(environ: Optional[MutableMapping[str, str]] = None, timeout: float = 20.0) -> Optional[str]:
    """The kernel family the system OpenBLAS chooses by itself (OPENBLAS_CORETYPE unset), in a child
    process so that this one has not loaded it yet; None if there is no such library."""
    env = {k: v for k, v in (environ if environ is not None else os.environ).items() if k != "OPENBLAS_CORETYPE"}
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                             timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def configure_openblas(environ: Optional[MutableMapping[str, str]] = None, flags: Optional[set[str]] = None,
                       probe=probe_corename) -> Optional[str]:
    """Set OPENBLAS_CORETYPE in `environ` (default os.environ) where OpenBLAS would fall back to a generic
    kernel on a CPU that runs a faster one; returns the value it set, else None. Call it before the
    library is loaded (i.e. before `import caffe`)."""
    env = os.environ if environ is None else environ
    if "OPENBLAS_CORETYPE" in env or env.get("HCGEN_OPENBLAS", "").lower() == "keep" or PROBED in env:
        return None
    chosen = probe(env)
    env[PROBED] = chosen or "none"
    if not chosen or chosen.lower() not in GENERIC:
        return None
    best = best_coretype(cpu_flags() if flags is None else flags)
    if best is None:
        return None
    env["OPENBLAS_CORETYPE"] = best
    return best


def describe(environ: Optional[MutableMapping[str, str]] = None) -> str:
    """One line for `hcgen doctor`: the kernel Caffe's OpenBLAS uses and why."""
    env = os.environ if environ is None else environ
    own = env.get(PROBED)
    forced = env.get("OPENBLAS_CORETYPE")
    if forced and own and own.lower() in GENERIC:
        return (f"{forced} (OpenBLAS alone would fall back to {own} on this CPU; set by hcgen, "
                "HCGEN_OPENBLAS=keep to leave it)")
    if forced:
        return f"{forced} (OPENBLAS_CORETYPE)"
    return own if own and own != "none" else "unknown"
