"""Batched PASS vs the naive per-pair loop on MNIST (issue 3: ≥ 5,000 pairs/s on 2 cores, ≥ 2.5× naive).

Pairs: MNIST test digit i vs the digit plus Gaussian noise (σ = --noise grey levels, rounded to
uint8), every --shift-every-th one replaced by the digit shifted by one pixel (down, up, right, left
in turn). Both scorers run in this process on the same pairs; the script checks that they agree and
prints pairs/s for each and the ratio. The naive loop is the spec written out: for each pair,
cv2.findTransformECC + cv2.warpPerspective, then skimage's structural_similarity, in one process.

The time goes into OpenCV's ECC, whose cost depends on the pairs: it iterates until the correlation
gain drops below 1e-5, which takes more iterations for noisier or shifted candidates. On this
machine, idle, ECC + warp alone does ~3,000 pairs/s per core at σ = 2, ~2,600 at σ = 2 with every
8th candidate shifted (the default, close to the ~2,700 the issue measured), and ~1,550 at σ = 4
with every 2nd shifted. The script prints the ECC-alone rate it saw, i.e. the ceiling for any
scorer that uses OpenCV's ECC on these pairs, and the load average: the cores may be shared.
pass_scores runs ECC on threads (cv2 releases the GIL): on 2 idle cores that scaled 1.9x, the same
as a process pool of 2 (measured with 16 chunks, warm and fresh pools), without pickling or start-up.

    .venv/bin/python benchmarks/bench_pass.py [--n 10000] [--jobs N] [--noise 2] [--shift-every 8]
"""
from __future__ import annotations

import argparse
import gzip
import os
import time
from pathlib import Path

import cv2
import numpy as np
from skimage.metrics import structural_similarity

from hcgen.core.metrics import ECC_CRITERIA, pass_scores

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def read_idx_images(path: Path) -> np.ndarray:
    raw = gzip.open(path, "rb").read()
    n, h, w = np.frombuffer(raw, ">u4", count=3, offset=4)
    return np.frombuffer(raw, np.uint8, offset=16).reshape(n, h, w)


def make_pairs(digits: np.ndarray, noise: float, shift_every: int, seed: int = 0) -> np.ndarray:
    """Noisy copies (σ = `noise`, rounded to uint8); every `shift_every`-th one a 1-px shift instead."""
    rng = np.random.default_rng(seed)
    candidates = np.round(np.clip(digits + rng.normal(0, noise, digits.shape), 0, 255)).astype(np.uint8)
    if shift_every:
        shifted = np.arange(shift_every - 1, len(digits), shift_every)
        for k, (axis, step) in enumerate([(1, 1), (1, -1), (2, 1), (2, -1)]):  # down, up, right, left
            idx = shifted[k::4]
            candidates[idx] = np.roll(digits[idx], step, axis=axis)
    return candidates


def naive(originals: np.ndarray, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The spec, one pair at a time with OpenCV's default threading: (scores, aligned_ok)."""
    scores, ok = np.empty(len(originals)), np.empty(len(originals), bool)
    h, w = originals.shape[1:]
    for i, (x, y) in enumerate(zip(originals, candidates)):
        x32, y32 = x.astype(np.float32), y.astype(np.float32)
        try:
            _, H = cv2.findTransformECC(x32, y32, np.eye(3, dtype=np.float32), cv2.MOTION_HOMOGRAPHY,
                                        ECC_CRITERIA, None, 1)
            ok[i] = np.isfinite(H).all()
        except cv2.error:
            ok[i] = False
        if ok[i]:
            y32 = cv2.warpPerspective(y32, H, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
        scores[i] = structural_similarity(y32.astype(np.float64), x32.astype(np.float64), gaussian_weights=True,
                                          sigma=1.5, use_sample_covariance=False, data_range=255)
    return scores, ok


def ecc_alone(originals: np.ndarray, candidates: np.ndarray) -> None:
    """ECC + warp only, one thread (OpenCV's threads off): the part no PASS scorer can avoid."""
    h, w = originals.shape[1:]
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    for x, y in zip(originals.astype(np.float32), candidates.astype(np.float32)):
        try:
            _, H = cv2.findTransformECC(x, y, np.eye(3, dtype=np.float32), cv2.MOTION_HOMOGRAPHY, ECC_CRITERIA, None, 1)
            cv2.warpPerspective(y, H, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
        except cv2.error:
            pass
    cv2.setNumThreads(threads)


def timed(f, *args):
    t0 = time.perf_counter()
    out = f(*args)
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10000, help="pairs (at most 10,000: the MNIST test set)")
    ap.add_argument("--jobs", type=int, default=None, help="pass_scores n_jobs (default: all cores)")
    ap.add_argument("--noise", type=float, default=2.0, help="σ of the Gaussian noise, grey levels")
    ap.add_argument("--shift-every", type=int, default=8, help="every K-th candidate is a 1-px shift (0: none)")
    ap.add_argument("--mnist", type=Path, default=MNIST, help="directory with t10k-images-idx3-ubyte.gz")
    args = ap.parse_args()

    x = read_idx_images(args.mnist / "t10k-images-idx3-ubyte.gz")[: args.n]
    y = make_pairs(x, args.noise, args.shift_every)
    n, cores = len(x), len(os.sched_getaffinity(0))
    pass_scores(x[:256], y[:256], n_jobs=args.jobs)  # warm-up (imports, caches, thread start)
    naive(x[:32], y[:32])
    load = os.getloadavg()[0]
    t_naive, (s_naive, ok_naive) = timed(naive, x, y)
    t_fast, (s_fast, ok_fast) = timed(pass_scores, x, y, args.jobs)
    t_ecc, _ = timed(ecc_alone, x, y)
    load_after = os.getloadavg()[0]

    diff = float(np.abs(s_fast - s_naive).max())
    same_flags = bool((ok_fast == ok_naive).all())
    rate_naive, rate_fast, rate_ecc = n / t_naive, n / t_fast, n / t_ecc
    shifts = f", 1 in {args.shift_every} shifted by 1 px instead" if args.shift_every else ""
    print(f"PASS on {n} MNIST test digits vs noisy copies (σ={args.noise:g}{shifts}); {cores} cores; "
          f"load average {load:.2f} before, {load_after:.2f} after")
    print(f"naive loop (cv2 ECC + skimage SSIM, one pair at a time): {rate_naive:6.0f} pairs/s")
    print(f"pass_scores (n_jobs={args.jobs or cores}):{'':25}{rate_fast:6.0f} pairs/s   "
          f"{rate_fast / rate_naive:.2f}x the naive loop")
    print(f"ECC + warp alone (1 thread, no SSIM):{'':18}{rate_ecc:6.0f} pairs/s per core -> {cores} cores: "
          f"{cores * rate_ecc:.0f} pairs/s; pass_scores reaches {rate_fast / (cores * rate_ecc):.0%} of that")
    print(f"same numbers: max |PASS difference| = {diff:.1e}, aligned flags identical: {same_flags}, "
          f"ECC did not converge for {int((~ok_fast).sum())} pairs")
    goal = rate_fast >= 5000 and rate_fast >= 2.5 * rate_naive
    print(f"goal (>= 5,000 pairs/s and >= 2.5x naive): {'met' if goal else 'NOT met'}")
    if diff > 1e-6 or not same_flags:
        raise SystemExit("pass_scores and the naive loop disagree")


if __name__ == "__main__":
    main()
