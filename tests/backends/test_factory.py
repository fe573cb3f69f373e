"""One way to build a backend (`BackendSpec`), its provenance, and the one table of preprocessing presets."""
from __future__ import annotations

from dataclasses import fields

import numpy as np
import pytest

from hcgen.backends.base import PREPROCESSING, preset
from hcgen.backends.factory import BackendSpec
from hcgen.generate.run import GenerateSettings, generate

from tests.conftest import MODELS

DEPLOY = MODELS / "lenet" / "lenet_deploy.prototxt"


def test_every_preset_maps_pixels_the_same_in_both_backends():
    """CaffeNet's Preprocessing and TorchNet's Normalization are built from the one table: equal inputs
    (float32) for every preset both run; the torch-only preset is refused by Caffe with a hint."""
    pytest.importorskip("torch")
    from hcgen.backends.caffe import PRESETS as CAFFE, preprocessing_preset
    from hcgen.backends.torch import PRESET_SHAPES, PRESETS as TORCH, normalization_preset

    assert set(TORCH) == set(PREPROCESSING) and set(CAFFE) == {n for n, p in PREPROCESSING.items()
                                                              if "caffe" in p.frameworks}
    rng = np.random.default_rng(0)
    for name in CAFFE:
        pixels = rng.integers(0, 256, (2,) + PREPROCESSING[name].image_shape).astype(np.uint8)
        a, b = preprocessing_preset(name).forward(pixels), normalization_preset(name).forward(pixels)
        assert a.dtype == b.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-4)
        assert PRESET_SHAPES[name] == PREPROCESSING[name].image_shape
    assert np.array_equal(preprocessing_preset("lenet").forward(np.full((1, 1, 28, 28), 255, np.uint8)),
                          np.full((1, 1, 28, 28), 255 * 0.00390625, np.float32))
    with pytest.raises(ValueError, match=r"unknown preprocessing 'torchvision'; choose one of lenet, googlenet, "
                                         r"resnet152 \(torchvision needs --framework torch\)"):
        preset("torchvision", "caffe")
    with pytest.raises(ValueError, match="unknown preprocessing 'vgg'; choose one of lenet, googlenet, resnet152, "
                                         "torchvision$"):
        preset("vgg", "torch")


@pytest.mark.parametrize("spec, message", [
    (BackendSpec("m.prototxt"), r"--weights \(the trained caffemodel\) is required with --framework caffe"),
    (BackendSpec("m.prototxt", "w", device="cuda"), "--device cuda needs --framework torch"),
    (BackendSpec("m.prototxt", "w", framework="tf"), "unknown framework 'tf'; choose one of caffe, torch"),
    (BackendSpec("m.prototxt", "w", batch_size=0), "batch size must be positive, got 0"),
    (BackendSpec("m.py:f", framework="torch", preprocess="caffe"), "unknown preprocessing 'caffe'"),
])
def test_option_errors_come_before_anything_is_loaded(spec, message):
    with pytest.raises(ValueError, match=message):
        spec.open()


def test_provenance_names_generate_settings_fields():
    names = {f.name for f in fields(GenerateSettings)}
    assert set(BackendSpec("m", "w").provenance()) <= names


def test_the_opened_net_carries_its_spec_and_generate_refuses_other_settings(trained_lenet, tmp_path):
    """generate.json records what the net was opened from: settings that say otherwise are a bug (ValueError)."""
    spec = BackendSpec(str(DEPLOY), str(trained_lenet))
    net = spec.open()
    assert net.spec is spec and net.layer == "ip2" and net.num_classes == 10
    common = dict(source=None, split="test", methods="fgs", scales="", min_pass=-1.0, limit=2, seed=0, batch_size=2)
    wrong = GenerateSettings(**{**spec.provenance(), "preprocess": "googlenet"}, **common)
    with pytest.raises(ValueError, match="generate.json would record .*'preprocess': 'googlenet'.* but the net was "
                                         "opened from .*'preprocess': 'lenet'"):
        generate(net, wrong, tmp_path / "out")
    assert not (tmp_path / "out").exists()
