"""The patched Caffe: Net.backward_from (B_l), pycaffe on numpy 2, LMDB, and the caffe CLI."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import lmdb
import numpy as np
import pytest

from hcgen.backends import caffe_checks
from hcgen.backends.caffe import CaffeNet, caffe
from hcgen.commands.doctor import caffe_executable

from tests.conftest import MODELS

LENET_DEPLOY = MODELS / "lenet" / "lenet_deploy.prototxt"


def test_backward_from_matches_central_differences(tmp_path):
    """B_l on a conv-tanh-ip net equals central differences of <w, ip(x)> (float32 Caffe, h=1e-2)."""
    assert caffe_checks.check_backward_from(tmp_path) < 1e-2


def test_backward_from_is_not_accumulating_and_is_linear(tmp_path):
    net = caffe_checks.tiny_net(tmp_path)
    net.blobs["data"].data[...] = np.random.default_rng(1).normal(size=net.blobs["data"].shape)
    net.forward(end="ip")
    w = np.random.default_rng(2).normal(size=net.blobs["ip"].shape).astype(np.float32)
    g1 = net.backward_from("ip", w)
    g2 = net.backward_from("ip", w)
    np.testing.assert_array_equal(g1, g2)  # diffs are zeroed, never accumulated
    np.testing.assert_allclose(net.backward_from("ip", -2 * w), -2 * g1, rtol=1e-5, atol=1e-6)
    assert np.abs(g1).max() > 0


def test_backward_from_errors(tmp_path):
    net = caffe_checks.tiny_net(tmp_path)
    net.forward()
    with pytest.raises(KeyError, match="unknown layer 'nope'"):
        net.backward_from("nope", np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"features have shape \(2, 4\) but the top blob 'ip'"):
        net.backward_from("ip", np.zeros((2, 4), np.float32))
    plain = caffe_checks.tiny_net(tmp_path, force_backward=False)
    plain.forward()
    with pytest.raises(ValueError, match="force_backward: true"):
        plain.backward_from("ip", np.zeros((2, 3), np.float32))


def test_stock_backward_still_refuses_inner_blobs(tmp_path):
    """Why the patch exists: pycaffe's backward only takes diffs of output blobs."""
    net = caffe_checks.tiny_net(tmp_path)
    net.forward()
    with pytest.raises(Exception, match="Top diff arguments do not match net outputs"):
        net.backward(ip=np.zeros((2, 3), np.float32))


def _loss_net(path: Path, batch: int) -> Path:
    deploy = LENET_DEPLOY.read_text()
    body = deploy[deploy.index('layer {\n  name: "conv1"') : deploy.index('layer {\n  name: "prob"')]
    path.write_text(
        "force_backward: true\n"
        f'layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: {batch} dim: 1 dim: 28 dim: 28 }} }} }}\n'
        f'layer {{ name: "label" type: "Input" top: "label" input_param {{ shape {{ dim: {batch} }} }} }}\n'
        + body
        + 'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }\n'
    )
    return path


def test_lenet_loss_gradient_equals_softmaxwithloss(tmp_path, mnist_test_slice):
    """backward_from(ip2, dJ/dip2) == Caffe's own SoftmaxWithLoss gradient (mean loss, so x N), x 1/256."""
    images, labels = mnist_test_slice
    x, y = images[:8, None].astype(np.float32), labels[:8].astype(int)
    caffe.set_random_seed(3)
    deploy = caffe.Net(str(LENET_DEPLOY), caffe.TEST)
    weights = tmp_path / "random.caffemodel"
    deploy.save(str(weights))
    net = CaffeNet(LENET_DEPLOY, weights)
    ours = net.loss_gradient(x, y)

    loss_net = caffe.Net(str(_loss_net(tmp_path / "loss.prototxt", 8)), caffe.TEST, weights=str(weights))
    loss_net.forward(data=x / 256.0, label=y.astype(np.float32))
    theirs = loss_net.backward()["data"] * 8 / 256.0
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-7 * np.abs(theirs).max())
    assert np.abs(theirs).max() > 0


def _write_mnist_lmdb(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    with lmdb.open(str(path), map_size=1 << 26) as env, env.begin(write=True) as txn:
        for i, (img, lab) in enumerate(zip(images, labels)):
            datum = caffe.io.array_to_datum(img[None], label=int(lab))
            txn.put(b"%08d" % i, datum.SerializeToString())


def test_caffe_cli_trains_and_tests_on_python_lmdb(tmp_path, mnist_test_slice):
    images, labels = mnist_test_slice
    _write_mnist_lmdb(tmp_path / "train_lmdb", images[:512], labels[:512])
    _write_mnist_lmdb(tmp_path / "test_lmdb", images[512:712], labels[512:712])
    net = (MODELS / "lenet" / "lenet_train_test.prototxt").read_text()
    net = net.replace('source: "mnist_train_lmdb"', f'source: "{tmp_path / "train_lmdb"}"')
    net = net.replace('source: "mnist_test_lmdb"', f'source: "{tmp_path / "test_lmdb"}"')
    (tmp_path / "net.prototxt").write_text(net)
    (tmp_path / "solver.prototxt").write_text(
        f'net: "{tmp_path / "net.prototxt"}"\nbase_lr: 0.01\nmomentum: 0.9\nweight_decay: 0.0005\n'
        'lr_policy: "inv"\ngamma: 0.0001\npower: 0.75\ndisplay: 10\nmax_iter: 40\n'
        f'snapshot_prefix: "{tmp_path / "lenet"}"\nsolver_mode: CPU\nrandom_seed: 1\n'
    )
    exe = caffe_executable()
    env = {**os.environ, "GLOG_minloglevel": "0", "GLOG_logtostderr": "1"}
    train = subprocess.run([exe, "train", f"--solver={tmp_path / 'solver.prototxt'}"],
                           capture_output=True, text=True, env=env)
    assert train.returncode == 0, train.stderr[-2000:]
    losses = [float(v) for v in re.findall(r"Iteration \d+.*?, loss = ([\d.e+-]+)", train.stderr)]
    assert len(losses) >= 3 and losses[-1] < losses[0]
    model = tmp_path / "lenet_iter_40.caffemodel"
    assert model.exists()
    test = subprocess.run([exe, "test", f"--model={tmp_path / 'net.prototxt'}", f"--weights={model}",
                           "--iterations=2"], capture_output=True, text=True, env=env)
    assert test.returncode == 0, test.stderr[-2000:]
    accuracy = float(re.findall(r"accuracy = ([\d.]+)", test.stderr)[-1])
    assert 0.5 < accuracy <= 1.0  # 40 iterations of LeNet already beat chance by far


def test_caffe_version_cli():
    out = subprocess.run([caffe_executable(), "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "1.0.0" in (out.stdout + out.stderr)


def test_numpy2_datum_round_trip():
    arr = np.arange(12, dtype=np.uint8).reshape(1, 3, 4)
    datum = caffe.io.array_to_datum(arr, label=7)
    back = caffe.io.datum_to_array(datum)
    np.testing.assert_array_equal(back, arr)
    back[0, 0, 0] = 99  # a writable copy, as before numpy 2


def _max_pool_reference(x: np.ndarray, k: int, s: int, p: int, out_hw: tuple[int, int]):
    """Caffe's MAX pooling, written out: windows clipped to the image, start at -FLT_MAX and index -1,
    take a value only if strictly greater, rows then columns (ties keep the first, NaN never wins)."""
    n, c, h, w = x.shape
    top = np.full((n, c) + out_hw, -np.finfo(np.float32).max, np.float32)
    mask = np.full((n, c) + out_hw, -1.0, np.float32)
    for ph in range(out_hw[0]):
        for pw in range(out_hw[1]):
            h0, w0 = ph * s - p, pw * s - p
            for i in range(n):
                for j in range(c):
                    for hh in range(max(h0, 0), min(h0 + k, h)):
                        for ww in range(max(w0, 0), min(w0 + k, w)):
                            if x[i, j, hh, ww] > top[i, j, ph, pw]:
                                top[i, j, ph, pw], mask[i, j, ph, pw] = x[i, j, hh, ww], hh * w + ww
    return top, mask


@pytest.mark.parametrize("kernel,stride,pad", [(2, 2, 0), (3, 2, 1), (3, 1, 0)])
def test_max_pooling_forward_equals_the_reference_loop(tmp_path, kernel, stride, pad):
    """patches/0005 rewrote the CPU max-pool loop for speed: outputs and argmax mask must be unchanged,
    with ties, NaN, -inf and windows hanging over the padded border."""
    proto = tmp_path / "pool.prototxt"
    proto.write_text(f"""
name: "pool"
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 2 dim: 3 dim: 7 dim: 9 }} }} }}
layer {{ name: "pool" type: "Pooling" bottom: "data" top: "pool" top: "mask"
        pooling_param {{ pool: MAX kernel_size: {kernel} stride: {stride} pad: {pad} }} }}
""")
    net = caffe.Net(str(proto), caffe.TEST)
    rng = np.random.default_rng(kernel * 10 + stride + pad)
    x = rng.integers(-3, 4, size=(2, 3, 7, 9)).astype(np.float32)  # small integers: many ties
    x[0, 0, 1, 2], x[0, 1, 3, 3], x[1, 2] = np.nan, -np.inf, -np.inf
    x[1, 1, :3, :3] = np.nan
    net.blobs["data"].data[...] = x
    net.forward()
    top, mask = _max_pool_reference(x, kernel, stride, pad, net.blobs["pool"].data.shape[2:])
    np.testing.assert_array_equal(net.blobs["pool"].data, top)
    np.testing.assert_array_equal(net.blobs["mask"].data, mask)
    assert (mask == -1).any() and (top == -np.finfo(np.float32).max).any()  # an all -inf/NaN window
