"""PASS, SSIM, ECC alignment and L2 / L∞ of a perturbation (Rozsa et al. 2016, Sec. 3, Eq. 1-4).

**PASS** (perceptual adversarial similarity score) measures how similar a candidate image x̃ looks
to its original x once small geometric changes are forgiven: x̃ is first aligned to x by the
homography H that maximises the enhanced correlation coefficient (ECC, Eq. 1), then compared to x
with SSIM (Eq. 2-3): PASS(x̃, x) = SSIM(ψ(x̃, x), x) (Eq. 4), a number in [-1, 1] that is 1 for
identical images and stays close to 1 for a slightly shifted or rotated copy, where plain SSIM and
L_p norms drop. `pass_score(x, x_adv)` scores one pair; `pass_scores(xs, xs_adv)` scores a batch,
with SSIM vectorised over the batch and the ECC alignments spread over the CPU cores. When ECC does
not converge the pair is scored with plain SSIM and flagged (`aligned_ok` False, or a
`ECCNotConvergedWarning` for a single pair).

Conventions
-----------
- Images: pixel values in [0, 255] (uint8 or float), grey (H, W) or colour (H, W, C=3) in OpenCV /
  Caffe BGR order; batches are (N, H, W) or (N, H, W, 3). A trailing channel axis of 1 means grey.
  H and W must be at least 11 (the SSIM window).
- Alignment ψ (Eq. 1): ``cv2.findTransformECC(template=x, input=x̃, warp=I₃, MOTION_HOMOGRAPHY,
  criteria=(COUNT|EPS, 100, 1e-5), inputMask=None, gaussFiltSize=1)`` on float32 images, then
  ``cv2.warpPerspective(x̃, H, (W, H), INTER_LINEAR | WARP_INVERSE_MAP)`` with border 0; the aligned
  image stays float32 (not rounded). Colour: H is estimated on the luma images
  Y = 0.114 B + 0.587 G + 0.299 R (ITU-R BT.601, as ``cv2.COLOR_BGR2GRAY``) and every channel is
  warped. If OpenCV reports non-convergence (``cv2.error``, code StsNoConv) or H is not finite, ψ is
  the identity, i.e. PASS falls back to plain SSIM, and the pair is flagged.
- SSIM (Eq. 2-3; Wang et al. 2004): Gaussian weights 11×11, σ = 1.5, K1 = 0.01, K2 = 0.03,
  L = 255, α = β = γ = 1 (so C3 = C2 / 2), population (not sample) covariances, mean of the SSIM
  map over the valid region (the 18×18 centre of a 28×28 image; no padding), computed in float64.
  This is the number ``skimage.metrics.structural_similarity(a, b, gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, data_range=255)`` returns; colour: mean over channels.
- Norms of the perturbation δ = x̃ − x (unaligned, in [0, 255] units, over all values):
  L2 = ‖δ‖₂, L∞ = max |δ|, and "L2 per pixel" = ‖δ‖₂ / m with m = H·W the number of pixels
  (the m of Eq. 3). The paper prints "L2 norm per pixel" in Fig. 2-3 without defining it; this is
  the literal reading. It is not the RMS difference sqrt(‖δ‖₂² / m).

Notes
-----
Speed: almost all the time is OpenCV's ECC (more for noisier or shifted candidates: it iterates until
the correlation gain falls below 1e-5); SSIM adds little. `pass_scores` runs ECC on `n_jobs` threads
(cv2 releases the GIL) with OpenCV's own threads switched off meanwhile. The times per pair are in
benchmarks/README.md (benchmarks/bench_pass.py measures both against the naive per-pair loop). Switching OpenCV's thread count is process-wide: avoid calling
OpenCV elsewhere in parallel with a batch if you rely on its threads.

ECC: G. D. Evangelidis, E. Z. Psarakis, "Parametric image alignment using enhanced correlation
coefficient maximization", IEEE TPAMI 30(10), 2008. SSIM: Z. Wang, A. C. Bovik, H. R. Sheikh,
E. P. Simoncelli, "Image quality assessment: from error visibility to structural similarity",
IEEE TIP 13(4), 2004.
"""
from __future__ import annotations

import functools
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

from hcgen.errors import BadInput

# SSIM (Eq. 2-3), Wang et al. settings.
SIGMA = 1.5
WIN_SIZE = 11  # = 2 * int(3.5 * SIGMA + 0.5) + 1, skimage's window for gaussian_weights=True
K1, K2 = 0.01, 0.03
DATA_RANGE = 255.0
C1 = (K1 * DATA_RANGE) ** 2
C2 = (K2 * DATA_RANGE) ** 2

# ECC alignment (Eq. 1).
ECC_CRITERIA = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 100, 1e-5)
ECC_GAUSS_FILT_SIZE = 1
LUMA_BGR = np.array([0.114, 0.587, 0.299], dtype=np.float32)  # ITU-R BT.601, as cv2.COLOR_BGR2GRAY

_CHUNK = 64  # pairs per alignment task
_MIN_PARALLEL = 2 * _CHUNK  # below this a thread pool costs more than it saves
_SSIM_PIXELS = 32 * 28 * 28  # pixels per SSIM step: 32 MNIST pairs, whose planes stay in cache
_local = threading.local()


class ECCNotConvergedWarning(RuntimeWarning):
    """ECC alignment did not converge; the score is plain SSIM (ψ = identity)."""


# --------------------------------------------------------------------------- input checks


def _as_images(a: np.ndarray, name: str, batch: bool) -> np.ndarray:
    """Validate one image (batch=False) or a batch; return it with a channel axis of 1 dropped."""
    a = np.asarray(a)
    if a.dtype == bool or a.dtype.kind not in "uif":
        raise BadInput(f"{name} has dtype {a.dtype}; pass uint8 or float pixel values in [0, 255]")
    lead = 1 if batch else 0
    layout = "(N, H, W) or (N, H, W, C)" if batch else "(H, W) or (H, W, C)"
    if a.ndim not in (lead + 2, lead + 3):
        hint = " (a single image? use pass_score / ssim / align_ecc)" if batch and a.ndim == 2 else ""
        raise BadInput(f"{name} has shape {a.shape}; expected {layout}{hint}")
    if a.ndim == lead + 3:
        c = a.shape[-1]
        if c == 1:
            a = a[..., 0]
        elif c != 3:
            raise BadInput(
                f"{name} has shape {a.shape}: {c} channels; expected channels-last {layout} with C = 1 "
                "(grey) or 3 (BGR); drop an alpha channel, and transpose Caffe (N, C, H, W) arrays "
                "with a.transpose(0, 2, 3, 1)"
            )
    h, w = a.shape[lead : lead + 2]
    if h < WIN_SIZE or w < WIN_SIZE:
        raise BadInput(f"{name} is {h}×{w} pixels; SSIM needs at least {WIN_SIZE}×{WIN_SIZE}")
    if a.dtype != np.uint8 and a.size:
        lo, hi = np.min(a), np.max(a)
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise BadInput(f"{name} contains NaN or infinite values; pixel values must be finite in [0, 255]")
        if lo < 0 or hi > DATA_RANGE:
            raise BadInput(
                f"{name} has values in [{lo:g}, {hi:g}]; pixel values must lie in [0, 255] "
                "(clip the candidate, or scale [0, 1] images by 255)"
            )
    return a


def _check_pair(original, candidate, batch: bool) -> tuple[np.ndarray, np.ndarray]:
    x = _as_images(original, "original" + ("s" if batch else ""), batch)
    y = _as_images(candidate, "candidate" + ("s" if batch else ""), batch)
    if x.shape != y.shape:
        raise BadInput(
            f"original and candidate shapes differ: {np.shape(original)} vs {np.shape(candidate)}; "
            "PASS compares images of the same size and number of channels"
        )
    return x, y


def _n_workers(n_jobs: int | None) -> int:
    """Threads for ECC: `n_jobs`, else $HCGEN_THREADS (a Dask worker sets 1: one core each), else all cores."""
    if n_jobs is None:
        env = os.environ.get("HCGEN_THREADS", "").strip()
        if env:
            if not env.isdigit() or int(env) < 1:
                raise BadInput(f"HCGEN_THREADS must be a positive integer; got {env!r}")
            return int(env)
        return len(os.sched_getaffinity(0))
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, (int, np.integer)) or n_jobs < 1:
        raise BadInput(f"n_jobs must be a positive integer or None (all available cores); got {n_jobs!r}")
    return int(n_jobs)


# --------------------------------------------------------------------------- SSIM (Eq. 2-3)


@functools.lru_cache(maxsize=None)
def _valid_gaussian(n: int) -> np.ndarray:
    """(n, n - 10) matrix M such that v @ M is v correlated with the 11-tap Gaussian, valid part only."""
    r = WIN_SIZE // 2
    t = np.arange(-r, r + 1, dtype=np.float64)
    g = np.exp(-0.5 / SIGMA**2 * t**2)
    g /= g.sum()  # the kernel of scipy.ndimage.gaussian_filter(sigma=1.5, truncate=3.5)
    m = np.zeros((n, n - 2 * r))
    for j in range(n - 2 * r):
        m[j : j + WIN_SIZE, j] = g
    m.setflags(write=False)
    return m


def _workspace(k: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """This thread's float64 buffers for k planes of h×w, reused: fresh ones cost as much as the GEMMs."""
    ws = getattr(_local, "ssim", None)
    if ws is None or ws[0] != (k, h, w):
        r = WIN_SIZE - 1
        ws = (k, h, w), np.empty((4, k, h, w)), np.empty((4 * k, h - r, w)), np.empty((4 * k, h - r, w - r))
        _local.ssim = ws
    return ws[1:]


def _ssim_planes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Mean SSIM of each pair of 2-D planes x[i], y[i] (shape (M, H, W), any real dtype) -> (M,) float64."""
    m, h, w = x.shape
    gw, gh = _valid_gaussian(w), _valid_gaussian(h)
    step = max(1, _SSIM_PIXELS // (h * w))
    out = np.empty(m)
    for lo in range(0, m, step):
        k = min(step, m - lo)
        s, half, z = _workspace(k, h, w)
        # Planes x, y, x² + y², xy: Eq. 2 needs σx² + σy² only as a sum.
        s[0], s[1] = x[lo : lo + k], y[lo : lo + k]
        np.multiply(s[0], s[0], out=s[2])
        np.multiply(s[1], s[1], out=s[3])
        s[2] += s[3]
        np.multiply(s[0], s[1], out=s[3])
        # Separable Gaussian weighting over the valid region, G_hᵀ · plane · G_w, one small GEMM per
        # plane: one big GEMM would let OpenBLAS start threads that fight the ECC workers.
        np.matmul(gh.T, s.reshape(4 * k, h, w), out=half)
        np.matmul(half, gw, out=z)
        mu_x, mu_y, e_xx_yy, e_xy = z.reshape(4, k, -1)
        mu_xy = mu_x * mu_y
        mu_xx_yy = mu_x * mu_x + mu_y * mu_y
        # Eq. 2 with α = β = γ = 1 and C3 = C2 / 2: (2 μx μy + C1)(2 σxy + C2) / ((μx² + μy² + C1)(σx² + σy² + C2))
        num = (2 * mu_xy + C1) * (2 * (e_xy - mu_xy) + C2)
        den = (mu_xx_yy + C1) * (e_xx_yy - mu_xx_yy + C2)
        out[lo : lo + k] = (num / den).mean(axis=1)  # Eq. 3
    return out


def _ssim_images(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """SSIM of validated batches (N, H, W) or (N, H, W, 3); colour: mean over channels."""
    if x.ndim == 3:
        return _ssim_planes(x, y)
    n, h, w, c = x.shape
    per_channel = _ssim_planes(np.moveaxis(x, -1, 1).reshape(n * c, h, w), np.moveaxis(y, -1, 1).reshape(n * c, h, w))
    return per_channel.reshape(n, c).mean(axis=1)


def ssim(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM (Eq. 3) of two images, Wang et al. settings (see the module docstring)."""
    a, b = _check_pair(x, y, batch=False)
    return float(_ssim_images(a[None], b[None])[0])


def ssim_batch(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """SSIM (Eq. 3) of each pair of a batch (N, H, W) or (N, H, W, 3) -> (N,) float64."""
    a, b = _check_pair(xs, ys, batch=True)
    return _ssim_images(a, b)


# --------------------------------------------------------------------------- ECC alignment (Eq. 1)


def _luma(a: np.ndarray) -> np.ndarray:
    """float32 grey images for ECC: the image itself, or Y = 0.114 B + 0.587 G + 0.299 R."""
    a = a.astype(np.float32)
    return a if a.ndim == 3 else np.ascontiguousarray(a @ LUMA_BGR)


class _Aligner:
    """Per-batch buffers; `run(lo, hi)` aligns pairs lo..hi-1 and may score them (thread-safe by range)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, score: bool):
        self.x = x
        self.template, self.input = _luma(x), _luma(y)
        self.candidate = np.ascontiguousarray(y, dtype=np.float32)
        self.aligned = np.empty_like(self.candidate)
        self.homography = np.empty((len(x), 3, 3), dtype=np.float32)
        self.ok = np.empty(len(x), dtype=bool)
        self.score = np.empty(len(x)) if score else None

    def run(self, lo: int, hi: int) -> None:
        h, w = self.template.shape[1:]
        eye = np.eye(3, dtype=np.float32)
        hom = self.homography
        hom[lo:hi] = eye  # ECC's initial warp
        for i in range(lo, hi):
            try:
                _, refined = cv2.findTransformECC(
                    self.template[i], self.input[i], hom[i], cv2.MOTION_HOMOGRAPHY,
                    ECC_CRITERIA, None, ECC_GAUSS_FILT_SIZE,
                )
                hom[i] = refined  # usually hom[i] itself (OpenCV writes in place); never rely on it
                ok = cv2.checkRange(hom[i])[0]  # finite, and cheaper than np.isfinite here
            except cv2.error as exc:
                # cv2 keeps `code` on the exception class (shared by threads); the message is per error.
                if f"({cv2.Error.StsNoConv}:" not in str(exc):  # a real error, not ECC giving up
                    raise
                ok = False
            if ok:  # written straight into the batch's buffer (dst=): no allocation, no copy
                cv2.warpPerspective(
                    self.candidate[i], hom[i], (w, h), dst=self.aligned[i],
                    flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT, borderValue=0,
                )
            else:  # ψ = identity: PASS is plain SSIM
                self.aligned[i] = self.candidate[i]
                hom[i] = eye
            self.ok[i] = ok
        if self.score is not None:
            self.score[lo:hi] = _ssim_images(self.aligned[lo:hi], self.x[lo:hi])  # Eq. 4


def _run(aligner: _Aligner, n_jobs: int | None) -> None:
    """Run `aligner` over its batch, in chunks on a thread pool (cv2 releases the GIL in ECC).

    OpenCV's own threads are switched off meanwhile (and restored after): ECC gains nothing from them
    (measured on 28×28 and 224×224 images) while an idle OpenCV worker spin-waits, burning about one
    core per ECC caller, and one OpenCV thread per pool worker cannot oversubscribe the cores.
    """
    n, workers = len(aligner.ok), _n_workers(n_jobs)
    cv_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        if workers == 1 or n < _MIN_PARALLEL:
            aligner.run(0, n)
            return
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(aligner.run, lo, min(lo + _CHUNK, n)) for lo in range(0, n, _CHUNK)]
            try:
                for f in futures:
                    f.result()
            except BaseException:  # an OpenCV error or Ctrl-C: do not run the remaining chunks
                for f in futures:
                    f.cancel()
                raise
    finally:
        cv2.setNumThreads(cv_threads)


def align_ecc(original: np.ndarray, candidate: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """ψ(x̃, x) of Eq. 1: candidate warped onto original -> (aligned float32, H 3×3 float32, converged).

    When ECC does not converge, (candidate as float32, identity, False).
    """
    x, y = _check_pair(original, candidate, batch=False)
    a = _Aligner(x[None], y[None], score=False)
    _run(a, 1)
    return a.aligned[0], a.homography[0], bool(a.ok[0])


def align_ecc_batch(
    originals: np.ndarray, candidates: np.ndarray, n_jobs: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batched `align_ecc` over `n_jobs` threads (None: all cores) -> (aligned, H (N, 3, 3), converged (N,))."""
    x, y = _check_pair(originals, candidates, batch=True)
    a = _Aligner(x, y, score=False)
    _run(a, n_jobs)
    return a.aligned, a.homography, a.ok


# --------------------------------------------------------------------------- PASS (Eq. 4)


def pass_scores(
    originals: np.ndarray, candidates: np.ndarray, n_jobs: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """PASS(x̃, x) = SSIM(ψ(x̃, x), x) (Eq. 4) for a batch (N, H, W) or (N, H, W, 3).

    Returns (scores (N,) float64, aligned_ok (N,) bool); where aligned_ok is False, ECC did not
    converge and the score is plain SSIM. ECC runs on `n_jobs` threads (None: all available cores).
    """
    x, y = _check_pair(originals, candidates, batch=True)
    a = _Aligner(x, y, score=True)
    _run(a, n_jobs)
    return a.score, a.ok


def pass_score(original: np.ndarray, candidate: np.ndarray) -> float:
    """PASS(x̃, x) (Eq. 4) of one pair; warns `ECCNotConvergedWarning` when it is plain SSIM."""
    x, y = _check_pair(original, candidate, batch=False)
    score, ok = pass_scores(x[None], y[None], n_jobs=1)
    if not ok[0]:
        warnings.warn(
            "ECC alignment did not converge; PASS is plain SSIM (use pass_scores to get the flag)",
            ECCNotConvergedWarning,
            stacklevel=2,
        )
    return float(score[0])


# --------------------------------------------------------------------------- perturbation norms


def perturbation_norms(originals: np.ndarray, candidates: np.ndarray) -> dict[str, np.ndarray]:
    """L2, L2 per pixel (‖δ‖₂ / (H·W)) and L∞ of δ = x̃ − x for each pair of a batch, in [0, 255] units."""
    x, y = _check_pair(originals, candidates, batch=True)
    d = (y.astype(np.float64) - x).reshape(len(x), -1)
    l2_ = np.sqrt(np.einsum("ij,ij->i", d, d))
    pixels = x.shape[1] * x.shape[2]
    return {"l2": l2_, "l2_per_pixel": l2_ / pixels, "linf": np.abs(d).max(axis=1, initial=0.0)}


def _norm(name: str, original: np.ndarray, candidate: np.ndarray) -> float:
    x, y = _check_pair(original, candidate, batch=False)
    return float(perturbation_norms(x[None], y[None])[name][0])


def l2(original: np.ndarray, candidate: np.ndarray) -> float:
    """‖x̃ − x‖₂ over all pixel values, in [0, 255] units."""
    return _norm("l2", original, candidate)


def l2_per_pixel(original: np.ndarray, candidate: np.ndarray) -> float:
    """‖x̃ − x‖₂ / (H·W): the "L2 norm per pixel" of the paper's Fig. 2-3 (see the module docstring)."""
    return _norm("l2_per_pixel", original, candidate)


def linf(original: np.ndarray, candidate: np.ndarray) -> float:
    """max |x̃ − x| over all pixel values, in [0, 255] units."""
    return _norm("linf", original, candidate)


def pass_report(
    originals: np.ndarray, candidates: np.ndarray, n_jobs: int | None = None
) -> dict[str, np.ndarray]:
    """Everything the CLI prints, per pair: pass, ssim (unaligned), l2, l2_per_pixel, linf, aligned_ok."""
    x, y = _check_pair(originals, candidates, batch=True)
    scores, ok = pass_scores(x, y, n_jobs=n_jobs)
    return {"pass": scores, "ssim": _ssim_images(x, y), **perturbation_norms(x, y), "aligned_ok": ok}
