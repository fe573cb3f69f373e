"""A Caffe deploy net seen in pixel units: the Caffe `Backend`.

`CaffeNet` wraps a deploy prototxt + caffemodel. Images go in as float or uint8 batches
(N, C, H, W) of pixels in [0, 255]; the adapter applies the net's preprocessing
(LeNet: ``scale = 1/256``; ImageNet nets: channel order and mean, see `Preprocessing`) and
returns gradients with respect to the *pixels*, so a step ``eps`` along a direction is in
grey levels.

Scores are the penultimate blob ``h(x)`` (the input of the final Softmax: LeNet ``ip2``),
the "features of the penultimate layer" of Eq. 7 in Rozsa et al. (CVPRW 2016). The image
gradient of a feature vector is computed with ``Net.backward_from`` (B_l, Sec. 4.3), which
hcgen adds to pycaffe with patches/0003-pycaffe-backward-from.patch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hcgen.backends.base import PREPROCESSING, ChunkedBackend, Preset, gradients_in_chunks, preset, scores_in_chunks
from hcgen.backends.pycaffe import caffe, caffe_pb2, text_format
from hcgen.errors import BadInput, NotFound


@dataclass(frozen=True)
class Preprocessing:
    """Pixels -> net input: ``net[:, c] = (pixels[:, channel_order[c]] - mean[c]) * scale``.

    LeNet (Caffe's MNIST example): ``scale=1/256`` (0.00390625), no mean, one channel.
    BVLC-GoogLeNet: ``channel_order=(2, 1, 0)`` (RGB pixels -> BGR), ``mean=(104, 117, 123)``,
    ``scale=1``. hcgen's ImageNet presets (`GOOGLENET`, `RESNET152`) take BGR pixels, as hcgen.data.images
    loads them and as Caffe's Data layer reads LMDBs, so they swap no channels.
    """

    scale: float = 1.0
    mean: tuple[float, ...] = ()
    channel_order: tuple[int, ...] = ()

    def forward(self, pixels: np.ndarray) -> np.ndarray:
        x = np.asarray(pixels, dtype=np.float32)
        if self.channel_order:
            x = x[:, list(self.channel_order)]
        if self.mean:
            x = x - np.asarray(self.mean, dtype=np.float32)[None, :, None, None]
        return x * np.float32(self.scale)

    def inverse(self, net_input: np.ndarray) -> np.ndarray:
        """Exact inverse of `forward` (up to float rounding): net input -> pixels."""
        x = np.asarray(net_input, dtype=np.float64) / self.scale
        if self.mean:
            x = x + np.asarray(self.mean, dtype=np.float64)[None, :, None, None]
        if self.channel_order:
            x = x[:, np.argsort(self.channel_order)]
        return x

    def gradient_to_pixels(self, input_diff: np.ndarray) -> np.ndarray:
        """Chain rule through `forward`: d/d(pixels) = scale * d/d(net input), channels put back."""
        g = np.asarray(input_diff, dtype=np.float64) * self.scale
        if self.channel_order:
            g = g[:, np.argsort(self.channel_order)]
        return g


def _from_preset(p: Preset) -> Preprocessing:
    return Preprocessing(scale=p.scale, mean=p.mean, channel_order=p.channel_order)


# hcgen.backends.base.PREPROCESSING's presets that Caffe runs (its ImageNet presets take BGR pixels: no swap)
PRESETS = {name: _from_preset(p) for name, p in PREPROCESSING.items() if "caffe" in p.frameworks}
LENET, GOOGLENET, RESNET152 = PRESETS["lenet"], PRESETS["googlenet"], PRESETS["resnet152"]


def preprocessing_preset(name: str) -> Preprocessing:
    """The `Preprocessing` of the preset `name` (`hcgen.backends.base.PREPROCESSING`: lenet, googlenet, resnet152)."""
    preset(name, "caffe")  # BadInput naming the choices
    return PRESETS[name]


def read_prototxt_into(prototxt: str | os.PathLike, param, what: str):
    path = Path(prototxt)
    if not path.is_file():
        raise NotFound(f"{what} not found: {path}")
    try:
        text_format.Merge(path.read_text(), param)
    except text_format.ParseError as exc:
        raise BadInput(f"{path} is not a valid Caffe {type(param).__name__} prototxt: {exc}") from exc
    return param


def read_net_parameter(prototxt: str | os.PathLike) -> caffe_pb2.NetParameter:
    return read_prototxt_into(prototxt, caffe_pb2.NetParameter(), "deploy prototxt")


def penultimate_layer(param: caffe_pb2.NetParameter) -> str:
    """Name of the layer whose top feeds the final Softmax (the paper's penultimate layer)."""
    softmax = [layer for layer in param.layer if layer.type == "Softmax"]
    if not softmax:
        raise BadInput(
            "the prototxt has no Softmax layer, so the penultimate layer cannot be found; "
            "name it with --layer"
        )
    blob = softmax[-1].bottom[0]
    producers = [layer.name for layer in param.layer if blob in layer.top and layer.type != "Softmax"]
    if not producers:
        raise BadInput(f"no layer produces {blob!r}, the input of the final Softmax; name one with --layer")
    return producers[-1]


def set_weight_gradients(net: caffe.Net, on: bool) -> bool:
    """Switch the weight gradients of `net`'s backward pass on or off; False where pycaffe cannot (patch 0006).

    ``force_backward: true``, which the input gradient needs, makes Caffe's Net::Init compute the gradient
    of every parameter blob in every backward pass as well. hcgen reads only the input gradient, and each
    layer computes its bottom gradient apart from its parameter gradients (Convolution, InnerProduct,
    Scale, PReLU, ...), so `CaffeNet` switches them off: the input gradient is bit for bit the same
    (tests/backends/test_caffe_net.py) and the backward pass does less work (benchmarks/README.md).
    """
    layers = list(net.layers)
    if not layers or not hasattr(layers[0], "set_param_propagate_down"):
        return False  # a Caffe built without hcgen's patches/0006-pycaffe-param-propagate-down.patch
    for layer in layers:
        for i in range(len(layer.blobs)):
            layer.set_param_propagate_down(i, on)
    return True


@dataclass
class CaffeNet(ChunkedBackend):
    """A deploy net (prototxt with an Input layer, ``force_backward: true``) + caffemodel.

    Parameters
    ----------
    deploy, weights : paths to the deploy prototxt and the trained caffemodel.
    preprocessing : pixels -> net input (default: LeNet's scale 1/256).
    layer : the penultimate layer; default: the layer feeding the final Softmax.
    batch_size : images per forward pass.
    """

    deploy: str | os.PathLike
    weights: str | os.PathLike
    preprocessing: Preprocessing = LENET
    layer: str | None = None
    batch_size: int = 256
    net: caffe.Net = field(init=False, repr=False)

    def __post_init__(self) -> None:
        param = read_net_parameter(self.deploy)
        if not param.force_backward:
            raise BadInput(
                f"{self.deploy} lacks 'force_backward: true'; input gradients would be zero"
            )
        if not Path(self.weights).is_file():
            raise NotFound(f"weights not found: {self.weights} (train a net with `hcgen train`)")
        self.net = caffe.Net(str(self.deploy), caffe.TEST, weights=str(self.weights))
        self.input_gradients_only = set_weight_gradients(self.net, False)
        if len(self.net.inputs) != 1:
            raise BadInput(f"{self.deploy} must have exactly one input blob, has {list(self.net.inputs)}")
        self.input_blob = self.net.inputs[0]
        self.input_shape = tuple(self.net.blobs[self.input_blob].shape[1:])
        self.layer = self.layer or penultimate_layer(param)
        if self.layer not in self.net.top_names:
            raise BadInput(
                f"unknown layer {self.layer!r}; layers of {self.deploy}: {', '.join(self.net.top_names)}"
            )
        tops = self.net.top_names[self.layer]
        if len(tops) != 1:
            raise BadInput(f"layer {self.layer!r} has {len(tops)} top blobs; it needs exactly one")
        self.score_blob = tops[0]
        outputs = [self.net.blobs[name].data for name in self.net.outputs]
        self.num_classes = int(np.prod(outputs[-1].shape[1:]))
        score_size = int(np.prod(self.net.blobs[self.score_blob].shape[1:]))
        if score_size != self.num_classes:
            raise BadInput(
                f"layer {self.layer!r} outputs {score_size} values per image but the net has "
                f"{self.num_classes} classes; choose the layer before the Softmax"
            )

    # -- batching -------------------------------------------------------------------------

    def _check(self, pixels: np.ndarray) -> np.ndarray:
        x = np.asarray(pixels)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise BadInput(
                f"images must have shape (N, {', '.join(map(str, self.input_shape))}), got {x.shape}"
            )
        return x

    def _forward_chunk(self, x: np.ndarray) -> np.ndarray:
        blob = self.net.blobs[self.input_blob]
        if blob.shape[0] != len(x):
            blob.reshape(len(x), *self.input_shape)
            self.net.reshape()
        blob.data[...] = self.preprocessing.forward(x)
        self.net.forward(end=self.layer)
        return self.net.blobs[self.score_blob].data.reshape(len(x), -1).copy()

    def scores(self, pixels: np.ndarray) -> np.ndarray:
        """Penultimate scores h(x), float32 (N, n_classes), for pixel images (N, C, H, W)."""
        return scores_in_chunks(self._check(pixels), self.batch_size, self.num_classes, self._forward_chunk)

    # -- gradients ------------------------------------------------------------------------

    def _backward_chunk(self, x: np.ndarray, features_fn) -> np.ndarray:
        """One forward of the chunk, then one B_l per feature set: (K, n, C, H, W) pixel gradients."""
        h = self._forward_chunk(x)
        shape = self.net.blobs[self.score_blob].shape
        return np.stack([
            self.preprocessing.gradient_to_pixels(self.net.backward_from(self.layer, omega.reshape(shape)))
            for omega in features_fn(h)
        ])

    _loss_chunk = _backward_chunk  # ChunkedBackend.loss_gradient's chunk: the backward from the score layer

    def backward_from(self, pixels: np.ndarray, features: np.ndarray) -> np.ndarray:
        """B_l (Sec. 4.3): image-space gradient of <omega, h(x)> for features omega at the penultimate layer.

        `features` is (N, n_classes), one omega per image (e.g. Eq. 7's omega_hc), or (K, N, n_classes)
        for K feature sets backpropagated after a single forward pass per chunk. Returns float64
        pixel-unit gradients (N, C, H, W), or (K, N, C, H, W).
        """
        x = self._check(pixels)
        omega = np.asarray(features, dtype=np.float32)
        single = omega.ndim == 2
        omega = omega[None] if single else omega
        if omega.ndim != 3 or omega.shape[1:] != (len(x), self.num_classes):
            raise BadInput(
                f"features must have shape ({len(x)}, {self.num_classes}) or (K, {len(x)}, "
                f"{self.num_classes}) for {len(x)} images, got {np.shape(features)}"
            )
        out = gradients_in_chunks(x, self.batch_size, omega, self._backward_chunk)
        return out[0] if single else out
