"""hcgen.core.directions: Eq. 7 on hand-made scores, normalisation, FGS = sign(FGV), HC first-order effect."""
from __future__ import annotations

import numpy as np
import pytest

from hcgen.core import directions
from hcgen.core.directions import fgs, fgv, hc_d, hc_s, hot_class, normalize, omega_hc

SCORES = np.array([[1.0, 5.0, 3.0, -2.0],
                   [0.5, 0.5, 4.0, 0.5]])
LABELS = np.array([1, 2])


def test_hot_class_ranks_other_classes_by_score():
    assert hot_class(SCORES, LABELS, 1).tolist() == [2, 0]  # row 2: ties 0.5 -> lowest index
    assert hot_class(SCORES, LABELS, 2).tolist() == [0, 1]
    assert hot_class(SCORES, LABELS, 3).tolist() == [3, 3]


def test_omega_hc_is_eq7():
    """Eq. 7: |h| at the hot class, -h_y at the label, 0 elsewhere (hand-computed)."""
    np.testing.assert_array_equal(omega_hc(SCORES, LABELS, 1), [[0, -5, 3, 0], [0.5, 0, -4, 0]])
    np.testing.assert_array_equal(omega_hc(SCORES, LABELS, 3), [[0, -5, 0, 2], [0, 0, -4, 0.5]])
    # the cold entry is -h_y literally, also when h_y < 0
    np.testing.assert_array_equal(omega_hc([[-1.0, -3.0]], [0], 1), [[1.0, 3.0]])


@pytest.mark.parametrize("k", [0, 4, 1.5, True])
def test_hot_class_rejects_bad_k(k):
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 3\]"):
        hot_class(SCORES, LABELS, k)


def test_scores_and_labels_are_validated():
    with pytest.raises(ValueError, match="scores must have shape"):
        omega_hc(SCORES[0], LABELS, 1)
    with pytest.raises(ValueError, match="labels must have shape"):
        omega_hc(SCORES, LABELS[:1], 1)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\]"):
        omega_hc(SCORES, np.array([1, 4]), 1)
    with pytest.raises(ValueError, match="NaN or inf"):
        omega_hc(np.array([[np.nan, 1.0]]), np.array([0]), 1)
    with pytest.raises(ValueError, match="labels must be integers"):
        omega_hc(SCORES, np.array([1.0, 2.0]), 1)


def test_normalize_peak_one_and_flags_zero_gradient():
    rng = np.random.default_rng(0)
    g = rng.standard_normal((3, 1, 4, 4)) * np.array([1e-9, 1.0, 0.0])[:, None, None, None]
    d = normalize(g)
    assert d.valid.tolist() == [True, True, False]
    np.testing.assert_allclose(np.abs(d.eta[:2]).reshape(2, -1).max(1), 1.0)
    assert np.all(d.eta[2] == 0) and np.isfinite(d.eta).all()
    np.testing.assert_allclose(d.eta[0], g[0] / np.abs(g[0]).max())


def test_normalize_rejects_nan_and_bad_shape():
    g = np.zeros((2, 1, 2, 2))
    g[1, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"NaN or inf for sample\(s\) \[1\]"):
        normalize(g)
    with pytest.raises(ValueError, match=r"shape \(N, C, H, W\)"):
        normalize(np.zeros((2, 4)))


def test_fgs_is_sign_of_fgv_exactly():
    rng = np.random.default_rng(1)
    g = rng.standard_normal((5, 1, 6, 6)) * (rng.random((5, 1, 6, 6)) > 0.3)
    g[4] = 0
    assert np.array_equal(fgs(g).eta, np.sign(fgv(g).eta))
    assert np.array_equal(fgs(g).valid, fgv(g).valid)
    assert set(np.unique(fgs(g).eta)) <= {-1.0, 0.0, 1.0}


class OrthoLinear:
    """s = W x / 256 + b with orthonormal rows of W: B_l(omega) = W^T omega / 256 exactly."""

    def __init__(self, n=10, shape=(1, 8, 8), seed=0):
        rng = np.random.default_rng(seed)
        q, _ = np.linalg.qr(rng.standard_normal((int(np.prod(shape)), n)))
        self.W, self.shape = q.T, shape
        self.b = 5 + rng.random(n)  # positive scores, so -h_y is a genuinely cold (negative) entry

    def scores(self, x):
        return x.reshape(len(x), -1) @ self.W.T / 256 + self.b

    def backward_from(self, omega):
        return (omega @ self.W / 256).reshape((len(omega),) + self.shape)


@pytest.mark.parametrize("k", [1, 2, 9])
def test_hc_direction_increases_hot_minus_cold_to_first_order(k):
    """d/d eps [s_hot - s_y](x + eps eta) = (W_hot - W_y) . eta / 256 = (|h_hot| + h_y) / c > 0 when
    W has orthonormal rows; checked on the analytic gradient and by a central difference."""
    model = OrthoLinear()
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (20, 1, 8, 8)).astype(np.float64)
    h = model.scores(x)
    y = h.argmax(1)
    d = hc_d(h, y, k, model.backward_from)
    assert d.valid.all()
    hot, rows = hot_class(h, y, k), np.arange(len(x))
    slope = ((model.W[hot] - model.W[y]) * d.eta.reshape(len(x), -1)).sum(1) / 256
    assert (slope > 0).all()
    t = 1e-3
    diff = model.scores(x + t * d.eta) - model.scores(x - t * d.eta)
    np.testing.assert_allclose((diff[rows, hot] - diff[rows, y]) / (2 * t), slope, rtol=1e-6)


def test_hc_s_is_sign_of_hc_d_and_accepts_gradient_array():
    model = OrthoLinear(seed=1)
    x = np.random.default_rng(4).integers(0, 256, (6, 1, 8, 8)).astype(np.float64)
    h = model.scores(x)
    y = h.argmax(1)
    dd = hc_d(h, y, 2, model.backward_from)
    assert np.array_equal(hc_s(h, y, 2, model.backward_from).eta, np.sign(dd.eta))
    grad = model.backward_from(omega_hc(h, y, 2))
    assert np.array_equal(hc_d(h, y, 2, grad).eta, dd.eta)


def test_backward_from_shape_is_checked():
    with pytest.raises(ValueError, match=r"must return an image gradient of shape \(2, C, H, W\)"):
        hc_d(SCORES, LABELS, 1, lambda omega: np.zeros((2, 64)))


def test_public_names():
    assert set(directions.__all__) >= {"fgs", "fgv", "hc_d", "hc_s", "omega_hc", "hot_class", "normalize"}
