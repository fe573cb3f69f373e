"""hcgen.core.search: exactness on integer images, failures reported, batching, hard positives, input errors.

The oracle is a small numpy ReLU MLP (784-32-10 on x / 256, like LeNet's input scaling) trained for a
few epochs on the session's MNIST slice; its input gradients are analytic.
"""
from __future__ import annotations

import numpy as np
import pytest

from hcgen.core import directions
from hcgen.core.search import (SearchResult, Status, adversarial_search, hard_positives, perturb,
                          scale_perturbation)


class MLP:
    def __init__(self, x, y, hidden=32, epochs=4, seed=0):
        rng = np.random.default_rng(seed)
        self.W1 = rng.standard_normal((784, hidden)) * np.sqrt(2 / 784)
        self.b1 = np.zeros(hidden)
        self.W2 = rng.standard_normal((hidden, 10)) * np.sqrt(2 / hidden)
        self.b2 = np.zeros(10)
        for _ in range(epochs):
            for k in np.array_split(rng.permutation(len(x)), len(x) // 50):
                a, z = self._forward(x[k])
                p = np.exp(z - z.max(1, keepdims=True))
                p /= p.sum(1, keepdims=True)
                p[np.arange(len(k)), y[k]] -= 1
                g2 = p / len(k)
                g1 = (g2 @ self.W2.T) * (a[1] > 0)
                self.W2 -= 0.1 * a[1].T @ g2
                self.b2 -= 0.1 * g2.sum(0)
                self.W1 -= 0.1 * a[0].T @ g1
                self.b1 -= 0.1 * g1.sum(0)

    def _forward(self, x):
        a0 = np.asarray(x, np.float64).reshape(len(x), -1) / 256
        a1 = np.maximum(a0 @ self.W1 + self.b1, 0)
        return (a0, a1), a1 @ self.W2 + self.b2

    def scores(self, x):
        return self._forward(x)[1]

    def backward_from(self, x, omega):
        (_, a1), _ = self._forward(x)
        return (((omega @ self.W2.T) * (a1 > 0)) @ self.W1.T / 256).reshape(np.shape(x))

    def loss_grad(self, x, y):
        z = self.scores(x)
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p[np.arange(len(y)), y] -= 1
        return self.backward_from(x, p)


@pytest.fixture(scope="module")
def model(mnist_test_slice):
    images, labels = mnist_test_slice
    return MLP(images[:1500, None], labels[:1500].astype(np.int64))


@pytest.fixture(scope="module")
def batch(model, mnist_test_slice):
    """60 digits with FGS, FGV, HC-D-1, HC-S-1 and HC-D-3 directions: eta (60, 5, 1, 28, 28)."""
    images, labels = mnist_test_slice
    x, y = images[1500:1560, None], labels[1500:1560].astype(np.int64)
    h = model.scores(x)
    back = lambda omega: model.backward_from(x, omega)  # noqa: E731
    g = model.loss_grad(x, y)
    dirs = [directions.fgs(g), directions.fgv(g), directions.hc_d(h, y, 1, back),
            directions.hc_s(h, y, 1, back), directions.hc_d(h, y, 3, back)]
    return x, y, np.stack([d.eta for d in dirs], axis=1)


class Recorder:
    def __init__(self, fn):
        self.fn, self.sizes = fn, []

    def __call__(self, batch):
        assert batch.dtype == np.uint8 and batch.ndim == 4
        self.sizes.append(len(batch))
        return self.fn(batch)


@pytest.fixture(scope="module")
def searched(model, batch):
    x, y, eta = batch
    rec = Recorder(model.scores)
    return adversarial_search(rec, x, eta, y), rec


def test_every_result_is_a_minimal_adversarial(model, batch, searched):
    """x_adv is adversarial, reproducible from eps, and the previous distinct integer image on the ray
    (the one at eps_prev, which is also the image just below eps) is classified correctly."""
    x, y, eta = batch
    res, _ = searched
    ok = res.success
    assert ok.sum() > 200
    i, j = np.nonzero(ok)
    adv = perturb(x[i], eta[i, j], res.eps[i, j])
    assert np.array_equal(adv, res.x_adv[i, j])
    assert np.array_equal(model.scores(adv).argmax(1), res.label[i, j])
    assert (res.label[i, j] != y[i]).all()
    prev = perturb(x[i], eta[i, j], res.eps_prev[i, j])
    assert (model.scores(prev).argmax(1) == y[i]).all()
    just_below = perturb(x[i], eta[i, j], np.nextafter(res.eps[i, j], -np.inf))
    assert np.array_equal(just_below, prev)
    assert (adv != prev).reshape(len(i), -1).any(1).all()
    # eps_prev is itself the left end of its image (or 0, the clean image)
    below_prev = perturb(x[i], eta[i, j], np.nextafter(res.eps_prev[i, j], -np.inf).clip(0))
    assert ((below_prev != prev).reshape(len(i), -1).any(1) | (res.eps_prev[i, j] == 0)).all()


def test_sign_directions_match_brute_force_first_crossing(model, batch, searched):
    """For FGS the distinct images are eps = 0, 1, ..., 255 (every moving pixel has |eta| = 1); where the
    label along that list changes only once, the search must return exactly the first flip."""
    x, y, eta = batch
    res, _ = searched
    steps = np.arange(256)
    checked = 0
    for n in range(len(x)):  # a reference loop, not the code under test
        imgs = perturb(np.repeat(x[n:n + 1], 256, 0), np.repeat(eta[n:n + 1, 0], 256, 0), steps)
        adv = model.scores(imgs).argmax(1) != y[n]
        if adv[0] or not adv.any() or (np.diff(adv.astype(int)) < 0).any():
            continue
        first = np.argmax(adv)
        assert res.success[n, 0]
        assert np.array_equal(res.x_adv[n, 0], imgs[first])
        prev = perturb(x[n:n + 1], eta[n:n + 1, 0], res.eps_prev[n:n + 1, 0])[0]
        assert np.array_equal(prev, imgs[first - 1])
        checked += 1
    assert checked > 40


def test_one_batched_call_per_round_and_forward_counts(batch, searched):
    x, _, eta = batch
    res, rec = searched
    assert rec.sizes[0] == len(x) == res.clean_forwards  # the clean images, once
    assert len(rec.sizes) == 1 + res.rounds
    assert sum(rec.sizes[1:]) == res.forwards.sum()
    assert res.forwards.shape == res.eps.shape == res.status.shape == eta.shape[:2]
    assert res.x_adv.shape == eta.shape and res.x_adv.dtype == np.uint8


def test_layouts_agree(model, batch, searched):
    """(N, D, C, H, W) directions give the same answers as one (N, C, H, W) search per direction."""
    x, y, eta = batch
    res, _ = searched
    for d in (1, 2):
        one = adversarial_search(model.scores, x, eta[:, d], y, clean_scores=model.scores(x))
        assert one.clean_forwards == 0
        np.testing.assert_array_equal(one.eps, res.eps[:, d])
        np.testing.assert_array_equal(one.x_adv, res.x_adv[:, d])
        np.testing.assert_array_equal(one.status, res.status[:, d])


def test_step0_per_direction_changes_cost_not_answer(model, batch, searched):
    """Where the ray crosses the boundary once, the minimal image does not depend on the first step."""
    x, y, eta = batch
    res, _ = searched
    other = adversarial_search(model.scores, x, eta, y, step0=np.array([8.0, 64.0, 64.0, 8.0, 32.0]))
    assert np.array_equal(other.status, res.status)
    same = np.mean(other.eps[res.success] == res.eps[res.success])
    assert same > 0.95  # the rest: rays that cross more than once, each answer a valid local crossing


def test_failures_are_reported_not_dropped(model, batch):
    x, y, eta = batch
    right = np.flatnonzero(model.scores(x).argmax(1) == y)[:4]
    x, y, eta = x[right], y[right].copy(), eta[right, :2].copy()
    eta[0, 1] = 0  # moves nothing
    y[1] = (model.scores(x[1:2]).argmax(1)[0] + 1) % 10  # clean image already misclassified
    res = adversarial_search(model.scores, x, eta, y)
    assert res.status[0, 1] == Status.NULL_DIRECTION
    assert (res.status[1] == Status.MISCLASSIFIED).all()
    assert not res.success[0, 1] and np.isnan(res.eps[0, 1]) and res.forwards[0, 1] == 0
    assert np.array_equal(res.x_adv[1, 0], x[1])

    def stubborn(batch):  # always predicts class 3
        s = np.zeros((len(batch), 10))
        s[:, 3] = 1
        return s

    res = adversarial_search(stubborn, x, eta, np.full(4, 3))
    assert (res.status[eta.reshape(8, -1).any(1).reshape(4, 2)] == Status.NOT_ADVERSARIAL).all()
    assert (res.forwards[res.status == Status.NOT_ADVERSARIAL] > 0).all()


def test_ties_count_as_adversarial_by_argmax():
    """Equal top scores: adversarial iff np.argmax picks a class other than y (the first maximum)."""
    x = np.array([[[[100, 0]]], [[[100, 50]]]], np.uint8)  # second pixel: a fixed marker
    eta = np.array([[[[1.0, 0.0]]], [[[1.0, 0.0]]]])

    def tie_above_110(batch):
        flat = batch.reshape(len(batch), -1)
        s = np.tile([0.0, 2.0, 0.0], (len(batch), 1))
        above = flat[:, 0] > 110
        s[above] = np.where(flat[above, 1:2] == 0, [1.0, 1.0, 0.0], [0.0, 1.0, 1.0])
        return s

    res = adversarial_search(tie_above_110, x, eta, np.array([1, 1]))
    assert res.success[0] and res.label[0] == 0 and res.x_adv[0].ravel().tolist() == [111, 0]
    assert res.status[1] == Status.NOT_ADVERSARIAL  # the tie 1 = 2 resolves to class 1 = y


def test_rounding_rule():
    """Round half away from the original pixel, clip to [0, 255]."""
    x = np.array([[[[10, 10, 250, 3]]]], np.uint8)
    eta = np.array([[[[0.5, -0.5, 1.0, -0.25]]]])
    assert perturb(x, eta, 1.0).tolist() == [[[[11, 9, 251, 3]]]]
    assert perturb(x, eta, 10.0).tolist() == [[[[15, 5, 255, 0]]]]
    # float64 as written: (1 - 2**-53) * 0.5 + 0.5 rounds to 1.0, so that pixel has moved already
    assert perturb(x, eta, np.nextafter(1.0, 0)).tolist() == [[[[11, 9, 251, 3]]]]
    assert perturb(x, eta, 0.99).tolist() == [[[[10, 10, 251, 3]]]]


def test_hard_positives_keep_label_and_record_prediction(model, batch, searched):
    x, y, eta = batch
    res, _ = searched
    hp = hard_positives(model.scores, x, eta, y, res, [1.0, 1.05, 1.10])
    assert hp.images.shape == (3,) + eta.shape and hp.images.dtype == np.uint8
    assert np.array_equal(hp.images[0][res.success], res.x_adv[res.success])
    scaled = scale_perturbation(x, eta, np.where(res.success, res.eps, 0), [1.10])[0]
    assert np.array_equal(hp.images[2], scaled)
    assert np.array_equal(hp.label, np.broadcast_to(y[:, None], res.eps.shape))
    i = np.nonzero(res.success)
    np.testing.assert_array_equal(hp.pred[2][i], model.scores(hp.images[2][i]).argmax(1))
    assert (hp.pred[:, ~res.success] == -1).all() and not hp.valid[:, ~res.success].any()


@pytest.mark.parametrize("change, message", [
    (dict(x=np.zeros((2, 28, 28))), r"x must be a batch of images \(N, C, H, W\)"),
    (dict(x=np.full((2, 1, 28, 28), 256.0)), r"pixel values in \[0, 255\], got range \[256.0, 256.0\]"),
    (dict(x=np.full((2, 1, 28, 28), 0.5)), "integer pixel values"),
    (dict(eta=np.zeros((2, 1, 28, 27))), r"eta must have shape \(2, 1, 28, 28\)"),
    (dict(eta=np.full((2, 1, 28, 28), np.nan)), r"NaN or inf in direction\(s\) \[\[0\], \[1\]\]"),
    (dict(labels=np.array([1])), r"labels must have shape \(2,\)"),
    (dict(labels=np.array([1, 12])), r"labels must lie in \[0, 9\]"),
    (dict(scores_fn=lambda b: np.zeros((len(b), 3, 1))),
     r"scores_fn must return class scores of shape \(2, n_classes\)"),
    (dict(scores_fn=lambda b: np.full((len(b), 10), np.nan)), "NaN"),
    (dict(x=np.full((2, 1, 28, 28), np.nan)), "x contains NaN or inf"),
    (dict(eta=np.ones((2, 1, 28, 28), complex)), "eta must be real"),
    (dict(labels=np.array([1.0, 2.0])), "labels must be integers"),
    (dict(scores_fn="lenet"), "scores_fn must be a callable"),
    (dict(step0=0.0), "step0 must be a positive"),
    (dict(step0=np.ones(3)), r"step0 must be a scalar or broadcast to the directions' shape \(2,\)"),
    (dict(growth=1.0), "growth must be > 1"),
    (dict(clean_scores=np.zeros((3, 10))), r"clean_scores must be finite scores of shape \(2, n_classes\)"),
])
def test_input_errors(model, change, message):
    args = dict(scores_fn=model.scores, x=np.zeros((2, 1, 28, 28), np.uint8), eta=np.ones((2, 1, 28, 28)),
                labels=np.array([1, 2]))
    args.update(change)
    with pytest.raises(ValueError, match=message):
        adversarial_search(**args)


def test_helper_input_errors(batch, searched):
    x, y, eta = batch
    res, _ = searched
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        perturb(x, eta, res.eps)  # failures carry NaN
    with pytest.raises(ValueError, match=r"eps must have shape \(60, 5\)"):
        perturb(x, eta, np.zeros(60))
    with pytest.raises(ValueError, match="factors must be a non-empty list of finite scales >= 1"):
        scale_perturbation(x, eta, np.zeros((60, 5)), [0.9])
    with pytest.raises(ValueError, match="pass the eta the search was run with"):
        hard_positives(lambda b: None, x, eta[:, 0], y, res, [1.05])


def test_result_type(searched):
    assert isinstance(searched[0], SearchResult)


def test_exact_on_colour_images_with_tied_breakpoints():
    """Directions quantised to multiples of 1/8 make many pixels change at the same eps (and some only
    a few ulps apart); C = 3 and a linear model that some rays never flip."""
    rng = np.random.default_rng(7)
    x = rng.integers(0, 256, (40, 3, 5, 5)).astype(np.uint8)
    W = rng.standard_normal((4, 75))
    b = -(x.reshape(40, -1) @ W.T).mean(0) / 256

    def scores(batch):
        return batch.reshape(len(batch), -1) @ W.T / 256 + b

    y = scores(x).argmax(1)
    towards = W[(y + 1) % 4] - W[y] + 0.5 * rng.standard_normal((40, 75))  # mostly adversarial
    eta = np.stack([towards, -towards], axis=1).reshape(40, 2, 3, 5, 5)  # ... and mostly not
    eta = np.round(eta / np.abs(eta).reshape(40, 2, -1).max(-1)[..., None, None, None] * 8) / 8
    res = adversarial_search(scores, x, eta, y)
    assert set(np.unique(res.status)) <= {Status.FOUND, Status.NOT_ADVERSARIAL}
    assert res.success.sum() > 30 and (res.status == Status.NOT_ADVERSARIAL).any()
    i, j = np.nonzero(res.success)
    adv = perturb(x[i], eta[i, j], res.eps[i, j])
    prev = perturb(x[i], eta[i, j], res.eps_prev[i, j])
    assert np.array_equal(adv, res.x_adv[i, j])
    assert (scores(adv).argmax(1) != y[i]).all() and (scores(prev).argmax(1) == y[i]).all()
    assert np.array_equal(perturb(x[i], eta[i, j], np.nextafter(res.eps[i, j], 0)), prev)
    # a failure means the saturated image keeps the label
    i, j = np.nonzero(res.status == Status.NOT_ADVERSARIAL)
    saturated = perturb(x[i], eta[i, j], np.full(len(i), 1e6))
    assert (scores(saturated).argmax(1) == y[i]).all()
