"""PASS, SSIM, ECC alignment and norms (hcgen.core.metrics) against references and the properties of Sec. 3."""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage.metrics import structural_similarity

from hcgen.core import metrics
from hcgen.core.metrics import (
    ECCNotConvergedWarning,
    align_ecc,
    align_ecc_batch,
    l2,
    l2_per_pixel,
    linf,
    pass_report,
    pass_score,
    pass_scores,
    perturbation_norms,
    ssim,
    ssim_batch,
)

MNIST_DIR = Path(os.environ.get("HCGEN_MNIST_DIR", Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"))


def read_idx_images(path: Path) -> np.ndarray:
    """A gzipped IDX3 ubyte file -> uint8 (N, H, W); independent of hcgen.data.mnist."""
    raw = gzip.open(path, "rb").read()
    n, h, w = np.frombuffer(raw, ">u4", count=3, offset=4)
    return np.frombuffer(raw, np.uint8, offset=16).reshape(n, h, w)


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    """The first 200 MNIST test digits (uint8, 28×28)."""
    path = MNIST_DIR / "t10k-images-idx3-ubyte.gz"
    if not path.is_file():
        pytest.skip(f"MNIST not found at {path} (set HCGEN_MNIST_DIR)")
    return read_idx_images(path)[:200].copy()


def skimage_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """The reference: scikit-image with the Wang et al. settings the paper uses."""
    return structural_similarity(
        np.asarray(a, np.float64), np.asarray(b, np.float64), gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False, data_range=255, channel_axis=-1 if np.ndim(a) == 3 else None,
    )


def naive_pass(x: np.ndarray, y: np.ndarray) -> tuple[float, bool]:
    """The spec written out for one grey pair: cv2 ECC + warp, then skimage SSIM."""
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    try:
        _, H = cv2.findTransformECC(x32, y32, np.eye(3, dtype=np.float32), cv2.MOTION_HOMOGRAPHY,
                                    (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 100, 1e-5), None, 1)
        y32 = cv2.warpPerspective(y32, H, x.shape[::-1], flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
        ok = True
    except cv2.error:
        ok = False
    return skimage_ssim(y32, x32), ok


def render(digit: np.ndarray, H: np.ndarray, scale: int = 4) -> np.ndarray:
    """A view of `digit` through homography H (28×28 pixel coordinates), rendered at `scale`× and averaged down.

    Resampling the 28×28 digit directly with bilinear interpolation blurs its 1-2 pixel strokes: even
    warping back with the exact inverse H gives SSIM ≈ 0.956 (measured on the first 200 test digits,
    3° rotation). Rendering the original (H = I) and the view the same way keeps that blur out of PASS.
    """
    big = cv2.resize(digit.astype(np.float32), None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
    S = np.diag([scale, scale, 1.0])
    big = cv2.warpPerspective(big, S @ H @ np.linalg.inv(S), big.shape[::-1], flags=cv2.INTER_LINEAR)
    small = cv2.resize(big, digit.shape[::-1], interpolation=cv2.INTER_AREA)
    return np.round(np.clip(small, 0, 255)).astype(np.uint8)


def motion(degrees: float = 0.0, dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
    """Rotation about the digit's centre, then a shift."""
    H = np.vstack([cv2.getRotationMatrix2D((13.5, 13.5), degrees, 1.0), [0.0, 0.0, 1.0]])
    H[:2, 2] += dx, dy
    return H


MILD_HOMOGRAPHY = np.array([[1.02, 0.03, -0.3], [-0.02, 0.99, 0.4], [4e-4, -3e-4, 1.0]])
NOT_ONES = [0, 1, 3, 4, 6, 7, 8, 9]  # the first ten test digits except the two "1"s (indices 2 and 5)


# --------------------------------------------------------------------------- SSIM = skimage's


@pytest.mark.parametrize("shape", [(28, 28), (11, 11), (37, 23), (28, 28, 3), (16, 40, 3)])
def test_ssim_equals_skimage_on_random_images(shape):
    rng = np.random.default_rng(sum(shape))
    x = rng.integers(0, 256, (6, *shape)).astype(np.uint8)
    y = np.clip(x + rng.normal(0, 30, x.shape), 0, 255)  # float candidate
    want = np.array([skimage_ssim(a, b) for a, b in zip(x, y)])
    np.testing.assert_allclose(ssim_batch(x, y), want, rtol=0, atol=1e-6)
    assert ssim(x[0], y[0]) == pytest.approx(want[0], abs=1e-6)


def test_ssim_equals_skimage_on_mnist_pairs(digits):
    rng = np.random.default_rng(0)
    x = digits[:100]
    y = np.clip(x + rng.normal(0, 20, x.shape), 0, 255).astype(np.uint8)
    y[::2] = digits[100:200:2]  # also pairs of different digits
    want = np.array([skimage_ssim(a, b) for a, b in zip(x, y)])
    np.testing.assert_allclose(ssim_batch(x, y), want, rtol=0, atol=1e-6)


def test_colour_ssim_is_the_channel_mean_and_grey_channel_axis_is_dropped(digits):
    x = np.stack([digits[0], digits[1], digits[3]], axis=-1)
    y = np.stack([digits[4], digits[1], np.roll(digits[3], 1, axis=1)], axis=-1)
    assert ssim(x, y) == pytest.approx(skimage_ssim(x, y), abs=1e-6)
    assert ssim(x, y) == pytest.approx(np.mean([ssim(x[..., c], y[..., c]) for c in range(3)]), abs=1e-12)
    assert ssim(digits[0][..., None], digits[4][..., None]) == ssim(digits[0], digits[4])


# --------------------------------------------------------------------------- PASS properties (Sec. 3)


def test_pass_of_an_image_with_itself_is_one(digits):
    scores, ok = pass_scores(digits[:20], digits[:20])
    np.testing.assert_allclose(scores, 1.0, atol=1e-9)
    assert ok.all()
    colour = np.random.default_rng(1).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    assert pass_score(colour, colour) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize(
    "H",
    [motion(dx=1), motion(dy=2), motion(dx=-1, dy=1), motion(degrees=2, dy=1), motion(degrees=-3, dx=1),
     MILD_HOMOGRAPHY],
    ids=["shift 1,0", "shift 0,2", "shift -1,1", "rotate 2° + shift", "rotate -3° + shift", "homography"],
)
def test_pass_forgives_small_geometric_changes_that_plain_ssim_punishes(digits, H):
    """Eq. 4 on views of 8 MNIST test digits (not the "1"s: see the next test).

    Thresholds from the spec (PASS ≥ 0.98) on the median digit; every digit ≥ 0.97 (after a 2-3°
    rotation the aligned bilinear resampling itself costs ~0.01); plain SSIM at least 0.05 lower.
    """
    x = np.stack([render(d, np.eye(3)) for d in digits[NOT_ONES]])
    y = np.stack([render(d, H) for d in digits[NOT_ONES]])
    scores, ok = pass_scores(x, y)
    plain = ssim_batch(x, y)
    assert ok.all()
    assert np.median(scores) >= 0.98 and scores.min() >= 0.97, scores
    assert np.median(plain) <= np.median(scores) - 0.05, plain
    assert (plain < scores).all()


def test_ecc_gives_up_on_shifted_ones_and_pass_falls_back_to_plain_ssim(digits):
    """A "1" is a thin vertical stroke: a horizontal shift is nearly unobservable for an 8-parameter
    homography and OpenCV's ECC stops with StsNoConv (test digits 2 and 5, found by inspection)."""
    ones = digits[[2, 5]]
    shifted = np.stack([render(d, motion(dx=1)) for d in ones])
    ones = np.stack([render(d, np.eye(3)) for d in ones])
    scores, ok = pass_scores(ones, shifted)
    assert not ok.any()
    np.testing.assert_allclose(scores, ssim_batch(ones, shifted), atol=1e-12)
    with pytest.warns(ECCNotConvergedWarning, match="did not converge; PASS is plain SSIM"):
        assert pass_score(ones[0], shifted[0]) == pytest.approx(scores[0], abs=1e-12)


def test_pass_falls_with_noise_amplitude(digits):
    noise = np.random.default_rng(0).standard_normal((28, 28))
    amplitudes = [0, 2, 4, 8, 16, 32, 64, 128]
    for d in digits[:10]:
        y = np.stack([np.clip(d + a * noise, 0, 255) for a in amplitudes])
        scores, _ = pass_scores(np.repeat(d[None], len(amplitudes), axis=0), y)
        assert scores[0] == pytest.approx(1.0, abs=1e-9)
        assert (np.diff(scores) < 0).all(), scores


@pytest.mark.parametrize("candidate", ["uniform noise", "black"])
def test_uncorrelated_candidates_are_flagged_not_crashed(digits, candidate):
    rng = np.random.default_rng(3)
    y = rng.integers(0, 256, (8, 28, 28)).astype(np.uint8) if candidate == "uniform noise" else np.zeros((8, 28, 28))
    scores, ok = pass_scores(digits[:8], y)
    assert not ok.any()
    np.testing.assert_allclose(scores, ssim_batch(digits[:8], y), atol=1e-12)
    aligned, H, ok1 = align_ecc(digits[0], y[0])
    assert not ok1 and (H == np.eye(3)).all() and (aligned == y[0]).all()


def test_non_finite_homography_is_flagged(digits, monkeypatch):
    monkeypatch.setattr(metrics.cv2, "findTransformECC", lambda *a: (1.0, np.full((3, 3), np.nan, np.float32)))
    scores, ok = pass_scores(digits[:3], digits[3:6])
    assert not ok.any()
    np.testing.assert_allclose(scores, ssim_batch(digits[:3], digits[3:6]), atol=1e-12)


def test_opencv_errors_other_than_non_convergence_propagate(digits, monkeypatch):
    def broken(*args):
        raise cv2.error("not an ECC convergence problem")

    monkeypatch.setattr(metrics.cv2, "findTransformECC", broken)
    for n in (3, 150):  # in the caller's thread, and from the thread pool
        with pytest.raises(cv2.error, match="not an ECC convergence problem"):
            pass_scores(digits[:n], digits[-n:], n_jobs=2)


# --------------------------------------------------------------------------- batched = exact


def test_batched_pass_equals_the_naive_per_pair_loop(digits):
    rng = np.random.default_rng(5)
    x = digits[:150]  # above the threshold for the thread pool
    y = np.clip(x + rng.normal(0, 8, x.shape), 0, 255).astype(np.uint8)
    y[1::3] = np.roll(y[1::3], 1, axis=2)
    y[2::7] = rng.integers(0, 256, y[2::7].shape)  # some non-convergence
    want = [naive_pass(a, b) for a, b in zip(x, y)]
    cv_threads = cv2.getNumThreads()
    for n_jobs in (1, 2):
        scores, ok = pass_scores(x, y, n_jobs=n_jobs)
        assert cv2.getNumThreads() == cv_threads  # restored after the batch
        np.testing.assert_allclose(scores, [s for s, _ in want], rtol=0, atol=1e-6)
        assert ok.tolist() == [k for _, k in want]
        assert not ok.all() and ok.any()
    assert pass_score(x[0], y[0]) == pytest.approx(want[0][0], abs=1e-6)


def test_colour_alignment_uses_luma_and_warps_every_channel(digits):
    d = render(digits[0], np.eye(3))
    x = np.stack([d, d // 2 + 40, d // 4 + 100], axis=-1).astype(np.uint8)  # B, G, R
    y = np.stack([render(c, motion(dx=1, dy=-1)) for c in np.moveaxis(x, -1, 0)], axis=-1)
    aligned, H, ok = align_ecc(x, y)
    assert ok and aligned.shape == x.shape and aligned.dtype == np.float32
    np.testing.assert_allclose(H[:2, 2], [1, -1], atol=0.05)  # warp from original to candidate coordinates
    assert pass_score(x, y) >= 0.98 > 0.8 > ssim(x, y)
    luma = (x.astype(np.float32) @ np.float32([0.114, 0.587, 0.299]))
    np.testing.assert_allclose(luma, cv2.cvtColor(x.astype(np.float32), cv2.COLOR_BGR2GRAY), atol=1e-3)


def test_align_ecc_batch_matches_align_ecc(digits):
    y = np.roll(digits[:5], 1, axis=1)
    aligned, H, ok = align_ecc_batch(digits[:5], y)
    for i in range(5):
        a1, h1, ok1 = align_ecc(digits[i], y[i])
        assert ok1 == ok[i] and (a1 == aligned[i]).all() and (h1 == H[i]).all()


def test_empty_batch():
    scores, ok = pass_scores(np.zeros((0, 28, 28)), np.zeros((0, 28, 28)))
    assert scores.shape == ok.shape == (0,)


# --------------------------------------------------------------------------- norms


def test_norms_of_the_perturbation():
    x = np.full((28, 28), 200, np.uint8)
    y = x.copy()
    y[3, 4], y[5, 6] = 10, 203  # uint8 subtraction would wrap around
    assert linf(x, y) == 190
    assert l2(x, y) == pytest.approx(np.hypot(190, 3))
    assert l2_per_pixel(x, y) == pytest.approx(np.hypot(190, 3) / 784)
    colour = np.zeros((28, 28, 3))
    colour2 = colour.copy()
    colour2[0, 0] = 2.0
    assert l2_per_pixel(colour, colour2) == pytest.approx(np.sqrt(12) / 784)  # m = H·W pixels
    n = perturbation_norms(np.stack([x, x]), np.stack([x, y]))
    np.testing.assert_allclose(n["linf"], [0, 190])


def test_pass_report_columns(digits):
    r = pass_report(digits[:4], np.roll(digits[:4], 1, axis=2))
    assert set(r) == {"pass", "ssim", "l2", "l2_per_pixel", "linf", "aligned_ok"}
    assert all(len(v) == 4 for v in r.values())
    assert r["aligned_ok"].tolist() == [True, True, False, True]  # digit 2 is a "1" (see above)
    np.testing.assert_allclose(r["pass"][2], r["ssim"][2], atol=1e-12)
    assert (r["pass"][[0, 1, 3]] > r["ssim"][[0, 1, 3]] + 0.3).all()


# --------------------------------------------------------------------------- input errors


GOOD = np.zeros((28, 28), np.uint8)


@pytest.mark.parametrize(
    "original, candidate, match",
    [
        (GOOD, np.zeros((28, 27)), r"shapes differ: \(28, 28\) vs \(28, 27\)"),
        (GOOD, np.zeros((28, 28, 3)), "shapes differ"),
        (np.zeros(28), np.zeros(28), r"shape \(28,\); expected \(H, W\) or \(H, W, C\)"),
        (np.zeros((2, 2, 28, 28)), np.zeros((2, 2, 28, 28)), "2 channels|expected"),
        (np.zeros((28, 28, 4)), np.zeros((28, 28, 4)), "4 channels; .*drop an alpha channel"),
        (np.zeros((10, 28)), np.zeros((10, 28)), r"10×28 pixels; SSIM needs at least 11×11"),
        (GOOD, np.full((28, 28), -1.0), r"values in \[-1, -1\]; pixel values must lie in \[0, 255\]"),
        (GOOD, np.full((28, 28), 256.0), r"values in \[256, 256\]"),
        (GOOD, np.full((28, 28), 300, np.int32), r"values in \[300, 300\]"),
        (GOOD, np.full((28, 28), np.nan), "NaN or infinite"),
        (GOOD, np.zeros((28, 28), bool), "dtype bool; pass uint8 or float"),
        (GOOD, np.zeros((28, 28), complex), "dtype complex128"),
        (np.full((28, 28), "a"), GOOD, "original has dtype <U1"),
    ],
)
def test_single_pair_input_errors(original, candidate, match):
    for f in (pass_score, ssim, align_ecc, l2, linf):
        with pytest.raises(ValueError, match=match):
            f(original, candidate)


@pytest.mark.parametrize(
    "originals, candidates, kwargs, match",
    [
        (GOOD, GOOD, {}, r"originals has shape \(28, 28\); expected \(N, H, W\).*single image\? use pass_score"),
        (np.zeros((2, 28, 28, 2)), np.zeros((2, 28, 28, 2)), {}, "2 channels.*transpose Caffe"),
        (np.zeros((2, 1, 28, 28)), np.zeros((2, 1, 28, 28)), {}, r"28 channels.*a.transpose\(0, 2, 3, 1\)"),
        (np.zeros((2, 28, 28)), np.zeros((3, 28, 28)), {}, "shapes differ"),
        (np.zeros((2, 28, 28)), np.zeros((2, 28, 28)), {"n_jobs": 0}, "n_jobs must be a positive integer or None"),
        (np.zeros((2, 28, 28)), np.zeros((2, 28, 28)), {"n_jobs": 1.5}, "n_jobs must be a positive integer"),
    ],
)
def test_batch_input_errors(originals, candidates, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pass_scores(originals, candidates, **kwargs)
    if not kwargs:
        for f in (ssim_batch, align_ecc_batch, perturbation_norms, pass_report):
            with pytest.raises(ValueError, match=match):
                f(originals, candidates)


def test_hcgen_threads_sets_the_default_thread_count(monkeypatch):
    """A single-threaded Dask worker (HCGEN_THREADS=1) must not run 2 ECC threads beside another worker."""
    from concurrent import futures

    from hcgen.core import metrics

    started = []
    real = futures.ThreadPoolExecutor

    def spy(max_workers=None, **kw):
        started.append(max_workers)
        return real(max_workers=max_workers, **kw)

    monkeypatch.setattr(metrics, "ThreadPoolExecutor", spy)
    x = np.zeros((600, 28, 28), np.uint8)
    x[:, 8:20, 8:20] = 200
    monkeypatch.setenv("HCGEN_THREADS", "1")
    one, ok1 = pass_scores(x, x)
    assert started == []  # one thread: no pool at all
    monkeypatch.setenv("HCGEN_THREADS", "2")
    two, ok2 = pass_scores(x, x)
    assert started == [2] and np.array_equal(one, two) and np.array_equal(ok1, ok2)
    assert pass_scores(x, x, n_jobs=1)[0].tolist() == one.tolist() and started == [2]  # n_jobs wins
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("HCGEN_THREADS", bad)
        with pytest.raises(ValueError, match="HCGEN_THREADS must be a positive integer"):
            pass_scores(x, x)
