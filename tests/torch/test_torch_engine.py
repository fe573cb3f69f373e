"""hcgen.torch.engine (the tensor-native engine) against hcgen.core.search / hcgen.core.directions (the numpy engine).

The same torch LeNet through `TorchNet` + the numpy engine (today's `hcgen generate --framework torch` path)
and through the tensor engine: identical directions, and identical records (eps, x_adv bytes, label, status,
x1.05 hard positives and their predictions) for >= 99% of (digit, method) pairs; any other difference must be
a float tie (the one place the engines' arithmetic differs is the order of the float64 sum u that steers the
bracket, so on a ray with two crossings they may find different ones: both must be crossings). Measured on the
suite's torch LeNet: 100 digits x 20 methods, every pair identical.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hcgen.core import directions as np_directions
from hcgen.core import search
from hcgen.generate.run import compute_directions
from hcgen.core.methods import parse_methods
from hcgen.torch import engine
from hcgen.backends.torch import TorchNet

from tests.torch.lenet_fixture import mnist_test_digits, trained_lenet

METHODS = parse_methods("fgs,fgv,hc-d:1-9,hc-s:1-9")
N_DIGITS = 100


@pytest.fixture(scope="module")
def net():
    torch.set_num_threads(1)
    return TorchNet(trained_lenet())


@pytest.fixture(scope="module")
def sources(net):
    x, y = mnist_test_digits(N_DIGITS)
    h = net.scores(x).astype(np.float64)
    ok = h.argmax(1) == y
    return x[ok], y[ok], h[ok]  # x[ok]: strides (784, 1, 28, 1), the layout generate_batch passes


@pytest.fixture(scope="module")
def both(net, sources):
    x, y, h = sources
    eta, _ = compute_directions(net, x, y, h, METHODS)
    res = search.adversarial_search(net.scores, x, eta, y, clean_scores=h)
    hp = search.hard_positives(net.scores, x, eta, y, res, [1.05])
    res_t, hp_t = engine.search_batch(net, x, y, h, METHODS, [1.05])
    return eta, (res, hp), (res_t, hp_t)


def _margin(net, image: np.ndarray, label: int) -> float:
    s = net.scores(image[None]).astype(np.float64)[0]
    return (s[label] - np.delete(s, label).max()) / np.abs(s).max()


def test_directions_are_torchnets_bit_for_bit(net, sources):
    x, y, h = sources
    eta_np, valid_np = compute_directions(net, x, y, h, METHODS)
    eta_t, valid_t = engine.compute_directions(engine.pixel_model_of(net), torch.from_numpy(x), torch.from_numpy(y),
                                               torch.from_numpy(h), METHODS)
    np.testing.assert_array_equal(eta_t.numpy(), eta_np)
    np.testing.assert_array_equal(valid_t.numpy(), valid_np)
    assert valid_np.all()  # LeNet: no all-zero gradient here


def test_same_records_as_the_numpy_engine(net, sources, both):
    """>= 99% of (digit, method) pairs identical in eps, x_adv bytes, label, status and the x1.05 hard
    positive (image and prediction); every other pair is two crossings of one ray or a class tie."""
    x, y, _ = sources
    eta, (res, hp), (res_t, hp_t) = both
    assert res_t.eps.shape == res.eps.shape == (len(x), len(METHODS))
    same = ((res.eps == res_t.eps) | (np.isnan(res.eps) & np.isnan(res_t.eps)))
    same &= (res.status == res_t.status) & (res.label == res_t.label) & (res.success == res_t.success)
    same &= (res.x_adv == res_t.x_adv).all(axis=(2, 3, 4))
    same &= (hp.images[0] == hp_t.images[0]).all(axis=(2, 3, 4)) & (hp.pred[0] == hp_t.pred[0])
    assert same.mean() >= 0.99, same.mean()
    assert res.x_adv.dtype == res_t.x_adv.dtype == np.uint8
    assert set(np.unique(res_t.status)) <= {s.value for s in search.Status}
    for i, j in np.argwhere(~same):
        assert res.success[i, j] and res_t.success[i, j], f"digit {i} {METHODS[j].name}: a search failed on one engine only"
        ray = eta[i:i + 1, j]
        margins = [_margin(net, r.x_adv[i, j], int(y[i])) for r in (res, res_t)]
        if min(abs(m) for m in margins) <= 1e-5:
            continue  # class tie at a crossing
        for r in (res, res_t):  # two crossings of the same ray: both adversarial, both previous images not
            assert _margin(net, r.x_adv[i, j], int(y[i])) < 0
            prev = search.perturb(x[i:i + 1], ray, r.eps_prev[i, j])[0]
            assert _margin(net, prev, int(y[i])) > 0, f"digit {i} {METHODS[j].name}: unexplained difference"


def test_results_are_minimal_integer_adversarials(net, sources, both):
    """The engine's own guarantee, checked with the numpy rounding rule: x_adv = perturb(eps) is adversarial,
    the previous distinct integer image perturb(eps_prev) is not, and nothing lies between them."""
    x, y, _ = sources
    eta, _, (res_t, hp_t) = both
    n, d = np.nonzero(res_t.success)
    assert len(n) >= 0.9 * res_t.success.size
    xb = x[n]
    np.testing.assert_array_equal(search.perturb(xb, eta[n, d], res_t.eps[n, d]), res_t.x_adv[n, d])
    assert (net.scores(res_t.x_adv[n, d]).argmax(1) != y[n]).all()
    np.testing.assert_array_equal(net.scores(res_t.x_adv[n, d]).argmax(1), res_t.label[n, d])
    prev = search.perturb(xb, eta[n, d], res_t.eps_prev[n, d])
    assert (net.scores(prev).argmax(1) == y[n]).all()
    just_before = search.perturb(xb, eta[n, d], np.nextafter(res_t.eps[n, d], 0))
    np.testing.assert_array_equal(just_before, prev)
    np.testing.assert_array_equal(hp_t.images[0][n, d], search.perturb(xb, eta[n, d], 1.05 * res_t.eps[n, d]))
    assert (hp_t.label == y[:, None]).all() and hp_t.label.shape == res_t.eps.shape


def test_perturb_equals_numpy_including_rounding_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (4, 1, 6, 6)).astype(np.uint8)
    eta = rng.normal(size=(4, 3, 1, 6, 6))
    eta[:, 0] = np.sign(eta[:, 0])  # FGS-like: eps * 1 + 0.5 ties at half-integers
    eta[:, 1, 0, :2] = 0.25  # eps * 0.25 + 0.5 exactly integer at eps = 2, 6, ...
    eta /= np.abs(eta).reshape(4, 3, -1).max(axis=2)[:, :, None, None, None]
    for eps in (0.5, 2.0, 6.0, 7.3, 300.0):
        e = np.full((4, 3), eps)
        np.testing.assert_array_equal(engine.perturb(torch.from_numpy(x), torch.from_numpy(eta), torch.from_numpy(e))
                                      .numpy().astype(np.uint8), search.perturb(x, eta, e))


class Linear(nn.Module):
    input_shape = (1, 12, 12)

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(144, 4)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_search_equals_numpy_on_random_directions_and_statuses():
    """Arbitrary directions (random, sparse, zero) on a small linear model: same records and statuses,
    including NULL_DIRECTION (eta = 0), NOT_ADVERSARIAL and MISCLASSIFIED (a wrong label)."""
    torch.manual_seed(0)
    model = Linear().eval()
    net = TorchNet(model, input_shape=(1, 12, 12))
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (6, 1, 12, 12)).astype(np.uint8)
    y = net.scores(x).argmax(1).astype(np.int64)
    y[5] = (y[5] + 1) % 4  # misclassified source
    eta = rng.normal(size=(6, 5, 1, 12, 12))
    eta[:, 1] *= rng.random((6, 1, 12, 12)) < 0.1  # sparse
    eta[:, 2] = 0.0  # null
    eta[:, 3] = np.sign(eta[:, 3])
    peak = np.abs(eta).reshape(6, 5, -1).max(axis=2)
    eta = np.where(peak[:, :, None, None, None] > 0, eta / np.where(peak > 0, peak, 1)[:, :, None, None, None], 0)
    eta[:, 4, :, :6] = 0.0  # half the image fixed
    res = search.adversarial_search(net.scores, x, eta, y)
    pm = engine.PixelModel(model, "lenet")
    res_t = engine.adversarial_search(pm, torch.from_numpy(x), torch.from_numpy(eta), torch.from_numpy(y)).numpy()
    for name in ("eps", "eps_prev", "x_adv", "label", "success", "status", "forwards"):
        np.testing.assert_array_equal(getattr(res_t, name), getattr(res, name), err_msg=name)
    assert res_t.rounds == res.rounds and res_t.clean_forwards == res.clean_forwards == 6
    assert (res_t.status[:, 2][:5] == search.Status.NULL_DIRECTION).all()
    assert (res_t.status[5] == search.Status.MISCLASSIFIED).all()
    assert {search.Status.FOUND, search.Status.NOT_ADVERSARIAL} <= set(res_t.status[:5].ravel().tolist())


def test_hot_class_and_omega_with_ties_equal_numpy():
    h = np.array([[1.0, 3.0, 3.0, -2.0, 3.0], [0.5, 0.5, 0.5, 0.5, 0.5], [-1.0, -3.0, 2.0, 2.0, 0.0]])
    y = np.array([1, 0, 4])
    for k in range(1, 5):
        np.testing.assert_array_equal(engine.hot_class(torch.from_numpy(h), torch.from_numpy(y), k).numpy(),
                                      np_directions.hot_class(h, y, k))
        np.testing.assert_array_equal(engine.omega_hc(torch.from_numpy(h), torch.from_numpy(y), k).numpy(),
                                      np_directions.omega_hc(h, y, k))


def test_channels_last_looking_strides_are_made_canonical(net):
    """A 1-channel batch indexed with a mask has strides (HW, 1, W, 1), which torch may run through another
    convolution kernel (different float32 sums): the engine copies such input to canonical strides."""
    x, _ = mnist_test_digits(40)
    sub = x[:, 0][:, None][np.arange(40) % 3 > 0]  # as generate_batch's x[correct] of MNIST (N, 28, 28)[:, None]
    t = torch.from_numpy(sub)
    assert t.stride()[1] == 1
    pm = engine.pixel_model_of(net)
    np.testing.assert_array_equal(pm.scores(t).numpy(), net.scores(sub))
    assert engine.canonical(t, torch.float32, torch.device("cpu")).stride() == (784, 784, 28, 1)


def test_eval_mode_restores_each_modules_flag_even_on_error():
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.BatchNorm1d(3))
    model.train()
    model[2].eval()  # a mix
    with pytest.raises(RuntimeError, match="inside"):
        with engine.eval_mode(model):
            assert not any(m.training for m in model.modules())
            raise RuntimeError("inside")
    assert [m.training for m in model.modules()] == [True, True, True, False]


def test_pixel_model_refuses_unknown_layer_and_non_modules():
    with pytest.raises(ValueError, match=r"unknown layer 'nope'; modules of Linear: fc"):
        engine.PixelModel(Linear(), layer="nope")
    with pytest.raises(ValueError, match="model must be a torch.nn.Module"):
        engine.PixelModel(lambda x: x)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        engine.PixelModel(Linear(), batch_size=0)
    with pytest.raises(ValueError, match="unknown preprocessing 'caffe'"):
        engine.PixelModel(Linear(), preprocess="caffe")


def test_generate_batch_through_the_engine_gives_the_same_records(net, monkeypatch):
    """`hcgen generate --framework torch`: generate_batch sends a TorchNet's batches to `search_batch` and
    writes the same records, metadata (PASS included) and failures as the numpy path (`hcgen.core.search`,
    forced here by hiding the engine)."""
    from hcgen.generate import run as generate

    x, y = mnist_test_digits(24)
    methods = parse_methods("fgs,fgv,hc-d:1-3,hc-s:2")
    calls = []
    real = engine.search_batch
    monkeypatch.setattr(engine, "search_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    new = generate.generate_batch(net, x, y, np.arange(24), 0, methods, [1.05], 0.5, n_jobs=1)
    assert calls == [1]  # the engine ran the batch
    monkeypatch.setattr(generate, "_tensor_engine", lambda net: None)
    ref = generate.generate_batch(net, x, y, np.arange(24), 0, methods, [1.05], 0.5, n_jobs=1)
    assert calls == [1]  # the numpy path did not call it
    np.testing.assert_array_equal(new.images, ref.images)
    np.testing.assert_array_equal(new.labels, ref.labels)
    assert new.metadata.keys() == ref.metadata.keys()
    for key in ref.metadata:
        np.testing.assert_array_equal(new.metadata[key], ref.metadata[key], err_msg=key)
    assert new.failures == ref.failures and len(ref.images) > 50
