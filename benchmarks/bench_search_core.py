"""Forwards per search and throughput of hcgen.core.search vs plain doubling + bisection, without Caffe.

The oracle is a numpy MLP 784-1024-1024-10 (ReLU, ~1.8 M multiply-adds per image, about LeNet's 2.3 M)
trained for one epoch on 10,000 MNIST digits in this process; its input is x / 256 as in Caffe's LeNet.
Directions: FGS, FGV, HC-D-1, HC-D-3, HC-S-1 on the first --images test digits. Both searches are exact
at integer precision (same breakpoint arithmetic, hcgen.core.search._Rays). hcgen's results are rechecked
(adversarial, and the previous distinct integer image on the ray is not); the baseline's must agree in
status, and in eps wherever the ray crosses the boundary once.

    .venv/bin/python benchmarks/bench_search_core.py [--images 300] [--mnist DIR]

Prints forwards per search for both searches and their ratio, searches/s, and the fraction of raw
forward throughput (images/s of the model alone on full batches of 1000) that the search achieves.
Timings are wall-clock on a possibly shared machine; the forward counts are deterministic.
"""
from __future__ import annotations

import argparse
import gzip
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from hcgen.core import directions
from hcgen.core.search import Status, _Rays, _margin, adversarial_search, perturb

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def read_idx(path: Path) -> np.ndarray:
    raw = gzip.open(path, "rb").read()
    dims = np.frombuffer(raw, ">u4", count=raw[3], offset=4)
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * raw[3]).reshape(dims)


class MLP:
    """ReLU MLP on x / 256 with analytic input gradients (float32 weights, float64 scores)."""

    def __init__(self, sizes=(784, 1024, 1024, 10), seed=0):
        rng = np.random.default_rng(seed)
        self.W = [(rng.standard_normal((m, n)) * np.sqrt(2.0 / m)).astype(np.float32)
                  for m, n in zip(sizes[:-1], sizes[1:])]
        self.b = [np.zeros(n, np.float32) for n in sizes[1:]]

    def _forward(self, x):
        acts = [np.asarray(x, np.float32).reshape(len(x), -1) / 256]
        for i, (W, b) in enumerate(zip(self.W, self.b)):
            z = acts[-1] @ W + b
            acts.append(np.maximum(z, 0) if i < len(self.W) - 1 else z)
        return acts

    def scores(self, x):
        return self._forward(x)[-1].astype(np.float64)

    def _backward(self, acts, top):
        g = top.astype(np.float32)
        grads = []
        for i in range(len(self.W) - 1, -1, -1):
            grads.append((acts[i].T @ g, g.sum(0)))
            g = g @ self.W[i].T
            if i:
                g = g * (acts[i] > 0)
        return g / 256, grads[::-1]

    def backward_from(self, x, omega):
        """Image gradient of sum_j omega_j h_j (h = logits, the penultimate layer before softmax)."""
        g, _ = self._backward(self._forward(x), omega)
        return g.reshape(np.shape(x)).astype(np.float64)

    def loss_grad(self, x, y):
        acts = self._forward(x)
        p = np.exp(acts[-1] - acts[-1].max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p[np.arange(len(y)), y] -= 1
        g, _ = self._backward(acts, p)
        return g.reshape(np.shape(x)).astype(np.float64)

    def train(self, x, y, epochs=1, batch=128, lr=0.05, seed=0):
        rng = np.random.default_rng(seed)
        vel = [(np.zeros_like(W), np.zeros_like(b)) for W, b in zip(self.W, self.b)]
        for _ in range(epochs):
            for k in np.array_split(rng.permutation(len(x)), len(x) // batch):
                acts = self._forward(x[k])
                p = np.exp(acts[-1] - acts[-1].max(1, keepdims=True))
                p /= p.sum(1, keepdims=True)
                p[np.arange(len(k)), y[k]] -= 1
                _, grads = self._backward(acts, p / len(k))
                for i, (gW, gb) in enumerate(grads):
                    vel[i] = (0.9 * vel[i][0] - lr * gW, 0.9 * vel[i][1] - lr * gb)
                    self.W[i] += vel[i][0]
                    self.b[i] += vel[i][1]
        return self


class Counting:
    """Wraps scores_fn: counts images and time spent inside the model."""

    def __init__(self, fn):
        self.fn, self.images, self.calls, self.seconds = fn, 0, 0, 0.0

    def __call__(self, batch):
        t = time.perf_counter()
        out = self.fn(batch)
        self.seconds += time.perf_counter() - t
        self.images += len(batch)
        self.calls += 1
        return out


def baseline_search(scores_fn, x, eta, labels, step0=1.0):
    """Plain doubling from step0 (capped at saturation), then bisection of eps, exact on integer images.

    Batched like hcgen's search (one scores_fn call per round); returns (eps, status, forwards).
    """
    img = np.repeat(np.arange(len(x)), eta.shape[1])
    rays = _Rays(x.astype(np.float64), eta, img)
    y = labels[img]
    S = len(img)
    everything = np.arange(S)
    sat = rays.probe(everything, None, full=False).start
    lo, hi = np.zeros(S), np.full(S, np.inf)
    lo_next = rays.probe(everything, np.zeros(S), full=False).next
    status = np.where(np.isfinite(lo_next), -1, int(Status.NULL_DIRECTION))
    pred0, _ = _margin(scores_fn(x), labels)
    status[(pred0[img] != y) & (status == -1)] = Status.MISCLASSIFIED
    step = np.full(S, step0)
    forwards = np.zeros(S, np.int64)
    while (status == -1).any():
        idx = np.flatnonzero(status == -1)
        line = ~np.isfinite(hi[idx])
        target = np.where(line, np.minimum(step[idx], sat[idx]), 0.5 * (lo[idx] + hi[idx]))
        target = np.maximum(np.minimum(target, np.nextafter(hi[idx], -np.inf)), lo_next[idx])
        probe = rays.probe(idx, target)
        pred, _ = _margin(scores_fn(probe.images.reshape((-1,) + x.shape[1:])), y[idx])
        forwards[idx] += 1
        adv = pred != y[idx]
        hi[idx[adv]] = probe.start[adv]
        lo[idx[~adv]], lo_next[idx[~adv]] = probe.start[~adv], probe.next[~adv]
        step[idx] *= 2
        status[idx[np.isfinite(hi[idx]) & (lo_next[idx] >= hi[idx])]] = Status.FOUND
        status[idx[~np.isfinite(hi[idx]) & (lo[idx] >= sat[idx])]] = Status.NOT_ADVERSARIAL
    return hi, status, forwards


def check_minimal(model, x, eta, labels, res):
    """Recheck every found image (adversarial) and its predecessor (not): returns the number of
    violations, and how many of them are float32 noise (|margin| < 1e-4, since a float32 GEMM's rounding
    depends on the batch it runs in)."""
    i, j = np.nonzero(res.success)
    y = labels[i]
    pred_a, m_a = _margin(model.scores(perturb(x[i], eta[i, j], res.eps[i, j])), y)
    pred_p, m_p = _margin(model.scores(perturb(x[i], eta[i, j], res.eps_prev[i, j])), y)
    bad_a, bad_p = pred_a == y, pred_p != y
    noise = (bad_a & (np.abs(m_a) < 1e-4)) | (bad_p & (np.abs(m_p) < 1e-4))
    return int((bad_a | bad_p).sum()), int(noise.sum())


def raw_throughput(model, x, batch=1000, repeats=3):
    block = np.resize(x, (batch,) + x.shape[1:])
    model.scores(block)
    t = time.perf_counter()
    for _ in range(repeats):
        model.scores(block)
    return repeats * batch / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--mnist", type=Path, default=MNIST)
    ap.add_argument("--train", type=int, default=10000, help="training images for the MLP (one epoch)")
    args = ap.parse_args()

    xtr = read_idx(args.mnist / "train-images-idx3-ubyte.gz")[: args.train, None]
    ytr = read_idx(args.mnist / "train-labels-idx1-ubyte.gz")[: args.train].astype(np.int64)
    xte = read_idx(args.mnist / "t10k-images-idx3-ubyte.gz")[:2000, None]
    yte = read_idx(args.mnist / "t10k-labels-idx1-ubyte.gz")[:2000].astype(np.int64)
    t = time.perf_counter()
    model = MLP().train(xtr, ytr)
    acc = (model.scores(xte).argmax(1) == yte).mean()
    print(f"model: MLP 784-1024-1024-10, one epoch on {args.train} digits ({time.perf_counter() - t:.0f}s), "
          f"test accuracy {acc:.3f}")

    x, y = xte[: args.images], yte[: args.images]
    h = model.scores(x)
    back = lambda omega: model.backward_from(x, omega)  # noqa: E731
    g = model.loss_grad(x, y)
    dirs = {"FGS": directions.fgs(g), "FGV": directions.fgv(g),
            "HC-D-1": directions.hc_d(h, y, 1, back), "HC-D-3": directions.hc_d(h, y, 3, back),
            "HC-S-1": directions.hc_s(h, y, 1, back)}
    eta = np.stack([d.eta for d in dirs.values()], axis=1)

    raw_before = raw_throughput(model, x)
    ours_fn = Counting(model.scores)
    t = time.perf_counter()
    res = adversarial_search(ours_fn, x, eta, y, clean_scores=h)
    t_ours = time.perf_counter() - t
    raw_after = raw_throughput(model, x)
    base_fn = Counting(model.scores)
    t = time.perf_counter()
    eps_b, status_b, fw_b = baseline_search(base_fn, x, eta, y)
    t_base = time.perf_counter() - t
    status_b, fw_b, eps_b = (v.reshape(res.status.shape) for v in (status_b, fw_b, eps_b))

    ok = res.success
    bad, noise = check_minimal(model, x, eta, y, res)
    searched = np.isin(res.status, [Status.FOUND, Status.NOT_ADVERSARIAL])
    print(f"{res.status.size} searches ({args.images} images x {eta.shape[1]} directions): "
          f"{ok.sum()} found, {(res.status == Status.NOT_ADVERSARIAL).sum()} not adversarial, "
          f"{(res.status == Status.MISCLASSIFIED).sum()} misclassified, "
          f"{(res.status == Status.NULL_DIRECTION).sum()} null direction")
    print(f"minimality rechecked: {bad} violations ({noise} of them float32 noise, |margin| < 1e-4); "
          f"statuses equal to the baseline's: {np.array_equal(res.status, status_b)}; same eps: "
          f"{np.mean(res.eps[ok] == eps_b[ok]):.3f} (differs only where a ray crosses more than once)")
    print(f"{'forwards/search':>15} {'hcgen':>7} {'baseline':>9} {'ratio':>6}")
    for k, name in enumerate(dirs):
        f, b = res.forwards[:, k][ok[:, k]], fw_b[:, k][ok[:, k]]
        print(f"{name:>15} {f.mean():7.2f} {b.mean():9.2f} {f.mean() / b.mean():6.3f}")
    f, b = res.forwards[ok], fw_b[ok]
    print(f"{'all found':>15} {f.mean():7.2f} {b.mean():9.2f} {f.mean() / b.mean():6.3f}"
          f"   (max {f.max()} vs {b.max()}; {res.rounds} rounds vs {base_fn.calls - 1})")
    f, b = res.forwards[searched], fw_b[searched]
    print(f"{'incl. failures':>15} {f.mean():7.2f} {b.mean():9.2f} {f.mean() / b.mean():6.3f}")
    n = searched.sum()
    print(f"searches/s: hcgen {n / t_ours:.0f}, baseline {n / t_base:.0f} ({t_base / t_ours:.2f}x)")
    raw = 0.5 * (raw_before + raw_after)
    print(f"raw forward throughput {raw:.0f} images/s (batches of 1000; {raw_before:.0f} before, "
          f"{raw_after:.0f} after the search); the search evaluated {ours_fn.images / t_ours:.0f} images/s = "
          f"{ours_fn.images / t_ours / raw:.1%} of it, spending {ours_fn.seconds / t_ours:.1%} of its time "
          "in the model")


if __name__ == "__main__":
    main()
