"""Minimal adversarial step along a direction, exact on integer images (Sec. 4.3); hard positives.

Conventions
-----------
* Images ``x`` are (N, C, H, W) with integer values in [0, 255]; directions ``eta`` are (N, C, H, W)
  (one per image) or (N, D, C, H, W) (D per image), normalised as in :mod:`hcgen.directions`.
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

Algorithm: per search, arrays hold the bracket ``lo`` (not adversarial) / ``hi`` (adversarial), their
margins and a status. A line search with increasing steps extrapolates the margin linearly (with
overshoot, growth clamped to [1.25, growth**2]) until the crossing is bracketed; then Illinois regula
falsi on the margin, with bisection as a safeguard, proposes a target inside the bracket, and the
integer image containing it is evaluated together with its immediate predecessor, so a good prediction
ends the search in one round. Every round sends all active searches' candidates to one ``scores_fn`` call.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Callable, Optional, Sequence

import numpy as np

ScoresFn = Callable[[np.ndarray], np.ndarray]

__all__ = ["Status", "SearchResult", "HardPositives", "perturb", "adversarial_search",
           "scale_perturbation", "hard_positives"]

_OVERSHOOT = 1.2  # line search aims this far beyond the extrapolated crossing, to bracket it
_MIN_GROWTH = 1.25
_IQI = True
_PAIR = True
_ENDGAME = 256  # enumerate the images of a bracket holding at most this many pixel-level changes
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
        raise ValueError(f"x must be a batch of images (N, C, H, W), got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise ValueError(f"x must hold numbers, got dtype {x.dtype}")
    if x.size:
        if np.issubdtype(x.dtype, np.floating):
            if not np.isfinite(x).all():
                raise ValueError("x contains NaN or inf; expected integer pixel values in [0, 255]")
            if (x != np.round(x)).any():
                raise ValueError("x must hold integer pixel values in [0, 255] (got fractional values; "
                                 "pass raw pixels, not the net's scaled input)")
        lo, hi = x.min(), x.max()
        if lo < 0 or hi > 255:
            raise ValueError(f"x must hold pixel values in [0, 255], got range [{lo}, {hi}]")
    return x.astype(np.float64)


def _check_eta(eta: np.ndarray, x: np.ndarray) -> np.ndarray:
    eta = np.asarray(eta)
    if eta.shape != x.shape and not (eta.ndim == 5 and eta.shape[0] == len(x) and eta.shape[2:] == x.shape[1:]):
        raise ValueError(f"eta must have shape {x.shape} (one direction per image) or "
                         f"({len(x)}, D, {', '.join(map(str, x.shape[1:]))}) (D per image), got {eta.shape}")
    if not np.issubdtype(eta.dtype, np.number) or np.issubdtype(eta.dtype, np.complexfloating):
        raise ValueError(f"eta must be real, got dtype {eta.dtype}")
    eta = eta.astype(np.float64)
    finite = np.isfinite(eta).reshape(eta.shape[:-3] + (-1,)).all(axis=-1)
    if not finite.all():
        bad = np.argwhere(~finite)[:10].tolist()
        raise ValueError(f"eta contains NaN or inf in direction(s) {bad}; normalise raw gradients with "
                         "hcgen.directions.normalize, which flags all-zero gradients instead")
    return eta


def _check_labels(labels: np.ndarray, n_images: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.shape != (n_images,):
        raise ValueError(f"labels must have shape ({n_images},), one per image, got {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    if y.size and y.min() < 0:
        raise ValueError(f"labels must be non-negative class indices, got {y.min()}")
    return y.astype(np.int64)


def _scores(scores_fn: ScoresFn, batch: np.ndarray, n_classes: Optional[int]) -> np.ndarray:
    s = np.asarray(scores_fn(batch))
    if s.ndim != 2 or s.shape[0] != len(batch) or (n_classes is not None and s.shape[1] != n_classes):
        want = f"({len(batch)}, {n_classes if n_classes is not None else 'n_classes'})"
        raise ValueError(f"scores_fn must return class scores of shape {want} for a batch of "
                         f"{len(batch)} images, got shape {s.shape}")
    if not np.issubdtype(s.dtype, np.number) or not np.isfinite(s).all():
        raise ValueError("scores_fn returned NaN, inf or non-numeric scores")
    return s.astype(np.float64)


def _margin(scores: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Predicted label and margin s_y - max_{j != y} s_j (adversarial iff pred != y)."""
    rows = np.arange(len(y))
    s_y = scores[rows, y]
    others = scores.copy()
    others[rows, y] = -np.inf
    return scores.argmax(axis=1), s_y - others.max(axis=1)


# --------------------------------------------------------------------------- integer images on a ray

def _headroom(x: np.ndarray, eta: np.ndarray) -> np.ndarray:
    return np.where(eta > 0, 255.0 - x, np.where(eta < 0, x, 0.0))


def _levels(eps: np.ndarray, a: np.ndarray, head: np.ndarray) -> np.ndarray:
    """|integer perturbation| per pixel: the rounding rule of the module docstring."""
    return np.minimum(np.floor(eps * a + 0.5), head)


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


def _extreme_break(a: np.ndarray, inv_a: np.ndarray, t: np.ndarray, unusable: Optional[np.ndarray],
                   uniform: np.ndarray, largest: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the max (or min) over usable pixels of _exact_break(a, t); -inf (or inf) if none.

    Also returns the argmax (argmin) column. The approximate breakpoints (t - 0.5) / a are within a few
    ulps of the exact ones, so only pixels within a relative 1e-12 of the approximate extreme can hold
    the exact extreme: usually one per row. In ``uniform`` rows (one |eta| for all moving pixels, e.g.
    sign directions) the pixels near the extreme share (a, t), hence the exact breakpoint.
    """
    fill = -np.inf if largest else np.inf
    approx = (t - 0.5) * inv_a
    if unusable is not None:
        np.putmask(approx, unusable, fill)
    rows = np.arange(len(approx))
    if approx.shape[1] == 0:
        return np.full(len(approx), fill), np.zeros(len(approx), dtype=np.int64)
    k = approx.argmax(axis=1) if largest else approx.argmin(axis=1)
    ext = approx[rows, k]
    some = np.isfinite(ext)
    out = np.full(len(approx), fill)
    out[some] = _exact_break(a[rows[some], k[some]], t[rows[some], k[some]])
    tol = (np.abs(ext) * 1e-12)[:, None]
    near = (approx >= ext[:, None] - tol) if largest else (approx <= ext[:, None] + tol)
    multi = np.flatnonzero(some & ~uniform & (near.sum(axis=1) > 1))
    if len(multi):
        r, col = np.nonzero(near[multi])
        exact = np.full((len(multi), approx.shape[1]), fill)
        exact[r, col] = _exact_break(a[multi[r], col], t[multi[r], col])
        k[multi] = exact.argmax(axis=1) if largest else exact.argmin(axis=1)
        out[multi] = exact[np.arange(len(multi)), k[multi]]
    return out, k


class _Rays:
    """The S rays x_i + eps * eta_s: pixel magnitudes, signs and headroom as (S, P) arrays.

    ``take(idx)`` gathers the rows of a round once; the methods then work on those (M, P) arrays.
    """

    def __init__(self, x: np.ndarray, eta: np.ndarray, img: np.ndarray):
        eta = eta.reshape(len(img), -1)
        self.x0 = x.reshape(len(x), -1)[img]
        self.a = np.abs(eta)
        with np.errstate(divide="ignore"):
            self.inv_a = 1.0 / self.a
        self.sgn = np.sign(eta)
        head = _headroom(self.x0, eta)
        with np.errstate(invalid="ignore"):
            head[~np.isfinite((head - 0.5) * self.inv_a)] = 0.0  # never moves at a finite eps (eta 0 or tiny)
        self.head = head
        peak = self.a.max(axis=1, initial=0.0)
        self.uniform = ((self.a == peak[:, None]) | (self.a == 0)).all(axis=1)

    def take(self, idx: np.ndarray) -> "_Rays":
        sub = object.__new__(_Rays)
        sub.x0, sub.a, sub.inv_a, sub.sgn, sub.head, sub.uniform = (
            self.x0[idx], self.a[idx], self.inv_a[idx], self.sgn[idx], self.head[idx], self.uniform[idx])
        return sub

    def levels(self, eps: np.ndarray) -> np.ndarray:
        return _levels(eps[:, None], self.a, self.head)

    def images(self, levels: np.ndarray, rows: Optional[np.ndarray] = None) -> np.ndarray:
        if rows is None:
            return (self.x0 + self.sgn * levels).astype(np.uint8)
        return (self.x0[rows] + self.sgn[rows] * levels).astype(np.uint8)

    def left_end(self, levels: np.ndarray, rows: Optional[np.ndarray] = None) -> np.ndarray:
        """Smallest eps giving the same integer image (0.0 for the clean image)."""
        if rows is None:
            a, inv_a, uniform = self.a, self.inv_a, self.uniform
        else:
            a, inv_a, uniform = self.a[rows], self.inv_a[rows], self.uniform[rows]
        ends, _ = _extreme_break(a, inv_a, levels, None, uniform, largest=True)
        return np.maximum(ends, 0.0)

    def next_break(self, levels: np.ndarray) -> np.ndarray:
        """Left end of the next distinct integer image (inf if saturated)."""
        return _extreme_break(self.a, self.inv_a, levels + 1, levels >= self.head, self.uniform, largest=False)[0]

    def previous_levels(self, levels: np.ndarray, c: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Levels of the image just before left end c (rows of ``levels``/``c`` given by ``rows``)."""
        return _levels(np.nextafter(c[rows], -np.inf)[:, None], self.a[rows], self.head[rows])


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
        raise ValueError(f"eps must have shape {eta.shape[:-3]} (one per direction), got {eps.shape}")
    if not np.isfinite(eps).all() or (eps < 0).any():
        raise ValueError("eps must be finite and >= 0 (failed searches have eps = NaN; select "
                         "result.success first)")
    xb = xf[:, None] if eta.ndim == 5 else xf
    levels = _levels(eps[..., None, None, None], np.abs(eta), _headroom(xb, eta))
    return (xb + np.sign(eta) * levels).astype(np.uint8)


# ------------------------------------------------------------------------------------------- search

def adversarial_search(
    scores_fn: ScoresFn,
    x: np.ndarray,
    eta: np.ndarray,
    labels: np.ndarray,
    *,
    clean_scores: Optional[np.ndarray] = None,
    step0: float = 16.0,
    growth: float = 2.0,
) -> SearchResult:
    """Find, for every (image, direction), the minimal adversarial integer image along the ray.

    ``scores_fn(batch)`` takes uint8 images (M, C, H, W) and returns class scores (M, n) (logits
    preferred: the margin is extrapolated linearly). It is called once per round with the candidates of
    all active searches. ``step0`` is the first step (in grey levels of the most-moved pixel, see
    :mod:`hcgen.directions`); without a usable margin trend the step grows by ``growth`` per round.
    ``clean_scores`` (N, n) are the scores of ``x``; if omitted they cost one extra call.
    See the module docstring for the rounding rule, the meaning of "minimal" and the failure statuses.
    """
    if not callable(scores_fn):
        raise ValueError("scores_fn must be a callable batch (M, C, H, W) -> scores (M, n_classes)")
    xf = _check_images(x)
    eta = _check_eta(eta, xf)
    y_img = _check_labels(labels, len(xf))
    if not (np.isfinite(step0) and step0 > 0):
        raise ValueError(f"step0 must be a positive number of grey levels, got {step0!r}")
    if not (np.isfinite(growth) and growth > 1):
        raise ValueError(f"growth must be > 1, got {growth!r}")

    clean_forwards = 0
    if clean_scores is None:
        clean_scores = _scores(scores_fn, xf.astype(np.uint8), None)
        clean_forwards = len(xf)
    else:
        clean_scores = np.asarray(clean_scores, dtype=np.float64)
        if clean_scores.shape[:1] != (len(xf),) or clean_scores.ndim != 2 or not np.isfinite(clean_scores).all():
            raise ValueError(f"clean_scores must be finite scores of shape ({len(xf)}, n_classes) for "
                             f"the {len(xf)} images, got shape {clean_scores.shape}")
    n_classes = clean_scores.shape[1]
    if y_img.size and y_img.max() >= n_classes:
        raise ValueError(f"labels must lie in [0, {n_classes - 1}] for {n_classes} classes, got {y_img.max()}")

    shape = eta.shape[:-3]
    n_dir = 1 if eta.ndim == 4 else eta.shape[1]
    img = np.repeat(np.arange(len(xf)), n_dir)
    rays = _Rays(xf, eta, img)
    engine = _Engine(rays, y_img[img], scores_fn, n_classes, xf.shape[1:], float(step0), float(growth))
    pred0, m0 = _margin(clean_scores, y_img)
    engine.run(pred0[img], m0[img])

    s = engine
    ok = s.status == Status.FOUND
    hi = np.where(ok, s.hi, 0.0)
    x_adv = rays.images(rays.levels(hi))
    return SearchResult(
        eps=np.where(ok, s.hi, np.nan).reshape(shape),
        eps_prev=np.where(ok, s.lo, np.nan).reshape(shape),
        x_adv=x_adv.reshape(eta.shape),
        label=s.pred_hi.reshape(shape),
        success=ok.reshape(shape),
        status=s.status.astype(np.int8).reshape(shape),
        forwards=s.forwards.reshape(shape),
        rounds=s.rounds,
        clean_forwards=clean_forwards,
    )


def _inverse_quadratic(p: tuple, m: tuple) -> np.ndarray:
    """Position where the parabola eps(m) through three (position, margin) points has m = 0."""
    (p0, p1, p2), (m0, m1, m2) = p, m
    return (p0 * m1 * m2 / ((m0 - m1) * (m0 - m2)) + p1 * m0 * m2 / ((m1 - m0) * (m1 - m2))
            + p2 * m0 * m1 / ((m2 - m0) * (m2 - m1)))


def _endgame_targets(a: np.ndarray, inv_a: np.ndarray, lev_lo: np.ndarray, lev_hi: np.ndarray,
                     u_lo: np.ndarray, u_star: np.ndarray) -> np.ndarray:
    """For small brackets: list every pixel-level change between lo and hi, in order along the ray, and
    return an eps inside the first image whose u = sum |eta| * level reaches u_star (clamped to the
    images strictly between lo and hi). Rows: searches; (a, inv_a, levels) are their (M, P) arrays."""
    diff = lev_hi.astype(np.int64) - lev_lo
    r, col = np.nonzero(diff)
    d = diff[r, col]
    start = np.cumsum(d) - d
    r, col = np.repeat(r, d), np.repeat(col, d)
    t = lev_lo[r, col] + 1 + (np.arange(len(r)) - np.repeat(start, d))
    breaks = (t - 0.5) * inv_a[r, col]
    order = np.lexsort((breaks, r))
    r, breaks, du = r[order], breaks[order], a[r[order], col[order]]
    first = np.searchsorted(r, np.arange(len(a)))
    count = np.diff(np.append(first, len(r)))  # level changes per row (>= 2)
    cum = np.cumsum(du)
    u = u_lo[r] + cum - (cum - du)[first][r]  # u of the image starting at each break
    # images 1..count along the bracket (count = hi); the first with u >= u_star is image j + 1
    j = np.bincount(r, weights=u < u_star[r], minlength=len(a)).astype(np.int64)
    j = first + np.clip(j, 0, count - 2)  # keep image j + 1 strictly between lo and hi
    return 0.5 * (breaks[j] + breaks[j + 1])


class _Engine:
    """Per-search state in arrays; one batched scores_fn call per round."""

    RUNNING = -1

    def __init__(self, rays: _Rays, y: np.ndarray, scores_fn: ScoresFn, n_classes: int,
                 image_shape: tuple, step0: float, growth: float):
        S = len(y)
        self.rays, self.y, self.scores_fn, self.n_classes = rays, y, scores_fn, n_classes
        self.image_shape, self.step0, self.growth = image_shape, step0, growth
        self.status = np.full(S, self.RUNNING, dtype=np.int64)
        # bracket: lo = left end of a non-adversarial image, hi = of an adversarial one (inf: none yet)
        self.lo, self.hi = np.zeros(S), np.full(S, np.inf)
        self.lo_next = np.zeros(S)  # left end of the image after lo; done when it reaches hi
        # margins at the image-interval midpoints pos_*; "old" is the last point to leave the bracket
        self.pos_lo, self.pos_hi, self.pos_old = np.zeros(S), np.full(S, np.inf), np.full(S, np.nan)
        self.m_lo, self.m_hi, self.m_old = np.zeros(S), np.zeros(S), np.full(S, np.nan)
        self.w_lo, self.w_hi = np.ones(S), np.ones(S)  # Illinois weights of the margins
        # integer perturbation levels of lo and hi, their sums, and u = sum |eta| * level
        self.lev_lo, self.lev_hi = np.zeros(rays.a.shape, np.uint8), np.zeros(rays.a.shape, np.uint8)
        self.k_lo, self.k_hi = np.zeros(S), np.zeros(S)
        self.u_lo, self.u_hi = np.zeros(S), np.zeros(S)
        self.side = np.zeros(S, dtype=np.int8)  # end replaced last round: -1 lo, +1 hi
        self.slow = np.zeros(S, dtype=np.int8)  # bracket rounds in a row that shrank it by < 1/2
        self.pred_hi = np.zeros(S, dtype=np.int64)
        self.forwards = np.zeros(S, dtype=np.int64)
        self.rounds = 0
        self.sat = rays.left_end(rays.head)  # left end of the saturated image

    def run(self, pred0: np.ndarray, m0: np.ndarray) -> None:
        self.pred_hi[:] = pred0
        self.m_lo[:] = m0
        self.lo_next[:] = self.rays.next_break(np.zeros_like(self.rays.a))
        self.status[pred0 != self.y] = Status.MISCLASSIFIED
        self.status[(self.status == self.RUNNING) & ~np.isfinite(self.lo_next)] = Status.NULL_DIRECTION
        while True:
            idx = np.flatnonzero(self.status == self.RUNNING)
            if not len(idx):
                return
            self._round(idx)

    def _estimates(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Line search aim (hi unknown) or estimated crossing inside the bracket; and bisection flags."""
        lo, hi, pos_lo, pos_hi, pos_old = self.lo[idx], self.hi[idx], self.pos_lo[idx], self.pos_hi[idx], self.pos_old[idx]
        m_lo, m_hi, m_old = self.m_lo[idx], self.m_hi[idx], self.m_old[idx]
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            # line search: extrapolate the last two non-adversarial margins to the crossing, overshoot
            slope = (m_lo - m_old) / (pos_lo - pos_old)
            aim = pos_lo + _OVERSHOOT * m_lo / -slope
            aim = np.where((slope < 0) & np.isfinite(aim), aim, pos_lo * self.growth)
            aim = np.clip(aim, pos_lo * _MIN_GROWTH, pos_lo * self.growth ** 2)
            aim = np.minimum(np.where(lo == 0, self.step0, aim), self.sat[idx])
            # bracket: inverse quadratic interpolation through lo, hi and the old point if it lands
            # inside, else Illinois regula falsi; bisection after two rounds that shrank it by < 1/2
            iqi = _inverse_quadratic((pos_lo, pos_hi, pos_old), (m_lo, m_hi, m_old))
            wl, wh = m_lo * self.w_lo[idx], m_hi * self.w_hi[idx]
            rf = pos_lo + (pos_hi - pos_lo) * (wl / (wl - wh))
            est = np.where(_IQI & (iqi > pos_lo) & (iqi < pos_hi), iqi, rf)
            bisect = ~(np.isfinite(est) & (self.slow[idx] < 2))
            est = np.where(bisect, 0.5 * (lo + hi), est)
        line = ~np.isfinite(hi)
        return np.where(line, aim, est), bisect & ~line

    def _round(self, idx: np.ndarray) -> None:
        """Evaluate per search an upper candidate image B and, in a bracket, a lower one A < B."""
        n, sub = len(idx), self.rays.take(idx)
        lo, lo_next, hi = self.lo[idx], self.lo_next[idx], self.hi[idx]
        line = ~np.isfinite(hi)
        est, bisected = self._estimates(idx)
        target_b, target_a = est.copy(), np.full(n, np.nan)  # NaN: A is the image just before B
        # large brackets: straddle the estimate with a window of about _ENDGAME level changes
        level_span = self.k_hi[idx] - self.k_lo[idx]
        mid = ~line & ~sub.uniform & ~bisected & (level_span > _ENDGAME)
        half = 0.5 * _ENDGAME / level_span[mid] * (hi[mid] - lo[mid])
        target_a[mid], target_b[mid] = est[mid] - half, est[mid] + half
        # small brackets: interpolate the margin in u, which follows its staircase, over listed images
        e = np.flatnonzero(~line & ~sub.uniform & (level_span <= _ENDGAME))
        if len(e):
            rows = idx[e]
            wl, wh = self.m_lo[rows] * self.w_lo[rows], self.m_hi[rows] * self.w_hi[rows]
            with np.errstate(divide="ignore", invalid="ignore"):
                frac = np.where(wl > wh, wl / (wl - wh), 0.5)
            u_star = self.u_lo[rows] + (self.u_hi[rows] - self.u_lo[rows]) * frac
            target_b[e] = _endgame_targets(sub.a[e], sub.inv_a[e], self.lev_lo[rows], self.lev_hi[rows],
                                           self.u_lo[rows], u_star)
            bisected[e] = False
        # B strictly inside the bracket: at or above the image after lo, below hi
        target_b = np.maximum(np.minimum(target_b, np.nextafter(hi, -np.inf)), lo_next)
        lev_b = sub.levels(target_b)
        b = sub.left_end(lev_b)
        b_next = sub.next_break(lev_b)
        # A: only in a bracket, and only if some image lies between lo and B
        has_a = ~line & (b > lo_next)
        ar = np.flatnonzero(has_a)
        own = ~np.isnan(target_a[ar])
        lev_a = sub.previous_levels(lev_b, b, ar)
        if own.any():
            o = ar[own]
            t_a = np.maximum(np.minimum(target_a[o], np.nextafter(b[o], -np.inf)), lo_next[o])
            lev_a[own] = _levels(t_a[:, None], sub.a[o], sub.head[o])
        a = lo.copy()
        a[ar] = sub.left_end(lev_a, ar)
        a_next = b.copy()
        if own.any():
            a_next[ar[own]] = _extreme_break(sub.a[ar[own]], sub.inv_a[ar[own]], lev_a[own] + 1,
                                             lev_a[own] >= sub.head[ar[own]], sub.uniform[ar[own]],
                                             largest=False)[0]

        images = np.concatenate([sub.images(lev_b), sub.images(lev_a, ar)])
        scores = _scores(self.scores_fn, images.reshape((len(images),) + self.image_shape), self.n_classes)
        self.rounds += 1
        self.forwards[idx] += 1 + has_a
        pred, margin = _margin(scores, np.concatenate([self.y[idx], self.y[idx[ar]]]))
        adv_b, m_b, pred_b = pred[:n] != self.y[idx], margin[:n], pred[:n]
        adv_a, m_a, pred_a = np.zeros(n, dtype=bool), np.zeros(n), np.zeros(n, dtype=np.int64)
        adv_a[ar], m_a[ar], pred_a[ar] = pred[n:] != self.y[idx[ar]], margin[n:], pred[n:]
        u_b, u_a = np.einsum("ij,ij->i", lev_b, sub.a), np.zeros(n)
        u_a[ar] = np.einsum("ij,ij->i", lev_a, sub.a[ar])
        k_b, k_a = lev_b.sum(axis=1), np.zeros(n)
        k_a[ar] = lev_a.sum(axis=1)
        in_ar = np.cumsum(has_a) - 1  # row of lev_a for each search with an A
        pos_a = 0.5 * (a + a_next)
        pos_b = np.where(np.isfinite(b_next), 0.5 * (b + b_next), b)
        width_before = hi - lo

        # hi <- A if A is adversarial (the lower crossing), else B if B is
        new_hi = adv_a | adv_b
        # lo <- B if neither is adversarial, A if only B is
        new_lo = ~adv_a & (has_a | ~adv_b)
        j = idx[new_hi & ~line]
        self.pos_old[j], self.m_old[j] = self.pos_hi[j], self.m_hi[j]
        j = idx[new_lo]
        self.pos_old[j], self.m_old[j] = self.pos_lo[j], self.m_lo[j]
        j, sel = idx[new_hi], adv_a[new_hi]
        self.hi[j] = np.where(sel, a[new_hi], b[new_hi])
        self.pos_hi[j] = np.where(sel, pos_a[new_hi], pos_b[new_hi])
        self.m_hi[j] = np.where(sel, m_a[new_hi], m_b[new_hi])
        self.pred_hi[j] = np.where(sel, pred_a[new_hi], pred_b[new_hi])
        self.u_hi[j] = np.where(sel, u_a[new_hi], u_b[new_hi])
        self.k_hi[j] = np.where(sel, k_a[new_hi], k_b[new_hi])
        self.w_hi[j] = 1.0
        self.lev_hi[idx[new_hi & ~adv_a]] = lev_b[new_hi & ~adv_a]
        self.lev_hi[idx[adv_a]] = lev_a[in_ar[adv_a]]
        j, sel = idx[new_lo], adv_b[new_lo]
        self.lo[j] = np.where(sel, a[new_lo], b[new_lo])
        self.lo_next[j] = np.where(sel, a_next[new_lo], b_next[new_lo])
        self.pos_lo[j] = np.where(sel, pos_a[new_lo], pos_b[new_lo])
        self.m_lo[j] = np.where(sel, m_a[new_lo], m_b[new_lo])
        self.u_lo[j] = np.where(sel, u_a[new_lo], u_b[new_lo])
        self.k_lo[j] = np.where(sel, k_a[new_lo], k_b[new_lo])
        self.w_lo[j] = 1.0
        self.lev_lo[idx[new_lo & ~adv_b]] = lev_b[new_lo & ~adv_b]
        self.lev_lo[idx[new_lo & adv_b]] = lev_a[in_ar[new_lo & adv_b]]

        # Illinois: when the same end is replaced twice in a row, halve the retained end's weight
        side = np.where(new_hi & ~new_lo, 1, np.where(new_lo & ~new_hi, -1, 0)).astype(np.int8)
        repeat = (side != 0) & (side == self.side[idx])
        self.w_lo[idx[repeat & (side == 1)]] *= 0.5
        self.w_hi[idx[repeat & (side == -1)]] *= 0.5
        self.side[idx] = side
        shrank = (self.hi[idx] - self.lo[idx]) <= 0.5 * width_before
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
        raise ValueError(f"factors must be a non-empty list of finite scales >= 1 (paper: 1.05 1.10), "
                         f"got {np.asarray(factors).tolist()}")
    return f


def scale_perturbation(x: np.ndarray, eta: np.ndarray, eps: np.ndarray, factors: Sequence[float]) -> np.ndarray:
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
        raise ValueError(f"result has shape {result.eps.shape} but eta has {eta.shape[:-3]} directions; "
                         "pass the eta the search was run with")
    ok = result.success
    images = scale_perturbation(xf, eta, np.where(ok, result.eps, 0.0), f)
    label = np.broadcast_to(y.reshape((-1,) + (1,) * (eta.ndim - 4)), ok.shape)
    valid = np.broadcast_to(ok, (len(f),) + ok.shape)
    pred = np.full(valid.shape, -1, dtype=np.int64)
    if valid.any():
        pred[valid] = _scores(scores_fn, images[valid], None).argmax(axis=1)
    return HardPositives(factors=f, images=images, label=np.array(label), pred=pred, valid=np.array(valid))
