"""hcgen.backends.blas: OpenBLAS's generic fallback is replaced by the kernel family the CPU's flags run, and only then."""
import os
import subprocess
import sys

import pytest

from hcgen.backends import blas

SKX = {"fma", "avx2", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}


def test_best_coretype_follows_the_flags():
    assert blas.best_coretype(SKX) == "SkylakeX"
    assert blas.best_coretype({"avx2", "fma", "avx512f"}) == "Haswell"  # AVX-512 F alone is not SkylakeX
    assert blas.best_coretype({"sse4_2", "avx"}) is None


def test_cpu_flags_reads_the_first_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert blas.cpu_flags(info) == {"fpu", "avx2", "fma"}
    assert blas.cpu_flags(tmp_path / "missing") == set()


def test_configure_sets_the_coretype_only_over_a_generic_fallback():
    env = {}
    assert blas.configure_openblas(env, SKX, probe=lambda e: "Prescott") == "SkylakeX"
    assert env["OPENBLAS_CORETYPE"] == "SkylakeX" and env[blas.PROBED] == "Prescott"
    assert "would fall back to Prescott" in blas.describe(env)
    env = {}
    assert blas.configure_openblas(env, SKX, probe=lambda e: "Zen") is None  # a CPU the library knows
    assert "OPENBLAS_CORETYPE" not in env and blas.describe(env) == "Zen"
    env = {}
    assert blas.configure_openblas(env, {"sse3"}, probe=lambda e: "Prescott") is None  # nothing faster
    assert "OPENBLAS_CORETYPE" not in env


def test_configure_respects_the_user_and_probes_once():
    calls = []

    def probe(env):
        calls.append(1)
        return "Prescott"

    env = {"OPENBLAS_CORETYPE": "Haswell"}
    assert blas.configure_openblas(env, SKX, probe=probe) is None and env["OPENBLAS_CORETYPE"] == "Haswell"
    env = {"HCGEN_OPENBLAS": "keep"}
    assert blas.configure_openblas(env, SKX, probe=probe) is None and "OPENBLAS_CORETYPE" not in env
    assert calls == []
    env = {}
    blas.configure_openblas(env, SKX, probe=probe)
    child = {k: v for k, v in env.items() if k != "OPENBLAS_CORETYPE"}  # e.g. a child that dropped it
    assert blas.configure_openblas(child, SKX, probe=probe) is None and calls == [1]


def test_the_probe_reports_the_library_choice_and_caffe_uses_the_configured_one():
    """The real library: the probe names a kernel family; a process that imports hcgen.backends.caffe runs
    Caffe's OpenBLAS with OPENBLAS_CORETYPE as configure_openblas left it."""
    pytest.importorskip("caffe")
    own = blas.probe_corename()
    assert own
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", blas.PROBED, "HCGEN_OPENBLAS")}
    code = ("import os, hcgen.backends.caffe, ctypes\n"
            "lib = ctypes.CDLL('libopenblas.so.0'); lib.openblas_get_corename.restype = ctypes.c_char_p\n"
            "print(os.environ.get('OPENBLAS_CORETYPE', '-'), lib.openblas_get_corename().decode())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    forced, used = out.stdout.split()
    expected = blas.best_coretype(blas.cpu_flags()) if own.lower() in blas.GENERIC else None
    assert forced == (expected or "-")
    assert used.lower() == (expected or own).lower()
