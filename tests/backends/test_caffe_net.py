"""CaffeNet, the adapter: penultimate layer discovery, batching, preprocessing, clear errors."""
from __future__ import annotations

import numpy as np
import pytest

from hcgen.backends.caffe import (LENET, CaffeNet, Preprocessing, caffe, penultimate_layer, read_net_parameter,
                                  set_weight_gradients)

from tests.conftest import MODELS

DEPLOY = MODELS / "lenet" / "lenet_deploy.prototxt"


@pytest.fixture(scope="module")
def random_lenet(tmp_path_factory):
    caffe.set_random_seed(5)
    net = caffe.Net(str(DEPLOY), caffe.TEST)
    path = tmp_path_factory.mktemp("w") / "random.caffemodel"
    net.save(str(path))
    return path


def test_penultimate_is_input_of_final_softmax():
    assert penultimate_layer(read_net_parameter(DEPLOY)) == "ip2"


def test_scores_are_batch_independent(random_lenet, mnist_test_slice):
    images = mnist_test_slice[0][:70, None]
    net = CaffeNet(DEPLOY, random_lenet, batch_size=32)
    one = CaffeNet(DEPLOY, random_lenet, batch_size=7).scores(images)
    np.testing.assert_allclose(net.scores(images), one, rtol=1e-5, atol=1e-5)
    labels, scores = net.predict(images)
    np.testing.assert_array_equal(labels, scores.argmax(1))
    assert scores.shape == (70, 10)


def test_loss_gradient_directional_derivative(random_lenet, mnist_test_slice):
    """<∇ₓJ, u> equals the central difference of J along u = ∇ₓJ / max|∇ₓJ| (0.05 grey level), to 1%.

    Noise images, not digits: on a digit's flat background max-pooling has exact ties, where
    Caffe's backward returns one subgradient (the first maximum) and central differences average
    two one-sided slopes; measured there, the two differ by 7-65% on a random LeNet.
    """
    x = np.random.default_rng(0).uniform(0, 255, size=(4, 1, 28, 28))
    y = mnist_test_slice[1][:4].astype(int)
    net = CaffeNet(DEPLOY, random_lenet)

    def loss(z):
        h = net.scores(z).astype(np.float64)
        m = h.max(axis=1, keepdims=True)
        return (np.log(np.exp(h - m).sum(axis=1)) + m[:, 0]) - h[np.arange(len(y)), y]

    g = net.loss_gradient(x, y)
    u = g / np.abs(g).reshape(4, -1).max(axis=1)[:, None, None, None]
    t = 0.05
    numeric = (loss(x + t * u) - loss(x - t * u)) / (2 * t)
    analytic = (g * u).reshape(4, -1).sum(axis=1)
    np.testing.assert_allclose(analytic, numeric, rtol=0.01)
    assert (analytic > 0).all()


def test_preprocessing_round_trip():
    pp = Preprocessing(scale=1.0, mean=(104.0, 117.0, 123.0), channel_order=(2, 1, 0))
    x = np.random.default_rng(0).integers(0, 256, size=(2, 3, 5, 5)).astype(np.uint8)
    np.testing.assert_array_equal(np.rint(pp.inverse(pp.forward(x))).astype(np.uint8), x)
    np.testing.assert_allclose(LENET.forward(np.full((1, 1, 1, 1), 128)), 0.5)


def test_errors(tmp_path, random_lenet):
    with pytest.raises(FileNotFoundError, match="weights not found"):
        CaffeNet(DEPLOY, tmp_path / "missing.caffemodel")
    with pytest.raises(FileNotFoundError, match="deploy prototxt not found"):
        CaffeNet(tmp_path / "missing.prototxt", random_lenet)
    nofb = tmp_path / "nofb.prototxt"
    nofb.write_text(DEPLOY.read_text().replace("force_backward: true", ""))
    with pytest.raises(ValueError, match="lacks 'force_backward: true'"):
        CaffeNet(nofb, random_lenet)
    with pytest.raises(ValueError, match="unknown layer 'fc7'"):
        CaffeNet(DEPLOY, random_lenet, layer="fc7")
    with pytest.raises(ValueError, match="outputs 500 values per image but the net has 10 classes"):
        CaffeNet(DEPLOY, random_lenet, layer="ip1")
    net = CaffeNet(DEPLOY, random_lenet)
    with pytest.raises(ValueError, match=r"images must have shape \(N, 1, 28, 28\)"):
        net.scores(np.zeros((2, 28, 28)))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        net.loss_gradient(np.zeros((1, 1, 28, 28)), np.array([10]))
    bad = tmp_path / "bad.prototxt"
    bad.write_text("layer { name: ")
    with pytest.raises(ValueError, match="not a valid Caffe NetParameter"):
        CaffeNet(bad, random_lenet)


BN_NET = """name: "bn-scale-prelu"
force_backward: true
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 }
                      bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }
layer { name: "scale" type: "Scale" bottom: "conv" top: "conv"
  scale_param { bias_term: true filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "prelu" type: "PReLU" bottom: "conv" top: "conv" prelu_param { filler { type: "constant" value: 0.2 } } }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.2 } } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""


@pytest.mark.parametrize("which", ["lenet", "bn-scale-prelu"])
def test_input_gradients_are_the_same_without_weight_gradients(which, random_lenet, mnist_test_slice, tmp_path):
    """CaffeNet switches the weight gradients off (patch 0006): every parameter blob's param_propagate_down is
    False and its diff stays 0 after a backward; switched back on, the diffs are computed and the loss
    gradient and B_l are bit for bit the same (LeNet; Convolution, BatchNorm, Scale with bias, PReLU,
    InnerProduct)."""
    rng = np.random.default_rng(3)
    if which == "lenet":
        deploy, weights = DEPLOY, random_lenet
        x = mnist_test_slice[0][:40, None]
    else:
        deploy, weights = tmp_path / "bn.prototxt", tmp_path / "bn.caffemodel"
        deploy.write_text(BN_NET)
        caffe.set_random_seed(9)
        raw = caffe.Net(str(deploy), caffe.TEST)
        mean, var, factor = raw.params["bn"]
        mean.data[...] = rng.normal(0, 0.2, mean.data.shape)
        var.data[...] = rng.uniform(0.5, 2.0, var.data.shape)
        factor.data[...] = 1.0
        raw.save(str(weights))
        x = rng.integers(0, 256, (10, 3, 8, 8)).astype(np.uint8)
    net = CaffeNet(deploy, weights, batch_size=16)
    params = [(layer, i) for layer in net.net.layers for i in range(len(layer.blobs))]
    assert net.input_gradients_only and len(params) >= 4
    assert not any(layer.param_propagate_down(i) for layer, i in params)
    y = rng.integers(0, net.num_classes, len(x))
    omega = rng.normal(size=(2, len(x), net.num_classes))
    off = (net.loss_gradient(x, y), net.backward_from(x, omega))
    assert all(not np.any(layer.blobs[i].diff) for layer, i in params)
    assert set_weight_gradients(net.net, True)
    on = (net.loss_gradient(x, y), net.backward_from(x, omega))
    learned = [(layer, i) for layer, i in params if layer.type != "BatchNorm"]  # BN's statistics get no gradient
    assert all(np.any(layer.blobs[i].diff) for layer, i in learned)  # computed now
    for a, b in zip(off, on):
        assert np.any(a) and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
