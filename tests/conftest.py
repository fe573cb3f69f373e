"""Shared fixtures: paths, real MNIST slices, and (lazily) Caffe nets."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"


def _read_idx(path: Path) -> np.ndarray:
    raw = gzip.open(path, "rb").read()
    ndim = raw[3]
    dims = np.frombuffer(raw, ">u4", count=ndim, offset=4)
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


@pytest.fixture(scope="session")
def mnist_test_slice() -> tuple[np.ndarray, np.ndarray]:
    """The first 2,000 MNIST test digits (uint8 (N,28,28)) and labels, read independently of hcgen."""
    images = _read_idx(SHARED_MNIST / "t10k-images-idx3-ubyte.gz")[:2000].copy()
    labels = _read_idx(SHARED_MNIST / "t10k-labels-idx1-ubyte.gz")[:2000].copy()
    return images, labels


@pytest.fixture(scope="session")
def trained_lenet(tmp_path_factory) -> Path:
    """A LeNet trained by the stock `caffe train` for 300 iterations on 6,400 MNIST training digits
    (seed 1): about 95% test accuracy, enough for adversarial searches to mean something."""
    import os
    import subprocess

    from hcgen.commands.doctor import caffe_executable
    from hcgen.data.lmdb_io import write_datums

    root = tmp_path_factory.mktemp("lenet")
    images = _read_idx(SHARED_MNIST / "train-images-idx3-ubyte.gz")[:6400, None]
    labels = _read_idx(SHARED_MNIST / "train-labels-idx1-ubyte.gz")[:6400]
    write_datums(root / "train_lmdb", images, labels)
    write_datums(root / "test_lmdb", images[:100], labels[:100])  # Caffe must not open one LMDB twice
    net = (MODELS / "lenet" / "lenet_train_test.prototxt").read_text()
    net = net.replace('source: "mnist_train_lmdb"', f'source: "{root / "train_lmdb"}"')
    net = net.replace('source: "mnist_test_lmdb"', f'source: "{root / "test_lmdb"}"')
    (root / "net.prototxt").write_text(net)
    solver = (MODELS / "lenet" / "lenet_solver.prototxt").read_text()
    solver = solver.replace('net: "lenet_train_test.prototxt"', f'net: "{root / "net.prototxt"}"')
    solver = solver.replace("max_iter: 10000", "max_iter: 300\nrandom_seed: 1")
    solver = solver.replace("test_interval: 500", "test_interval: 100000").replace("test_iter: 100", "test_iter: 1")
    solver = solver.replace('snapshot_prefix: "lenet"', f'snapshot_prefix: "{root / "lenet"}"')
    (root / "solver.prototxt").write_text(solver)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    subprocess.run([caffe_executable(), "train", f"--solver={root / 'solver.prototxt'}"],
                   check=True, capture_output=True, env=env, timeout=600)
    return root / "lenet_iter_300.caffemodel"
