"""hcgen.torch.HardPositives: online hard positives on the current weights, in a training loop.

Checked on the suite's small torch LeNet: uint8-exact images with x's dtype, original labels, PASS >= tau
(OpenCV's PASS recomputed), adversarial for the current weights at scale 1 and minimal along the ray before
scaling, scaled images = the rounding rule at s * eps, the PASS band, counts that add up, the train/eval
mode and batch norm statistics untouched, no RNG consumed, no parameter gradients, device placement, and
one-line errors for bad input.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import hcgen
from hcgen.core import metrics
from hcgen.torch import HardPositives, engine
from hcgen.torch.hard_positives import REASONS

from tests.torch.lenet_fixture import mnist_test_digits, trained_lenet

N = 16


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return trained_lenet()


@pytest.fixture(scope="module")
def batch():
    x, y = mnist_test_digits(N)
    return torch.from_numpy(x), torch.from_numpy(y)


def _pred(model, x):
    with torch.no_grad():
        return model(x.float() * 0.00390625).argmax(1)


def test_uint8_exact_labels_kept_and_minimal_adversarial_before_scaling(model, batch):
    x, y = batch
    hp = HardPositives(model, methods="fgs,fgv,hc-d:1-3,hc-s:2", scales=(1.0, 1.05))
    x_hp, y_hp = hp(x, y)
    info, res, eta = hp.last_info, hp.last_search, hp.last_directions
    assert x_hp.dtype == torch.uint8 and x_hp.shape[1:] == x.shape[1:] and len(x_hp) == len(y_hp) > 0
    assert y_hp.dtype == torch.int64
    torch.testing.assert_close(y_hp, y[info.source])  # original labels
    src = torch.nonzero(_pred(model, x) == y).flatten()
    torch.testing.assert_close(info.source, src[info.row])
    # ordered by source image, then method, then scale
    key = (info.source * 100 + info.method) * 10 + (info.scale > 1).long()
    assert (key[1:] > key[:-1]).all()
    xs = x[src].double()
    rays = eta[info.row, info.method]
    # each row is the rounding rule at scale * eps; scale 1 is the minimal adversarial of the search
    torch.testing.assert_close(x_hp.double(), engine.perturb(xs[info.row], rays, info.scale * info.eps), rtol=0, atol=0)
    one = info.scale == 1.0
    torch.testing.assert_close(x_hp[one], res.x_adv[info.row[one], info.method[one]], rtol=0, atol=0)
    assert (_pred(model, x_hp[one]) != y_hp[one]).all()  # adversarial for the current weights
    prev = engine.perturb(xs[info.row[one]], rays[one], res.eps_prev[info.row[one], info.method[one]])
    assert (_pred(model, prev) == y_hp[one]).all()  # the previous integer image on the ray is not
    before = engine.perturb(xs[info.row[one]], rays[one], torch.nextafter(info.eps[one], torch.zeros(())))
    torch.testing.assert_close(before, prev, rtol=0, atol=0)
    # a float batch gives the same pixels as floats
    x_f, y_f = hp(x.float(), y)
    assert x_f.dtype == torch.float32
    torch.testing.assert_close(x_f, x_hp.float(), rtol=0, atol=0)
    torch.testing.assert_close(y_f, y_hp)


def test_pass_at_least_tau_and_counts_add_up(model, batch):
    x, y = batch
    hp = HardPositives(model, methods="hc-d:1-4", scales=(1.05, 1.1), tau=0.8)
    x_hp, y_hp = hp(x, y)
    s, info = hp.last_stats, hp.last_info
    assert (info.pass_ >= 0.8).all()
    want, _ = metrics.pass_scores(x[info.source][:, 0].numpy(), x_hp[:, 0].numpy(), n_jobs=1)
    np.testing.assert_array_equal(info.pass_.numpy(), want)
    d = s["dropped"]
    assert set(d) == set(REASONS)
    assert s["searches"] == (N - d["misclassified_source"]) * 4
    assert s["found"] + d["not_adversarial"] + d["null_direction"] == s["searches"]
    assert s["candidates"] == 2 * s["found"] and s["kept"] == s["candidates"] - d["below_tau"] == len(x_hp)
    assert d["below_tau"] > 0  # tau 0.8 removes some on this net
    no_tau = HardPositives(model, methods="hc-d:1-4", scales=(1.05, 1.1))
    x_all, _ = no_tau(x, y)
    assert len(x_all) == s["candidates"] and torch.isnan(no_tau.last_info.pass_).all()


def test_pass_band_lands_every_kept_image_in_the_band(model, batch):
    x, y = batch
    hp = HardPositives(model, methods="fgv,hc-d:1-2", pass_band=(0.8, 0.9))
    x_hp, y_hp = hp(x, y)
    info, s = hp.last_info, hp.last_stats
    assert len(x_hp) > 0 and ((info.pass_ >= 0.8) & (info.pass_ <= 0.9)).all() and (info.scale >= 1).all()
    want, _ = metrics.pass_scores(x[info.source][:, 0].numpy(), x_hp[:, 0].numpy(), n_jobs=1)
    np.testing.assert_array_equal(info.pass_.numpy(), want)
    rays = hp.last_directions[info.row, info.method]
    torch.testing.assert_close(x_hp.double(), engine.perturb(x[info.source].double(), rays, info.scale * info.eps),
                               rtol=0, atol=0)
    assert s["kept"] + s["dropped"]["outside_band"] == s["candidates"] == s["found"]
    assert (info.scale > 1).any()


class DropBN(nn.Module):
    """LeNet-shaped net with dropout and batch norm, for the mode tests."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 5, stride=2)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4 * 12 * 12, 10)

    def forward(self, x):
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x)))).flatten(1))


def test_search_in_eval_mode_restores_the_mode_and_touches_no_state(batch):
    """Dropout off and batch norm on its running statistics while searching (so the result equals the
    eval-mode model's, call after call), each module's training flag restored, running statistics and
    parameter gradients untouched, no random numbers drawn."""
    x, y = batch
    torch.manual_seed(0)
    net = DropBN()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.1, 0.1)
        net.bn.running_var.uniform_(0.5, 1.5)
    y = _pred(net.eval(), x)  # labels the eval-mode net gets right
    net.train()
    net.drop.eval()  # a mix of modes
    flags = [m.training for m in net.modules()]
    stats = (net.bn.running_mean.clone(), net.bn.running_var.clone(), int(net.bn.num_batches_tracked))
    for p in net.parameters():
        p.grad = torch.full_like(p, 7.0)
    rng = torch.get_rng_state()
    hp = HardPositives(net, methods="fgs,hc-d:1", scales=(1.0,))
    x1, y1 = hp(x, y)
    x2, y2 = hp(x, y)
    assert [m.training for m in net.modules()] == flags
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(net.bn.running_mean, stats[0]) and torch.equal(net.bn.running_var, stats[1])
    assert int(net.bn.num_batches_tracked) == stats[2]
    assert all((p.grad == 7.0).all() for p in net.parameters())
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and len(x1) > 0
    net.eval()
    x3, _ = HardPositives(net, methods="fgs,hc-d:1", scales=(1.0,))(x, y)
    assert torch.equal(x1, x3)
    assert not any(m.training for m in net.modules())  # an eval-mode model stays in eval mode
    assert (_pred(net, x1) != y1).all()  # adversarial for the eval-mode function
    net.train()
    with pytest.raises(ValueError, match="class indices"):
        hp(x, torch.full_like(y, 10))  # fails inside the eval-mode block
    assert [m.training for m in net.modules()] == [True] * 5


def test_training_loop_with_a_dataloader_and_an_optimizer(batch):
    """Works as documented with a DataLoader, a user's optimizer and loss; the model stays in train mode."""
    x, y = batch
    model = trained_lenet().train()
    before = [p.detach().clone() for p in model.parameters()]
    hp = HardPositives(model, methods="hc-d:1-2", scales=(1.05,), tau=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    for xb, yb in loader:
        x_hp, y_hp = hp(xb, yb)
        logits = model(hp.preprocess(torch.cat([xb, x_hp]).float()))
        loss = nn.functional.cross_entropy(logits, torch.cat([yb, y_hp]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert model.training and torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_layer_names_the_scores_module(model, batch):
    """layer='ip2' (the logits module, read with a hook) gives exactly what the model's output gives."""
    x, y = batch
    a = HardPositives(model, methods="fgv,hc-s:1", scales=(1.05,))(x, y)
    b = HardPositives(model, methods="fgv,hc-s:1", scales=(1.05,), layer="ip2")(x, y)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="unknown layer 'fc9'; modules of LeNet: conv1, pool1, conv2"):
        HardPositives(model, layer="fc9")
    with pytest.raises(ValueError, match="layer 'ip1' outputs 500 values per image but the model has 10 outputs"):
        HardPositives(model, methods="fgs", layer="ip1")(x, y)


def test_device_placement(model, batch):
    x, y = batch
    x_hp, y_hp = HardPositives(model, methods="fgs", device="cpu")(x.float(), y)
    assert x_hp.device.type == y_hp.device.type == "cpu"
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the refusal cannot be tested here")
    with pytest.raises(ValueError, match=r"^device 'cuda' requested but torch.cuda.is_available\(\) is False"):
        HardPositives(model, device="cuda")


def test_empty_and_all_misclassified_batches(model, batch):
    x, y = batch
    hp = HardPositives(model, methods="fgs")
    x_hp, y_hp = hp(x[:0], y[:0])
    assert x_hp.shape == (0, 1, 28, 28) and y_hp.shape == (0,)
    wrong = (_pred(model, x[:4]) + 1) % 10
    x_hp, y_hp = hp(x[:4], wrong)
    assert len(x_hp) == 0 and hp.last_stats["dropped"]["misclassified_source"] == 4


@pytest.mark.parametrize("x, y, message", [
    (torch.zeros(2, 28, 28), torch.zeros(2, dtype=torch.int64), r"x must be a batch of images \(N, C, H, W\), got shape \(2, 28, 28\)"),
    (torch.full((2, 1, 28, 28), 0.5), torch.zeros(2, dtype=torch.int64), "x must hold integer pixel values in \\[0, 255\\] \\(got fractional"),
    (torch.full((2, 1, 28, 28), 256.0), torch.zeros(2, dtype=torch.int64), r"x must hold pixel values in \[0, 255\], got range \[256, 256\]"),
    (torch.full((2, 1, 28, 28), -1, dtype=torch.int32), torch.zeros(2, dtype=torch.int64), r"got range \[-1, -1\]"),
    (torch.full((2, 1, 28, 28), float("nan")), torch.zeros(2, dtype=torch.int64), "x contains NaN or inf"),
    (torch.zeros(2, 1, 28, 28, dtype=torch.bool), torch.zeros(2, dtype=torch.int64), "x must hold pixel values \\(uint8 or float\\)"),
    (torch.zeros(2, 1, 28, 28), torch.zeros(3, dtype=torch.int64), r"y must hold one label per image, shape \(2,\), got \(3,\)"),
    (torch.zeros(2, 1, 28, 28), torch.zeros(2), "y must hold integer class indices"),
    (torch.zeros(2, 1, 28, 28), torch.tensor([0, 12]), r"y must hold class indices in \[0, 9\]"),
])
def test_bad_input_is_refused_in_one_line(model, x, y, message):
    with pytest.raises(ValueError, match=message) as err:
        HardPositives(model, methods="fgs")(x, y)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs, message", [
    (dict(methods="hc-x:1"), "unknown method 'hc-x'"),
    (dict(methods="fgs,fgs"), "methods repeat"),
    (dict(methods=""), "no methods given"),
    (dict(methods=["fgs"]), "methods must be a string"),
    (dict(scales=(0.9,)), "scales must be a non-empty list of finite factors >= 1"),
    (dict(scales=(1.05,), pass_band=(0.8, 0.9)), "give scales or pass_band, not both"),
    (dict(pass_band=(0.9, 0.8)), "pass_band must be \\(low, high\\)"),
    (dict(tau=1.5), "tau must be a PASS threshold in \\[-1, 1\\]"),
    (dict(preprocess="imagenet"), "unknown preprocessing 'imagenet'"),
])
def test_bad_settings_are_refused(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        HardPositives(model, **kwargs)


def test_public_api():
    import hcgen.torch

    assert hcgen.torch.HardPositives is HardPositives
    for name in hcgen.__all__:  # `from hcgen import ...` unchanged
        assert hasattr(hcgen, name)
