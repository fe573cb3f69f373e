"""Same net, two backends: the suite's trained Caffe LeNet and examples/torch_lenet.py with its weights copied.

On 200 MNIST test digits the two give the same scores (<= 1e-4 relative), and the same FGS / FGV / HC-D /
HC-S directions and records (integer minimal adversarial images, hard positives, PASS) except where
float32 arithmetic meets a tie. The largest cause: Caffe's convolution (im2col + OpenBLAS sgemm) rounds
the same input patch 1 ulp differently at some output positions (the first and last rows of conv2's 8x8
map), torch's does not. On a digit's blank background conv2 sees the same patch everywhere, so a 2x2
max-pooling window there holds an exact tie in torch (the gradient goes to the first maximum, as in
Caffe's own loop) and a 1-ulp winner elsewhere in Caffe: the whole direction changes. The tests find
these digits and check that every other difference is a tie too.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hcgen.core import search
from hcgen.backends.base import Backend
from hcgen.backends.caffe import CaffeNet
from hcgen.generate.run import compute_directions, generate_batch
from hcgen.core.methods import parse_methods
from hcgen.backends.torch import TorchNet, load_model, state_dict_from_caffe

from tests.conftest import MODELS, REPO

DEPLOY = MODELS / "lenet" / "lenet_deploy.prototxt"
METHODS = parse_methods("fgs,fgv,hc-d:1-9,hc-s:1-9")
N_DIGITS = 200
ULPS = 8  # a pooling window whose top two values are this many float32 ulps apart is a near-tie


@pytest.fixture(scope="module")
def nets(trained_lenet):
    torch.set_num_threads(1)
    caffe_net = CaffeNet(DEPLOY, trained_lenet)
    model = load_model(f"{REPO / 'examples' / 'torch_lenet.py'}:lenet")
    params = caffe_net.net.params
    model.load_state_dict(state_dict_from_caffe({name: [b.data for b in params[name]] for name in params}))
    return caffe_net, TorchNet(model.eval())


@pytest.fixture(scope="module")
def digits(nets, mnist_test_slice):
    images, labels = mnist_test_slice
    return images[:N_DIGITS, None].copy(), labels[:N_DIGITS].astype(np.int64)


@pytest.fixture(scope="module")
def near_tie_digits(nets, digits):
    """Digits where some max-pooling window's argmax differs between the backends and its top two values
    are within ULPS ulps in both: the only digits allowed to differ."""
    caffe_net, torch_net = nets
    x, _ = digits
    caffe_net.scores(x)
    caffe_conv = [caffe_net.net.blobs[name].data.copy() for name in ("conv1", "conv2")]
    model = torch_net.model
    with torch.no_grad():
        c1 = model.conv1(torch.from_numpy(x.astype(np.float32)) * 0.00390625)
        c2 = model.conv2(model.pool1(c1))
    tied = np.zeros(len(x), bool)
    for a, b in zip(caffe_conv, (c1.numpy(), c2.numpy())):
        windows = [v.reshape(v.shape[0], v.shape[1], v.shape[2] // 2, 2, v.shape[3] // 2, 2)
                   .transpose(0, 1, 2, 4, 3, 5).reshape(*v.shape[:2], v.shape[2] // 2, v.shape[3] // 2, 4)
                   for v in (a, b)]
        top2 = [np.sort(w, axis=-1)[..., 2:] for w in windows]
        close = [(t[..., 1] - t[..., 0]) <= ULPS * np.spacing(np.abs(t[..., 1])) for t in top2]
        differs = windows[0].argmax(-1) != windows[1].argmax(-1)
        tied |= (differs & close[0] & close[1]).any(axis=(1, 2, 3))
    return tied


@pytest.fixture(scope="module")
def directions(nets, digits):
    """Per backend, on its own scores: (scores of the 200 digits, correctly classified mask, eta (n, 20, ...))."""
    x, y = digits
    out = []
    for net in nets:
        h = net.scores(x).astype(np.float64)
        ok = h.argmax(1) == y
        out.append((h, ok, compute_directions(net, x[ok], y[ok], h[ok], METHODS)[0]))
    return out


@pytest.fixture(scope="module")
def both_records(nets, digits):
    x, y = digits
    return [generate_batch(net, x, y, np.arange(len(x)), 0, METHODS, [1.05], -1.0, n_jobs=1) for net in nets]


def test_both_backends_implement_the_protocol(nets):
    for net in nets:
        assert isinstance(net, Backend)
    assert nets[0].input_shape == nets[1].input_shape == (1, 28, 28)
    assert nets[0].num_classes == nets[1].num_classes == 10
    assert nets[1].layer == "" and nets[0].layer == "ip2"


def test_same_scores(nets, digits):
    x, _ = digits
    s_caffe, s_torch = (net.scores(x).astype(np.float64) for net in nets)
    rel = np.abs(s_torch - s_caffe).max(axis=1) / np.abs(s_caffe).max(axis=1)
    assert rel.max() <= 1e-4
    np.testing.assert_array_equal(s_torch.argmax(1), s_caffe.argmax(1))


def test_torch_sees_exact_ties_on_the_background(nets):
    """The cause of the near-tie digits: on a blank image every conv2 position has the same input patch,
    so exact arithmetic gives one value per channel. torch computes exactly that; Caffe's im2col + sgemm
    rounds some positions (measured here: the first and last rows of conv2's 8x8 map) 1 ulp apart."""
    model = nets[1].model
    with torch.no_grad():
        c2 = model.conv2(model.pool1(model.conv1(torch.zeros(1, 1, 28, 28)))).numpy()[0]
    assert (c2 == c2[:, :1, :1]).all()
    caffe_net = nets[0]
    caffe_net.scores(np.zeros((1, 1, 28, 28), np.uint8))
    caffe_c2 = caffe_net.net.blobs["conv2"].data[0]
    assert np.abs(caffe_c2 - c2).max() <= 1e-6 * np.abs(c2).max()


def test_same_directions(directions, near_tie_digits):
    """FGV / HC-D agree to 1e-4 of their peak (1) and FGS / HC-S are equal, except on the near-tie digits."""
    (_, ok, eta_c), (_, ok_t, eta_t) = directions
    np.testing.assert_array_equal(ok, ok_t)
    tied = near_tie_digits[ok]
    diff = np.abs(eta_c - eta_t).max(axis=(2, 3, 4))  # (digits, methods)
    assert (diff[~tied] <= 1e-4).all()
    for j, m in enumerate(METHODS):
        if m.kind in ("fgs", "hc-s"):
            np.testing.assert_array_equal(eta_c[~tied, j], eta_t[~tied, j])
    assert tied.sum() <= 0.03 * len(tied)


def _outcomes(r) -> dict:
    """(source digit, method) -> its records (scale, image bytes, PASS, pred) and failures (scale, status)."""
    out: dict = {}
    md = r.metadata
    for i in range(len(r.images)):
        out.setdefault((int(md["source_index"][i]), str(md["method"][i])), []).append(
            (float(md["scale"][i]), r.images[i].tobytes(), float(md["pass"][i]), int(md["pred"][i])))
    for _, source, method, scale, status in r.failures:
        out.setdefault((source, method), []).append((scale, status))
    return {key: sorted(v, key=repr) for key, v in out.items()}


def _margin(net, image: np.ndarray, label: int) -> float:
    s = net.scores(image[None]).astype(np.float64)[0]
    return (s[label] - np.delete(s, label).max()) / np.abs(s).max()


def test_same_minimal_images_hard_positives_and_pass(nets, digits, directions, both_records, near_tie_digits):
    """The records (minimal adversarials, x1.05 hard positives, PASS, predicted labels, failures) of the
    two backends are the same for >= 97% of the searched (digit, method) pairs and >= 99% outside the
    pooling near-tie digits, and every other difference is explained by float32 arithmetic at a tie:
    the two rays' integer images at the same eps differ only in pixels where the rounding rule's
    half-integer lies between the two backends' values e * |eta| (rounding tie); where the same image is minimal for one search only,
    either its margin is within 1e-5 of the scores (class tie), or both backends classify it adversarial
    and the image before the other search's result not (a non-monotone ray with two crossings, reached by
    search paths that interpolate margins equal to float32 precision).

    Measured on the suite's LeNet: 3723 of 3820 pairs (97.5%) the same, 99.5% outside the 4 pooling
    near-tie digits; the 97 others: 77 pooling ties, 14 rounding ties, 2 class ties, 4 two crossings.
    """
    caffe_o, torch_o = (_outcomes(r) for r in both_records)
    assert {k for k in caffe_o if k[1] == "*"} == {k for k in torch_o if k[1] == "*"}  # misclassified sources
    pairs = sorted(k for k in caffe_o if k[1] != "*")
    assert pairs == sorted(k for k in torch_o if k[1] != "*")
    assert len(pairs) == (N_DIGITS - sum(k[1] == "*" for k in caffe_o)) * len(METHODS)
    differing = [k for k in pairs if caffe_o[k] != torch_o[k]]
    share = 1 - len(differing) / len(pairs)
    untied = [k for k in pairs if not near_tie_digits[k[0]]]
    share_untied = 1 - sum(not near_tie_digits[k[0]] for k in differing) / len(untied)
    assert share >= 0.97 and share_untied >= 0.99, (share, share_untied)

    x, y = digits
    rows = np.flatnonzero(directions[0][1])  # digit index -> row of eta
    names = [m.name for m in METHODS]
    eps = [{(i, m, s): e for i, m, s, e in zip(r.metadata["source_index"].tolist(), r.metadata["method"].tolist(),
                                                r.metadata["scale"].tolist(), r.metadata["eps"].tolist())}
           for r in both_records]
    reasons = {"pooling tie": 0, "rounding tie": 0, "class tie": 0, "two crossings": 0}
    for i, method in differing:
        if near_tie_digits[i]:
            reasons["pooling tie"] += 1
            continue
        recs = [dict((o[(i, method)][n][0], o[(i, method)][n]) for n in range(len(o[(i, method)])))
                for o in (caffe_o, torch_o)]
        assert all(len(rec[1.0]) == 4 for rec in recs), f"digit {i} {method}: a search failed on one backend only"
        e_c, e_t = eps[0][(i, method, 1.0)], eps[1][(i, method, 1.0)]
        row, j = np.searchsorted(rows, i), names.index(method)
        etas = [d[2][row, j][None] for d in directions]
        for scale in recs[0]:
            e = scale * min(e_c, e_t)
            a, b = (search.perturb(x[i:i + 1], eta, e)[0] for eta in etas)
            # the two rays' integer images at the same eps differ only where a pixel is at a rounding tie:
            # the rounding threshold lies between the two backends' values e * |eta|, whose directions agree
            # to 1e-4 of their peak (test above; how close they come depends on the BLAS kernels)
            v = [e * np.abs(eta[0][a != b]) + 0.5 for eta in etas]
            assert (np.floor(v[0]) != np.floor(v[1])).all(), f"digit {i} {method} x{scale}: {v}"
            assert (np.abs(v[0] - v[1]) <= 1e-4 * e).all(), f"digit {i} {method} x{scale}: {v}"
            if scale == 1.0 and abs(e_c - e_t) > 1e-5 * e_c and np.array_equal(a, b):
                # the same image at the smaller eps, found minimal by one search only: either a tie of two
                # classes, or a non-monotone ray with two crossings that both backends see, the searches'
                # paths (interpolated from margins equal to float32 precision) having reached different ones
                margins = [_margin(net, a, int(y[i])) for net in nets]
                if max(abs(m) for m in margins) <= 1e-5:
                    reasons["class tie"] += 1
                    continue
                later = int(np.argmax([e_c, e_t]))
                before = search.perturb(x[i:i + 1], etas[later], np.nextafter(max(e_c, e_t), 0))[0]
                assert max(margins) < 0 and min(_margin(net, before, int(y[i])) for net in nets) > 0, (
                    f"digit {i} {method}: eps {e_c} vs {e_t} unexplained")
                reasons["two crossings"] += 1
            elif scale == 1.0:
                reasons["rounding tie"] += 1
    assert sum(reasons.values()) == len(differing)
