"""A small trained torch LeNet (examples/torch_lenet.py) shared by the torch engine / hard-positive tests.

Trained once per test session, in torch, with Caffe's LeNet solver settings: 200 iterations of 64 on the
first 3,200 MNIST training digits (seed 1), about 93% test accuracy (a few seconds on one thread); enough for
adversarial searches to mean something. No Caffe needed.
"""
from __future__ import annotations

import functools
import importlib.util

import numpy as np
import torch

from tests.conftest import REPO, _read_idx, SHARED_MNIST

LENET_PY = REPO / "examples" / "torch_lenet.py"


@functools.lru_cache(maxsize=None)
def example():
    spec = importlib.util.spec_from_file_location("torch_lenet_example_tests", LENET_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=None)
def _trained_state() -> dict:
    torch.set_num_threads(1)
    images = _read_idx(SHARED_MNIST / "train-images-idx3-ubyte.gz")[:3200, None]
    labels = _read_idx(SHARED_MNIST / "train-labels-idx1-ubyte.gz")[:3200].astype(np.int64)
    torch.manual_seed(1)
    model = example().train(example().lenet(), images, labels, 200, seed=1)
    return {k: v.clone() for k, v in model.state_dict().items()}


def trained_lenet() -> torch.nn.Module:
    """A fresh LeNet module (eval mode) with the session's trained weights."""
    model = example().lenet()
    model.load_state_dict(_trained_state())
    return model.eval()


def mnist_test_digits(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first n MNIST test digits (uint8 (n, 1, 28, 28)) and labels (int64)."""
    images = _read_idx(SHARED_MNIST / "t10k-images-idx3-ubyte.gz")[:n, None].copy()
    labels = _read_idx(SHARED_MNIST / "t10k-labels-idx1-ubyte.gz")[:n].astype(np.int64)
    return images, labels
