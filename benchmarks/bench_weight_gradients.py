"""A generation batch with and without Caffe's weight gradients, in the same run (patch 0006, issue 23).

    .venv/bin/python benchmarks/bench_weight_gradients.py [--weights LENET.caffemodel] [--digits 256] [--rounds 3]

`CaffeNet` switches off the parameter gradients that ``force_backward: true`` makes Caffe compute in every
backward pass (`hcgen.backends.caffe.set_weight_gradients`). This times `generate_batch` (the paper-rows
methods FGS, FGV, HC-D-1..9, x1.05 hard positives, PASS on one thread) on the same training digits with
them switched back on ("before") and off ("after"), rounds interleaved, and prints the medians, the ratio,
the backward passes' own times, and whether the records are identical. Without --weights a LeNet is trained
first (3,000 iterations, results/bench/lenet, as bench_search.py does).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from benchmarks.bench_search import DEPLOY, trained_lenet  # noqa: E402
from hcgen.backends.caffe import CaffeNet, set_weight_gradients  # noqa: E402
from hcgen.core.methods import parse_methods  # noqa: E402
from hcgen.data.mnist import load_mnist  # noqa: E402
from hcgen.generate.run import compute_directions, generate_batch  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=None, help="a trained LeNet caffemodel (default: train one)")
    ap.add_argument("--digits", type=int, default=256, help="MNIST training digits (default 256)")
    ap.add_argument("--batch", type=int, default=64, help="digits per generate_batch call (default 64)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of each (default 3)")
    args = ap.parse_args()
    weights = Path(args.weights) if args.weights else trained_lenet(Path("results/bench"))
    net = CaffeNet(DEPLOY, weights)
    if not net.input_gradients_only:
        print("this Caffe lacks patches/0006 (Layer.set_param_propagate_down): rebuild with `make caffe`")
        return 1
    images, labels = load_mnist(None, "train")
    x, y = images[:args.digits, None], labels[:args.digits].astype(np.int64)
    methods = parse_methods("fgs,fgv,hc-d:1-9")

    def generation() -> tuple[float, list]:
        t = time.perf_counter()
        out = [generate_batch(net, x[s:s + args.batch], y[s:s + args.batch], np.arange(s, min(s + args.batch, len(x))),
                              0, methods, [1.05], -1.0, n_jobs=1) for s in range(0, len(x), args.batch)]
        return time.perf_counter() - t, out

    def backward() -> float:
        h = net.scores(x).astype(np.float64)
        t = time.perf_counter()
        compute_directions(net, x, y, h, methods)  # one loss backward + 9 B_l per digit
        return time.perf_counter() - t

    times: dict[str, list[float]] = {"before": [], "after": []}
    back: dict[str, list[float]] = {"before": [], "after": []}
    records = {}
    for _ in range(args.rounds):
        for name, on in (("before", True), ("after", False)):
            set_weight_gradients(net.net, on)
            seconds, out = generation()
            times[name].append(seconds)
            back[name].append(backward())
            records[name] = out
    same = all(np.array_equal(a.images, b.images) and all(np.array_equal(a.metadata[c], b.metadata[c]) for c in a.metadata)
               and a.failures == b.failures for a, b in zip(records["before"], records["after"]))
    n = sum(len(r.images) for r in records["after"])
    print(f"{args.digits} training digits x 11 methods + x1.05, {n} records, medians of {args.rounds} rounds")
    for name in ("before", "after"):
        label = "weight gradients on (before)" if name == "before" else "weight gradients off (after)"
        print(f"{label:<32} generate_batch {statistics.median(times[name]):7.2f} s   "
              f"directions (backward) {statistics.median(back[name]):6.2f} s")
    print(f"ratio before / after: generation x{statistics.median(times['before']) / statistics.median(times['after']):.3f}, "
          f"backward x{statistics.median(back['before']) / statistics.median(back['after']):.3f}")
    print(f"records identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
