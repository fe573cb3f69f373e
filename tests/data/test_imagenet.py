"""ImageNet nets (BVLC-GoogLeNet, ResNet-152) with random weights: prototxts, weights by name, preprocessing,
image folders, hot/cold directions and a generation through `hcgen generate`, a fine-tuning iteration.

Random weights come from models/make_imagenet_prototxts.py (the prototxts' fillers, seeded; ResNet's
BatchNorm statistics calibrated on noise). The real caffemodels are not downloaded (see models/*/README.md).
"""
from __future__ import annotations

import importlib.util
import json
import shutil

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage.metrics import structural_similarity

from hcgen.core import directions, metrics
from hcgen.backends.caffe import (GOOGLENET, LENET, RESNET152, CaffeNet, caffe, caffe_pb2, preprocessing_preset,
                             read_net_parameter)
from hcgen.cli import main
from hcgen.data.images import caffe_crop, center_crop, list_image_folder, load_image_folder
from hcgen.data.lmdb_io import METADATA_FILE, MetadataTable, read_lmdb, write_datums
from hcgen.core.methods import Method
from hcgen.generate.run import compute_directions
from hcgen.data.sources import load_source

from tests.conftest import MODELS

_spec = importlib.util.spec_from_file_location("make_imagenet_prototxts", MODELS / "make_imagenet_prototxts.py")
make = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make)

GOOGLENET_DEPLOY = MODELS / "googlenet" / "deploy.prototxt"
RESNET_DEPLOY = MODELS / "resnet152" / "deploy.prototxt"


def _caffemodel_blobs(path) -> dict[str, list[np.ndarray]]:
    """{layer name: blobs} read from a caffemodel with protobuf alone (independent of Net.copy_from)."""
    param = caffe_pb2.NetParameter()
    param.ParseFromString(path.read_bytes())
    return {layer.name: [np.array(b.data, np.float32).reshape(b.shape.dim) for b in layer.blobs]
            for layer in param.layer if layer.blobs}


@pytest.fixture(scope="module")
def googlenet_weights(tmp_path_factory):
    return make.random_weights(GOOGLENET_DEPLOY, tmp_path_factory.mktemp("googlenet") / "random.caffemodel", seed=3)


@pytest.fixture(scope="module")
def googlenet(googlenet_weights):
    return CaffeNet(GOOGLENET_DEPLOY, googlenet_weights, preprocessing=GOOGLENET, batch_size=2)


def _smooth_images(n: int, height: int, width: int, seed: int) -> np.ndarray:
    """RGB uint8 (n, height, width, 3): bicubically upsampled noise (ECC converges on it)."""
    rng = np.random.default_rng(seed)
    return np.stack([cv2.resize(rng.integers(0, 256, (9, 8, 3)).astype(np.uint8), (width, height),
                                interpolation=cv2.INTER_CUBIC) for _ in range(n)])


@pytest.fixture(scope="module")
def image_folder(googlenet, tmp_path_factory):
    """Two PNGs (300x260 RGB, written by Pillow) labelled with the random GoogLeNet's own predictions."""
    folder = tmp_path_factory.mktemp("images")
    for i, rgb in enumerate(_smooth_images(2, 300, 260, seed=1)):
        Image.fromarray(rgb).save(folder / f"img{i}.png")
    (folder / "labels.txt").write_text("img0.png 0\nimg1.png 0\n")
    pred = googlenet.predict(load_image_folder(folder)[0])[0]
    (folder / "labels.txt").write_text("".join(f"img{i}.png {p}\n" for i, p in enumerate(pred)))
    return folder


# -- prototxts and weights -------------------------------------------------------------------------


def test_prototxts_are_what_the_script_writes():
    for path, net in ((GOOGLENET_DEPLOY, make.googlenet()), (RESNET_DEPLOY, make.resnet152()),
                      (MODELS / "googlenet" / "train_val.prototxt", make.googlenet(train_val=True))):
        assert path.read_text() == make.HEADER + str(net), f"{path} is stale: rerun the script"


def test_googlenet_layer_names_and_shapes(googlenet):
    """Names of BVLC-GoogLeNet's deploy.prototxt (Caffe Model Zoo, written from memory: it could not be
    downloaded), parameter shapes from Szegedy et al. 2015 Table 1; 6,998,552 parameters is what these
    shapes add up to (BVLC-GoogLeNet is quoted as ~7M without its auxiliary heads)."""
    param = read_net_parameter(GOOGLENET_DEPLOY)
    assert param.force_backward
    stem = ["data", "conv1/7x7_s2", "conv1/relu_7x7", "pool1/3x3_s2", "pool1/norm1", "conv2/3x3_reduce",
            "conv2/relu_3x3_reduce", "conv2/3x3", "conv2/relu_3x3", "conv2/norm2", "pool2/3x3_s2"]
    module = ["1x1", "relu_1x1", "3x3_reduce", "relu_3x3_reduce", "3x3", "relu_3x3", "5x5_reduce",
              "relu_5x5_reduce", "5x5", "relu_5x5", "pool", "pool_proj", "relu_pool_proj", "output"]
    names = list(stem)
    for group in (["3a", "3b"], ["4a", "4b", "4c", "4d", "4e"], ["5a", "5b"]):
        names += [f"inception_{m}/{s}" for m in group for s in module]
        names.append({"3a": "pool3/3x3_s2", "4a": "pool4/3x3_s2", "5a": "pool5/7x7_s1"}[group[0]])
    names += ["pool5/drop_7x7_s1", "loss3/classifier", "prob"]
    assert [layer.name for layer in param.layer] == names
    shapes = make.parameter_shapes(googlenet.net)
    assert shapes["conv1/7x7_s2"] == [(64, 3, 7, 7), (64,)]
    assert shapes["inception_3a/5x5"] == [(32, 16, 5, 5), (32,)]
    assert shapes["inception_4e/pool_proj"] == [(128, 528, 1, 1), (128,)]
    assert shapes["inception_5b/3x3"] == [(384, 192, 3, 3), (384,)]
    assert shapes["loss3/classifier"] == [(1000, 1024), (1000,)]
    assert len(shapes) == 57 + 1
    assert sum(int(np.prod(s)) for blobs in shapes.values() for s in blobs) == 6_998_552
    assert googlenet.layer == "loss3/classifier" and googlenet.num_classes == 1000
    assert googlenet.input_shape == (3, 224, 224)


def test_googlenet_weights_load_back_by_name(googlenet, googlenet_weights):
    saved = _caffemodel_blobs(googlenet_weights)
    assert list(saved) == list(googlenet.net.params)
    for name, blobs in googlenet.net.params.items():
        for ours, theirs in zip(blobs, saved[name]):
            np.testing.assert_array_equal(ours.data, theirs)


def test_resnet152_layer_names():
    """Names of KaimingHe/deep-residual-networks' ResNet-152-deploy.prototxt: 3, 8, 36, 3 bottleneck blocks
    named res2a-c, res3a, res3b1-b7, res4a, res4b1-b35, res5a-c; BatchNorm with global stats + Scale with bias."""
    param = read_net_parameter(RESNET_DEPLOY)
    assert param.force_backward
    blocks = (["2a", "2b", "2c"] + ["3a"] + [f"3b{i}" for i in range(1, 8)] + ["4a"]
              + [f"4b{i}" for i in range(1, 36)] + ["5a", "5b", "5c"])
    names = ["data", "conv1", "bn_conv1", "scale_conv1", "conv1_relu", "pool1"]
    for b in blocks:
        if b.endswith("a"):
            names += [f"res{b}_branch1", f"bn{b}_branch1", f"scale{b}_branch1"]
        for part in ("2a", "2b", "2c"):
            names += [f"res{b}_branch{part}", f"bn{b}_branch{part}", f"scale{b}_branch{part}"]
            if part != "2c":
                names.append(f"res{b}_branch{part}_relu")
        names += [f"res{b}", f"res{b}_relu"]
    names += ["pool5", "fc1000", "prob"]
    layers = list(param.layer)
    assert [layer.name for layer in layers] == names
    bn = [layer for layer in layers if layer.type == "BatchNorm"]
    assert len(bn) == 155 and all(layer.batch_norm_param.use_global_stats for layer in bn)
    assert all(layer.scale_param.bias_term for layer in layers if layer.type == "Scale")
    convs = {layer.name: layer.convolution_param for layer in layers if layer.type == "Convolution"}
    assert len(convs) == 1 + 3 * 50 + 4 and not any(c.bias_term for c in convs.values())
    assert convs["res3a_branch2a"].stride == [2] and convs["res3a_branch1"].stride == [2]
    assert convs["res2a_branch1"].stride in ([], [1])


def test_resnet152_forward_backward_and_weights(tmp_path):
    """One random ResNet-152: weights load back by name; 60,192,808 learnable parameters (the count of
    torchvision's resnet152); backward_from on fc1000 matches a central difference (0.02 grey levels)."""
    weights = make.random_weights(RESNET_DEPLOY, tmp_path / "resnet152.caffemodel", seed=0)
    net = CaffeNet(RESNET_DEPLOY, weights, preprocessing=RESNET152, batch_size=2)
    assert net.layer == "fc1000" and net.num_classes == 1000
    saved = _caffemodel_blobs(weights)
    assert list(saved) == list(net.net.params) and len(saved) == 155 * 2 + 155 + 1
    for name in ("conv1", "bn_conv1", "res4b35_branch2b", "bn5c_branch2c", "scale5c_branch2c", "fc1000"):
        for ours, theirs in zip(net.net.params[name], saved[name]):
            np.testing.assert_array_equal(ours.data, theirs)
    assert make.learnable_count(net.net) == 60_192_808
    assert make.parameter_shapes(net.net)["fc1000"] == [(1000, 2048), (1000,)]

    x = caffe_crop(_smooth_images(1, 256, 256, seed=4)[0][..., ::-1])[None].astype(np.float64)
    omega = np.random.default_rng(0).normal(size=(1, 1000))
    g = net.backward_from(x, omega)
    assert g.shape == (1, 3, 224, 224) and np.isfinite(g).all() and np.abs(g).max() > 0
    u = g / np.abs(g).max()
    t = 0.02  # 150 ReLUs: at 0.25 grey levels the central difference is already 7% off (0.3% at 0.01)
    h = net.scores(np.concatenate([x + t * u, x - t * u])).astype(np.float64) @ omega[0]
    numeric = (h[0] - h[1]) / (2 * t)
    np.testing.assert_allclose((g * u).sum(), numeric, rtol=0.02)


# -- preprocessing and images ----------------------------------------------------------------------


def test_preprocessing_presets_round_trip():
    x = np.random.default_rng(0).integers(0, 256, size=(2, 3, 7, 7)).astype(np.uint8)
    for pp in (GOOGLENET, RESNET152):
        z = pp.inverse(pp.forward(x))
        assert np.abs(z - x).max() < 1e-3
        np.testing.assert_array_equal(np.rint(z).astype(np.uint8), x)
        np.testing.assert_array_equal(pp.gradient_to_pixels(np.ones((1, 3, 2, 2))), 1.0)
    np.testing.assert_allclose(GOOGLENET.forward(x)[:, 0], x[:, 0] - 104.0)  # BGR in, no channel swap
    assert preprocessing_preset("resnet152") is RESNET152 and preprocessing_preset("lenet") is LENET
    with pytest.raises(ValueError, match="unknown preprocessing 'vgg'; choose one of lenet, googlenet"):
        preprocessing_preset("vgg")


def test_image_folder_crops_and_labels(tmp_path):
    """Pillow writes RGB PNGs; hcgen reads BGR, warps to 256x256 (cv2 INTER_LINEAR) and crops the centre
    224x224 at offset 16, as convert_imageset + Caffe's TEST-phase crop_size: 224 do."""
    rgb = _smooth_images(2, 256, 256, seed=2)
    for i, name in enumerate(("n02", "n01")):
        (tmp_path / "classes" / name).mkdir(parents=True)
        Image.fromarray(rgb[i]).save(tmp_path / "classes" / name / "a.png")
    images, labels = load_image_folder(tmp_path / "classes")
    np.testing.assert_array_equal(images, rgb[::-1, 16:240, 16:240, ::-1].transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(labels, [0, 1])  # sorted subfolder names: n01 -> 0, n02 -> 1
    (tmp_path / "classes" / "synsets.txt").write_text("n02 goldfish\nn00 tench\nn01 shark\n")
    assert list_image_folder(tmp_path / "classes")[1].tolist() == [2, 0]

    tall = _smooth_images(1, 300, 260, seed=3)[0][..., ::-1]
    warped = cv2.resize(np.ascontiguousarray(tall), (256, 256), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(caffe_crop(tall), warped[16:240, 16:240].transpose(2, 0, 1))
    shorter = cv2.resize(np.ascontiguousarray(tall), (256, 295), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(caffe_crop(tall, "shorter"), shorter[35:259, 16:240].transpose(2, 0, 1))

    lmdb = tmp_path / "lmdb256"  # BVLC's ilsvrc12 LMDBs hold 3x256x256 Datums: centre-cropped
    write_datums(lmdb, rgb.transpose(0, 3, 1, 2), [5, 6])
    x, y = load_source(lmdb)
    np.testing.assert_array_equal(x, rgb[:, 16:240, 16:240].transpose(0, 3, 1, 2))
    assert y.tolist() == [5, 6]


def test_image_folder_errors(tmp_path):
    Image.fromarray(_smooth_images(1, 20, 20, seed=0)[0]).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="has images but no labels: add labels.txt"):
        list_image_folder(tmp_path)
    (tmp_path / "labels.txt").write_text("a.png cat\n")
    with pytest.raises(ValueError, match=r"labels.txt:1: expected 'relative/path label'"):
        list_image_folder(tmp_path)
    (tmp_path / "labels.txt").write_text("a.png 1\nb.png 2\n")
    with pytest.raises(FileNotFoundError, match="lists 1 missing image"):
        list_image_folder(tmp_path)
    (tmp_path / "labels.txt").write_text("a.png 1\n")
    with pytest.raises(ValueError, match=r"resize \(200\) must be at least the crop \(224\)"):
        caffe_crop(cv2.imread(str(tmp_path / "a.png")), resize=200)
    with pytest.raises(ValueError, match="unknown resize mode 'fit'"):
        caffe_crop(cv2.imread(str(tmp_path / "a.png")), mode="fit")
    with pytest.raises(ValueError, match="images of 20x20 pixels are smaller than the 224x224 crop"):
        center_crop(np.zeros((1, 3, 20, 20)))
    (tmp_path / "c" / "n5").mkdir(parents=True)
    shutil.copy(tmp_path / "a.png", tmp_path / "c" / "n5" / "a.png")
    (tmp_path / "c" / "synsets.txt").write_text("n1\n")
    with pytest.raises(ValueError, match=r"subfolders \['n5'\] .* are not listed"):
        list_image_folder(tmp_path / "c")
    (tmp_path / "c" / "n5" / "b.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "c" / "synsets.txt").unlink()
    with pytest.raises(ValueError, match="cannot decode .*b.jpg"):
        load_image_folder(tmp_path / "c")


# -- directions and generation on a random GoogLeNet ----------------------------------------------


def test_googlenet_hot_cold_direction_raises_objective(googlenet, image_folder):
    """HC-D-1 (Eq. 7 + B_l): <omega, h> grows to first order along eta, at the rate
    <B_l(omega), eta> = |B_l(omega)|^2 / max|B_l(omega)| (central difference, 0.05 grey levels;
    at 0.25 it is 5% below: ReLU / max-pooling kinks)."""
    x, y = load_image_folder(image_folder)
    h = googlenet.scores(x).astype(np.float64)
    eta, valid = compute_directions(googlenet, x, y, h, [Method("hc-d", 1)])
    assert valid.all()
    omega = directions.omega_hc(h, y, 1)
    grad = googlenet.backward_from(x, omega)
    expected = (grad * eta[:, 0]).reshape(2, -1).sum(1)
    t = 0.05
    moved = googlenet.scores(np.concatenate([x + t * eta[:, 0], x - t * eta[:, 0]])).astype(np.float64)
    numeric = ((moved[:2] - moved[2:]) * omega).sum(1) / (2 * t)
    assert (expected > 0).all()
    np.testing.assert_allclose(numeric, expected, rtol=0.02)


@pytest.fixture(scope="module")
def generated(googlenet_weights, image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "adv"
    rc = main(["generate", "--model", str(GOOGLENET_DEPLOY), "--weights", str(googlenet_weights),
               "--input", str(image_folder), "--methods", "hc-d:1", "--scales", "", "--min-pass", "0.99",
               "--preprocess", "googlenet", "--batch", "2", "--out", str(out)])
    assert rc == 0
    return out


def test_generate_on_image_folder(googlenet, image_folder, generated):
    """3x224x224 uint8 BGR Datums with the original labels, misclassified; PASS >= 0.99 and equal to
    skimage's SSIM averaged over the channels after ECC alignment on luma."""
    keys, images, labels = read_lmdb(generated)
    rows = list(MetadataTable(generated / METADATA_FILE).rows())
    assert images.dtype == np.uint8 and images.shape[1:] == (3, 224, 224)
    assert len(keys) == len(rows) and 1 <= len(rows) <= 2
    src, y = load_image_folder(image_folder)
    index = np.array([int(r["source_index"]) for r in rows])
    np.testing.assert_array_equal(labels, y[index])
    assert (googlenet.predict(images)[0] != labels).all()
    assert json.loads((generated / "generate.json").read_text())["preprocess"] == "googlenet"
    for row, original, adv in zip(rows, src[index], images):
        a, b = original.transpose(1, 2, 0), adv.transpose(1, 2, 0)
        aligned, _, ok = metrics.align_ecc(a, b)
        per_channel = [structural_similarity(aligned[..., c].astype(np.float64), a[..., c].astype(np.float64),
                                             gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                             data_range=255) for c in range(3)]
        assert ok and float(row["pass"]) >= 0.99
        np.testing.assert_allclose(float(row["pass"]), np.mean(per_channel), atol=1e-6)


def test_data_layer_sees_the_deploy_input(generated, tmp_path):
    """Caffe's Data layer (TEST, crop_size 224, mean_value 104/117/123, as train_val.prototxt) fed our
    Datums gives exactly GOOGLENET.forward of the stored pixels: BGR storage needs no channel swap."""
    _, images, labels = read_lmdb(generated)
    proto = tmp_path / "data.prototxt"
    proto.write_text(f'layer {{ name: "data" type: "Data" top: "data" top: "label" '
                     f'transform_param {{ crop_size: 224 mean_value: 104 mean_value: 117 mean_value: 123 }} '
                     f'data_param {{ source: "{generated}" backend: LMDB batch_size: {len(images)} }} }}\n')
    net = caffe.Net(str(proto), caffe.TEST)
    net.forward()
    np.testing.assert_array_equal(net.blobs["data"].data, GOOGLENET.forward(images))
    np.testing.assert_array_equal(net.blobs["label"].data, labels)


def test_finetune_solver_one_iteration(googlenet_weights, generated, tmp_path):
    """models/googlenet/solver_finetune.prototxt + train_val.prototxt (batch sizes cut to 2 and 1) run one
    `caffe train` iteration on the generated LMDB, starting from deploy weights matched by name."""
    from hcgen.training.caffe_train import train

    folder = tmp_path / "models"
    shutil.copytree(MODELS / "googlenet", folder)
    net = (folder / "train_val.prototxt").read_text()
    (folder / "train_val.prototxt").write_text(net.replace("batch_size: 80", "batch_size: 2")
                                               .replace("batch_size: 50", "batch_size: 1"))
    test_lmdb = tmp_path / "test_lmdb"  # this Caffe hangs opening one LMDB twice
    shutil.copytree(generated, test_lmdb)
    result = train(folder / "solver_finetune.prototxt", tmp_path / "run", weights=googlenet_weights, seed=1,
                   train_lmdb=generated, test_lmdb=test_lmdb, iterations=1)
    assert result.caffemodel.is_file() and result.max_iter == 1 and result.status == "trained"
    tuned = _caffemodel_blobs(result.caffemodel)
    start = _caffemodel_blobs(googlenet_weights)
    assert set(start) < set(tuned) and "loss1/classifier" in tuned  # + the auxiliary heads
    assert not np.array_equal(tuned["loss3/classifier"][0], start["loss3/classifier"][0])


def test_generate_cli_errors_on_unlabelled_folder(googlenet_weights, tmp_path, capsys):
    Image.fromarray(_smooth_images(1, 256, 256, seed=0)[0]).save(tmp_path / "a.jpg")
    rc = main(["generate", "--model", str(GOOGLENET_DEPLOY), "--weights", str(googlenet_weights),
               "--input", str(tmp_path), "--preprocess", "googlenet", "--out", str(tmp_path / "out")])
    assert rc == 2
    assert "has images but no labels: add labels.txt" in capsys.readouterr().err
