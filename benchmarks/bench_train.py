"""`hcgen train` against bare `caffe train`: the same LeNet solver, iterations and LMDBs, in one run.

Each round runs, one after the other: `hcgen.training.caffe_train.train` (which renders solver.prototxt /
net.prototxt and runs `caffe train` with OPENBLAS_NUM_THREADS=1), bare `caffe train` on that same
solver with OPENBLAS_NUM_THREADS=1 and its log redirected to a file, and bare `caffe train` with
OpenBLAS's default threads. Two rates per run:

  wall  iterations / wall time of the whole run (net setup and the two test passes included)
  loop  400 / time between the "Iteration 0" and "Iteration 400" log lines (training only; GLOG stamps)

The headline ratio is hcgen / bare (one thread), medians over the rounds; the goal is >= 0.95.
Usage: python benchmarks/bench_train.py [--iterations 500] [--rounds 3] [--mnist DIR]
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path

from hcgen.data import mnist
from hcgen.training.caffe_train import caffe_executable, train

REPO = Path(__file__).resolve().parents[1]
SOLVER = REPO / "models" / "lenet" / "lenet_solver.prototxt"
_STAMP = re.compile(r"^I(\d{8} \d\d:\d\d:\d\d\.\d+) .*\] Iteration (\d+), loss = ", re.M)


def loop_rate(log: str, last: int) -> float:
    """Iterations per second between the 'Iteration 0' and 'Iteration `last`' lines of a caffe log."""
    stamps = {int(it): datetime.strptime(t, "%Y%m%d %H:%M:%S.%f") for t, it in _STAMP.findall(log)}
    return last / (stamps[last] - stamps[0]).total_seconds()


def bare(solver: Path, out: Path, iterations: int, one_thread: bool) -> tuple[float, float]:
    out.mkdir()
    text = re.sub(r'snapshot_prefix: ".*"', f'snapshot_prefix: "{out / "lenet"}"', solver.read_text())
    (out / "solver.prototxt").write_text(text)
    env = {**os.environ, "GLOG_minloglevel": "0", "GLOG_logtostderr": "1"}
    env.pop("OPENBLAS_NUM_THREADS", None)
    if one_thread:
        env["OPENBLAS_NUM_THREADS"] = "1"
    started = time.perf_counter()
    with open(out / "train.log", "w") as log:
        subprocess.run([caffe_executable(), "train", f"--solver={out / 'solver.prototxt'}"], stdout=log,
                       stderr=subprocess.STDOUT, env=env, check=True)
    wall = time.perf_counter() - started
    return iterations / wall, loop_rate((out / "train.log").read_text(), 400)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=500, help="at least 400 (default: 500)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mnist", help="directory holding the MNIST files (default: hcgen's search)")
    args = parser.parse_args()
    if args.iterations < 400:
        parser.error("--iterations must be at least 400 (the loop rate spans iterations 0-400)")
    rates: dict[str, list[tuple[float, float]]] = {"hcgen train": [], "caffe train (1 thread)": [],
                                                   "caffe train (default threads)": []}
    with tempfile.TemporaryDirectory(prefix="bench_train.") as tmp:
        root = Path(tmp)
        mnist.convert_mnist(root, args.mnist)
        for r in range(args.rounds):
            started = time.perf_counter()
            result = train(SOLVER, root / f"hcgen{r}", seed=1, iterations=args.iterations,
                           train_lmdb=root / "mnist_train_lmdb", test_lmdb=root / "mnist_test_lmdb")
            wall = time.perf_counter() - started
            rates["hcgen train"].append((args.iterations / wall, loop_rate(result.log.read_text(), 400)))
            solver = root / f"hcgen{r}" / "solver.prototxt"
            rates["caffe train (1 thread)"].append(bare(solver, root / f"bare{r}", args.iterations, True))
            rates["caffe train (default threads)"].append(
                bare(solver, root / f"default{r}", args.iterations, False))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1][0]:.1f}/{v[-1][1]:.1f}" for k, v in rates.items()))

    print(f"\nLeNet, batch 64, {args.iterations} iterations, {os.cpu_count()} cores, medians of {args.rounds} "
          "rounds (it/s)")
    print(f"{'':32}{'wall':>8}{'loop':>8}")
    med = {k: (statistics.median(w for w, _ in v), statistics.median(lp for _, lp in v)) for k, v in rates.items()}
    for name, (wall, loop) in med.items():
        print(f"{name:32}{wall:8.1f}{loop:8.1f}")
    base = med["caffe train (1 thread)"]
    hc = med["hcgen train"]
    print(f"hcgen / bare caffe (1 thread): wall {hc[0] / base[0]:.3f}, loop {hc[1] / base[1]:.3f} (goal >= 0.95)")


if __name__ == "__main__":
    main()
