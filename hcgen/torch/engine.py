"""The tensor-native engine: directions and the exact integer ray search of `hcgen.core.search` on torch tensors.

Everything runs on the model's device in float64 tensor arithmetic written in the same order as the numpy
engine (`hcgen.core.search`, `hcgen.core.directions`), so a search sees the same breakpoints, takes the same statuses
and returns the same records; the model is called once per round with one candidate per active search (in
chunks of ``batch_size`` images, as `hcgen.backends.torch.TorchNet` does), with no numpy round trip per forward.
The conventions (rounding rule, "adversarial", "minimal", failure statuses) are those of `hcgen.core.search`'s
module docstring: images are integer pixels in [0, 255]; the returned image is adversarial and the previous
distinct integer image on the ray is not.

Pieces:

* `PixelModel`: any ``torch.nn.Module`` seen in pixel units on tensors: a preprocessing (a
  `hcgen.backends.torch` preset name such as ``"lenet"`` = Caffe's ``x * 0.00390625``, a `Normalization`, or a
  callable) applied before the model, the scores h(x) read at the model's output or at any named module with
  a forward hook (the forward stops there, as Caffe's ``forward(end=layer)``).
* `compute_directions`: FGS, FGV (Eq. 6), HC-D-k and HC-S-k (Eq. 7, omega at the scores' layer) for
  `hcgen.core.methods.Method` lists; one forward per chunk and one ``autograd.grad`` per seed.
* `adversarial_search`, `perturb`, `hard_positives`: `hcgen.core.search`'s algorithm on tensors.
* `search_batch`: what `hcgen.generate.run.generate_batch` needs for a `TorchNet`, as the numpy
  dataclasses `hcgen.core.search.SearchResult` and `hcgen.core.search.HardPositives`.

Where the two engines can differ (tests/test_torch_engine.py checks each difference is one of these): the
sum ``u = sum |eta| * levels`` that steers the bracket is a float64 sum in another order (numpy's einsum vs
torch's sum), so along a non-monotone ray the two searches may reach different crossings; everything else
(breakpoints, rounding, margins, argmax ties) is the same IEEE arithmetic. The FGS / FGV loss seed
``softmax(h) - onehot(y)`` is computed by `hcgen.backends.base.softmax_loss_seed` on a host copy of the (N,
classes) scores, once per chunk of directions (not per search forward), so that the directions are
TorchNet's bit for bit.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from hcgen.backends.base import softmax_loss_seed
from hcgen.backends.torch import Normalization, layer_output, normalization_preset
from hcgen.core import search as np_search
from hcgen.core.search import Status

__all__ = ["PixelModel", "TensorSearch", "TensorHardPositives", "compute_directions", "adversarial_search",
           "perturb", "hard_positives", "search_batch", "eval_mode", "Status"]

F64 = torch.float64
_OVERSHOOT = np_search._OVERSHOOT
_MIN_GROWTH = np_search._MIN_GROWTH
_INVERT = np_search._INVERT
_MAX_NUDGE = np_search._MAX_NUDGE
_BLOCK = 1 << 20  # pixels per block of rays in probe / invert (float64 temporaries of 8 MB)
INF = math.inf

Preprocess = Union[str, Normalization, Callable[[torch.Tensor], torch.Tensor]]


# ------------------------------------------------------------------------------------------- the model

@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Every module in eval mode inside the block; each module's own ``training`` flag restored after
    (also on an exception), so a model in train mode, eval mode or a mix of both comes back as it was."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        for m, _ in flags:
            m.training = False
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def canonical(x: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``x`` as ``dtype`` on ``device`` with C-contiguous strides, also along size-1 axes: torch may read a
    (N, 1, H, W) tensor with strides (HW, 1, W, 1) (numpy's ``x[mask]`` of a 1-channel batch) as channels-last
    and run another convolution kernel, whose float32 sums differ in the last bits from the one `TorchNet`
    (numpy ``astype`` -> canonical strides) runs."""
    want = [1] * x.ndim
    for i in range(x.ndim - 2, -1, -1):
        want[i] = want[i + 1] * x.shape[i + 1]
    if x.dtype == dtype and x.device == device and list(x.stride()) == want:
        return x
    out = torch.empty(tuple(x.shape), dtype=dtype, device=device)
    out.copy_(x)
    return out


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's parameters (else buffers) live; cpu for a model without any."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def as_preprocess(preprocess: Preprocess) -> Callable[[torch.Tensor], torch.Tensor]:
    """A preset name (`hcgen.backends.torch.PRESETS`: lenet, googlenet, resnet152, torchvision), a `Normalization`
    or a callable -> a differentiable function float32 pixels (N, C, H, W) -> model input."""
    if isinstance(preprocess, str):
        return normalization_preset(preprocess).apply
    if isinstance(preprocess, Normalization):
        return preprocess.apply
    if callable(preprocess):
        return preprocess
    raise ValueError(f"preprocess must be a preset name, a hcgen.backends.torch.Normalization or a callable, "
                     f"got {type(preprocess).__name__}")


class PixelModel:
    """A ``torch.nn.Module`` classifier seen in pixel units on tensors (see the module docstring).

    The caller decides the mode: the engine's functions run the model as it is (`TorchNet` requires eval
    mode; `hcgen.torch.HardPositives` wraps them in `eval_mode`).
    """

    def __init__(self, model: torch.nn.Module, preprocess: Preprocess = "lenet", layer: Optional[str] = None,
                 batch_size: int = 256):
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.model = model
        self.normalization = normalization_preset(preprocess) if isinstance(preprocess, str) else (
            preprocess if isinstance(preprocess, Normalization) else None)
        self.preprocess = as_preprocess(preprocess)
        self.layer = layer or ""
        self.batch_size = batch_size
        modules = dict(model.named_modules())
        if self.layer:
            if self.layer not in modules:
                names = [n for n in modules if n]
                listed = ", ".join(names[:30]) + (f", ... ({len(names) - 30} more)" if len(names) > 30 else "")
                raise ValueError(f"unknown layer {self.layer!r}; modules of {type(model).__name__}: "
                                 f"{listed or 'none'}")
            if isinstance(model, torch.jit.ScriptModule):
                raise ValueError(f"layer {self.layer!r}: a TorchScript model runs no forward hooks, so only "
                                 "its output can be the layer; pass the nn.Module")
            self._module = modules[self.layer]
        self.device = model_device(model)

    def output(self, pixels: torch.Tensor) -> torch.Tensor:
        """Output of the scores' layer for float32 pixels (N, C, H, W) on the device, in the current grad mode."""
        return layer_output(self.model, self.preprocess(pixels), self.layer, self._module if self.layer else None,
                            option="layer=")

    def scores(self, pixels: torch.Tensor) -> torch.Tensor:
        """h(x) as float32 (M, n) for integer pixel images (M, C, H, W) of any dtype; ``batch_size`` images
        per forward, without autograd."""
        out = []
        with torch.no_grad():
            for start in range(0, len(pixels), self.batch_size):
                chunk = canonical(pixels[start:start + self.batch_size], torch.float32, self.device)
                out.append(self.output(chunk).reshape(len(chunk), -1))
        if not out:
            return torch.empty((0, 0), device=self.device)
        return torch.cat(out)


# ---------------------------------------------------------------------------------------- directions

def _normalize(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hcgen.core.directions.normalize on a float64 tensor (N, ...): eta with max |eta| = 1, valid."""
    flat = g.reshape(len(g), -1)
    if not torch.isfinite(flat).all():
        bad = torch.nonzero(~torch.isfinite(flat).all(dim=1)).flatten()[:10].tolist()
        raise ValueError(f"gradient contains NaN or inf for sample(s) {bad}; check the loss/backward of the "
                         "network (e.g. a softmax over overflowing logits)")
    peak = flat.abs().amax(dim=1) if flat.shape[1] else torch.zeros(len(g), dtype=g.dtype, device=g.device)
    valid = peak > 0
    view = (-1,) + (1,) * (g.ndim - 1)
    scale = torch.where(valid, peak, torch.ones_like(peak)).reshape(view)
    eta = torch.where(valid.reshape(view), g / scale, torch.zeros((), dtype=g.dtype, device=g.device))
    return eta, valid


def hot_class(h: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """hcgen.core.directions.hot_class on tensors: the k-th highest-scoring class other than y (ties: lower index)."""
    n = h.shape[1]
    if not 1 <= k <= n - 1:
        raise ValueError(f"k must be an integer in [1, {n - 1}] for {n} classes (k = 1 is the most similar "
                         f"class), got {k!r}")
    others = h.clone()
    others[torch.arange(len(h), device=h.device), y] = -INF
    order = torch.sort(-others, dim=1, stable=True).indices
    return order[:, k - 1]


def omega_hc(h: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Eq. 7 on float64 tensors (see hcgen.core.directions.omega_hc)."""
    hot = hot_class(h, y, k)
    rows = torch.arange(len(h), device=h.device)
    omega = torch.zeros_like(h)
    omega[rows, hot] = h[rows, hot].abs()
    omega[rows, y] = -h[rows, y]
    return omega


def compute_directions(pm: PixelModel, x: torch.Tensor, y: torch.Tensor, h: torch.Tensor,
                       methods: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
    """eta (N, D, C, H, W) float64 and valid (N, D) for D methods (`hcgen.core.methods.Method`), on
    the device. ``h`` are the clean scores (N, n) (float64 of the float32 scores). Per chunk of
    ``batch_size`` images: one forward with autograd, then one ``autograd.grad`` per seed (the loss seed for
    FGS / FGV, omega_hc(k) for each distinct k of HC-D / HC-S). Only the pixels' gradients are computed:
    parameters' ``.grad`` are left untouched."""
    x = x.to(pm.device)
    y = y.to(pm.device)
    h = h.to(pm.device, F64)
    kinds = {m.kind for m in methods}
    ks = sorted({m.k for m in methods if m.k})
    want_loss = bool(kinds & {"fgs", "fgv"})
    grads = {key: torch.empty(x.shape, dtype=F64, device=pm.device)
             for key in (["loss"] if want_loss else []) + ks}
    omegas = {k: omega_hc(h, y, k) for k in ks}
    for start in range(0, len(x), pm.batch_size):
        stop = start + pm.batch_size
        with torch.enable_grad():
            pixels = canonical(x[start:stop], torch.float32, pm.device).requires_grad_(True)
            out = pm.output(pixels)
            seeds = []
            if want_loss:
                hn = out.detach().reshape(len(pixels), -1).cpu().numpy()
                seed = softmax_loss_seed(hn, y[start:stop].cpu().numpy())
                seeds.append(("loss", torch.from_numpy(np.ascontiguousarray(seed, dtype=np.float32))))
            seeds += [(k, omegas[k][start:stop].to(torch.float32)) for k in ks]
            for i, (key, seed) in enumerate(seeds):
                (g,) = torch.autograd.grad(out, pixels, seed.to(pm.device).reshape(out.shape),
                                           retain_graph=i < len(seeds) - 1, allow_unused=True)
                grads[key][start:stop] = 0.0 if g is None else g.to(F64)
    eta = torch.empty((len(x), len(methods)) + tuple(x.shape[1:]), dtype=F64, device=pm.device)
    valid = torch.empty((len(x), len(methods)), dtype=torch.bool, device=pm.device)
    for d, m in enumerate(methods):
        g = grads["loss"] if m.kind in ("fgs", "fgv") else grads[m.k]
        if m.kind in ("fgs", "hc-s"):
            g = torch.sign(g)
        eta[:, d], valid[:, d] = _normalize(g)
    return eta, valid


# --------------------------------------------------------------------------- integer images on a ray

def _levels(eps: torch.Tensor, a: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """|integer perturbation| per pixel: min(floor(eps * |eta| + 0.5), headroom) (hcgen.core.search's rule)."""
    out = eps * a
    out += 0.5
    out.floor_()
    return torch.minimum(out, head, out=out)


def _exact_break(a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Smallest float64 eps with floor(eps * a + 0.5) >= t (a > 0, t >= 1), elementwise."""
    b = (t - 0.5) / a
    up, down_to = torch.full_like(b, INF), torch.full_like(b, -INF)
    for _ in range(_MAX_NUDGE):
        low = torch.floor(b * a + 0.5) < t
        if not bool(low.any()):
            break
        b = torch.where(low, torch.nextafter(b, up), b)
    for _ in range(_MAX_NUDGE):
        prev = torch.nextafter(b, down_to)
        down = torch.floor(prev * a + 0.5) >= t
        if not bool(down.any()):
            break
        b = torch.where(down, prev, b)
    return b


def _extreme_break(a: torch.Tensor, inv: torch.Tensor, levels: torch.Tensor, step: int,
                   unusable: Optional[torch.Tensor], uniform: torch.Tensor) -> torch.Tensor:
    """hcgen.core.search._extreme_break on tensors: per row, over usable pixels, the largest exact breakpoint of
    the current levels (step 0) or the smallest of the next ones (step 1); -inf / inf if none.

    The approximate breakpoints are (t - 0.5) * (1 / |eta|) here (numpy divides): a multiplication instead
    of a division per pixel. They only select the pixels within a relative 1e-12 of the approximate extreme,
    whose exact breakpoints are then computed as in numpy; one ulp more or less in an approximation cannot
    change that set's extreme, so the result is the same float64."""
    largest = step == 0
    fill = -INF if largest else INF
    S, P = levels.shape
    out = torch.full((S,), fill, dtype=F64, device=levels.device)
    if P == 0 or S == 0:
        return out
    approx = levels + (step - 0.5)
    approx *= inv  # 1 / a = inf only where a == 0: levels = 0 (-inf) or unusable
    if unusable is not None:
        approx.masked_fill_(unusable, fill)
    rows = torch.arange(S, device=levels.device)
    k = approx.argmax(dim=1) if largest else approx.argmin(dim=1)
    ext = approx[rows, k]
    some = torch.isfinite(ext)
    rs, ks = rows[some], k[some]
    out[some] = _exact_break(a[rs, ks], levels[rs, ks] + step)
    tol = ext.abs() * 1e-12
    approx[rows, k] = fill  # runner-up
    if largest:
        multi = some & ~uniform & (approx.amax(dim=1) >= ext - tol)
    else:
        multi = some & ~uniform & (approx.amin(dim=1) <= ext + tol)
    multi = torch.nonzero(multi).flatten()
    if len(multi):
        approx[multi, k[multi]] = ext[multi]
        sub = approx[multi]
        lim = (ext - tol if largest else ext + tol)[multi, None]
        r, col = torch.nonzero(sub >= lim if largest else sub <= lim, as_tuple=True)
        exact = torch.full((len(multi), P), fill, dtype=F64, device=levels.device)
        exact[r, col] = _exact_break(a[multi[r], col], levels[multi[r], col] + step)
        out[multi] = exact.amax(dim=1) if largest else exact.amin(dim=1)
    return out


@dataclass
class _Probe:
    start: torch.Tensor
    next: torch.Tensor
    images: Optional[torch.Tensor] = None  # float32 integer pixels (n, P)
    u: Optional[torch.Tensor] = None


class _Rays:
    """The S rays x_i + eps * eta_s as (S, P) tensors: |eta|, headroom, clean pixels, signs (all float64)."""

    def __init__(self, x: torch.Tensor, eta: torch.Tensor, img: torch.Tensor):
        P = int(np.prod(x.shape[1:]))
        eta = eta.reshape(len(img), P)
        self.x0 = x.reshape(len(x), P).to(F64)[img]
        self.a = eta.abs()
        self.inv = 1.0 / self.a
        self.sgn = torch.sign(eta)
        self.head = torch.where(eta > 0, 255.0 - self.x0, self.x0)
        # pixels that never move at a finite eps: eta == 0 (or so tiny that 1/|eta| overflows)
        self.head[~torch.isfinite((self.head - 0.5) / self.a)] = 0.0
        peak = self.a.amax(dim=1) if P else torch.zeros(len(img), dtype=F64, device=x.device)
        self.uniform = ((self.a == peak[:, None]) | (self.a == 0)).all(dim=1)
        self.block = max(1, _BLOCK // max(1, P))

    def probe(self, idx: torch.Tensor, eps: Optional[torch.Tensor], full: bool = True) -> _Probe:
        n, P = len(idx), self.a.shape[1]
        dev = self.a.device
        out = _Probe(start=torch.empty(n, dtype=F64, device=dev), next=torch.empty(n, dtype=F64, device=dev))
        if full:
            out.images = torch.empty((n, P), dtype=torch.float32, device=dev)
            out.u = torch.empty(n, dtype=F64, device=dev)
        whole = n == len(self.a) and n <= self.block
        for b in range(0, n, self.block):
            sl = slice(b, b + self.block)
            if whole:
                a, inv, head, uniform, x0, sgn = self.a, self.inv, self.head, self.uniform, self.x0, self.sgn
            else:
                rows = idx[sl]
                a, inv, head = self.a.index_select(0, rows), self.inv.index_select(0, rows), self.head.index_select(0, rows)
                uniform = self.uniform[rows]
                x0, sgn = (self.x0.index_select(0, rows), self.sgn.index_select(0, rows)) if full else (None, None)
            lev = head.clone() if eps is None else _levels(eps[sl, None], a, head)
            out.start[sl] = torch.clamp(_extreme_break(a, inv, lev, 0, None, uniform), min=0.0)
            out.next[sl] = _extreme_break(a, inv, lev, 1, lev >= head, uniform)
            if full:
                out.u[sl] = (lev * a).sum(dim=1)
                out.images[sl] = torch.addcmul(x0, sgn, lev)
        return out

    def invert(self, idx, lo, hi, u_lo, u_hi, u_star) -> torch.Tensor:
        """An eps in (lo, hi) where u(eps) is about u_star: _INVERT regula falsi steps (hcgen.core.search)."""
        out = torch.empty(len(idx), dtype=F64, device=self.a.device)
        for b in range(0, len(idx), self.block):
            sl = slice(b, b + self.block)
            rows = idx[sl]
            a, head = self.a.index_select(0, rows), self.head.index_select(0, rows)
            el, eh, ul, uh, us = lo[sl], hi[sl], u_lo[sl], u_hi[sl], u_star[sl]
            e = el
            for _ in range(_INVERT):
                e = el + (eh - el) * ((us - ul) / (uh - ul))
                u = (_levels(e[:, None], a, head) * a).sum(dim=1)
                below = u < us
                el, ul = torch.where(below, e, el), torch.where(below, u, ul)
                eh, uh = torch.where(below, eh, e), torch.where(below, uh, u)
            out[sl] = e
        return out


def perturb(x: torch.Tensor, eta: torch.Tensor, eps: torch.Tensor | float) -> torch.Tensor:
    """The integer image x~(eps) of hcgen.core.search's rounding rule on tensors, float64 shaped like ``eta``.

    ``x`` (N, C, H, W) integer pixels; ``eta`` (N, C, H, W) or (N, D, C, H, W); ``eps`` shaped
    ``eta.shape[:-3]`` or a scalar, finite and >= 0."""
    xf = x.to(eta.device, F64)
    eps = torch.as_tensor(eps, dtype=F64, device=eta.device)
    if eps.ndim == 0:
        eps = eps.expand(eta.shape[:-3])
    if eps.shape != eta.shape[:-3]:
        raise ValueError(f"eps must have shape {tuple(eta.shape[:-3])} (one per direction), got {tuple(eps.shape)}")
    if not bool(torch.isfinite(eps).all()) or bool((eps < 0).any()):
        raise ValueError("eps must be finite and >= 0 (failed searches have eps = NaN; select success first)")
    xb = xf[:, None] if eta.ndim == 5 else xf
    head = torch.where(eta > 0, 255.0 - xb, xb)
    levels = _levels(eps[..., None, None, None], eta.abs(), head)
    return xb + torch.sign(eta) * levels


# ------------------------------------------------------------------------------------------- search

@dataclass
class TensorSearch:
    """hcgen.core.search.SearchResult as tensors on the device, shaped (N,) or (N, D); x_adv is uint8."""

    eps: torch.Tensor
    eps_prev: torch.Tensor
    x_adv: torch.Tensor
    label: torch.Tensor
    success: torch.Tensor
    status: torch.Tensor
    forwards: torch.Tensor
    rounds: int
    clean_forwards: int

    def numpy(self) -> np_search.SearchResult:
        """The same record as hcgen.core.search.SearchResult (numpy, on the host)."""
        c = lambda t: t.cpu().numpy()  # noqa: E731
        return np_search.SearchResult(eps=c(self.eps), eps_prev=c(self.eps_prev), x_adv=c(self.x_adv),
                                      label=c(self.label), success=c(self.success), status=c(self.status),
                                      forwards=c(self.forwards), rounds=self.rounds,
                                      clean_forwards=self.clean_forwards)


def _margin(scores: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.arange(len(y), device=scores.device)
    s_y = scores[rows, y]
    others = scores.clone()
    others[rows, y] = -INF
    return scores.argmax(dim=1), s_y - others.amax(dim=1)


def _checked_scores(pm: PixelModel, images: torch.Tensor, n_classes: Optional[int]) -> torch.Tensor:
    s = pm.scores(images)
    if s.ndim != 2 or s.shape[0] != len(images) or (n_classes is not None and s.shape[1] != n_classes):
        raise ValueError(f"the scores' layer must give {n_classes or 'n_classes'} values per image, got shape "
                         f"{tuple(s.shape)} for {len(images)} images")
    if not bool(torch.isfinite(s).all()):
        raise ValueError("the model returned NaN or inf scores")
    return s.to(F64)


def adversarial_search(pm: PixelModel, x: torch.Tensor, eta: torch.Tensor, labels: torch.Tensor, *,
                       clean_scores: Optional[torch.Tensor] = None, step0: float = 16.0, growth: float = 3.0,
                       on_round: Optional[Callable[[torch.Tensor], None]] = None) -> TensorSearch:
    """hcgen.core.search.adversarial_search on tensors: for every (image, direction) the minimal adversarial
    integer image along the ray. ``x`` (N, C, H, W) integer pixels, ``eta`` (N, C, H, W) or (N, D, C, H, W)
    normalised directions (float64), ``labels`` (N,) int64, ``clean_scores`` (N, n) if known. ``on_round``
    (for benchmarks) sees every candidate batch."""
    dev = pm.device
    xf = x.to(dev, F64)
    eta = eta.to(dev, F64)
    y_img = labels.to(dev, torch.int64)
    if not (math.isfinite(growth) and growth > 1):
        raise ValueError(f"growth must be > 1, got {growth!r}")
    if not (math.isfinite(step0) and step0 > 0):
        raise ValueError(f"step0 must be a positive number of grey levels, got {step0!r}")
    clean_forwards = 0
    if clean_scores is None and not len(xf):
        clean_scores = torch.zeros((0, 1), dtype=F64, device=dev)
    elif clean_scores is None:
        clean_scores = _checked_scores(pm, xf.to(torch.float32), None)
        clean_forwards = len(xf)
    clean_scores = clean_scores.to(dev, F64)
    n_classes = clean_scores.shape[1]
    shape = tuple(eta.shape[:-3])
    n_dir = 1 if eta.ndim == 4 else eta.shape[1]
    img = torch.arange(len(xf), device=dev).repeat_interleave(n_dir)
    rays = _Rays(xf, eta, img)
    step0_t = torch.full((len(img),), float(step0), dtype=F64, device=dev)
    engine = _Engine(rays, y_img[img], pm, n_classes, tuple(xf.shape[1:]), step0_t, float(growth), on_round)
    pred0, m0 = _margin(clean_scores, y_img)
    engine.run(pred0[img], m0[img])

    ok = engine.status == Status.FOUND
    zero = torch.zeros((), dtype=F64, device=dev)
    nan = torch.full((), math.nan, dtype=F64, device=dev)
    x_adv = rays.probe(torch.arange(len(img), device=dev), torch.where(ok, engine.hi, zero)).images
    return TensorSearch(
        eps=torch.where(ok, engine.hi, nan).reshape(shape),
        eps_prev=torch.where(ok, engine.lo, nan).reshape(shape),
        x_adv=x_adv.to(torch.uint8).reshape(eta.shape),
        label=engine.pred_hi.reshape(shape),
        success=ok.reshape(shape),
        status=engine.status.to(torch.int8).reshape(shape),
        forwards=engine.forwards.reshape(shape),
        rounds=engine.rounds,
        clean_forwards=clean_forwards,
    )


def _inverse_quadratic(p: tuple, m: tuple) -> torch.Tensor:
    (p0, p1, p2), (m0, m1, m2) = p, m
    return (p0 * m1 * m2 / ((m0 - m1) * (m0 - m2)) + p1 * m0 * m2 / ((m1 - m0) * (m1 - m2))
            + p2 * m0 * m1 / ((m2 - m0) * (m2 - m1)))


class _Engine:
    """hcgen.core.search._Engine on tensors: per-search state, one candidate per active search per round."""

    RUNNING = -1

    def __init__(self, rays: _Rays, y: torch.Tensor, pm: PixelModel, n_classes: int, image_shape: tuple,
                 step0: torch.Tensor, growth: float, on_round=None):
        S = len(y)
        dev = y.device
        full = lambda v: torch.full((S,), v, dtype=F64, device=dev)  # noqa: E731
        self.rays, self.y, self.pm, self.n_classes = rays, y, pm, n_classes
        self.image_shape, self.step0, self.growth, self.on_round = image_shape, step0, growth, on_round
        self.status = torch.full((S,), self.RUNNING, dtype=torch.int64, device=dev)
        self.lo, self.hi = full(0.0), full(INF)
        self.lo_next = full(0.0)
        self.m_lo, self.m_hi, self.m_old = full(0.0), full(0.0), full(math.nan)
        self.pos_lo, self.pos_old = full(0.0), full(math.nan)
        self.w_lo, self.w_hi = full(1.0), full(1.0)
        self.u_lo, self.u_hi, self.u_old = full(0.0), full(0.0), full(math.nan)
        self.side = torch.zeros(S, dtype=torch.int8, device=dev)
        self.slow = torch.zeros(S, dtype=torch.int8, device=dev)
        self.pred_hi = torch.zeros(S, dtype=torch.int64, device=dev)
        self.forwards = torch.zeros(S, dtype=torch.int64, device=dev)
        self.rounds = 0
        self.all = torch.arange(S, device=dev)
        self.sat = rays.probe(self.all, None, full=False).start

    def run(self, pred0: torch.Tensor, m0: torch.Tensor) -> None:
        self.pred_hi[:] = pred0
        self.m_lo[:] = m0
        self.lo_next[:] = self.rays.probe(self.all, torch.zeros_like(self.lo), full=False).next
        self.status[pred0 != self.y] = Status.MISCLASSIFIED
        self.status[(self.status == self.RUNNING) & ~torch.isfinite(self.lo_next)] = Status.NULL_DIRECTION
        while True:
            idx = torch.nonzero(self.status == self.RUNNING).flatten()
            if not len(idx):
                return
            self._round(idx)

    def _targets(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi, pos_lo, pos_old = self.lo[idx], self.hi[idx], self.pos_lo[idx], self.pos_old[idx]
        m_lo, m_hi, m_old = self.m_lo[idx], self.m_hi[idx], self.m_old[idx]
        line = ~torch.isfinite(hi)
        slope = (m_lo - m_old) / (pos_lo - pos_old)
        aim = pos_lo + _OVERSHOOT * m_lo / -slope
        aim = torch.where((slope < 0) & torch.isfinite(aim), aim, pos_lo * self.growth)
        aim = torch.minimum(torch.maximum(aim, pos_lo * _MIN_GROWTH), pos_lo * self.growth ** 2)
        target = torch.minimum(torch.where(lo == 0, self.step0[idx], aim), self.sat[idx])
        u_lo, u_hi = self.u_lo[idx], self.u_hi[idx]
        iqi = _inverse_quadratic((u_lo, u_hi, self.u_old[idx]), (m_lo, m_hi, m_old))
        wl, wh = m_lo * self.w_lo[idx], m_hi * self.w_hi[idx]
        rf = u_lo + (u_hi - u_lo) * (wl / (wl - wh))
        u_star = torch.where((iqi > u_lo) & (iqi < u_hi), iqi, rf)
        bisect = ~line & ~((u_star > u_lo) & (u_star < u_hi) & (self.slow[idx] < 2))
        target = torch.where(bisect, 0.5 * (lo + hi), target)
        b = torch.nonzero(~line & ~bisect).flatten()
        if len(b):
            target[b] = self.rays.invert(idx[b], lo[b], hi[b], u_lo[b], u_hi[b], u_star[b])
        return target, bisect

    def _round(self, idx: torch.Tensor) -> None:
        lo, hi = self.lo[idx], self.hi[idx]
        line = ~torch.isfinite(hi)
        target, bisected = self._targets(idx)
        target = torch.maximum(torch.minimum(target, torch.nextafter(hi, torch.full_like(hi, -INF))),
                               self.lo_next[idx])
        probe = self.rays.probe(idx, target)
        c, c_next, u = probe.start, probe.next, probe.u
        images = probe.images.reshape((len(idx),) + self.image_shape)
        if self.on_round is not None:
            self.on_round(images)
        scores = _checked_scores(self.pm, images, self.n_classes)
        self.rounds += 1
        self.forwards[idx] += 1
        y = self.y[idx]
        pred, m = _margin(scores, y)
        adv = pred != y
        pos = torch.where(torch.isfinite(c_next), 0.5 * (c + c_next), c)

        j = idx[adv & ~line]
        self.m_old[j], self.u_old[j] = self.m_hi[j], self.u_hi[j]
        j, nadv = idx[~adv], ~adv
        self.pos_old[j], self.m_old[j], self.u_old[j] = self.pos_lo[j], self.m_lo[j], self.u_lo[j]
        j = idx[adv]
        self.hi[j], self.m_hi[j], self.u_hi[j], self.w_hi[j] = c[adv], m[adv], u[adv], 1.0
        self.pred_hi[j] = pred[adv]
        j = idx[nadv]
        self.lo[j], self.lo_next[j], self.pos_lo[j] = c[nadv], c_next[nadv], pos[nadv]
        self.m_lo[j], self.u_lo[j], self.w_lo[j] = m[nadv], u[nadv], 1.0

        side = torch.where(adv, 1, -1).to(torch.int8)
        repeat = side == self.side[idx]
        self.w_lo[idx[repeat & adv]] *= 0.5
        self.w_hi[idx[repeat & ~adv]] *= 0.5
        self.side[idx] = side
        shrank = (self.hi[idx] - self.lo[idx]) <= 0.5 * (hi - lo)
        self.slow[idx] = torch.where(bisected | shrank | line, torch.zeros_like(self.slow[idx]),
                                     self.slow[idx] + 1)

        hi, lo = self.hi[idx], self.lo[idx]
        done = torch.isfinite(hi) & (self.lo_next[idx] >= hi)
        self.status[idx[done]] = Status.FOUND
        failed = ~torch.isfinite(hi) & (lo >= self.sat[idx])
        self.status[idx[failed]] = Status.NOT_ADVERSARIAL


# ------------------------------------------------------------------------------------ hard positives

@dataclass
class TensorHardPositives:
    """hcgen.core.search.HardPositives on tensors: (F, N[, D], C, H, W) uint8 images for factors (F,), the
    original labels, their predicted labels (-1 where not valid) and valid (the search succeeded)."""

    factors: torch.Tensor
    images: torch.Tensor
    label: torch.Tensor
    pred: torch.Tensor
    valid: torch.Tensor

    def numpy(self) -> np_search.HardPositives:
        c = lambda t: t.cpu().numpy()  # noqa: E731
        return np_search.HardPositives(factors=c(self.factors), images=c(self.images), label=c(self.label),
                                       pred=c(self.pred), valid=c(self.valid))


def check_factors(factors: Sequence[float]) -> list[float]:
    f = np.atleast_1d(np.asarray(factors, dtype=np.float64))
    if f.ndim != 1 or not f.size or not np.isfinite(f).all() or (f < 1).any():
        raise ValueError(f"scales must be a non-empty list of finite factors >= 1 (paper: 1.05 1.10), "
                         f"got {np.asarray(factors).tolist()}")
    return f.tolist()


def hard_positives(pm: PixelModel, x: torch.Tensor, eta: torch.Tensor, labels: torch.Tensor,
                   result: TensorSearch, factors: Sequence[float], predict: bool = True) -> TensorHardPositives:
    """hcgen.core.search.hard_positives on tensors: every successful minimal perturbation scaled by each factor
    (``perturb(x, eta, s * eps)``), original labels kept, predicted labels from one forward (if ``predict``)."""
    f = check_factors(factors)
    dev = pm.device
    ok = result.success.to(dev)
    eps = torch.where(ok, result.eps.to(dev), torch.zeros((), dtype=F64, device=dev))
    images = torch.stack([perturb(x, eta, s * eps) for s in f]).to(torch.uint8)
    y = labels.to(dev, torch.int64)
    label = y.reshape((-1,) + (1,) * (eta.ndim - 4)).expand(ok.shape).clone()
    valid = ok.expand((len(f),) + tuple(ok.shape)).clone()
    pred = torch.full(valid.shape, -1, dtype=torch.int64, device=dev)
    if predict and bool(valid.any()):
        pred[valid] = _checked_scores(pm, images[valid], None).argmax(dim=1)
    return TensorHardPositives(factors=torch.tensor(f, dtype=F64), images=images, label=label, pred=pred,
                               valid=valid)


# ------------------------------------------------------------------------------- generate_batch's needs

def pixel_model_of(net) -> PixelModel:
    """The `PixelModel` of a `hcgen.backends.torch.TorchNet` (same model, preprocessing, layer, batch size)."""
    return PixelModel(net.model, net.preprocessing, layer=net.layer or None, batch_size=net.batch_size)


def search_batch(net, x: np.ndarray, y: np.ndarray, h: np.ndarray, methods: Sequence,
                 scales: Sequence[float] = (), timings: Optional[dict] = None
                 ) -> tuple[np_search.SearchResult, Optional[np_search.HardPositives]]:
    """For `hcgen.generate.run.generate_batch` on a `TorchNet`: the (search result, hard positives)
    that ``compute_directions`` + ``search.adversarial_search(net.scores, x, eta, y, clean_scores=h)`` +
    ``search.hard_positives(net.scores, x, eta, y, res, scales)`` give, from the tensor engine.

    ``x`` (N, C, H, W) uint8 correctly classified sources, ``y`` (N,), ``h`` their scores (N, n) as
    ``net.scores(x)`` gave them; returns numpy `hcgen.core.search.SearchResult` and `hcgen.core.search.HardPositives`
    (None without scales). `hcgen.generate.run.generate_batch` calls it for every batch of a `TorchNet`.
    """
    pm = pixel_model_of(net)
    t = time.perf_counter()
    xt = torch.from_numpy(np.ascontiguousarray(x)).to(pm.device)
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64)).to(pm.device)
    ht = torch.from_numpy(np.asarray(h, dtype=np.float64)).to(pm.device)
    eta, _ = compute_directions(pm, xt, yt, ht, methods)
    t1 = time.perf_counter()
    res = adversarial_search(pm, xt, eta, yt, clean_scores=ht)
    t2 = time.perf_counter()
    hp = hard_positives(pm, xt, eta, yt, res, scales).numpy() if len(scales) else None
    if timings is not None:
        timings.update(directions=t1 - t, search=t2 - t1, hard_positives=time.perf_counter() - t2)
    return res.numpy(), hp
