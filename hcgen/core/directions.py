"""Adversarial directions in pixel space: FGS, FGV (Eq. 6) and hot/cold (Eq. 7), on numpy batches.

Conventions
-----------
* Images are batches (N, C, H, W) of pixel values in [0, 255]; a direction ``eta`` has the same shape.
* Every direction is normalised per sample so that ``max |eta| = 1``: a step ``eps`` along ``eta``
  moves the most-moved pixel by ``eps`` grey levels (see :func:`hcgen.core.search.perturb` for the rounding).
* Gradients may be taken with respect to the pixels or to any positive multiple of them that is uniform
  over pixels (e.g. LeNet's input ``x / 256``, or a mean-subtracted input): the normalisation removes
  the scale. Per-channel scaling is *not* uniform; the caller must chain-rule such gradients back to
  pixels first.
* A sample whose gradient is identically zero cannot be normalised; it gets ``eta = 0`` and
  ``valid = False`` (never NaN). :func:`hcgen.core.search.adversarial_search` reports such directions as
  failures with status ``NULL_DIRECTION``.

This module never imports caffe: the backpropagation ``B_l(omega)`` of Sec. 4.3 is supplied by the
caller as a callable ``backward_from(omega) -> image gradient`` (or as the gradient array itself).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import numpy as np

from hcgen.errors import BadInput

BackwardFrom = Union[Callable[[np.ndarray], np.ndarray], np.ndarray]

__all__ = ["Directions", "normalize", "fgs", "fgv", "hot_class", "omega_hc", "hc_d", "hc_s"]


@dataclass(frozen=True)
class Directions:
    """Normalised directions ``eta`` (N, C, H, W) float64 with ``max |eta| = 1`` per sample, and ``valid``
    (N,) bool, False where the raw gradient was all zero (then ``eta`` is all zero)."""

    eta: np.ndarray
    valid: np.ndarray


def normalize(grad: np.ndarray) -> Directions:
    """Scale each sample of a raw image-space gradient (N, C, H, W) to ``max |eta| = 1``.

    All-zero samples are flagged (``valid = False``, ``eta = 0``); non-finite gradients raise.
    """
    g = np.asarray(grad, dtype=np.float64)
    if g.ndim != 4:
        raise BadInput(f"expected an image-space gradient of shape (N, C, H, W), got shape {g.shape}")
    finite = np.isfinite(g).reshape(len(g), -1).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise BadInput(
            f"gradient contains NaN or inf for sample(s) {bad[:10].tolist()}; check the loss/backward "
            "of the network (e.g. a softmax over overflowing logits)")
    peak = np.abs(g).reshape(len(g), -1).max(axis=1) if g.size else np.zeros(len(g))
    valid = peak > 0
    scale = np.where(valid, peak, 1.0)[:, None, None, None]
    eta = np.where(valid[:, None, None, None], g / scale, 0.0)
    return Directions(eta=eta, valid=valid)


def fgv(loss_grad: np.ndarray) -> Directions:
    """Fast gradient value (Eq. 6): ``eta = grad_x J(theta, x, y)``, normalised to ``max |eta| = 1``."""
    return normalize(loss_grad)


def fgs(loss_grad: np.ndarray) -> Directions:
    """Fast gradient sign (Goodfellow et al.): ``eta = sign(grad_x J)`` (already ``max |eta| = 1``).

    ``fgs(g).eta == np.sign(fgv(g).eta)`` exactly.
    """
    return normalize(np.sign(np.asarray(loss_grad, dtype=np.float64)))


def _check_scores_labels(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if h.ndim != 2:
        raise BadInput(f"scores must have shape (N, n_classes), got shape {h.shape}")
    if not np.isfinite(h).all():
        raise BadInput("scores contain NaN or inf; pass finite penultimate-layer features")
    if y.shape != (len(h),):
        raise BadInput(f"labels must have shape ({len(h)},) to match scores {h.shape}, got {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise BadInput(f"labels must be integers, got dtype {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= h.shape[1]):
        raise BadInput(f"labels must lie in [0, {h.shape[1] - 1}] for {h.shape[1]} classes, "
                       f"got range [{y.min()}, {y.max()}]")
    return h, y.astype(np.int64)


def hot_class(scores: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """The hot class of HC-k: the k-th highest-scoring class other than ``labels`` (k = 1: most similar).

    Ties in score are broken towards the lower class index. Returns (N,) int64.
    """
    h, y = _check_scores_labels(scores, labels)
    n = h.shape[1]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n - 1:
        raise BadInput(f"k must be an integer in [1, {n - 1}] for {n} classes (k = 1 is the most "
                       f"similar class), got {k!r}")
    others = h.copy()
    others[np.arange(len(h)), y] = -np.inf  # the label itself is never hot
    order = np.argsort(-others, axis=1, kind="stable")
    return order[:, k - 1]


def omega_hc(scores: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Hot/cold feature vector (Eq. 7) for the penultimate-layer features ``scores`` = h(x), (N, n).

    ``omega[j] = |h_j|`` for the hot class j = :func:`hot_class` (k), ``omega[y] = -h_y`` for the label
    (cold), 0 elsewhere. Note Eq. 7 is taken literally: if ``h_y < 0`` the cold entry is positive.
    """
    hot = hot_class(scores, labels, k)
    h, y = _check_scores_labels(scores, labels)
    rows = np.arange(len(h))
    omega = np.zeros_like(h)
    omega[rows, hot] = np.abs(h[rows, hot])  # Eq. 7, j = y~ (hot)
    omega[rows, y] = -h[rows, y]  # Eq. 7, j = y (cold)
    return omega


def _backprop(features: np.ndarray, labels: np.ndarray, k: int, backward_from: BackwardFrom) -> np.ndarray:
    omega = omega_hc(features, labels, k)
    grad = backward_from(omega) if callable(backward_from) else backward_from
    grad = np.asarray(grad, dtype=np.float64)
    if grad.ndim != 4 or len(grad) != len(omega):
        raise BadInput(f"backward_from must return an image gradient of shape ({len(omega)}, C, H, W) "
                       f"for omega of shape {omega.shape}, got shape {grad.shape}")
    return grad


def hc_d(features: np.ndarray, labels: np.ndarray, k: int, backward_from: BackwardFrom) -> Directions:
    """HC-D-k: ``eta = B_l(omega_hc)`` (Sec. 4.2) backpropagated from the penultimate layer, normalised.

    ``features`` are h(x) (N, n); ``backward_from(omega)`` returns the image-space gradient (N, C, H, W)
    of ``sum_j omega_j h_j`` (Caffe's backward seeded with ``omega`` at the penultimate layer). An
    already computed gradient array is accepted in place of the callable.
    """
    return normalize(_backprop(features, labels, k, backward_from))


def hc_s(features: np.ndarray, labels: np.ndarray, k: int, backward_from: BackwardFrom) -> Directions:
    """HC-S-k: the sign of HC-D-k, ``eta = sign(B_l(omega_hc))``."""
    return normalize(np.sign(_backprop(features, labels, k, backward_from)))
