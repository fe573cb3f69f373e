"""The contract between the pipeline and a network: what hcgen.generate needs from a classifier.

`hcgen.backends.caffe.CaffeNet` and `hcgen.backends.torch.TorchNet` are two implementations of `Backend`; the
pipeline (`hcgen.generate.run`) receives one and imports neither. Like Foolbox 3's ``Model``, a
backend sees the network in *pixel units*: images go in as (N, C, H, W) batches of values in [0, 255]
(uint8 or float), the backend applies its own preprocessing, and every gradient comes back with respect
to the pixels (the preprocessing chain-ruled away), so a step ``eps`` along a normalised direction is in
grey levels (see `hcgen.core.directions`).

The scores ``h(x)`` are the outputs of one layer, ``layer``, with one value per class: the paper's
penultimate layer, the input of the final softmax (Eq. 7 of Rozsa et al., CVPRW 2016).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from hcgen.errors import BadInput

__all__ = ["Backend", "ChunkedBackend", "Preprocessing", "PixelMapping", "Preset", "PREPROCESSING", "preset",
           "softmax_loss_seed", "check_labels", "check_class_labels", "scores_in_chunks", "gradients_in_chunks",
           "loss_gradient_in_chunks"]


@runtime_checkable
class Preprocessing(Protocol):
    """Pixels -> the network's input, as float32 numpy (N, C, H, W); the backend's own business."""

    def forward(self, pixels: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class PixelMapping:
    """The numbers of a pixels -> input mapping: ``input[:, c] = (pixels[:, channel_order[c]] * scale - mean[c])
    / std[c]``; empty tuples mean none. `Preset` and `hcgen.backends.torch.Normalization` are such numbers."""

    scale: float = 1.0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    channel_order: tuple[int, ...] = ()


@dataclass(frozen=True)
class Preset(PixelMapping):
    """One named pixels -> input mapping (``--preprocess NAME``), the same numbers for every backend.

    Caffe's `hcgen.backends.caffe.Preprocessing` subtracts the mean *before* scaling and has no std, so a
    preset that needs either (torchvision's) lists only ``torch`` in `frameworks`.
    `image_shape` is the (C, H, W) of the source images the preset is for (hcgen.data.images makes
    224x224 centre crops).
    """

    image_shape: tuple[int, int, int] = (3, 224, 224)
    frameworks: tuple[str, ...] = ("caffe", "torch")


# The one table of presets. LeNet: Caffe's MNIST example (x * 1/256). ImageNet nets on BGR pixels (the order
# of cv2.imread, hcgen.data.images and the LMDBs hcgen writes): BVLC-GoogLeNet's train_val mean_value; for
# ResNet-152, whose published mean is the image ResNet_mean.binaryproto, per-channel ImageNet means (see
# models/resnet152/README.md); torchvision's ImageNet models (RGB, /255, mean/std).
PREPROCESSING = {
    "lenet": Preset(scale=0.00390625, image_shape=(1, 28, 28)),
    "googlenet": Preset(mean=(104.0, 117.0, 123.0)),
    "resnet152": Preset(mean=(103.939, 116.779, 123.68)),
    "torchvision": Preset(scale=1 / 255, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                          channel_order=(2, 1, 0), frameworks=("torch",)),
}


def preset(name: str, framework: str) -> Preset:
    """The `PREPROCESSING` entry `name` for `framework` (caffe or torch); `BadInput` naming the choices."""
    choices = [n for n, p in PREPROCESSING.items() if framework in p.frameworks]
    if name not in choices:
        hint = (f" ({name} needs --framework {' or '.join(PREPROCESSING[name].frameworks)})"
                if name in PREPROCESSING else "")
        raise BadInput(f"unknown preprocessing {name!r}; choose one of {', '.join(choices)}{hint}")
    return PREPROCESSING[name]


@runtime_checkable
class Backend(Protocol):
    """A classifier seen in pixel units (see the module docstring).

    input_shape  (C, H, W) of one image.
    num_classes  values per image at `layer` (= classes).
    layer        name of the layer whose outputs are the scores h(x).
    preprocessing  pixels -> network input.
    """

    input_shape: tuple[int, ...]
    num_classes: int
    layer: str
    preprocessing: Preprocessing

    def scores(self, pixels: np.ndarray) -> np.ndarray:
        """h(x): float32 (N, num_classes) for pixel images (N, C, H, W)."""
        ...

    def predict(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(labels, scores): argmax of h(x) and h(x)."""
        ...

    def loss_gradient(self, pixels: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Pixel gradient of the softmax cross-entropy J(theta, x, y) of h(x), float64 (N, C, H, W) (Eq. 6)."""
        ...

    def backward_from(self, pixels: np.ndarray, features: np.ndarray) -> np.ndarray:
        """B_l (Sec. 4.3): pixel gradient of <omega, h(x)>; `features` omega is (N, num_classes) or
        (K, N, num_classes) (K sets after one forward pass); float64 (N, C, H, W) or (K, N, C, H, W)."""
        ...


def softmax_loss_seed(h: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """dJ/dh = softmax(h) - onehot(y) of the softmax cross-entropy, in h's dtype (float32 from a backend).

    Both backends seed their backward pass with this same array, so their loss gradients differ only by
    the networks' own arithmetic.
    """
    p = np.exp(h - h.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(labels)), labels] -= 1.0
    return p


def check_labels(labels, n: int, num_classes: int) -> np.ndarray:
    """`labels` as an array of `n` class indices in [0, num_classes); ValueError otherwise."""
    y = np.asarray(labels)
    if y.shape != (n,):
        raise BadInput(f"labels must have shape ({n},), got {y.shape}")
    if y.min(initial=0) < 0 or y.max(initial=0) >= num_classes:
        raise BadInput(f"labels must be in [0, {num_classes}), got {y.min()}..{y.max()}")
    return y


def check_class_labels(labels, classes: int, where: str, keys: Sequence | None = None) -> None:
    """Every label is one of the net's `classes`: `BadInput` naming `where`, the first bad record (its LMDB key
    from `keys`, else its position) and how many of these labels are out of range. The one check of sources
    (generate), training LMDBs (Caffe's SoftmaxWithLoss only DCHECKs them) and evaluated LMDBs."""
    y = np.asarray(labels)
    bad = np.flatnonzero((y < 0) | (y >= classes))
    if len(bad):
        i = bad[0]
        record = f"record {keys[i]}" if keys is not None else f"image {i}"
        raise BadInput(f"{where}: {record} has label {y[i]}, outside the net's {classes} classes [0, {classes}) "
                       f"({len(bad)} of {len(y)} read); labelled for another task or net?")


class ChunkedBackend:
    """The `Backend` methods whose body is the same for every backend, over three of its own: ``_check(pixels)``
    (the images as an (N, C, H, W) array, validated), ``scores`` and ``_loss_chunk(x, features_fn)`` (one chunk's
    backward from the score layer, as `BackwardChunk`). `CaffeNet` and `TorchNet` derive from it."""

    def predict(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(labels, scores): argmax of the scores h(x) (= argmax of the softmax) and h(x)."""
        s = self.scores(pixels)
        return s.argmax(axis=1), s

    def loss_gradient(self, pixels: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """∇ₓJ of the softmax cross-entropy J(θ, x, y) of the scores per image, in pixel units (Eq. 6)."""
        x = self._check(pixels)
        y = check_labels(labels, len(x), self.num_classes)
        return loss_gradient_in_chunks(x, y, self.batch_size, self._loss_chunk)


# --- the chunked loops both backends run (CaffeNet, TorchNet): only the per-chunk step is theirs ----------

ForwardChunk = Callable[[np.ndarray], np.ndarray]  # pixels (n, C, H, W) -> scores (n, num_classes)
# pixels (n, C, H, W) and features_fn(scores of the chunk) -> K feature sets -> (K, n, C, H, W) float64
BackwardChunk = Callable[[np.ndarray, Callable[[np.ndarray], Sequence[np.ndarray]]], np.ndarray]


def scores_in_chunks(x: np.ndarray, batch_size: int, num_classes: int, forward: ForwardChunk) -> np.ndarray:
    """h(x), float32 (N, num_classes): `forward` on `batch_size` images at a time."""
    out = np.empty((len(x), num_classes), dtype=np.float32)
    for start in range(0, len(x), batch_size):
        chunk = x[start:start + batch_size]
        out[start:start + len(chunk)] = forward(chunk)
    return out


def gradients_in_chunks(x: np.ndarray, batch_size: int, omega: np.ndarray, backward: BackwardChunk) -> np.ndarray:
    """B_l for K feature sets `omega` (K, N, ...): (K, N, C, H, W) float64, one forward per chunk."""
    out = np.empty((len(omega),) + x.shape, dtype=np.float64)
    for start in range(0, len(x), batch_size):
        stop = start + batch_size
        out[:, start:stop] = backward(x[start:stop], lambda h: omega[:, start:stop])
    return out


def loss_gradient_in_chunks(x: np.ndarray, y: np.ndarray, batch_size: int, backward: BackwardChunk) -> np.ndarray:
    """Pixel gradient of the softmax cross-entropy (Eq. 6), (N, C, H, W) float64: each chunk's backward is
    seeded with `softmax_loss_seed` of its own scores."""
    out = np.empty(x.shape, dtype=np.float64)
    for start in range(0, len(x), batch_size):
        stop = start + batch_size
        yy = y[start:stop]
        out[start:stop] = backward(x[start:stop], lambda h: [softmax_loss_seed(h, yy)])[0]
    return out
