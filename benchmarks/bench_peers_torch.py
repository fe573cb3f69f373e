"""hcgen's exact integer minimal search on a torch LeNet against ART and Foolbox, FGS and FGV, in one run.

Same model (examples/torch_lenet.py, trained here with Caffe's LeNet solver settings unless --weights),
same MNIST test digits (the first --limit, of which the correctly classified ones are attacked), one
torch thread for every tool:

* hcgen: `TorchNet` + `hcgen.core.search.adversarial_search` along FGS / FGV (Eq. 6) directions: the minimal
  adversarial *integer* image on the ray.
* ART 1.20 ``FastGradientMethod(minimal=True)``, its only minimal mode: a linear scan in ``eps_step``.
  FGS: ``norm=inf, eps_step=1`` grey level, ``eps=255``. FGV is ART's ``norm=2``, whose steps are L2 lengths;
  ``eps_step`` is set per image (ART accepts arrays) to the L2 length of one grey level on the most-moved
  pixel, ||g||_2 / max|g| from ART's own ``loss_gradient`` (timed with the attack), ``eps`` 255 such steps.
  ART's default ``batch_size`` 32 (it re-predicts the whole batch at every step).
* Foolbox 3.3 ``LinfFastGradientAttack`` / ``L2FastGradientAttack`` with an epsilon grid, the only way to a
  minimum (Foolbox 3 has no minimal search for these attacks): 1..255 grey levels for L∞; for L2, 255
  multiples of the median ||g||_2 / max|g| over the digits (one grey level on the most-moved pixel of the
  median digit). The minimum is the first grid point that succeeds.

Columns: images/s (attacked digits per second of wall time, gradient included), forwards per image (images
through the model, gradient passes included), share found, median L∞ (grey levels, of the uint8 results),
"lost" (the share of a tool's adversarials that are no longer adversarial once rounded to uint8, np.rint),
and "not tight": the share of uint8 adversarials whose previous distinct integer image along the same
direction (one step less) is still adversarial. The direction of that check is the FGS / FGV direction of
the model's own loss gradient (`TorchNet.loss_gradient`); "on ray" is the share of uint8 adversarials that
are that ray's integer image at their step, and "not tight" is counted among those (a peer's own gradient
can differ in the sign of a few near-zero pixels).

    nice -n 19 .venv/bin/python benchmarks/bench_peers_torch.py [--limit 1000] [--peers art,foolbox]

Needs the bench extra: pip install -e '.[bench]'.
"""
from __future__ import annotations

import argparse
import importlib.util
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hcgen.core import directions, search
from hcgen.data.mnist import load_mnist
from hcgen.backends.torch import TorchNet

REPO = Path(__file__).resolve().parents[1]


class Counting(nn.Module):
    """Counts the images that pass through `inner`."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.images = inner, 0

    def forward(self, x):
        self.images += len(x)
        return self.inner(x)


class PixelLeNet(nn.Module):
    """The LeNet on pixels in [0, 255] (x / 256 inside), for the peers' bounds (0, 255)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x * 0.00390625)


def _example():
    spec = importlib.util.spec_from_file_location("torch_lenet_example", REPO / "examples" / "torch_lenet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def trained_lenet(weights: str | None, iterations: int) -> nn.Module:
    example = _example()
    model = example.lenet()
    if weights:
        model.load_state_dict(torch.load(weights, weights_only=True))
        return model.eval()
    images, labels = load_mnist(None, "train")
    torch.manual_seed(0)
    return example.train(model, images[:, None], labels, iterations, seed=0)


def previous_images(x: np.ndarray, eta: np.ndarray, eps: np.ndarray) -> np.ndarray:
    """The integer image just before the one at `eps` on each ray x + eps * eta (hcgen's rounding rule)."""
    a = np.abs(eta)
    head = np.where(eta > 0, 255 - x, x)
    lev = np.minimum(np.floor(eps[:, None, None, None] * a + 0.5), head)
    with np.errstate(divide="ignore", invalid="ignore"):
        start = np.where(lev >= 1, (lev - 0.5) / a, -np.inf).reshape(len(x), -1).max(axis=1)
    return search.perturb(x, eta, np.maximum(start * (1 - 1e-12), 0.0))


def ray_step(x: np.ndarray, eta: np.ndarray, x_float: np.ndarray) -> np.ndarray:
    """The L∞ step e with x_float = x + e * eta, read off the unclipped pixels where |eta| >= 1/2."""
    delta = np.abs(x_float.astype(np.float64) - x)
    use = (np.abs(eta) >= 0.5) & (x_float > 0) & (x_float < 255)
    ratio = np.where(use, delta / np.where(use, np.abs(eta), 1), np.nan).reshape(len(x), -1)
    with warnings.catch_warnings():  # rows without a usable pixel fall back below
        warnings.simplefilter("ignore", RuntimeWarning)
        e = np.nanmedian(ratio, axis=1)
    return np.nan_to_num(e, nan=np.abs(x_float.astype(np.float64) - x).reshape(len(x), -1).max(axis=1))


def evaluate(name: str, method: str, seconds: float, forwards: int, found: np.ndarray, x_float: np.ndarray,
             x: np.ndarray, y: np.ndarray, eta: np.ndarray, eps: np.ndarray, net: TorchNet) -> dict:
    """The table row of one tool: `found` (its own success flags), `x_float` its adversarials, `eps` the
    L∞ step of each along `eta`."""
    n = len(x)
    x_r = np.clip(np.rint(x_float), 0, 255).astype(np.uint8)
    adv_r = net.predict(x_r)[0] != y
    lost = found & ~adv_r
    keep = found & adv_r
    on_ray = np.zeros(n, bool)
    on_ray[keep] = (search.perturb(x[keep], eta[keep], eps[keep]) == x_r[keep]).all(axis=(1, 2, 3))
    still = np.zeros(n, bool)  # checked where the rounded result is the ray's own integer image
    if on_ray.any():
        still[on_ray] = net.predict(previous_images(x[on_ray], eta[on_ray], eps[on_ray]))[0] != y[on_ray]
    linf = np.abs(x_r.astype(int) - x).reshape(n, -1).max(axis=1)
    return {"tool": name, "method": method, "img/s": n / seconds, "fwd/img": forwards / n,
            "found": found.mean(), "median Linf": float(np.median(linf[keep])) if keep.any() else float("nan"),
            "lost": lost.sum() / max(found.sum(), 1), "not tight": still.sum() / max(on_ray.sum(), 1),
            "on ray": on_ray.sum() / max(keep.sum(), 1)}


def run_hcgen(counting: Counting, x, y, method: str):
    net = TorchNet(counting, input_shape=(1, 28, 28))
    counting.images = 0
    t = time.perf_counter()
    h = net.scores(x)
    g = net.loss_gradient(x, y)
    dirs = directions.fgs(g) if method == "FGS" else directions.fgv(g)
    res = search.adversarial_search(net.scores, x, dirs.eta, y, clean_scores=h)
    seconds = time.perf_counter() - t
    return seconds, counting.images, res.success, res.x_adv.astype(np.float64), np.nan_to_num(res.eps)


def run_art(counting: Counting, x, y, method: str):
    from art.attacks.evasion import FastGradientMethod
    from art.estimators.classification import PyTorchClassifier

    classifier = PyTorchClassifier(model=PixelLeNet(counting), loss=nn.CrossEntropyLoss(), input_shape=(1, 28, 28),
                                   nb_classes=10, clip_values=(0.0, 255.0), device_type="cpu")
    xf = x.astype(np.float32)
    onehot = np.eye(10, dtype=np.float32)[y]
    counting.images = 0
    t = time.perf_counter()
    if method == "FGS":
        attack = FastGradientMethod(classifier, norm=np.inf, eps=255.0, eps_step=1.0, minimal=True)
    else:
        g = classifier.loss_gradient(xf, onehot).astype(np.float64)
        flat = g.reshape(len(g), -1)
        step = (np.linalg.norm(flat, axis=1) / np.maximum(np.abs(flat).max(axis=1), 1e-30))[:, None, None, None]
        attack = FastGradientMethod(classifier, norm=2, eps=255.0 * step, eps_step=step, minimal=True)
    adv = attack.generate(xf, onehot)
    pred = classifier.predict(adv).argmax(1)
    seconds = time.perf_counter() - t
    return seconds, counting.images, pred != y, adv.astype(np.float64)


def run_foolbox(counting: Counting, x, y, method: str, l2_step: float):
    import foolbox as fb

    fmodel = fb.PyTorchModel(PixelLeNet(counting).eval(), bounds=(0, 255), device="cpu")
    images = torch.from_numpy(x.astype(np.float32))
    labels = torch.from_numpy(y)
    grid = [float(k) for k in range(1, 256)] if method == "FGS" else [k * l2_step for k in range(1, 256)]
    kind = fb.attacks.LinfFastGradientAttack if method == "FGS" else fb.attacks.L2FastGradientAttack
    attack = kind(random_start=False)
    counting.images = 0
    t = time.perf_counter()
    _, clipped, success = attack(fmodel, images, labels, epsilons=grid)
    success = success.numpy()  # (grid, N)
    found = success.any(axis=0)
    first = np.where(found, success.argmax(axis=0), len(grid) - 1)
    adv = np.stack([clipped[k][i].numpy() for i, k in enumerate(first)])
    seconds = time.perf_counter() - t
    return seconds, counting.images, found, adv.astype(np.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=1000, help="MNIST test digits (default 1000)")
    parser.add_argument("--weights", default=None, help="a state_dict of examples/torch_lenet.py (default: train one)")
    parser.add_argument("--iterations", type=int, default=2000, help="training iterations without --weights")
    parser.add_argument("--peers", default="art,foolbox", help="comma-separated peers to run (art, foolbox)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    peers = [p for p in args.peers.split(",") if p]

    model = trained_lenet(args.weights, args.iterations)
    counting = Counting(model).eval()
    plain = TorchNet(model)
    images, labels = load_mnist(None, "test")
    x_all, y_all = images[:args.limit, None], labels[:args.limit].astype(np.int64)
    ok = plain.predict(x_all)[0] == y_all
    x, y = x_all[ok], y_all[ok]
    print(f"{len(x)} of {args.limit} test digits correctly classified; torch {torch.__version__}, 1 thread")
    g = plain.loss_gradient(x, y)
    etas = {"FGS": directions.fgs(g).eta, "FGV": directions.fgv(g).eta}
    flat = g.reshape(len(g), -1)
    l2_step = float(np.median(np.linalg.norm(flat, axis=1) / np.abs(flat).max(axis=1)))

    for method in ("FGS", "FGV"):  # warm-up (torch's first calls allocate and pick kernels), untimed
        run_hcgen(counting, x[:64], y[:64], method)
    rows = []
    for method in ("FGS", "FGV"):
        eta = etas[method]
        seconds, forwards, found, adv, eps = run_hcgen(counting, x, y, method)
        rows.append(evaluate("hcgen", method, seconds, forwards, found, adv, x, y, eta, eps, plain))
        for peer in peers:
            if peer == "art":
                seconds, forwards, found, adv = run_art(counting, x, y, method)
                name = "ART 1.20 minimal"
            elif peer == "foolbox":
                seconds, forwards, found, adv = run_foolbox(counting, x, y, method, l2_step)
                name = "Foolbox 3.3 grid"
            else:
                raise SystemExit(f"unknown peer {peer!r}; use art, foolbox")
            rows.append(evaluate(name, method, seconds, forwards, found, adv, x, y, eta, ray_step(x, eta, adv), plain))
        print(f"  {method} done", flush=True)

    cols = ["tool", "method", "img/s", "fwd/img", "found", "median Linf", "lost", "not tight", "on ray"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = [r["tool"], r["method"], f"{r['img/s']:.1f}", f"{r['fwd/img']:.1f}", f"{r['found']:.1%}",
                 f"{r['median Linf']:.0f}", f"{r['lost']:.1%}", f"{r['not tight']:.1%}", f"{r['on ray']:.1%}"]
        print("| " + " | ".join(cells) + " |")
    for method in ("FGS", "FGV"):
        mine = next(r for r in rows if r["tool"] == "hcgen" and r["method"] == method)
        for r in rows:
            if r["method"] == method and r["tool"] != "hcgen":
                print(f"{method}: hcgen {mine['img/s'] / r['img/s']:.1f}x the images/s of {r['tool']}")


if __name__ == "__main__":
    main()
