"""The only hcgen module that imports torch for networks: any ``torch.nn.Module`` seen in pixel units.

`TorchNet` implements `hcgen.backends.base.Backend` exactly as `hcgen.backends.caffe.CaffeNet` does: images go in as
(N, C, H, W) batches of pixels in [0, 255]; `Normalization` maps them to the model's input inside the
autograd graph, so every gradient comes back with respect to the pixels (per-channel mean/std chain-ruled
away by autograd), float64. The scores h(x) are the outputs of one module, ``layer``: by default the
model's own output (its logits, the paper's h before the softmax), or any module named as in
``dict(model.named_modules())``, read with a forward hook. B_l (Sec. 4.3 of Rozsa et al., CVPRW 2016) is
``torch.autograd.grad`` of the hooked output seeded with the features omega. As Caffe's
``forward(end=layer)`` does, a forward pass stops once the layer has run.

The model must be in eval mode (dropout and batch norm in train mode would make the scores random and
batch-dependent; `TorchNet` refuses them instead of switching the caller's model).
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from hcgen.backends.base import (PREPROCESSING, ChunkedBackend, PixelMapping, Preset, gradients_in_chunks, preset,
                                 scores_in_chunks)
from hcgen.errors import BadInput, NotFound

__all__ = ["Normalization", "TorchNet", "PRESETS", "PRESET_SHAPES", "normalization_preset", "load_model",
           "open_torch_net", "state_dict_from_caffe", "check_device", "layer_output"]


@dataclass(frozen=True)
class Normalization(PixelMapping):
    """Pixels -> model input: ``input[:, c] = (pixels[:, channel_order[c]] * scale - mean[c]) / std[c]``.

    Caffe's LeNet: ``scale=1/256``. torchvision's ImageNet models on hcgen's BGR pixels:
    ``channel_order=(2, 1, 0), scale=1/255, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)``.
    Empty ``mean`` / ``std`` / ``channel_order`` mean none; identity steps are skipped, so LeNet's input
    is ``pixels * 0.00390625`` in float32, bit for bit what `CaffeNet` feeds Caffe.
    """

    def check(self, channels: int) -> None:
        for name in ("mean", "std", "channel_order"):
            value = getattr(self, name)
            if value and len(value) != channels:
                raise BadInput(f"preprocessing {name} has {len(value)} values for {channels}-channel images")
        if self.channel_order and sorted(self.channel_order) != list(range(channels)):
            raise BadInput(f"channel_order must be a permutation of 0..{channels - 1}, got {self.channel_order}")
        if not self.scale > 0 or any(not s > 0 for s in self.std):
            raise BadInput(f"scale and std must be positive, got scale {self.scale}, std {self.std}")

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable pixels -> input (float32 tensors (N, C, H, W))."""
        if self.channel_order:
            x = x[:, list(self.channel_order)]
        if self.scale != 1.0:
            x = x * self.scale
        if self.mean:
            x = x - torch.tensor(self.mean, dtype=x.dtype, device=x.device)[None, :, None, None]
        if self.std:
            x = x / torch.tensor(self.std, dtype=x.dtype, device=x.device)[None, :, None, None]
        return x

    def forward(self, pixels: np.ndarray) -> np.ndarray:
        """The model input as float32 numpy (`hcgen.backends.base.Preprocessing`)."""
        return self.apply(torch.from_numpy(np.asarray(pixels, dtype=np.float32))).numpy()


def _from_preset(p: Preset) -> Normalization:
    return Normalization(**{f.name: getattr(p, f.name) for f in fields(PixelMapping)})


# hcgen.backends.base.PREPROCESSING as torch runs it (the ImageNet presets on BGR pixels, as in CaffeNet)
PRESETS = {name: _from_preset(p) for name, p in PREPROCESSING.items() if "torch" in p.frameworks}
LENET = PRESETS["lenet"]
# the image shape each preset's source images have
PRESET_SHAPES = {name: p.image_shape for name, p in PREPROCESSING.items() if "torch" in p.frameworks}


def normalization_preset(name: str) -> Normalization:
    """The `Normalization` named `name` in `PRESETS` (lenet, googlenet, resnet152, torchvision)."""
    preset(name, "torch")  # BadInput naming the choices
    return PRESETS[name]


def check_device(device: str) -> torch.device:
    """`torch.device(device)`, refusing CUDA clearly where torch sees no GPU."""
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise BadInput(f"unknown device {device!r}; use cpu or cuda ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"device {device!r} requested but torch.cuda.is_available() is False (no CUDA GPU, or "
                       f"a CPU-only torch {torch.__version__}); use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise BadInput(f"device {device!r} is not supported; use cpu or cuda")
    return dev


class _Stop(Exception):
    """Raised by the forward hook once the scores' layer has run (Caffe's forward(end=layer))."""


def layer_output(model: torch.nn.Module, x: torch.Tensor, layer: str = "",
                 module: Optional[torch.nn.Module] = None, option: str = "--layer") -> torch.Tensor:
    """``model(x)`` (`layer` ""), or the output of `module` (named `layer`) during it, read with a forward hook
    that stops the forward pass once the module has run (as Caffe's ``forward(end=layer)``). The one place
    both `TorchNet` and `hcgen.torch.engine.PixelModel` read scores; `option` names the setting in errors."""
    if not layer:
        out = model(x)
        if not isinstance(out, torch.Tensor):
            raise BadInput(f"the model returns {type(out).__name__}, not a tensor of class scores; "
                           f"name the module of the logits with {option}")
        return out
    captured = []

    def hook(module, inputs, output):
        if not isinstance(output, torch.Tensor):
            raise BadInput(f"module {layer!r} returns {type(output).__name__}, not a tensor")
        captured.append(output)
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not captured:
        raise BadInput(f"module {layer!r} did not run in the model's forward pass")
    return captured[0]


class TorchNet(ChunkedBackend):
    """A ``torch.nn.Module`` classifier as an hcgen backend (see the module docstring).

    Parameters
    ----------
    model : the network, in eval mode; an ``nn.Module`` or a TorchScript module (TorchScript runs no
        Python hooks, so there only the model's output can be the layer).
    preprocessing : pixels -> model input (default: LeNet's scale 1/256).
    layer : the module whose outputs are the scores, by name in ``dict(model.named_modules())``; default
        (None or "") the model's output.
    device : "cpu" or "cuda" (refused where torch sees no GPU).
    input_shape : (C, H, W); default ``model.input_shape`` if the model has that attribute.
    batch_size : images per forward pass.
    """

    def __init__(self, model: torch.nn.Module, preprocessing: Normalization = LENET, layer: Optional[str] = None,
                 device: str = "cpu", input_shape: Optional[Sequence[int]] = None, batch_size: int = 256):
        if not isinstance(model, torch.nn.Module):
            raise BadInput(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if input_shape is None:
            input_shape = getattr(model, "input_shape", None)
        if input_shape is None or len(tuple(input_shape)) != 3:
            raise BadInput(f"give input_shape=(C, H, W) (the model has no input_shape attribute), got {input_shape}")
        if batch_size < 1:
            raise BadInput(f"batch_size must be positive, got {batch_size}")
        self.input_shape = tuple(int(v) for v in input_shape)
        preprocessing.check(self.input_shape[0])
        self.device = check_device(device)
        self.model = model.to(self.device)
        self.preprocessing = preprocessing
        self.batch_size = batch_size
        self.scripted = isinstance(model, torch.jit.ScriptModule)
        self._modules = dict(model.named_modules())
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._check_eval()
        self.layer = layer or ""
        probe = np.zeros((1,) + self.input_shape, np.float32)
        out, _ = self._forward_chunk(probe, "", grad=False)
        out = out.reshape(1, -1)
        self.num_classes = int(out.shape[1])
        if self.layer:
            score_size = self.layer_shape(self.layer)
            if int(np.prod(score_size)) != self.num_classes:
                raise BadInput(f"layer {self.layer!r} outputs {int(np.prod(score_size))} values per image but "
                               f"the model has {self.num_classes} outputs; choose the layer before the softmax")
        else:
            p = out.detach().cpu().numpy().astype(np.float64)
            if self.num_classes > 1 and (p >= 0).all() and abs(p.sum() - 1) < 1e-5:
                raise BadInput("the model's output looks like probabilities (a softmax); name the module of "
                               "its logits with layer= / --layer (the scores are h before the softmax)")

    # -- checks ---------------------------------------------------------------------------------

    def _check_eval(self) -> None:
        training = [name or type(self.model).__name__ for name, m in self._modules.items() if m.training]
        if training:
            raise BadInput(f"the model is in training mode (modules {', '.join(training[:5])}); dropout and "
                           "batch norm would make the scores random and batch-dependent: call model.eval() first")

    def _check(self, pixels: np.ndarray) -> np.ndarray:
        x = np.asarray(pixels)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise BadInput(f"images must have shape (N, {', '.join(map(str, self.input_shape))}), got {x.shape}")
        self._check_eval()
        return x

    def _module(self, layer: str) -> torch.nn.Module:
        if layer not in self._modules or not layer:
            names = [n for n in self._modules if n]
            names = ", ".join(names[:30]) + (f", ... ({len(names) - 30} more)" if len(names) > 30 else "")
            raise BadInput(f"unknown layer {layer!r}; modules of {type(self.model).__name__}: {names}")
        if self.scripted:
            raise BadInput(f"layer {layer!r}: a TorchScript model runs no forward hooks, so only its output can "
                           "be the layer; pass the nn.Module (FILE.py:FACTORY) to read an inner module")
        return self._modules[layer]

    # -- forward --------------------------------------------------------------------------------

    def _forward_chunk(self, x: np.ndarray, layer: str, grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(output of `layer` ("" = the model), the pixel tensor) for pixels `x`; with `grad`, in a graph."""
        pixels = torch.from_numpy(np.asarray(x, dtype=np.float32)).to(self.device)
        if grad:
            pixels.requires_grad_(True)
        with torch.set_grad_enabled(grad):
            out = layer_output(self.model, self.preprocessing.apply(pixels), layer,
                               self._module(layer) if layer else None)
        return out, pixels

    def layer_shape(self, layer: str) -> tuple[int, ...]:
        """Per-image output shape of the module `layer` ("" = the model's output)."""
        if not layer:
            return (self.num_classes,)
        if layer not in self._shapes:
            out, _ = self._forward_chunk(np.zeros((1,) + self.input_shape, np.float32), layer, grad=False)
            self._shapes[layer] = tuple(out.shape[1:])
        return self._shapes[layer]

    def scores(self, pixels: np.ndarray) -> np.ndarray:
        """Scores h(x) at `layer`, float32 (N, num_classes), for pixel images (N, C, H, W)."""
        x = self._check(pixels)

        def forward(chunk: np.ndarray) -> np.ndarray:
            h, _ = self._forward_chunk(chunk, self.layer, grad=False)
            return h.reshape(len(chunk), -1).cpu().numpy()

        with torch.inference_mode():
            return scores_in_chunks(x, self.batch_size, self.num_classes, forward)

    # -- gradients ------------------------------------------------------------------------------

    def _backward_chunk(self, x: np.ndarray, layer: str,
                        features_fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """One forward of the chunk, then one autograd.grad per feature set: (K, n, C, H, W) float64."""
        out, pixels = self._forward_chunk(x, layer, grad=True)
        h = out.detach().reshape(len(x), -1).cpu().numpy()
        omegas = features_fn(h)
        grads = []
        for i, omega in enumerate(omegas):
            seed = torch.from_numpy(np.ascontiguousarray(omega, dtype=np.float32)).to(self.device).reshape(out.shape)
            (g,) = torch.autograd.grad(out, pixels, seed, retain_graph=i < len(omegas) - 1, allow_unused=True)
            grads.append(np.zeros(x.shape) if g is None else g.cpu().numpy().astype(np.float64))
        return np.stack(grads)

    def backward_from(self, pixels: np.ndarray, features: np.ndarray, layer: Optional[str] = None) -> np.ndarray:
        """B_l (Sec. 4.3): pixel gradient of <omega, output of `layer`> (default: the scores' layer).

        `features` omega is (N, *S) for one set or (K, N, *S) for K sets backpropagated after a single
        forward pass per chunk, where S is the layer's per-image output shape (for the scores' layer
        ``(num_classes,)``; any module: `layer_shape`). Returns float64 (N, C, H, W) or (K, N, C, H, W).
        """
        x = self._check(pixels)
        layer = self.layer if layer is None else layer
        shape = (self.num_classes,) if layer == self.layer else self.layer_shape(layer)
        omega = np.asarray(features, dtype=np.float32)
        n_shape = (len(x),) + tuple(shape)
        single = omega.shape == n_shape
        omega = omega[None] if single else omega
        if omega.shape[1:] != n_shape:
            want = ", ".join(map(str, n_shape))
            raise BadInput(f"features must have shape ({want}) or (K, {want}) for {len(x)} images at layer "
                           f"{layer or 'output'!r}, got {np.shape(features)}")
        out = gradients_in_chunks(x, self.batch_size, omega, lambda xs, fn: self._backward_chunk(xs, layer, fn))
        return out[0] if single else out

    def _loss_chunk(self, x: np.ndarray, features_fn) -> np.ndarray:
        return self._backward_chunk(x, self.layer, features_fn)


# -- loading -------------------------------------------------------------------------------------

def _from_factory(path: Path, factory: str) -> torch.nn.Module:
    spec = importlib.util.spec_from_file_location(f"hcgen_model_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise BadInput(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn = getattr(module, factory, None)
    if not callable(fn):
        defined = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise BadInput(f"{path} has no factory {factory!r}; it defines {', '.join(defined) or 'nothing callable'}")
    model = fn()
    if not isinstance(model, torch.nn.Module):
        raise BadInput(f"{path}:{factory}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_model(spec: str | os.PathLike, weights: Optional[str | os.PathLike] = None,
               device: str = "cpu") -> torch.nn.Module:
    """A model from ``FILE.py:FACTORY`` (FACTORY() builds it) or a TorchScript file, with the state_dict
    `weights` (a ``torch.save``'d mapping, loaded with ``weights_only=True``) if given; in eval mode."""
    text = str(spec)
    path_text, sep, factory = text.rpartition(":") if text.count(":") and ".py:" in text else (text, "", "")
    path = Path(path_text)
    if not path.is_file():
        raise NotFound(f"model file not found: {path}")
    if sep:
        model = _from_factory(path, factory)
    elif path.suffix == ".py":
        raise BadInput(f"--model {path} needs the factory to call: {path}:FACTORY")
    else:
        try:
            model = torch.jit.load(str(path), map_location=check_device(device))
        except (RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BadInput(f"{path} is neither FILE.py:FACTORY nor a TorchScript file ({first})") from None
    if weights is not None:
        wpath = Path(weights)
        if not wpath.is_file():
            raise NotFound(f"weights not found: {wpath}")
        try:
            state = torch.load(str(wpath), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several kinds for a file that is no checkpoint
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BadInput(f"{wpath} is not a state_dict saved with torch.save ({first})") from None
        if not isinstance(state, Mapping):
            raise BadInput(f"{wpath} holds a {type(state).__name__}, not a state_dict; save model.state_dict()")
        missing, unexpected = _state_mismatch(model, state)
        if missing or unexpected:
            raise BadInput(f"{wpath} does not fit the model: missing {', '.join(missing) or 'none'}; "
                           f"unexpected {', '.join(unexpected) or 'none'}")
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            raise BadInput(f"{wpath} does not fit the model: {' '.join(lines[1:3]) or lines[0]}") from None
    return model.eval()


def open_torch_net(model: str, weights: Optional[str] = None, preprocess: str = "lenet",
                   layer: Optional[str] = None, device: str = "cpu", batch_size: int = 256) -> TorchNet:
    """`TorchNet` for `hcgen generate --framework torch`: `load_model` (model in eval mode), the preset
    `preprocess`, and the input shape from ``model.input_shape`` or else the preset's images."""
    pre = normalization_preset(preprocess)
    check_device(device)
    net = load_model(model, weights, device)
    return TorchNet(net, pre, layer=layer, device=device, batch_size=batch_size,
                    input_shape=getattr(net, "input_shape", None) or PRESET_SHAPES[preprocess])


def _state_mismatch(model: torch.nn.Module, state: Mapping) -> tuple[list[str], list[str]]:
    want = set(model.state_dict())
    return sorted(want - set(state)), sorted(set(state) - want)


def state_dict_from_caffe(params: Mapping[str, Sequence[np.ndarray]]) -> dict[str, torch.Tensor]:
    """Caffe layer parameters ``{layer: [weight, bias]}`` (e.g. ``{n: [b.data for b in net.params[n]]}``)
    as a state_dict ``{layer.weight, layer.bias}`` for a torch model whose modules carry the Caffe names.

    Convolution (out, in, kh, kw) and InnerProduct (out, in) weights have torch's layout already.
    """
    state: dict[str, torch.Tensor] = {}
    for name, blobs in params.items():
        for suffix, blob in zip(("weight", "bias"), blobs):
            state[f"{name}.{suffix}"] = torch.from_numpy(np.array(blob, dtype=np.float32))
    return state
