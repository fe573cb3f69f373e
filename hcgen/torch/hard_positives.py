"""Online hard positives: `HardPositives(model, ...)(x, y)` inside any PyTorch training loop.

For a batch of integer pixel images and their labels, on the model's *current* weights: every correctly
classified image is searched along each method's direction (FGS, FGV, HC-D-k, HC-S-k; Eq. 6-7) for its
minimal adversarial integer image (`hcgen.torch.engine`, the exact search of `hcgen.core.search`), the minimal
perturbation is scaled by each factor (or per image into a PASS band, Fig. 6), and the results that keep
PASS >= tau are returned with the ORIGINAL labels: hard positives (Sec. 4-5 of Rozsa et al., CVPRW 2016).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from hcgen.backends.torch import check_device
from hcgen.core.methods import parse_methods
from hcgen.core.metrics import pass_scores
from hcgen.torch import engine
from hcgen.torch.engine import F64, PixelModel, Preprocess, canonical, eval_mode, model_device

__all__ = ["HardPositives", "HardPositiveInfo", "REASONS"]

#: keys of ``HardPositives.last_stats["dropped"]``: why a (source image, method[, scale]) gave no hard positive
REASONS = ("misclassified_source", "not_adversarial", "null_direction", "below_tau", "outside_band")


@dataclass
class HardPositiveInfo:
    """Per returned hard positive (rows of ``x_hp``), tensors on the model's device: ``source`` its row in
    the batch, ``row`` its row among the searched (correctly classified) sources, i.e. in
    ``hp.last_search`` and ``hp.last_directions``, ``method`` its index in ``HardPositives.methods``,
    ``scale`` the factor applied to the minimal perturbation, ``eps`` the minimal step
    (``hcgen.torch.engine.perturb(x, eta, eps)`` is the minimal adversarial), ``pass_`` its PASS (NaN when
    PASS was not computed: no tau, no band)."""

    source: torch.Tensor
    row: torch.Tensor
    method: torch.Tensor
    scale: torch.Tensor
    eps: torch.Tensor
    pass_: torch.Tensor


class _Clock:
    """Seconds per part of a call, in wall time and in this thread's CPU time (torch's intra-op work with one
    thread and the OpenCV PASS with pass_jobs=1 run in the calling thread: the work itself on a shared machine)."""

    def __init__(self, parts):
        self.wall = dict.fromkeys(parts, 0.0)
        self.cpu = dict.fromkeys(parts, 0.0)

    @staticmethod
    def now() -> tuple[float, float]:
        return time.perf_counter(), time.thread_time()

    def add(self, part: str, since: tuple[float, float]) -> None:
        wall, cpu = self.now()
        self.wall[part] = self.wall.get(part, 0.0) + wall - since[0]
        self.cpu[part] = self.cpu.get(part, 0.0) + cpu - since[1]


def _hwc(images: np.ndarray) -> np.ndarray:
    """(M, C, H, W) -> (M, H, W) grey or (M, H, W, C) colour, as hcgen.core.metrics expects."""
    return images[:, 0] if images.shape[1] == 1 else images.transpose(0, 2, 3, 1)


class HardPositives:
    """Hard positives of a batch on the current weights, for a training loop: ``x_hp, y_hp = hp(x, y)``.

    Parameters
    ----------
    model : the ``torch.nn.Module`` being trained (any device; the hard positives come back on it).
    methods : hcgen method string (``hcgen.core.methods.parse_methods``), e.g. ``"hc-d:1-9"``,
        ``"fgs,fgv,hc-d:1-9,hc-s:1-9"``.
    scales : factors >= 1 applied to each minimal perturbation (default ``(1.05,)``; 1.0 = the minimal
        adversarial itself). Not with ``pass_band``.
    tau : keep only hard positives with PASS >= tau (None: no PASS filter, and no PASS computed).
    layer : module (name in ``dict(model.named_modules())``) whose output are the scores h(x) (one value
        per class, before any softmax); default the model's output. omega of HC-D / HC-S (Eq. 7) is built
        there and backpropagated from there (forward hook).
    preprocess : pixels -> model input: a `hcgen.backends.torch.PRESETS` name (``"lenet"`` = Caffe's x * 1/256,
        the default; ``"torchvision"``; ...), a `hcgen.backends.torch.Normalization`, or a callable on float
        tensors. ``hp.preprocess`` is that function: train with ``model(hp.preprocess(x_hp.float()))``.
    pass_band : ``(low, high)``: instead of fixed scales, per minimal adversarial the scale >= 1 is chosen
        (bisection in log-scale between 1 and ``band_max_scale``, at most ``band_steps`` PASS evaluations)
        so that PASS lands in [low, high] (Fig. 6: hard positives of PASS 0.8-0.9 helped most); those that
        cannot are dropped ("outside_band").
    device : optional check: "cpu" or "cuda" (refused in one line where torch sees no GPU); the model
        must already be there (it is never moved).
    batch_size : images per model call during the search (as `hcgen.backends.torch.TorchNet`).
    pass_jobs : threads of the OpenCV PASS (`hcgen.core.metrics.pass_scores`; None: all cores).

    Calling ``hp(x, y)``: ``x`` is a (N, C, H, W) tensor (or array) of integer pixel values in [0, 255],
    uint8 or float, on any device; ``y`` int64 (N,). Returns ``(x_hp, y_hp)`` on the model's device:
    ``x_hp`` (M, C, H, W) with x's dtype (uint8 stays uint8, a float batch gets floats holding integer
    pixel values: uint8-exact either way), ordered by source image, then method, then scale; ``y_hp`` the
    sources' original labels (int64). ``hp.last_stats`` counts what was kept and why the rest was not
    (`REASONS`) and where the time went (``seconds``: wall, ``cpu_seconds``: this thread's CPU);
    ``hp.last_info`` (`HardPositiveInfo`) describes each row.

    Train / eval mode: the search runs with every module in eval mode (dropout off, batch norm on its
    running statistics, which are not updated), inside `hcgen.torch.engine.eval_mode`, which restores
    each module's own ``training`` flag afterwards, also on an exception: the hard positives are minimal
    adversarials of the model's inference function on the current weights, deterministic and independent
    of the batch. The call consumes no random numbers and leaves the parameters' ``.grad`` untouched
    (only pixel gradients are taken). PASS is OpenCV's (`hcgen.core.metrics.pass_scores`, on the host);
    benchmarks/README.md measures its share of a training step.
    """

    def __init__(self, model: torch.nn.Module, methods: str = "hc-d:1-9", scales: Optional[Sequence[float]] = None,
                 tau: Optional[float] = None, layer: Optional[str] = None, preprocess: Preprocess = "lenet",
                 pass_band: Optional[Sequence[float]] = None, *, device: Optional[str] = None,
                 batch_size: int = 256, step0: float = 16.0, growth: float = 3.0,
                 pass_jobs: Optional[int] = 1, band_max_scale: float = 8.0, band_steps: int = 8):
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(methods, str):
            raise ValueError(f"methods must be a string like 'hc-d:1-9' or 'fgs,fgv,hc-s:1,3', got {methods!r}")
        self.methods = parse_methods(methods)
        if pass_band is not None:
            if scales is not None:
                raise ValueError("give scales or pass_band, not both (pass_band chooses the scale per image)")
            band = tuple(float(v) for v in pass_band)
            if len(band) != 2 or not (-1 <= band[0] < band[1] <= 1):
                raise ValueError(f"pass_band must be (low, high) with -1 <= low < high <= 1, got {pass_band!r}")
            if not (math.isfinite(band_max_scale) and band_max_scale > 1) or band_steps < 1:
                raise ValueError("band_max_scale must be > 1 and band_steps >= 1")
            self.pass_band: Optional[tuple[float, float]] = band
            self.scales: list[float] = []
        else:
            self.pass_band = None
            self.scales = engine.check_factors((1.05,) if scales is None else scales)
        if tau is not None and not (isinstance(tau, (int, float)) and -1 <= tau <= 1):
            raise ValueError(f"tau must be a PASS threshold in [-1, 1] or None, got {tau!r}")
        self.tau = None if tau is None else float(tau)
        self.model_device = model_device(model)
        if device is not None:
            want = check_device(device)
            if want.type != self.model_device.type or (want.index is not None and want != self.model_device):
                raise ValueError(f"device {device!r} requested but the model is on {self.model_device}; move it "
                                 f"with model.to({device!r}) first (HardPositives never moves the model)")
        self.pm = PixelModel(model, preprocess, layer=layer, batch_size=batch_size)
        self.model = model
        self.preprocess = self.pm.preprocess
        self.step0, self.growth = float(step0), float(growth)
        self.pass_jobs = pass_jobs
        self.band_max_scale, self.band_steps = float(band_max_scale), int(band_steps)
        self.last_stats: dict = {}
        self._checked_shape: Optional[tuple] = None
        self.last_info: Optional[HardPositiveInfo] = None
        self.last_search: Optional[engine.TensorSearch] = None  # the search of the last call's sources
        self.last_directions: Optional[torch.Tensor] = None  # their directions eta (n, D, C, H, W) float64

    # -- input checks ---------------------------------------------------------------------------------

    @staticmethod
    def _check_x(x) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            try:
                x = torch.as_tensor(np.asarray(x))
            except (TypeError, ValueError, RuntimeError):
                raise ValueError(f"x must be a tensor of pixel images (N, C, H, W), got {type(x).__name__}") from None
        if x.ndim != 4:
            raise ValueError(f"x must be a batch of images (N, C, H, W), got shape {tuple(x.shape)}")
        if x.dtype == torch.bool or x.is_complex() or not (x.is_floating_point() or x.dtype in (
                torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)):
            raise ValueError(f"x must hold pixel values (uint8 or float), got dtype {x.dtype}")
        if x.numel():
            if x.is_floating_point():
                if not bool(torch.isfinite(x).all()):
                    raise ValueError("x contains NaN or inf; expected integer pixel values in [0, 255]")
                if bool((x != torch.round(x)).any()):
                    raise ValueError("x must hold integer pixel values in [0, 255] (got fractional values; pass raw "
                                     "pixels, not the preprocessed model input)")
            lo, hi = float(x.min()), float(x.max())
            if lo < 0 or hi > 255:
                raise ValueError(f"x must hold pixel values in [0, 255], got range [{lo:g}, {hi:g}]")
        return x

    @staticmethod
    def _check_y(y, n: int) -> torch.Tensor:
        if not isinstance(y, torch.Tensor):
            y = torch.as_tensor(np.asarray(y))
        if tuple(y.shape) != (n,):
            raise ValueError(f"y must hold one label per image, shape ({n},), got {tuple(y.shape)}")
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise ValueError(f"y must hold integer class indices (int64), got dtype {y.dtype}")
        return y.to(torch.int64)

    # -- the call ---------------------------------------------------------------------------------------

    def __call__(self, x, y) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._check_x(x)
        y = self._check_y(y, len(x))
        out_dtype = x.dtype
        dev = self.pm.device
        clock = _Clock(("scores", "directions", "search", "scale", "pass"))
        t0 = clock.now()
        stats = {"images": len(x), "searches": 0, "found": 0, "candidates": 0, "kept": 0,
                 "dropped": dict.fromkeys(REASONS, 0), "forwards": 0, "seconds": clock.wall,
                 "cpu_seconds": clock.cpu}
        xd = canonical(x, torch.float32, dev)
        yd = y.to(dev)
        empty = (x.new_empty((0,) + tuple(x.shape[1:])).to(dev), torch.empty(0, dtype=torch.int64, device=dev))
        self.last_info, self.last_search, self.last_directions = None, None, None
        if not len(x):
            self.last_stats = stats
            return empty
        with eval_mode(self.model):
            t = clock.now()
            h = self.pm.scores(xd).to(F64)
            n_classes = h.shape[1]
            self._check_layer_width(xd[:1], n_classes)
            if int(yd.min()) < 0 or int(yd.max()) >= n_classes:
                raise ValueError(f"y must hold class indices in [0, {n_classes - 1}] for the model's {n_classes} "
                                 f"scores, got range [{int(yd.min())}, {int(yd.max())}]")
            if n_classes < 2 or (any(m.k >= n_classes for m in self.methods)):
                raise ValueError(f"methods {[m.name for m in self.methods]} need more than {n_classes} classes "
                                 "(hot class k must be < the number of classes)")
            correct = h.argmax(dim=1) == yd
            src = torch.nonzero(correct).flatten()
            stats["dropped"]["misclassified_source"] = len(x) - len(src)
            stats["forwards"] += len(x)
            clock.add("scores", t)
            if not len(src):
                self.last_stats = stats
                return empty
            xs, ys, hs = xd[src], yd[src], h[src]
            t = clock.now()
            eta, _ = engine.compute_directions(self.pm, xs, ys, hs, self.methods)
            clock.add("directions", t)
            t = clock.now()
            res = engine.adversarial_search(self.pm, xs, eta, ys, clean_scores=hs, step0=self.step0,
                                            growth=self.growth)
            clock.add("search", t)
        self.last_search, self.last_directions = res, eta
        stats["searches"] = int(res.status.numel())
        stats["forwards"] += int(res.forwards.sum())
        ok = res.success  # (n, D)
        stats["found"] = int(ok.sum())
        stats["dropped"]["not_adversarial"] = int((res.status == engine.Status.NOT_ADVERSARIAL).sum())
        stats["dropped"]["null_direction"] = int((res.status == engine.Status.NULL_DIRECTION).sum())
        n_idx, d_idx = torch.nonzero(ok, as_tuple=True)
        eps = res.eps[n_idx, d_idx]
        t = clock.now()
        if self.pass_band is None:
            F = len(self.scales)
            scale = torch.tensor(self.scales, dtype=F64, device=dev)
            # rows ordered by source image, method, scale
            nn, dd = n_idx.repeat_interleave(F), d_idx.repeat_interleave(F)
            ss = scale.repeat(len(n_idx))
            e = eps.repeat_interleave(F)
            images = engine.perturb(xs[nn], eta[nn, dd], ss * e)
            clock.add("scale", t)
            stats["candidates"] = len(images)
            pas = torch.full((len(images),), math.nan, dtype=F64, device=dev)
            keep = torch.ones(len(images), dtype=torch.bool, device=dev)
            if self.tau is not None and len(images):
                t = clock.now()
                pas = self._pass(xs[nn], images)
                clock.add("pass", t)
                keep = pas >= self.tau
                stats["dropped"]["below_tau"] = int((~keep).sum())
        else:
            nn, dd, e = n_idx, d_idx, eps
            images, ss, pas, keep = self._band(xs, eta, nn, dd, e, clock, stats)
        images, nn, dd, ss, e, pas = (v[keep] for v in (images, nn, dd, ss, e, pas))
        stats["kept"] = len(images)
        self.last_info = HardPositiveInfo(source=src[nn], row=nn, method=dd, scale=ss, eps=e, pass_=pas)
        clock.add("total", t0)
        self.last_stats = stats
        x_hp = images.to(torch.uint8) if out_dtype == torch.uint8 else images.to(out_dtype)
        return x_hp, ys[nn].clone()

    def _check_layer_width(self, one: torch.Tensor, width: int) -> None:
        """A named layer must give one value per class, as many as the model's output (once per input shape)."""
        if not self.pm.layer or self._checked_shape == tuple(one.shape[1:]):
            return
        with torch.no_grad():
            out = self.model(self.pm.preprocess(one))
        if isinstance(out, torch.Tensor) and out.reshape(1, -1).shape[1] != width:
            raise ValueError(f"layer {self.pm.layer!r} outputs {width} values per image but the model has "
                             f"{out.reshape(1, -1).shape[1]} outputs; name the layer of the class scores (logits)")
        self._checked_shape = tuple(one.shape[1:])

    def _pass(self, originals: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        a = originals.to(torch.uint8).cpu().numpy()
        b = candidates.to(torch.uint8).cpu().numpy()
        score, _ = pass_scores(_hwc(a), _hwc(b), n_jobs=self.pass_jobs)
        return torch.from_numpy(score).to(self.pm.device)

    def _band(self, xs, eta, nn, dd, eps, clock, stats):
        """Per minimal adversarial, a scale s in [1, band_max_scale] with PASS(perturb(x, eta, s eps)) in the
        band: PASS at 1, at band_max_scale, then bisection in log s (PASS falls as s grows)."""
        low, high = self.pass_band
        dev = self.pm.device
        M = len(nn)
        stats["candidates"] = M
        x0, rays = xs[nn], eta[nn, dd]

        def score(rows: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            t = clock.now()
            img = engine.perturb(x0[rows], rays[rows], s * eps[rows])
            clock.add("scale", t)
            t = clock.now()
            p = self._pass(x0[rows], img)
            clock.add("pass", t)
            return img, p

        shape = tuple(xs.shape[1:])
        images = torch.zeros((M,) + shape, dtype=F64, device=dev)
        chosen = torch.full((M,), math.nan, dtype=F64, device=dev)
        pas = torch.full((M,), math.nan, dtype=F64, device=dev)
        if not M:
            return images, chosen, pas, torch.zeros(0, dtype=torch.bool, device=dev)
        done = torch.zeros(M, dtype=torch.bool, device=dev)

        def accept(rows, s, img, p):
            hit = (p >= low) & (p <= high)
            r = rows[hit]
            images[r], chosen[r], pas[r] = img[hit], s[hit], p[hit]
            done[r] = True
            return hit

        rows = torch.arange(M, device=dev)
        s1 = torch.ones(M, dtype=F64, device=dev)
        img, p1 = score(rows, s1)
        accept(rows, s1, img, p1)
        rows = torch.nonzero(~done & (p1 > high)).flatten()  # p1 < low: unreachable with s >= 1
        s_hi = torch.full((len(rows),), self.band_max_scale, dtype=F64, device=dev)
        if len(rows):
            img, p_hi = score(rows, s_hi)
            hit = accept(rows, s_hi, img, p_hi)
            go = ~hit & (p_hi < low)  # p_hi > high: even the largest scale stays above the band
            rows, s_hi = rows[go], s_hi[go]
            s_lo = torch.ones(len(rows), dtype=F64, device=dev)
            for _ in range(self.band_steps):
                if not len(rows):
                    break
                mid = torch.sqrt(s_lo * s_hi)
                img, p = score(rows, mid)
                hit = accept(rows, mid, img, p)
                above = p > high
                s_lo = torch.where(above, mid, s_lo)
                s_hi = torch.where(above, s_hi, mid)
                rows, s_lo, s_hi = rows[~hit], s_lo[~hit], s_hi[~hit]
        keep = done.clone()
        if self.tau is not None:
            below = keep & (pas < self.tau)
            stats["dropped"]["below_tau"] = int(below.sum())
            keep &= ~below
        stats["dropped"]["outside_band"] = int((~done).sum())
        return images, chosen, pas, keep

    def __repr__(self) -> str:
        what = f"pass_band={self.pass_band}" if self.pass_band else f"scales={self.scales}"
        return (f"HardPositives(methods={','.join(m.name for m in self.methods)}, {what}, tau={self.tau}, "
                f"layer={self.pm.layer or None!r}, device={self.pm.device})")
