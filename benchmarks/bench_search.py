"""HC-D-1..9 searches on a trained Caffe LeNet: searches/s, forwards per search, share of raw forward speed.

    .venv/bin/python benchmarks/bench_search.py [--weights LENET.caffemodel] [--n 1000]

Without --weights a LeNet is trained first (3,000 iterations, results/bench/lenet). In one run it measures:
  raw      CaffeNet.scores on the same digits at the search's batch size (images/s)
  batched  adversarial_search over all (digit, HC-D-k) pairs at once
  single   the same searches one digit at a time (a subset), the baseline
and prints forwards per search, searches/s, the share of raw forward throughput the batched search
uses (forwards/search x searches/s / raw images/s) and the batched/single speed ratio.
Goal (issue 4): <= 10 forwards per search, >= 70% of raw throughput, >= 700 searches/s on 2 cores.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from hcgen.core import directions, search
from hcgen.backends.caffe import CaffeNet
from hcgen.data.mnist import load_mnist
from hcgen.experiments.table1.protocol import MODELS, caffemodel

DEPLOY = MODELS / "lenet_deploy.prototxt"


def trained_lenet(out: Path) -> Path:
    from hcgen.data.mnist import convert_mnist
    from hcgen.training.caffe_train import train

    convert_mnist(out / "mnist")
    train(MODELS / "lenet_solver.prototxt", out / "lenet", seed=1, iterations=3000,
          train_lmdb=out / "mnist" / "mnist_train_lmdb", test_lmdb=out / "mnist" / "mnist_test_lmdb")
    return caffemodel(out / "lenet")


def hc_directions(net: CaffeNet, x: np.ndarray, y: np.ndarray, h: np.ndarray) -> np.ndarray:
    ks = list(range(1, 10))
    grads = net.backward_from(x, np.stack([directions.omega_hc(h, y, k) for k in ks]))
    return np.stack([directions.normalize(g).eta for g in grads], axis=1)  # (N, 9, C, H, W)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=None)
    ap.add_argument("--n", type=int, default=1000, help="correctly classified test digits (default 1000)")
    ap.add_argument("--single", type=int, default=60, help="digits searched one at a time (default 60)")
    args = ap.parse_args()
    weights = args.weights or trained_lenet(Path("results/bench"))
    net = CaffeNet(DEPLOY, weights, batch_size=256)
    images, labels = load_mnist(None, "test")
    x, y = images[:, None][: args.n + 200], labels[: args.n + 200].astype(np.int64)
    pred, h = net.predict(x)
    ok = np.flatnonzero(pred == y)[: args.n]
    x, y, h = x[ok], y[ok], h[ok].astype(np.float64)
    eta = hc_directions(net, x, y, h)
    n_search = eta.shape[0] * eta.shape[1]

    calls = {"images": 0}

    def scores(batch: np.ndarray) -> np.ndarray:
        calls["images"] += len(batch)
        return net.scores(batch)

    t = time.perf_counter()
    res = search.adversarial_search(scores, x, eta, y, clean_scores=h)
    batched_s = time.perf_counter() - t
    forwards = calls["images"] / n_search
    # raw forward throughput at the batch size the search used on average
    batch = max(16, min(256, calls["images"] // max(res.rounds, 1)))
    probe = np.repeat(x, int(np.ceil(calls["images"] / len(x))), axis=0)[: calls["images"]]
    t = time.perf_counter()
    for start in range(0, len(probe), batch):
        net.scores(probe[start:start + batch])
    raw_ips = len(probe) / (time.perf_counter() - t)

    m = min(args.single, len(x))
    t = time.perf_counter()
    for i in range(m):
        search.adversarial_search(net.scores, x[i:i + 1], eta[i:i + 1], y[i:i + 1], clean_scores=h[i:i + 1])
    single_rate = m * eta.shape[1] / (time.perf_counter() - t)

    rate = n_search / batched_s
    print(f"searches: {n_search} (HC-D-1..9 on {len(x)} digits), found {res.success.mean():.1%}")
    print(f"forwards per search: {forwards:.2f} (goal <= 10)")
    print(f"raw Caffe forward at batch {batch}: {raw_ips:,.0f} images/s")
    print(f"batched search: {rate:,.0f} searches/s, uses {forwards * rate / raw_ips:.0%} of raw forward throughput")
    print(f"one digit at a time (baseline, {m} digits): {single_rate:,.0f} searches/s")
    print(f"ratio batched / single: {rate / single_rate:.1f}x")


if __name__ == "__main__":
    main()
