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
