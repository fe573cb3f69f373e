"""Minimal adversarial step along a direction, exact on integer images (Sec. 4.3); hard positives.

Conventions
-----------
* Images ``x`` are (N, C, H, W) with integer values in [0, 255]; directions ``eta`` are (N, C, H, W)
  (one per image) or (N, D, C, H, W) (D per image), normalised as in :mod:`hcgen.core.directions`.
* **Rounding rule** (used everywhere, see :func:`perturb`)::

      x~(eps) = x + sign(eta) * min(floor(eps * |eta| + 0.5), headroom)

  i.e. the perturbation ``eps * eta`` is rounded to the nearest integer with ties away from the original
  pixel (away from zero), then clipped to [0, 255] (``headroom`` is 255 - x where eta > 0, x where
  eta < 0). The arithmetic is float64 exactly as written, so each pixel is a monotone step function of
  ``eps`` and the integer image is constant on intervals ``[b_k, b_{k+1})`` whose left ends
  ("breakpoints") are exact float64 numbers computed by this module.
* **Adversarial** means ``argmax(scores) != y`` with NumPy's argmax (first maximum wins on ties);
  the margin ``m = s_y - max_{j != y} s_j`` is only used to predict where to look.
* **Minimal** (Eq. 5 restricted to the ray): the search returns the breakpoint ``eps`` such that
  ``x~(eps)`` is adversarial and the previous distinct integer image on the ray, ``x~(eps_prev)``, is not.
  Along a non-monotone ray this is a local boundary crossing: the first one found inside the line-search
  interval ``[lo, hi]`` in which it was bracketed (as in the paper), not necessarily the first crossing
  of the whole ray. ``eps`` is the smallest float64 producing ``x_adv``:
  ``perturb(x, eta, eps) == x_adv`` bit for bit.
* A ray along which the fully saturated image (every moving pixel at 0 or 255) is still classified as y
  is a failure (``NOT_ADVERSARIAL``), as are directions that move no pixel (``NULL_DIRECTION``) and
  images whose clean prediction is not y (``MISCLASSIFIED``). Failures are reported, never dropped.

Algorithm (all searches in lockstep; per-search state in arrays, one ``scores_fn`` call per round with
one candidate image per active search): the bracket is ``lo`` (left end of the last image known not to
be adversarial; 0 = the clean image) and ``hi`` (left end of the first image known to be adversarial).
The line search starts at ``step0`` and extrapolates the margin linearly through the last two
non-adversarial points (aiming 10% past the predicted crossing, growth clamped to
[1.25, ``growth``**2], ``growth`` when the margin does not fall) until a candidate is adversarial or the
saturated image is reached. Inside the bracket the crossing is predicted in
``u = sum |eta| * |integer perturbation|`` rather than in eps, because the margin follows the integer
staircase in u (each pixel step moves u by that pixel's |eta|): inverse quadratic interpolation through
lo, hi and the last point to leave the bracket, else Illinois regula falsi, and bisection in eps after
two rounds that did not halve the bracket. The predicted u is mapped back to eps by regula falsi on the
monotone function u(eps), and the integer image containing that eps is evaluated. The search ends when
no image lies between lo and hi. The forwards per search this takes, against doubling plus bisection, are
in benchmarks/README.md (benchmarks/bench_search_core.py measures them).

Memory: about 11 bytes per pixel per (image, direction) pair; split very large batches.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Callable, Optional, Sequence

import numpy as np

from hcgen.errors import BadInput

ScoresFn = Callable[[np.ndarray], np.ndarray]

__all__ = ["Status", "SearchResult", "HardPositives", "perturb", "adversarial_search",
           "scale_perturbation", "hard_positives"]

_OVERSHOOT = 1.1  # line search aims this far beyond the extrapolated crossing, to bracket it
_MIN_GROWTH = 1.25  # ... but grows the step at least this much (and at most growth**2)
_BLOCK = 1 << 16  # pixels per block of rays in _Rays.probe/invert (float64 temporaries stay in cache)
_INVERT = 6  # regula falsi steps from a target u back to eps
_MAX_NUDGE = 64  # float breakpoints are found within a few ulps; this bound is never reached


class Status(IntEnum):
    """Outcome of one (image, direction) search."""

    FOUND = 0  #: minimal adversarial found
    NOT_ADVERSARIAL = 1  #: even the saturated image along the ray keeps label y
    NULL_DIRECTION = 2  #: eta moves no pixel (all zero, or every moving pixel already at 0/255)
    MISCLASSIFIED = 3  #: the clean image is not classified as y; nothing to search


@dataclass(frozen=True)
class SearchResult:
    """Per-search arrays, shaped like ``eta.shape[:-3]``: (N,) or (N, D).

    eps       smallest float64 step with ``perturb(x, eta, eps) == x_adv``; NaN on failure.
    eps_prev  left end of the previous distinct integer image (classified y); NaN on failure.
    x_adv     uint8 ``eta.shape``: minimal adversarial image; the clean image on failure.
    label     predicted label of ``x_adv`` (argmax of its scores).
    success   ``status == Status.FOUND``.
    status    int8 :class:`Status` codes.
    forwards  images this search sent to ``scores_fn`` (the clean forward not included).
    rounds    number of batched ``scores_fn`` calls for the search itself.
    clean_forwards  images in the extra call that scored the clean images (0 if ``clean_scores`` given).
    """

    eps: np.ndarray
    eps_prev: np.ndarray
    x_adv: np.ndarray
    label: np.ndarray
    success: np.ndarray
    status: np.ndarray
    forwards: np.ndarray
    rounds: int
    clean_forwards: int


@dataclass(frozen=True)
class HardPositives:
    """Hard positives (F, ...) for factors (F,): uint8 images, the original label they keep, their predicted
    label (-1 where ``valid`` is False, i.e. the search failed and there is no perturbation to scale)."""

    factors: np.ndarray
    images: np.ndarray
    label: np.ndarray
    pred: np.ndarray
    valid: np.ndarray


# ----------------------------------------------------------------------------------------- validation

def _check_images(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 4:
        raise BadInput(f"x must be a batch of images (N, C, H, W), got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise BadInput(f"x must hold numbers, got dtype {x.dtype}")
    if x.size:
        if np.issubdtype(x.dtype, np.floating):
            if not np.isfinite(x).all():
                raise BadInput("x contains NaN or inf; expected integer pixel values in [0, 255]")
            if (x != np.round(x)).any():
                raise BadInput("x must hold integer pixel values in [0, 255] (got fractional values; "
                               "pass raw pixels, not the net's scaled input)")
        lo, hi = x.min(), x.max()
        if lo < 0 or hi > 255:
            raise BadInput(f"x must hold pixel values in [0, 255], got range [{lo}, {hi}]")
    return x.astype(np.float64)


def _check_eta(eta: np.ndarray, x: np.ndarray) -> np.ndarray:
    eta = np.asarray(eta)
    per_image = eta.ndim == 5 and eta.shape[0] == len(x) and eta.shape[2:] == x.shape[1:]
    if eta.shape != x.shape and not per_image:
        raise BadInput(f"eta must have shape {x.shape} (one direction per image) or "
                       f"({len(x)}, D, {', '.join(map(str, x.shape[1:]))}) (D per image), got {eta.shape}")
    if not np.issubdtype(eta.dtype, np.number) or np.issubdtype(eta.dtype, np.complexfloating):
        raise BadInput(f"eta must be real, got dtype {eta.dtype}")
    eta = eta.astype(np.float64)
    finite = np.isfinite(eta).all(axis=(-3, -2, -1))
    if not finite.all():
        bad = np.argwhere(~finite)[:10].tolist()
        raise BadInput(f"eta contains NaN or inf in direction(s) {bad}; normalise raw gradients with "
                       "hcgen.core.directions.normalize, which flags all-zero gradients instead")
    return eta


def _check_labels(labels: np.ndarray, n_images: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.shape != (n_images,):
        raise BadInput(f"labels must have shape ({n_images},), one per image, got {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise BadInput(f"labels must be integers, got dtype {y.dtype}")
    if y.size and y.min() < 0:
        raise BadInput(f"labels must be non-negative class indices, got {y.min()}")
    return y.astype(np.int64)


def _scores(scores_fn: ScoresFn, batch: np.ndarray, n_classes: Optional[int]) -> np.ndarray:
    s = np.asarray(scores_fn(batch))
    if s.ndim != 2 or s.shape[0] != len(batch) or (n_classes is not None and s.shape[1] != n_classes):
        want = f"({len(batch)}, {n_classes if n_classes is not None else 'n_classes'})"
        raise BadInput(f"scores_fn must return class scores of shape {want} for a batch of "
                       f"{len(batch)} images, got shape {s.shape}")
    if not np.issubdtype(s.dtype, np.number) or not np.isfinite(s).all():
        raise BadInput("scores_fn returned NaN, inf or non-numeric scores")
    return s.astype(np.float64)


def _margin(scores: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Predicted label and margin s_y - max_{j != y} s_j (adversarial iff pred != y)."""
    rows = np.arange(len(y))
    s_y = scores[rows, y]
    others = scores.copy()
    others[rows, y] = -np.inf
    return scores.argmax(axis=1), s_y - others.max(axis=1)


# --------------------------------------------------------------------------- integer images on a ray

def _levels(eps: np.ndarray, a: np.ndarray, head: np.ndarray) -> np.ndarray:
    """|integer perturbation| per pixel: min(floor(eps * |eta| + 0.5), headroom), the module's rule."""
    out = eps * a
    out += 0.5
    np.floor(out, out=out)
    return np.minimum(out, head, out=out)


def _exact_break(a: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Smallest float64 eps with floor(eps * a + 0.5) >= t (a > 0, t >= 1), elementwise."""
    b = (t - 0.5) / a
    for _ in range(_MAX_NUDGE):
        low = np.floor(b * a + 0.5) < t
        if not low.any():
            break
        b = np.where(low, np.nextafter(b, np.inf), b)
    for _ in range(_MAX_NUDGE):
        prev = np.nextafter(b, -np.inf)
        down = np.floor(prev * a + 0.5) >= t
        if not down.any():
            break
        b = np.where(down, prev, b)
    return b


def _extreme_break(a: np.ndarray, levels: np.ndarray, step: int, unusable: Optional[np.ndarray],
                   uniform: np.ndarray) -> np.ndarray:
    """Per row, over usable pixels, the largest _exact_break(a, levels) (step 0: where the current
    levels began) or the smallest _exact_break(a, levels + 1) (step 1: the next change); -inf or inf if none.

    The approximate breakpoints (t - 0.5) / a are within a few ulps of the exact ones, so only pixels
    within a relative 1e-12 of the approximate extreme can hold the exact extreme: usually one per row.
    In ``uniform`` rows (one |eta| for all moving pixels, e.g. sign directions) the pixels near the
    extreme share (a, t), hence the exact breakpoint.
    """
    largest = step == 0
    fill = -np.inf if largest else np.inf
    out = np.full(len(levels), fill)
    if levels.shape[1] == 0:
        return out
    approx = levels + (step - 0.5)
    with np.errstate(divide="ignore", invalid="ignore"):
        approx /= a  # a == 0 only where levels = 0 (-inf) or unusable
    if unusable is not None:
        np.putmask(approx, unusable, fill)
    rows = np.arange(len(approx))
    k = approx.argmax(axis=1) if largest else approx.argmin(axis=1)
    ext = approx[rows, k]
    some = np.isfinite(ext)
    out[some] = _exact_break(a[rows[some], k[some]], levels[rows[some], k[some]] + step)
    tol = np.abs(ext) * 1e-12
    approx[rows, k] = fill  # runner-up
    if largest:
        multi = np.flatnonzero(some & ~uniform & (approx.max(axis=1) >= ext - tol))
    else:
        multi = np.flatnonzero(some & ~uniform & (approx.min(axis=1) <= ext + tol))
    if len(multi):
        approx[multi, k[multi]] = ext[multi]
        sub, lim = approx[multi], (ext - tol if largest else ext + tol)[multi, None]
        r, col = np.nonzero(sub >= lim if largest else sub <= lim)
        exact = np.full((len(multi), approx.shape[1]), fill)
        exact[r, col] = _exact_break(a[multi[r], col], levels[multi[r], col] + step)
        out[multi] = exact.max(axis=1) if largest else exact.min(axis=1)
    return out


@dataclass
class _Probe:
    """Integer images at given eps on some rays: left end of each image's eps interval (``start``) and
    of the next image (``next``); optionally the images (uint8) and u = sum |eta| * levels."""

    start: np.ndarray
    next: np.ndarray
    images: Optional[np.ndarray] = None
    u: Optional[np.ndarray] = None


class _Rays:
    """The S rays x_i + eps * eta_s as (S, P) arrays: |eta| (float64), headroom, clean pixels, signs.

    Probes work through the requested rays in blocks of about _BLOCK pixels, so that the float64
    temporaries stay in cache.
    """

    def __init__(self, x: np.ndarray, eta: np.ndarray, img: np.ndarray):
        P = int(np.prod(x.shape[1:]))
        eta = eta.reshape(len(img), P)
        self.x0 = x.reshape(len(x), P).astype(np.uint8)[img]
        self.a = np.abs(eta)
        self.sgn = np.sign(eta).astype(np.int8)
        self.head = np.where(eta > 0, 255 - self.x0, self.x0)
        with np.errstate(divide="ignore", invalid="ignore"):
            # pixels that never move at a finite eps: eta == 0 (or so tiny that 1/|eta| overflows)
            self.head[~np.isfinite((self.head - 0.5) / self.a)] = 0
        peak = self.a.max(axis=1, initial=0.0)
        self.uniform = ((self.a == peak[:, None]) | (self.a == 0)).all(axis=1)
        self.block = max(1, _BLOCK // max(1, self.a.shape[1]))

    def probe(self, idx: np.ndarray, eps: Optional[np.ndarray], full: bool = True) -> _Probe:
        """Images at ``eps`` (None: the saturated images) on rays ``idx``."""
        n, P = len(idx), self.a.shape[1]
        out = _Probe(start=np.empty(n), next=np.empty(n))
        if full:
            out.images, out.u = np.empty((n, P), np.uint8), np.empty(n)
        for b in range(0, n, self.block):
            rows, sl = idx[b:b + self.block], slice(b, b + self.block)
            a, head, uniform = self.a[rows], self.head[rows], self.uniform[rows]
            lev = head.astype(np.float64) if eps is None else _levels(eps[sl, None], a, head)
            out.start[sl] = np.maximum(_extreme_break(a, lev, 0, None, uniform), 0.0)
            out.next[sl] = _extreme_break(a, lev, 1, lev >= head, uniform)
            if full:
                out.images[sl] = self.x0[rows] + self.sgn[rows] * lev
                out.u[sl] = np.einsum("ij,ij->i", lev, a)
        return out

    def invert(self, idx: np.ndarray, lo: np.ndarray, hi: np.ndarray, u_lo: np.ndarray, u_hi: np.ndarray,
               u_star: np.ndarray) -> np.ndarray:
        """An eps in (lo, hi) where u(eps) = sum |eta| * levels(eps) is about u_star (u_lo < u_star < u_hi):
        _INVERT regula falsi steps on the monotone staircase u."""
        out = np.empty(len(idx))
        for b in range(0, len(idx), self.block):
            rows, sl = idx[b:b + self.block], slice(b, b + self.block)
            a, head = self.a[rows], self.head[rows]
            el, eh, ul, uh, us = lo[sl], hi[sl], u_lo[sl], u_hi[sl], u_star[sl]
            for _ in range(_INVERT):
                e = el + (eh - el) * ((us - ul) / (uh - ul))
                u = np.einsum("ij,ij->i", _levels(e[:, None], a, head), a)
                below = u < us
                el, ul = np.where(below, e, el), np.where(below, u, ul)
                eh, uh = np.where(below, eh, e), np.where(below, uh, u)
            out[sl] = e
        return out


def perturb(x: np.ndarray, eta: np.ndarray, eps: np.ndarray) -> np.ndarray:
    """The integer image ``x~(eps)`` of the module's rounding rule, uint8 shaped like ``eta``.

    ``eps`` has shape ``eta.shape[:-3]`` ((N,) or (N, D)) or is a scalar; it must be finite and >= 0.
    """
    xf = _check_images(x)
    eta = _check_eta(eta, xf)
    eps = np.asarray(eps, dtype=np.float64)
    if eps.ndim == 0:
        eps = np.full(eta.shape[:-3], float(eps))
    if eps.shape != eta.shape[:-3]:
        raise BadInput(f"eps must have shape {eta.shape[:-3]} (one per direction), got {eps.shape}")
    if not np.isfinite(eps).all() or (eps < 0).any():
        raise BadInput("eps must be finite and >= 0 (failed searches have eps = NaN; select "
                       "result.success first)")
    xb = xf[:, None] if eta.ndim == 5 else xf
    levels = _levels(eps[..., None, None, None], np.abs(eta), np.where(eta > 0, 255 - xb, xb))
    return (xb + np.sign(eta) * levels).astype(np.uint8)


# ------------------------------------------------------------------------------------------- search

def adversarial_search(
    scores_fn: ScoresFn,
    x: np.ndarray,
    eta: np.ndarray,
    labels: np.ndarray,
    *,
    clean_scores: Optional[np.ndarray] = None,
    step0: float | np.ndarray = 16.0,
    growth: float = 3.0,
) -> SearchResult:
    """Find, for every (image, direction), the minimal adversarial integer image along the ray.

    ``scores_fn(batch)`` takes uint8 images (M, C, H, W) and returns class scores (M, n), preferably
    logits (the margin is interpolated; probabilities work but saturate). Scores, not just labels: the
    margin is what predicts the crossing. It is called once per round with one candidate per active
    search. ``step0`` is the first step in grey levels of the most-moved pixel (directions normalised to
    max |eta| = 1), a scalar or one per direction (e.g. a typical eps of the method); ``growth`` is the
    step factor when the margin gives no trend. ``clean_scores`` (N, n) are the scores of ``x``; if
    omitted they cost one extra call (``clean_forwards``). See the module docstring for the rounding
    rule, the meaning of "minimal" and the failure statuses.
    """
    if not callable(scores_fn):
        raise BadInput("scores_fn must be a callable batch (M, C, H, W) -> scores (M, n_classes)")
    xf = _check_images(x)
    eta = _check_eta(eta, xf)
    y_img = _check_labels(labels, len(xf))
    step0 = np.asarray(step0, dtype=np.float64)
    if not (np.isfinite(step0).all() and (step0 > 0).all()):
        raise BadInput(f"step0 must be a positive number of grey levels, got {step0.tolist()!r}")
    try:
        step0 = np.broadcast_to(step0, eta.shape[:-3]).ravel()
    except ValueError:
        raise BadInput(f"step0 must be a scalar or broadcast to the directions' shape {eta.shape[:-3]}, "
                       f"got shape {step0.shape}") from None
    if not (np.isfinite(growth) and growth > 1):
        raise BadInput(f"growth must be > 1, got {growth!r}")

    clean_forwards = 0
    if clean_scores is None and not len(xf):
        clean_scores = np.zeros((0, 1))  # nothing to score
    elif clean_scores is None:
        clean_scores = _scores(scores_fn, xf.astype(np.uint8), None)
        clean_forwards = len(xf)
    else:
        clean_scores = np.asarray(clean_scores, dtype=np.float64)
        if clean_scores.ndim != 2 or len(clean_scores) != len(xf) or not np.isfinite(clean_scores).all():
            raise BadInput(f"clean_scores must be finite scores of shape ({len(xf)}, n_classes) for "
                           f"the {len(xf)} images, got shape {clean_scores.shape}")
    n_classes = clean_scores.shape[1]
    if y_img.size and y_img.max() >= n_classes:
        raise BadInput(f"labels must lie in [0, {n_classes - 1}] for {n_classes} classes, "
                       f"got {y_img.max()}")

    shape = eta.shape[:-3]
    n_dir = 1 if eta.ndim == 4 else eta.shape[1]
    img = np.repeat(np.arange(len(xf)), n_dir)
    rays = _Rays(xf, eta, img)
    engine = _Engine(rays, y_img[img], scores_fn, n_classes, xf.shape[1:], step0, float(growth))
    pred0, m0 = _margin(clean_scores, y_img)
    engine.run(pred0[img], m0[img])

    ok = engine.status == Status.FOUND
    x_adv = rays.probe(np.arange(len(img)), np.where(ok, engine.hi, 0.0)).images
    return SearchResult(
        eps=np.where(ok, engine.hi, np.nan).reshape(shape),
        eps_prev=np.where(ok, engine.lo, np.nan).reshape(shape),
        x_adv=x_adv.reshape(eta.shape),
        label=engine.pred_hi.reshape(shape),
        success=ok.reshape(shape),
        status=engine.status.astype(np.int8).reshape(shape),
        forwards=engine.forwards.reshape(shape),
        rounds=engine.rounds,
        clean_forwards=clean_forwards,
    )


def _inverse_quadratic(p: tuple, m: tuple) -> np.ndarray:
    """Where the parabola p(m) through three (p, margin) points reaches m = 0 (NaN/inf if degenerate)."""
    (p0, p1, p2), (m0, m1, m2) = p, m
    return (p0 * m1 * m2 / ((m0 - m1) * (m0 - m2)) + p1 * m0 * m2 / ((m1 - m0) * (m1 - m2))
            + p2 * m0 * m1 / ((m2 - m0) * (m2 - m1)))


class _Engine:
    """Per-search state in arrays; one candidate per active search and one scores_fn call per round."""

    RUNNING = -1

    def __init__(self, rays: _Rays, y: np.ndarray, scores_fn: ScoresFn, n_classes: int,
                 image_shape: tuple, step0: np.ndarray, growth: float):
        S = len(y)
        self.rays, self.y, self.scores_fn, self.n_classes = rays, y, scores_fn, n_classes
        self.image_shape, self.step0, self.growth = image_shape, step0, growth
        self.status = np.full(S, self.RUNNING, dtype=np.int64)
        # bracket: lo = left end of a non-adversarial image, hi = of an adversarial one (inf: none yet)
        self.lo, self.hi = np.zeros(S), np.full(S, np.inf)
        self.lo_next = np.zeros(S)  # left end of the image after lo; done when it reaches hi
        # margins; "old" is the last point to leave the bracket. In the line search the margin is
        # extrapolated over pos = the midpoint of an image's eps interval (pos_old: the previous lo).
        self.m_lo, self.m_hi, self.m_old = np.zeros(S), np.zeros(S), np.full(S, np.nan)
        self.pos_lo, self.pos_old = np.zeros(S), np.full(S, np.nan)
        self.w_lo, self.w_hi = np.ones(S), np.ones(S)  # Illinois weights of the margins
        # u = sum |eta| * |integer perturbation|: the margin is closer to linear in u than in eps
        self.u_lo, self.u_hi, self.u_old = np.zeros(S), np.zeros(S), np.full(S, np.nan)
        self.side = np.zeros(S, dtype=np.int8)  # end replaced last round: -1 lo, +1 hi
        self.slow = np.zeros(S, dtype=np.int8)  # bracket rounds in a row that shrank it by < 1/2
        self.pred_hi = np.zeros(S, dtype=np.int64)
        self.forwards = np.zeros(S, dtype=np.int64)
        self.rounds = 0
        self.sat = rays.probe(np.arange(S), None, full=False).start  # left end of the saturated image

    def run(self, pred0: np.ndarray, m0: np.ndarray) -> None:
        self.pred_hi[:] = pred0
        self.m_lo[:] = m0
        self.lo_next[:] = self.rays.probe(np.arange(len(self.y)), np.zeros(len(self.y)), full=False).next
        self.status[pred0 != self.y] = Status.MISCLASSIFIED
        self.status[(self.status == self.RUNNING) & ~np.isfinite(self.lo_next)] = Status.NULL_DIRECTION
        while True:
            idx = np.flatnonzero(self.status == self.RUNNING)
            if not len(idx):
                return
            self._round(idx)

    def _targets(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where to look next (any eps inside the wanted image), and which searches bisect."""
        lo, hi, pos_lo, pos_old = self.lo[idx], self.hi[idx], self.pos_lo[idx], self.pos_old[idx]
        m_lo, m_hi, m_old = self.m_lo[idx], self.m_hi[idx], self.m_old[idx]
        line = ~np.isfinite(hi)
        target = np.empty(len(idx))
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            # line search: extrapolate the last two non-adversarial margins to the crossing, overshoot
            slope = (m_lo - m_old) / (pos_lo - pos_old)
            aim = pos_lo + _OVERSHOOT * m_lo / -slope
            aim = np.where((slope < 0) & np.isfinite(aim), aim, pos_lo * self.growth)
            aim = np.clip(aim, pos_lo * _MIN_GROWTH, pos_lo * self.growth ** 2)
            target[line] = np.minimum(np.where(lo == 0, self.step0[idx], aim), self.sat[idx])[line]
            # bracket: where the margin crosses 0 as a function of u, by inverse quadratic interpolation
            # through lo, hi and the old point if that lands inside, else by Illinois regula falsi
            u_lo, u_hi = self.u_lo[idx], self.u_hi[idx]
            iqi = _inverse_quadratic((u_lo, u_hi, self.u_old[idx]), (m_lo, m_hi, m_old))
            wl, wh = m_lo * self.w_lo[idx], m_hi * self.w_hi[idx]
            rf = u_lo + (u_hi - u_lo) * (wl / (wl - wh))
            u_star = np.where((iqi > u_lo) & (iqi < u_hi), iqi, rf)
        # safeguard: bisection after two rounds that shrank the bracket by less than half each
        bisect = ~line & ~((u_star > u_lo) & (u_star < u_hi) & (self.slow[idx] < 2))
        target[bisect] = 0.5 * (lo + hi)[bisect]
        b = np.flatnonzero(~line & ~bisect)
        target[b] = self.rays.invert(idx[b], lo[b], hi[b], u_lo[b], u_hi[b], u_star[b])
        return target, bisect

    def _round(self, idx: np.ndarray) -> None:
        lo, hi = self.lo[idx], self.hi[idx]
        line = ~np.isfinite(hi)
        target, bisected = self._targets(idx)
        # evaluate an image strictly inside the bracket: at or after the image after lo, before hi
        target = np.maximum(np.minimum(target, np.nextafter(hi, -np.inf)), self.lo_next[idx])
        probe = self.rays.probe(idx, target)
        c, c_next, u = probe.start, probe.next, probe.u
        scores = _scores(self.scores_fn, probe.images.reshape((len(idx),) + self.image_shape), self.n_classes)
        self.rounds += 1
        self.forwards[idx] += 1
        pred, m = _margin(scores, self.y[idx])
        adv = pred != self.y[idx]
        pos = np.where(np.isfinite(c_next), 0.5 * (c + c_next), c)  # for FGS: the step in grey levels

        j = idx[adv & ~line]  # the replaced end becomes the old point
        self.m_old[j], self.u_old[j] = self.m_hi[j], self.u_hi[j]
        j = idx[~adv]
        self.pos_old[j], self.m_old[j], self.u_old[j] = self.pos_lo[j], self.m_lo[j], self.u_lo[j]
        j = idx[adv]
        self.hi[j], self.m_hi[j], self.u_hi[j], self.w_hi[j] = c[adv], m[adv], u[adv], 1.0
        self.pred_hi[j] = pred[adv]
        j = idx[~adv]
        self.lo[j], self.lo_next[j], self.pos_lo[j], self.m_lo[j], self.u_lo[j], self.w_lo[j] = (
            c[~adv], c_next[~adv], pos[~adv], m[~adv], u[~adv], 1.0)

        # Illinois: when the same end is replaced twice in a row, halve the retained end's weight
        side = np.where(adv, 1, -1).astype(np.int8)
        repeat = side == self.side[idx]
        self.w_lo[idx[repeat & adv]] *= 0.5
        self.w_hi[idx[repeat & ~adv]] *= 0.5
        self.side[idx] = side
        shrank = (self.hi[idx] - self.lo[idx]) <= 0.5 * (hi - lo)
        self.slow[idx] = np.where(bisected | shrank | line, 0, self.slow[idx] + 1)

        hi, lo = self.hi[idx], self.lo[idx]
        done = np.isfinite(hi) & (self.lo_next[idx] >= hi)
        self.status[idx[done]] = Status.FOUND
        failed = ~np.isfinite(hi) & (lo >= self.sat[idx])
        self.status[idx[failed]] = Status.NOT_ADVERSARIAL


# ------------------------------------------------------------------------------------ hard positives

def _check_factors(factors: Sequence[float]) -> np.ndarray:
    f = np.atleast_1d(np.asarray(factors, dtype=np.float64))
    if f.ndim != 1 or not f.size or not np.isfinite(f).all() or (f < 1).any():
        raise BadInput(f"factors must be a non-empty list of finite scales >= 1 (paper: 1.05 1.10), "
                       f"got {np.asarray(factors).tolist()}")
    return f


def scale_perturbation(x: np.ndarray, eta: np.ndarray, eps: np.ndarray,
                       factors: Sequence[float]) -> np.ndarray:
    """Hard-positive images ``x_hp = perturb(x, eta, s * eps)`` for each factor s >= 1, uint8 (F, *eta.shape).

    That is ``x + sign(eta) * min(floor(s * eps * |eta| + 0.5), headroom)``: the *continuous* minimal
    perturbation ``eps * eta`` is scaled, then rounded and clipped with the module's rule, so
    ``s = 1`` reproduces ``x_adv`` exactly (``eps`` from :class:`SearchResult`).
    """
    f = _check_factors(factors)
    eps = np.asarray(eps, dtype=np.float64)
    return np.stack([perturb(x, eta, s * eps) for s in f])  # loop over the few factors, not images


def hard_positives(scores_fn: ScoresFn, x: np.ndarray, eta: np.ndarray, labels: np.ndarray,
                   result: SearchResult, factors: Sequence[float]) -> HardPositives:
    """Scale every successful minimal perturbation by ``factors`` (see :func:`scale_perturbation`).

    Hard positives keep the **original** label (``label``); their predicted label ``pred`` is recorded
    with one ``scores_fn`` call. Failed searches give ``valid = False``, ``pred = -1`` and the clean image.
    """
    f = _check_factors(factors)
    xf = _check_images(x)
    eta = _check_eta(eta, xf)
    y = _check_labels(labels, len(xf))
    if result.eps.shape != eta.shape[:-3]:
        raise BadInput(f"result has shape {result.eps.shape} but eta has {eta.shape[:-3]} directions; "
                       "pass the eta the search was run with")
    ok = result.success
    images = scale_perturbation(xf, eta, np.where(ok, result.eps, 0.0), f)
    label = np.broadcast_to(y.reshape((-1,) + (1,) * (eta.ndim - 4)), ok.shape)
    valid = np.broadcast_to(ok, (len(f),) + ok.shape)
    pred = np.full(valid.shape, -1, dtype=np.int64)
    if valid.any():
        pred[valid] = _scores(scores_fn, images[valid], None).argmax(axis=1)
    return HardPositives(factors=f, images=images, label=np.array(label), pred=pred, valid=np.array(valid))
