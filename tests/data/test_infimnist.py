"""The InfiMNIST-style generator: conventions, determinism, honesty labels, resumable LMDB output."""
from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import pytest
from scipy import ndimage

from hcgen.data import infimnist
from hcgen.commands import data_cmd
from hcgen.data.infimnist import BLOCK, GENERATOR, Deformation, deform, generate, write_infimnist
from hcgen.data.lmdb_io import MetadataTable, read_lmdb
from hcgen.data.mnist import find_mnist_dir, load_mnist

try:
    MNIST_DIR = find_mnist_dir(download=False)
except FileNotFoundError:
    pytest.skip("MNIST files not found (see hcgen.data.mnist for the search path)", allow_module_level=True)

RIGID = Deformation(alpha=0.0)  # affine part only
IDENTITY = Deformation(alpha=0.0, max_rotation_deg=0.0, max_scale=0.0, max_shear=0.0, max_translation=0.0)


@pytest.fixture(scope="module")
def train():
    return load_mnist(MNIST_DIR, "train")


def test_no_deformation_is_the_identity(train):
    images = train[0][:BLOCK]
    out, _ = deform(images, np.random.default_rng(0), IDENTITY)
    np.testing.assert_array_equal(out, images)


def test_affine_part_matches_the_documented_map(train):
    """With alpha=0, output(p) = bilinear source at c + A (p - c) + t, zero outside (scipy as reference).

    OpenCV's remap quantizes coordinates to 1/32 pixel, so single pixels may differ by a few levels.
    """
    images = train[0][:300]
    out, d = deform(images, np.random.default_rng(1), RIGID)
    theta, s, h = np.deg2rad(d["rotation_deg"]), d["scale"], d["shear"]
    c = 13.5
    y, x = np.mgrid[0:28, 0:28] - c
    for i in range(len(images)):
        rotation = np.array([[np.cos(theta[i]), -np.sin(theta[i])], [np.sin(theta[i]), np.cos(theta[i])]])
        a = s[i] * rotation @ [[1, h[i]], [0, 1]]
        src_x = c + a[0, 0] * x + a[0, 1] * y + d["tx"][i]
        src_y = c + a[1, 0] * x + a[1, 1] * y + d["ty"][i]
        ref = ndimage.map_coordinates(images[i].astype(float), [src_y, src_x], order=1, mode="grid-constant")
        diff = np.abs(out[i] - ref)
        assert diff.max() <= 8 and diff.mean() < 0.3


def test_output_is_close_but_different_and_deterministic(train):
    images, labels = train
    x, y, meta = generate(images, labels, seed=7, start=0, stop=2000)
    assert x.dtype == np.uint8 and x.shape == (2000, 28, 28)
    np.testing.assert_array_equal(y, labels[:2000])
    assert meta["source_index"] == list(range(2000)) and set(meta["generator"]) == {GENERATOR}
    src = images[:2000].astype(float)
    assert (x != images[:2000]).any(axis=(1, 2)).all()
    corr = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(x.astype(float), src)]
    assert np.mean(corr) > 0.45  # same digit, moved by ~1-2 pixels
    ink = x.reshape(2000, -1).sum(1) / src.reshape(2000, -1).sum(1)
    assert 0.4 < ink.min() and ink.max() < 2.2 and abs(np.median(ink) - 1) < 0.1  # strokes thin or thicken
    cy = lambda a: (a * np.arange(28)[:, None]).sum((1, 2)) / a.sum((1, 2))  # noqa: E731
    shift = cy(x.astype(float)) - cy(src)  # vertical centre of mass: elastic alpha=34 moves it ~1 px (std)
    assert np.abs(shift).max() < 5 and abs(shift.mean()) < 0.15 and shift.std() < 1.5
    again = generate(images, labels, seed=7, start=0, stop=2000)
    np.testing.assert_array_equal(again[0], x)
    assert again[2] == meta
    assert (generate(images, labels, seed=8, start=0, stop=100)[0] != x[:100]).any()
    part = generate(images, labels, seed=7, start=1500, stop=1800)  # record i depends on (seed, i) only
    np.testing.assert_array_equal(part[0], x[1500:1800])
    assert part[2]["rotation_deg"] == meta["rotation_deg"][1500:1800]


def test_source_cycles_through_the_training_set(train):
    images, labels = train
    x, y, meta = generate(images[:100], labels[:100], seed=0, start=250, stop=260)
    assert meta["source_index"] == list(range(50, 60))
    np.testing.assert_array_equal(y, labels[50:60])


def test_write_resume_equals_one_run(tmp_path, train):
    full = tmp_path / "full"
    assert write_infimnist(full, 2500, seed=3, source=MNIST_DIR) == (0, 2500)
    part = tmp_path / "part"
    assert write_infimnist(part, 1500, seed=3, source=MNIST_DIR) == (0, 1500)  # "crash" mid-block
    seen = []
    assert write_infimnist(part, 2500, seed=3, source=MNIST_DIR, progress=seen.append) == (1500, 2500)
    assert seen == [1500, 548, 452]  # already there, rest of block 1, block 2
    keys, x, y = read_lmdb(full)
    keys2, x2, y2 = read_lmdb(part)
    assert keys == keys2 and np.array_equal(x, x2) and np.array_equal(y, y2)
    np.testing.assert_array_equal(y, train[1][:2500])
    rows = list(MetadataTable(full / "metadata.csv").rows())
    assert rows == list(MetadataTable(part / "metadata.csv").rows())
    assert {r["generator"] for r in rows} == {"infimnist-style (not InfiMNIST)"}
    settings = json.loads((full / infimnist.PARAMS_FILE).read_text())
    assert settings["generator"] == GENERATOR and settings["seed"] == 3
    assert write_infimnist(full, 2000, seed=3, source=MNIST_DIR) == (2500, 2500)
    with pytest.raises(ValueError, match="generated with"):
        write_infimnist(full, 3000, seed=4, source=MNIST_DIR)
    with pytest.raises(ValueError, match="generated with"):
        write_infimnist(full, 3000, seed=3, source=MNIST_DIR, params=dataclasses.replace(Deformation(), sigma=5))


def test_cli_labels_the_generator_honestly(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="hcgen")
    data_cmd.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "infimnist", "--count", "1100", "--out", str(tmp_path / "inf"),
                              "--seed", "1", "--source", str(MNIST_DIR)])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "not InfiMNIST" in printed and "1100 records (1100 new" in printed and "img/s" in printed
    assert args.func(args) == 0
    assert "resumed: 1100 records were already present" in capsys.readouterr().out
