"""Caffe's LeNet with OpenBLAS's own kernel choice against the one hcgen.backends.blas picks, in the same run.

    .venv/bin/python benchmarks/bench_openblas.py [--rounds 3] [--iterations 50]

Runs `caffe time` (forward + backward of the deploy LeNet, batch 64, one BLAS thread) alternately with
OPENBLAS_CORETYPE unset (the library's own detection) and set as `hcgen.backends.blas.configure_openblas` sets it,
and prints the medians and their ratio. On a CPU the library knows, both are the same kernels (ratio ~1).
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from hcgen.backends.blas import best_coretype, cpu_flags, probe_corename  # noqa: E402

DEPLOY = Path(__file__).resolve().parents[1] / "models" / "lenet" / "lenet_deploy.prototxt"


def caffe_time(caffe: str, iterations: int, coretype: str | None) -> tuple[float, float, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "HCGEN_OPENBLAS_CORE")}
    env.update(OPENBLAS_NUM_THREADS="1", OPENBLAS_VERBOSE="2", GLOG_minloglevel="0", GLOG_logtostderr="1")
    if coretype:
        env["OPENBLAS_CORETYPE"] = coretype
    out = subprocess.run([caffe, "time", f"--model={DEPLOY}", f"--iterations={iterations}"], env=env,
                         capture_output=True, text=True, check=True)
    text = out.stdout + out.stderr
    fwd = float(re.search(r"Average Forward pass: ([\d.]+) ms", text).group(1))
    both = float(re.search(r"Average Forward-Backward: ([\d.]+) ms", text).group(1))
    core = re.search(r"Core: (\S+)", text)
    return fwd, both, core.group(1) if core else "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=50)
    ap.add_argument("--caffe", default=str(Path(sys.executable).parent / "caffe"))
    args = ap.parse_args()
    own = probe_corename()
    pick = best_coretype(cpu_flags())
    print(f"OpenBLAS alone: {own}; the CPU's flags allow: {pick}")
    if not pick:
        raise SystemExit("no faster kernel family for this CPU's flags: nothing to compare")
    runs: dict[str, list[tuple[float, float]]] = {"own": [], "picked": []}
    cores = {}
    for _ in range(args.rounds):
        for name, coretype in (("own", None), ("picked", pick)):
            fwd, both, core = caffe_time(args.caffe, args.iterations, coretype)
            runs[name].append((fwd, both))
            cores[name] = core
    med = {n: (statistics.median(f for f, _ in r), statistics.median(b for _, b in r)) for n, r in runs.items()}
    for n in ("own", "picked"):
        fwd, both = med[n]
        print(f"{n:7s} ({cores[n]:9s}): forward {fwd:7.2f} ms, forward+backward {both:7.2f} ms per batch of 64 "
              f"= {1000 / both:6.1f} LeNet it/s")
    print(f"ratio picked / own (forward+backward speed): {med['own'][1] / med['picked'][1]:.2f}x; "
          f"forward: {med['own'][0] / med['picked'][0]:.2f}x")


if __name__ == "__main__":
    main()
