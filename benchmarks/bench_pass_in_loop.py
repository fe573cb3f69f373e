"""What the OpenCV PASS costs inside an online hard-positive training step, against the rest of the step.

A torch LeNet (examples/torch_lenet.py: --weights, else trained here: 300 iterations on 6,400 digits)
fine-tuned for --steps steps on batches of --batch MNIST training digits; each step calls
`hcgen.torch.HardPositives` (--methods, x1.05 with PASS >= --tau, or --pass-band) and trains on the batch plus
its hard positives. Per step, the time of each part (clean scores, directions, search, scaling, PASS =
`hcgen.core.metrics.pass_scores` on one thread, the SGD step on batch + hard positives), summed over the steps, and
PASS's share of the whole step, in this thread's CPU time (the work itself, on a shared machine) and in wall
time. One torch thread; the load average is printed with the figures.

    nice -n 19 .venv/bin/python benchmarks/bench_pass_in_loop.py [--steps 5] [--pass-band 0.8 0.9]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import time
from pathlib import Path

import numpy as np
import torch

from hcgen.data.mnist import load_mnist
from hcgen.torch import HardPositives

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--methods", default="hc-d:1-9")
    parser.add_argument("--tau", type=float, default=0.8)
    parser.add_argument("--pass-band", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"))
    parser.add_argument("--weights", default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    spec = importlib.util.spec_from_file_location("torch_lenet_example", REPO / "examples" / "torch_lenet.py")
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    tx, ty = load_mnist(None, "train")
    model = ex.lenet()
    if args.weights:
        model.load_state_dict(torch.load(args.weights, weights_only=True))
    else:
        torch.manual_seed(1)
        model = ex.train(model, tx[:6400, None], ty[:6400], 300, seed=1)
    band = tuple(args.pass_band) if args.pass_band else None
    hp = HardPositives(model, methods=args.methods, scales=None if band else (1.05,), tau=args.tau, pass_band=band,
                       pass_jobs=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x_all = torch.from_numpy(np.array(tx[6400:6400 + args.steps * args.batch, None]))
    y_all = torch.from_numpy(ty[6400:6400 + args.steps * args.batch].astype(np.int64))
    names = ("scores", "directions", "search", "scale", "pass", "sgd step")
    parts = {c: dict.fromkeys(names, 0.0) for c in ("cpu", "wall")}
    kept = candidates = 0
    model.train()
    t_all = (time.perf_counter(), time.thread_time())
    for step in range(args.steps):
        x, y = x_all[step * args.batch:(step + 1) * args.batch], y_all[step * args.batch:(step + 1) * args.batch]
        x_hp, y_hp = hp(x, y)
        t = (time.perf_counter(), time.thread_time())
        loss = torch.nn.functional.cross_entropy(model(hp.preprocess(torch.cat([x, x_hp]).float())), torch.cat([y, y_hp]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        parts["wall"]["sgd step"] += time.perf_counter() - t[0]
        parts["cpu"]["sgd step"] += time.thread_time() - t[1]
        for key in names[:-1]:
            parts["wall"][key] += hp.last_stats["seconds"][key]
            parts["cpu"][key] += hp.last_stats["cpu_seconds"][key]
        kept += hp.last_stats["kept"]
        candidates += hp.last_stats["candidates"]
    total = {"wall": time.perf_counter() - t_all[0], "cpu": time.thread_time() - t_all[1]}
    load1 = os.getloadavg()
    what = f"PASS band {band[0]:g}-{band[1]:g}" if band else f"x1.05, PASS >= {args.tau:g}"
    print(f"torch {torch.__version__}, {args.threads} thread(s), PASS on 1 thread; load average {load0[0]:.2f} before, "
          f"{load1[0]:.2f} after (1 min)")
    print(f"{args.steps} steps of {args.batch} digits, {args.methods}, {what}: {candidates} candidates, {kept} kept")
    print(f"{'part':<12} {'CPU s/step':>11} {'share':>7} {'wall s/step':>12} {'share':>7}")
    for key in names:
        c, w = parts["cpu"][key], parts["wall"][key]
        print(f"{key:<12} {c / args.steps:>11.3f} {c / total['cpu']:>7.1%} {w / args.steps:>12.3f} {w / total['wall']:>7.1%}")
    c, w = total["cpu"], total["wall"]
    print(f"{'step':<12} {c / args.steps:>11.3f} {'':>7} {w / args.steps:>12.3f}")
    print(f"PASS / rest of the step: {parts['cpu']['pass'] / (c - parts['cpu']['pass']):.2f} in CPU time, "
          f"{parts['wall']['pass'] / (w - parts['wall']['pass']):.2f} in wall time")

if __name__ == "__main__":
    main()
