"""TorchNet on small torch models: B_l from any module against finite differences, preprocessing chain-ruled
to pixels, the loss gradient, refusals (unknown module, wrong features, train mode, softmax output, CUDA
without a GPU, TorchScript inner layers), model loading, and `hcgen generate --framework torch`."""
from __future__ import annotations

import copy
import hashlib
import json

import numpy as np
import pytest
import torch
from torch import nn

from hcgen.backends.base import Backend
from hcgen.cli import main
from hcgen.data.lmdb_io import METADATA_FILE, MetadataTable, read_lmdb
from hcgen.backends.torch import Normalization, TorchNet, check_device, load_model, open_torch_net

from tests.conftest import REPO, SHARED_MNIST

LENET_PY = REPO / "examples" / "torch_lenet.py"
COLOUR = Normalization(scale=1 / 255, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25), channel_order=(2, 1, 0))


class Tiny(nn.Module):
    """3x6x6 pixels -> conv 3x3 -> tanh ("act") -> linear 3 ("ip"): smooth, so finite differences hold."""

    input_shape = (3, 6, 6)

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3)
        self.act = nn.Tanh()
        self.ip = nn.Linear(32, 3)

    def forward(self, x):
        return self.ip(self.act(self.conv(x)).flatten(1))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    return Tiny().eval()


def _noise(n, shape=(3, 6, 6), seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n,) + shape).astype(np.float64)


def _central(f, x, h):
    """Central differences of the scalar functions f(x) (one per image) for every pixel, float64."""
    grad = np.zeros_like(x)
    for idx in np.ndindex(*x.shape[1:]):
        e = np.zeros_like(x)
        e[(slice(None),) + idx] = h
        grad[(slice(None),) + idx] = (f(x + e) - f(x - e)) / (2 * h)
    return grad


def test_backward_from_inner_module_equals_central_differences(tiny):
    """B_l from the inner module "act" (shape (2, 4, 4)) through per-channel mean/std and a channel swap:
    the pixel gradient of <omega, act(x)> equals central differences (h = 1 grey level) to 1e-3."""
    net = TorchNet(tiny, COLOUR)
    assert net.layer_shape("act") == (2, 4, 4)
    x = _noise(2) + 0.5  # off integers, nowhere at the pixel range's ends
    omega = np.random.default_rng(1).normal(size=(2, 2, 4, 4))

    double = copy.deepcopy(tiny).double()

    def objective(z):  # in float64
        with torch.no_grad():
            act = double.act(double.conv(COLOUR.apply(torch.from_numpy(z))))
        return (act.numpy() * omega).reshape(len(z), -1).sum(1)

    analytic = net.backward_from(x, omega, layer="act")
    numeric = _central(objective, x, 1.0)
    assert np.abs(analytic - numeric).max() <= 1e-3 * np.abs(numeric).max()
    assert analytic.dtype == np.float64 and analytic.shape == x.shape


def test_scores_layer_backward_and_loss_gradient_match_differences(tiny):
    net = TorchNet(tiny, COLOUR)
    assert isinstance(net, Backend) and net.num_classes == 3 and net.layer == ""
    x, y = _noise(3, seed=2) + 0.5, np.array([0, 1, 2])
    np.testing.assert_array_equal(net.preprocessing.forward(x), COLOUR.apply(torch.from_numpy(x.astype(np.float32))))
    omega = np.random.default_rng(3).normal(size=(3, 3))
    np.testing.assert_allclose(net.backward_from(x, omega), _central(lambda z: (net.scores(z) * omega).sum(1), x, 1.0),
                               rtol=1e-3, atol=1e-3 * np.abs(net.backward_from(x, omega)).max())

    def loss(z):
        h = net.scores(z).astype(np.float64)
        return np.log(np.exp(h).sum(1)) - h[np.arange(3), y]

    g = net.loss_gradient(x, y)
    np.testing.assert_allclose(g, _central(loss, x, 1.0), atol=1e-3 * np.abs(g).max())
    # K feature sets after one forward = K separate calls; the named scores' layer = the default
    both = net.backward_from(x, np.stack([omega, -2 * omega]))
    np.testing.assert_allclose(both[1], -2 * net.backward_from(x, omega), rtol=1e-6)
    by_name = TorchNet(tiny, COLOUR, layer="ip")
    np.testing.assert_array_equal(by_name.scores(x), net.scores(x))
    np.testing.assert_array_equal(by_name.backward_from(x, omega), net.backward_from(x, omega))


def test_scores_are_batch_independent_and_stop_at_the_layer(tiny):
    x = _noise(70, seed=4)
    a = TorchNet(tiny, COLOUR, batch_size=7).scores(x)
    np.testing.assert_allclose(TorchNet(tiny, COLOUR).scores(x), a, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="layer 'conv' outputs 32 values per image but the model has 3 outputs"):
        TorchNet(tiny, COLOUR, layer="conv")
    net = TorchNet(tiny, COLOUR)
    calls = []
    handle = tiny.ip.register_forward_hook(lambda *args: calls.append(1))
    try:
        net.backward_from(x[:2], np.ones((2, 2, 4, 4)), layer="act")  # stops after act: ip never runs
        assert calls == []
        net.scores(x[:2])
        assert calls == [1]
    finally:
        handle.remove()


def test_refusals(tiny):
    net = TorchNet(tiny, COLOUR)
    x = _noise(2)
    with pytest.raises(ValueError, match=r"unknown layer 'fc9'; modules of Tiny: conv, act, ip"):
        TorchNet(tiny, COLOUR, layer="fc9")
    with pytest.raises(ValueError, match=r"unknown layer 'fc9'"):
        net.backward_from(x, np.zeros((2, 3)), layer="fc9")
    with pytest.raises(ValueError, match=r"features must have shape \(2, 2, 4, 4\) or \(K, 2, 2, 4, 4\) for 2 "
                       r"images at layer 'act', got \(2, 3\)"):
        net.backward_from(x, np.zeros((2, 3)), layer="act")
    with pytest.raises(ValueError, match=r"features must have shape \(2, 3\) or \(K, 2, 3\)"):
        net.backward_from(x, np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"images must have shape \(N, 3, 6, 6\), got \(2, 1, 6, 6\)"):
        net.scores(np.zeros((2, 1, 6, 6)))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        net.loss_gradient(x, np.array([0, 3]))
    with pytest.raises(ValueError, match="give input_shape=\\(C, H, W\\)"):
        TorchNet(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).eval())
    with pytest.raises(ValueError, match="preprocessing mean has 3 values for 1-channel images"):
        TorchNet(tiny, COLOUR, input_shape=(1, 6, 6))
    with pytest.raises(ValueError, match="looks like probabilities"):
        TorchNet(nn.Sequential(tiny, nn.Softmax(dim=1)).eval(), COLOUR, input_shape=(3, 6, 6))
    probs = TorchNet(nn.Sequential(tiny, nn.Softmax(dim=1)).eval(), COLOUR, layer="0", input_shape=(3, 6, 6))
    np.testing.assert_array_equal(probs.scores(x), net.scores(x))  # the logits module named instead


def test_train_mode_is_refused():
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.Dropout(0.5), nn.BatchNorm1d(8), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"training mode \(modules Sequential, 0, 1, 2, 3\).*call model.eval\(\)"):
        TorchNet(model, input_shape=(1, 6, 6))
    net = TorchNet(model.eval(), input_shape=(1, 6, 6))
    x = _noise(4, (1, 6, 6))
    first = net.scores(x)
    np.testing.assert_allclose(net.scores(x[:1]), first[:1], rtol=1e-5, atol=1e-6)  # eval: batch-independent
    model.train()  # switched back after wrapping: refused at the next call
    with pytest.raises(ValueError, match="training mode"):
        net.scores(x)
    with pytest.raises(ValueError, match="training mode"):
        net.loss_gradient(x, np.zeros(4, int))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: CUDA is not refused")
def test_cuda_is_refused_without_a_gpu(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"torch.cuda.is_available\(\) is False .*use --device cpu"):
        check_device("cuda")
    with pytest.raises(ValueError, match="torch.cuda.is_available"):
        TorchNet(tiny, COLOUR, device="cuda")
    with pytest.raises(ValueError, match="device 'tpu' is not supported|unknown device 'tpu'"):
        check_device("tpu")


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # torch 2.13 deprecates TorchScript
def test_torchscript_model(tiny, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.jit.save(torch.jit.script(tiny), str(path))
    scripted = load_model(path)
    net = TorchNet(scripted, COLOUR, input_shape=(3, 6, 6))
    x = _noise(3, seed=5)
    np.testing.assert_allclose(net.scores(x), TorchNet(tiny, COLOUR).scores(x), rtol=1e-6)
    np.testing.assert_allclose(net.loss_gradient(x, np.array([0, 1, 2])),
                               TorchNet(tiny, COLOUR).loss_gradient(x, np.array([0, 1, 2])), rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="TorchScript model runs no forward hooks"):
        TorchNet(scripted, COLOUR, layer="ip", input_shape=(3, 6, 6))


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model file not found: .*nope.py"):
        load_model(f"{tmp_path / 'nope.py'}:lenet")
    with pytest.raises(ValueError, match=r"needs the factory to call: .*torch_lenet.py:FACTORY"):
        load_model(LENET_PY)
    with pytest.raises(ValueError, match=r"has no factory 'resnet'; it defines LeNet, .*lenet"):
        load_model(f"{LENET_PY}:resnet")
    (tmp_path / "bad.py").write_text("def make():\n    return 3\n")
    with pytest.raises(ValueError, match=r"bad.py:make\(\) returned int, not a torch.nn.Module"):
        load_model(f"{tmp_path / 'bad.py'}:make")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.pt is neither FILE.py:FACTORY nor a TorchScript file"):
        load_model(tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="junk.pt is not a state_dict saved with torch.save"):
        load_model(f"{LENET_PY}:lenet", tmp_path / "junk.pt")
    torch.save({"conv1.weight": torch.zeros(20, 1, 5, 5)}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=r"partial.pt does not fit the model: missing conv1.bias, conv2.bias"):
        load_model(f"{LENET_PY}:lenet", tmp_path / "partial.pt")
    state = load_model(f"{LENET_PY}:lenet").state_dict()
    state["ip2.weight"] = torch.zeros(5, 500)
    torch.save(state, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match=r"shape.pt does not fit the model: .*ip2.weight"):
        load_model(f"{LENET_PY}:lenet", tmp_path / "shape.pt")
    with pytest.raises(FileNotFoundError, match="weights not found"):
        load_model(f"{LENET_PY}:lenet", tmp_path / "missing.pt")


def test_weights_round_trip_and_lenet_layers(tmp_path):
    model = load_model(f"{LENET_PY}:lenet")
    torch.save(model.state_dict(), tmp_path / "w.pt")
    net = open_torch_net(f"{LENET_PY}:lenet", str(tmp_path / "w.pt"))
    x = _noise(5, (1, 28, 28))
    np.testing.assert_array_equal(net.scores(x), TorchNet(model).scores(x))
    assert net.input_shape == (1, 28, 28) and not net.model.training
    assert [n for n in dict(net.model.named_modules()) if n] == ["conv1", "pool1", "conv2", "pool2", "ip1",
                                                                  "relu1", "ip2"]


@pytest.fixture(scope="module")
def trained_torch_lenet(tmp_path_factory, mnist_test_slice):
    """examples/torch_lenet.py trained by its `train` (Caffe's solver settings) for 300 iterations on
    1,600 MNIST test digits: most of the next 100 test digits are classified correctly."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("torch_lenet_example", LENET_PY)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    torch.manual_seed(0)
    images, labels = mnist_test_slice
    model = example.train(example.lenet(), images[:1600, None], labels[:1600], 300, seed=0)
    path = tmp_path_factory.mktemp("torch_lenet") / "lenet.pt"
    torch.save(model.state_dict(), path)
    return path


def test_example_training_learns(trained_torch_lenet, mnist_test_slice):
    net = open_torch_net(f"{LENET_PY}:lenet", str(trained_torch_lenet))
    images, labels = mnist_test_slice
    assert (net.predict(images[1600:1800, None])[0] == labels[1600:1800]).mean() >= 0.8


def test_generate_cli_torch(tmp_path, capsys, trained_torch_lenet):
    """`hcgen generate --framework torch` on the example model writes the LMDB, metadata and settings
    (the model file's and weights' sha256), resumes, and refuses CUDA without a GPU in one line."""
    weights = trained_torch_lenet
    out = tmp_path / "gen"
    argv = ["generate", "--framework", "torch", "--model", f"{LENET_PY}:lenet", "--weights", str(weights),
            "--input", str(SHARED_MNIST), "--split", "test", "--limit", "6", "--methods", "fgs,hc-d:1",
            "--scales", "1.05", "--out", str(out)]
    assert main(argv) == 0
    keys, images, labels = read_lmdb(out)
    rows = list(MetadataTable(out / METADATA_FILE).rows())
    assert len(keys) == len(rows) > 0 and images.shape[1:] == (1, 28, 28)
    assert {r["method"] for r in rows} <= {"FGS", "HC-D-1"} and {r["scale"] for r in rows} <= {"1.0", "1.05"}
    settings = json.loads((out / "generate.json").read_text())
    assert settings["framework"] == "torch" and settings["layer"] == "" and settings["device"] == "cpu"
    assert settings["model_sha256"] == hashlib.sha256(LENET_PY.read_bytes()).hexdigest()
    assert settings["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert main(argv) == 0  # resumes: nothing left to do, same records
    assert read_lmdb(out)[0] == keys
    capsys.readouterr()
    if not torch.cuda.is_available():
        assert main(argv[:-2] + ["--out", str(tmp_path / "cuda"), "--device", "cuda"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("hcgen generate: error: device 'cuda' requested but torch.cuda.is_available() is False")
        assert "\n" not in err
    deploy = str(REPO / "models" / "lenet" / "lenet_deploy.prototxt")
    for extra, message in (([], "--weights (the trained caffemodel) is required with --framework caffe"),
                           (["--weights", str(weights), "--device", "cuda"], "--device cuda needs --framework torch"),
                           (["--weights", str(weights), "--preprocess", "torchvision"],
                            "unknown preprocessing 'torchvision'; choose one of lenet, googlenet, resnet152 "
                            "(torchvision needs --framework torch)")):
        assert main(["generate", "--model", deploy, "--out", str(tmp_path / "caffe"), *extra]) == 2
        assert message in capsys.readouterr().err
