"""MNIST IDX loading, checksums, search path, download, and the MNIST -> LMDB conversion."""
from __future__ import annotations

import argparse
import gzip
import os
import shutil
import urllib.error
from pathlib import Path

import lmdb
import numpy as np
import pytest

from hcgen.data import mnist
from hcgen.commands import data_cmd
from hcgen.data.lmdb_io import read_lmdb
from hcgen.data.mnist import MIRRORS, convert_mnist, download_mnist, find_mnist_dir, load_mnist

try:
    MNIST_DIR = find_mnist_dir(download=False)
except FileNotFoundError:
    pytest.skip("MNIST files not found (see hcgen.data.mnist for the search path)", allow_module_level=True)


@pytest.fixture(scope="session")
def train():
    return load_mnist(MNIST_DIR, "train")


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("mnist_lmdb")
    return out, convert_mnist(out, MNIST_DIR)


def _copy_split(dst: Path, split="test", gunzip=False) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for stem in mnist.SPLITS[split]:
        src = mnist._locate(MNIST_DIR, stem)
        if gunzip and src.suffix == ".gz":
            (dst / stem).write_bytes(gzip.decompress(src.read_bytes()))
        else:
            shutil.copy(src, dst / src.name)
    return dst


def test_load_known_values(train):
    """First labels and per-class counts of the standard files (LeCun et al.'s MNIST, as published widely)."""
    images, labels = train
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8 and labels.dtype == np.uint8
    assert labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert np.bincount(labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    test_images, test_labels = load_mnist(MNIST_DIR, "test")
    assert test_images.shape == (10000, 28, 28) and test_labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert np.bincount(test_labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_uncompressed_files_read_the_same(tmp_path):
    raw = _copy_split(tmp_path, gunzip=True)
    assert not list(raw.glob("*.gz"))
    for a, b in zip(load_mnist(raw, "test"), load_mnist(MNIST_DIR, "test")):
        np.testing.assert_array_equal(a, b)


def _corrupt(tmp_path, edit, gunzip=True):
    d = _copy_split(tmp_path, gunzip=gunzip)
    name = "t10k-labels-idx1-ubyte" + ("" if gunzip else ".gz")
    (d / name).write_bytes(edit((d / name).read_bytes()))
    return d


@pytest.mark.parametrize("edit, gunzip, message", [
    (lambda b: b[:100] + bytes([b[100] ^ 1]) + b[101:], True, "t10k-labels-idx1-ubyte: checksum mismatch.*re-download"),
    (lambda b: b[:-10], True, "truncated: 9998 bytes"),
    (lambda b: b + b"\0", True, "trailing bytes"),
    (lambda b: b"\0\0\x08\x03" + b[4:], True, "bad magic 00000803"),
    (lambda b: b[:3], True, "truncated: 3 bytes"),
    (lambda b: b[: len(b) // 2], False, "truncated gzip"),
    (lambda b: b"not gzip at all", False, "corrupt gzip"),
])
def test_bad_files_are_named_with_a_fix(tmp_path, edit, gunzip, message):
    d = _corrupt(tmp_path, edit, gunzip)
    with pytest.raises(ValueError, match=message):
        load_mnist(d, "test")


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="lacks the MNIST files"):
        load_mnist(tmp_path, "test")
    with pytest.raises(ValueError, match="split"):
        load_mnist(MNIST_DIR, "val")


def test_search_order(tmp_path, monkeypatch):
    monkeypatch.delenv(mnist.ENV_VAR, raising=False)
    env_dir = _copy_split(tmp_path / "env", "train")
    _copy_split(env_dir, "test")
    monkeypatch.setenv(mnist.ENV_VAR, str(env_dir))
    assert find_mnist_dir(download=False) == env_dir
    monkeypatch.setenv(mnist.ENV_VAR, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="HCGEN_MNIST_DIR=.*lacks"):
        find_mnist_dir(download=False)
    monkeypatch.delenv(mnist.ENV_VAR)
    (tmp_path / "cwd").mkdir()
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "mnist").symlink_to(env_dir)
    monkeypatch.chdir(tmp_path / "cwd")
    assert find_mnist_dir(download=False).resolve() == env_dir.resolve()  # ../shared/data/mnist from cwd
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(mnist, "_REPO_ROOT", tmp_path / "repo")
    assert find_mnist_dir(download=False) == tmp_path / "shared" / "data" / "mnist"  # from the repo root
    (tmp_path / "shared" / "data" / "mnist").unlink()
    cache = _copy_split(tmp_path / "cache", "train")
    _copy_split(cache, "test")
    assert find_mnist_dir(download=False, cache_dir=cache) == cache
    with pytest.raises(FileNotFoundError, match="not found in"):
        find_mnist_dir(download=False, cache_dir=tmp_path / "empty")


def test_download_from_a_mirror_with_checks(tmp_path, monkeypatch):
    """A file:// mirror stands in for the network: the first mirror fails, the second serves the files."""
    monkeypatch.delenv(mnist.ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(mnist, "_REPO_ROOT", tmp_path / "repo")
    gz = tmp_path / "mirror"
    gz.mkdir()
    for stem in mnist.MD5:
        src = mnist._locate(MNIST_DIR, stem)
        data = src.read_bytes()
        (gz / (stem + ".gz")).write_bytes(data if src.suffix == ".gz" else gzip.compress(data))
    cache = tmp_path / "cache"
    found = find_mnist_dir(cache_dir=cache, mirrors=[(tmp_path / "nowhere").as_uri(), gz.as_uri()])
    assert found == cache and sorted(p.name for p in cache.iterdir()) == sorted(s + ".gz" for s in mnist.MD5)
    np.testing.assert_array_equal(load_mnist(cache, "test")[1], load_mnist(MNIST_DIR, "test")[1])


def test_download_failures_list_every_url(tmp_path, monkeypatch):
    tried = []

    def offline(url):
        tried.append(url)
        raise urllib.error.URLError("Name or service not known")

    with pytest.raises(RuntimeError, match="could not download MNIST") as err:
        download_mnist(tmp_path, opener=offline)
    assert len(tried) == 8 and all(url in str(err.value) for url in tried)
    assert all(any(url.startswith(m) for m in MIRRORS) for url in tried)

    def corrupt(url):
        return gzip.compress(b"\0\0\x08\x01\0\0\0\x01\x07")

    with pytest.raises(RuntimeError, match="checksum mismatch"):
        download_mnist(tmp_path, mirrors=["https://example.invalid/"], opener=corrupt)
    assert not list(tmp_path.iterdir())  # nothing unverified kept

    monkeypatch.delenv(mnist.ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(mnist, "_REPO_ROOT", tmp_path / "repo")
    with pytest.raises(FileNotFoundError, match="(?s)not found in .*could not download.*Copy the four"):
        find_mnist_dir(cache_dir=tmp_path / "cache", opener=offline)


def test_conversion_round_trips_bit_exactly(converted, train):
    """Layout of Caffe's convert_mnist_data: 1x28x28 uint8 Datums, keys %08d in file order."""
    out, result = converted
    assert {s: status for s, (_, status) in result.items()} == {"train": "written", "test": "written"}
    keys, images, labels = read_lmdb(out / "mnist_train_lmdb")
    assert keys[0] == "00000000" and keys[-1] == "00059999" and len(keys) == 60000
    np.testing.assert_array_equal(images[:, 0], train[0])
    np.testing.assert_array_equal(labels, train[1])
    keys, images, labels = read_lmdb(out / "mnist_test_lmdb")
    test_images, test_labels = load_mnist(MNIST_DIR, "test")
    assert keys[-1] == "00009999"
    np.testing.assert_array_equal(images[:, 0], test_images)
    np.testing.assert_array_equal(labels, test_labels)
    with lmdb.open(str(out / "mnist_test_lmdb"), readonly=True, lock=False) as env, env.begin() as txn:
        first = txn.get(b"00000000")
    assert first == bytes.fromhex("08 01 10 1c 18 1c 22 90 06") + test_images[0].tobytes() + b"\x28\x07"
    assert sorted(p.name for p in out.iterdir()) == ["mnist_test_lmdb", "mnist_train_lmdb"]


def test_conversion_errors_leave_nothing_behind(tmp_path):
    src = _copy_split(tmp_path / "src", "test")
    _copy_split(src, "train", gunzip=True)
    labels = src / "train-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-1])
    out = tmp_path / "out"
    (out / "mnist_train_lmdb").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds 0 records.*--force"):
        convert_mnist(out, src)
    shutil.rmtree(out / "mnist_train_lmdb")
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte: truncated"):
        convert_mnist(out, src)
    assert list(out.iterdir()) == []  # every file is checked before anything is written


def test_cli_writes_then_keeps(tmp_path, capsys, converted):
    parser = argparse.ArgumentParser(prog="hcgen")
    data_cmd.add_parser(parser.add_subparsers(dest="command"))
    out, _ = converted
    args = parser.parse_args(["data", "mnist", "--source", str(MNIST_DIR), "--out", str(out)])
    mtime = os.stat(out / "mnist_train_lmdb" / "data.mdb").st_mtime_ns
    assert args.func(args) == 0
    assert "train: " in capsys.readouterr().out and os.stat(out / "mnist_train_lmdb" / "data.mdb").st_mtime_ns == mtime
    small = tmp_path / "small"
    small.mkdir()
    shutil.copytree(out / "mnist_test_lmdb", small / "mnist_test_lmdb")
    shutil.copytree(out / "mnist_train_lmdb", small / "mnist_train_lmdb")
    args = parser.parse_args(["data", "mnist", "--source", str(MNIST_DIR), "--out", str(small), "--force"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "mnist_train_lmdb (60000 records, written)" in printed and "(10000 records, written)" in printed
    assert sorted(p.name for p in small.iterdir()) == ["mnist_test_lmdb", "mnist_train_lmdb"]
    np.testing.assert_array_equal(read_lmdb(small / "mnist_test_lmdb")[1], read_lmdb(out / "mnist_test_lmdb")[1])
