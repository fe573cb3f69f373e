"""Training speed inside the Table 1 graph against a standalone `caffe train`, in one run.

    .venv/bin/python benchmarks/bench_stage_rate.py [--iterations 1000] [--rounds 2] [--mnist DIR]

Setup (once): MNIST LMDBs, a 300-iteration base LeNet, and a mixed fine-tuning LMDB (the 60K digits,
shuffled, written by `mix_training_data` like every Table 1 row's). Then per round, in turn:

  caffe (stock)       bare `caffe train` of the stock LeNet solver (test phase every 500 iterations
                      and at the start) fine-tuning the base net on the mixed LMDB
  caffe (no tests)    the same with the solver the Table 1 stage renders (no test phase)
  stage               `run_stage` of Table 1's fine-tune stage function (hcgen train: solver
                      rendering, caffe train as a child, log parsing, snapshot checks, marker)
  caffe x2 / stage x2 two of each side by side (the stages on a 2-worker Dask LocalCluster, as
                      `hcgen table1 --dask` runs them)

Rates are iterations / wall seconds of each run (stages: the seconds in their `.stage.json`), and the
training loop alone (iteration 0 to the last displayed iteration, from caffe's log stamps). The
headline is stage / caffe (stock) alone and stage x2 / caffe x2, medians over the rounds; the goal is
>= 0.90.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hcgen.data import mnist  # noqa: E402
from hcgen.experiments.table1 import protocol as table1
from hcgen.stages import graph as stages  # noqa: E402
from hcgen.training.caffe_train import caffe_executable, train  # noqa: E402

_STAMP = re.compile(r"^I(\d{8} \d\d:\d\d:\d\d\.\d+) .*\] Iteration (\d+), loss = ", re.M)


def loop_rate(log: str) -> float:
    stamps = {int(it): datetime.strptime(t, "%Y%m%d %H:%M:%S.%f") for t, it in _STAMP.findall(log)}
    last = max(i for i in stamps if i > 0)
    return last / (stamps[last] - stamps[0]).total_seconds()


def bare_cmd(solver_text: str, out: Path, weights: Path) -> tuple[list[str], Path]:
    out.mkdir(parents=True)
    text = re.sub(r'snapshot_prefix: ".*"', f'snapshot_prefix: "{out / "lenet"}"', solver_text)
    (out / "solver.prototxt").write_text(text)
    return [caffe_executable(), "train", f"--solver={out / 'solver.prototxt'}", f"--weights={weights}"], out / "log"


def run_bare(jobs: list[tuple[list[str], Path]], iterations: int) -> list[tuple[float, float]]:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "GLOG_logtostderr": "1", "GLOG_minloglevel": "0"}
    started = time.perf_counter()
    procs = [subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env) for cmd, log in jobs]
    ends = []
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"caffe train failed: {p.args}")
        ends.append(time.perf_counter())
    return [(iterations / (end - started), loop_rate(log.read_text())) for (_, log), end in zip(jobs, ends)]


def stage_for(name: str, base: Path, mix: Path, mnist_dir: Path, seed: int, iterations: int) -> stages.Stage:
    return stages.Stage(name, lambda out, *_: table1._finetune(out, base, mix, mnist_dir, seed=seed,
                                                               iterations=iterations,
                                                               solver="lenet_solver.prototxt"), (), {"seed": seed})


def stage_rates(work: Path, graph: dict, iterations: int) -> list[tuple[float, float]]:
    keys = stages.folders(graph)
    out = []
    for name in graph:
        folder = work / keys[name]
        seconds = json.loads((folder / stages.DONE).read_text())["seconds"]
        out.append((iterations / seconds, loop_rate((folder / "train.log").read_text())))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--mnist", default=None)
    args = ap.parse_args()
    from hcgen.stages.dask_runner import run_dask

    results: dict[str, list[tuple[float, float]]] = {k: [] for k in
                                                     ("caffe (stock)", "caffe (no tests)", "stage", "caffe x2", "stage x2")}
    with tempfile.TemporaryDirectory(prefix="bench_stage_rate.") as tmp:
        root = Path(tmp)
        mnist.convert_mnist(root / "mnist", args.mnist)
        base = train(table1.MODELS / "lenet_solver.prototxt", root / "base", seed=1, iterations=300, test=False,
                     train_lmdb=root / "mnist" / "mnist_train_lmdb", test_lmdb=root / "mnist" / "mnist_test_lmdb")
        table1._shuffle(root / "mix", root / "mnist", 5)
        probe = root / "probe"  # the solver a stage renders, to run bare
        table1._finetune(probe, root / "base", root / "mix", root / "mnist", seed=3, iterations=args.iterations,
                         solver="lenet_solver.prototxt")
        no_tests = (probe / "solver.prototxt").read_text()
        stock = re.sub(r"test_interval: \d+\n", "test_interval: 500\n", no_tests).replace("test_initialization: false\n", "")
        for r in range(args.rounds):
            rd = root / f"round{r}"
            results["caffe (stock)"] += run_bare([bare_cmd(stock, rd / "stock", base.caffemodel)], args.iterations)
            results["caffe (no tests)"] += run_bare([bare_cmd(no_tests, rd / "bare", base.caffemodel)], args.iterations)
            g = {"ft": stage_for("ft", root / "base", root / "mix", root / "mnist", 3, args.iterations)}
            stages.run_sequential(g, rd / "stage")
            results["stage"] += stage_rates(rd / "stage", g, args.iterations)
            results["caffe x2"] += run_bare([bare_cmd(stock, rd / f"pair{i}", base.caffemodel) for i in range(2)],
                                            args.iterations)
            g2 = {f"ft{i}": stage_for(f"ft{i}", root / "base", root / "mix", root / "mnist", 3 + i, args.iterations)
                  for i in range(2)}
            run_dask(g2, rd / "dask", n_workers=2)
            results["stage x2"] += stage_rates(rd / "dask", g2, args.iterations)
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1][0]:.1f}" for k, v in results.items()), flush=True)
            shutil.rmtree(rd)
    med = {k: (statistics.median(w for w, _ in v), statistics.median(lp for _, lp in v)) for k, v in results.items()}
    print(f"\nLeNet fine-tune, batch 64, {args.iterations} iterations, {os.cpu_count()} cores, medians of "
          f"{args.rounds} rounds (x2: per process), it/s")
    print(f"{'':20}{'wall':>8}{'loop':>8}")
    for name, (wall, loop) in med.items():
        print(f"{name:20}{wall:8.1f}{loop:8.1f}")
    print(f"stage / caffe (stock), alone:        {med['stage'][0] / med['caffe (stock)'][0]:.3f}  (goal >= 0.90)")
    print(f"stage x2 / caffe x2, side by side:   {med['stage x2'][0] / med['caffe x2'][0]:.3f}  (goal >= 0.90)")
    print(f"stage / caffe training loop, alone:  {med['stage'][0] / med['caffe (stock)'][1]:.3f}")


if __name__ == "__main__":
    main()
