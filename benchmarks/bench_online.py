"""Online hard positives against offline hard positives, plain fine-tuning and ART's adversarial trainers (issue 22, 3).

On a torch LeNet/MNIST (Caffe's architecture, examples/torch_lenet.py), for each seed s a base net is trained
(Caffe's LeNet solver, `base_iterations`), then fine-tuned from it by every method for the SAME budget of
compute time, all single-threaded in this one process, the same optimizer everywhere (SGD lr 0.01, momentum 0.9,
weight decay 5e-4, batches of 64 MNIST training digits):

  plain     the 64 digits;
  offline   HC-D-1..9 x1.05 hard positives generated ONCE from the base net on `offline_sources` training digits
            (with `hcgen.torch.HardPositives`, the same engine and settings as online; the generation is charged
            to the budget), then batches of 64 drawn from MNIST + them (the Table 1 row HC-D-9-1.05, small);
  online    `hcgen.torch.HardPositives(model, "hc-d:1-9", scales=(1.05,))` on the CURRENT weights at every step,
            for the first `online_sources` digits of the batch: the step trains on the 64 digits + their hard
            positives (`--methods online@k=N,tau=T`: a variant row with N digits, PASS >= T);
  art-fgsm  ART 1.20 `AdversarialTrainer(classifier, FastGradientMethod(eps), ratio=0.5)`, one batch per call;
  art-pgd   ART 1.20 `AdversarialTrainerMadryPGD(eps, eps_step=eps/4, max_iter=7)` (ART's defaults), likewise;
  art-pgd@eps_fgs  the same at eps_FGS, the median L-inf of the FGS minimal adversarials alone (a smaller eps:
            the issue's eps, dominated by the HC-D directions' large L-inf, is far beyond MNIST's usual 0.3).

eps (grey levels, pixels in [0, 255]) is the median L-inf of the minimal adversarials (scale 1) of FGS, FGV,
HC-D-1..9 and HC-S-1 that `hcgen.generate.run.generate` finds on the base nets from `eps_digits` MNIST test
digits each. Every fine-tuned net is evaluated on the 10,000 MNIST test digits, on a held-out adversarial set --
`heldout_per_type` images of each of Table 1's 14 types (FGS, FGV, HC-D-1..9, HC-D-1 x1.05, HC-D-1 x1.10,
HC-S-1), drawn evenly from `generate` runs on 3 more LeNets trained independently (seeds 100-102) that no method
trains on, from MNIST test digits -- and by PGD robust accuracy at eps (ART `ProjectedGradientDescent`, L-inf,
`pgd_iter` steps of 2.5 eps / pgd_iter, one random start, on the first `pgd_digits` test digits). Held-out error
and the error on 2,000 test digits are also taken at `checkpoints` points of the budget (the clock is paused
while evaluating): the curves that say when online reaches offline's final held-out error.

The budget clock is this process's CPU time (all threads; one torch thread) by default, `--clock wall` for wall
time: the machine is shared, and wall time measures the other jobs' load as much as ours; CPU time of one thread
is the wall time the same work takes on an idle core. Both are reported. Before every (method, seed) row the
machine's plain LeNet training rate (it/s, batches of 64) is measured for `calib_seconds`.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/bench_online.py --profile small   # a few minutes
    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/bench_online.py --profile full --out docs/online

The work folder (--work, default results/bench-online-PROFILE) keeps the nets, the held-out set and one JSON per
finished row; a rerun skips finished rows (--redo reruns them) and rewrites the table from every row present.
Needs ART (`pip install 'adversarial-robustness-toolbox==1.20.*'`, the `bench` extra; never a runtime dependency).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HCGEN_THREADS", "1")  # PASS / ECC in `generate`: one thread
os.environ.setdefault("TQDM_DISABLE", "1")  # ART's per-call progress bars

import argparse  # noqa: E402
import copy  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Optional, Sequence  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "torch_lenet.py"
SCALE = 0.00390625  # LeNet's input: pixels / 256
LR, MOMENTUM, DECAY, BATCH = 0.01, 0.9, 5e-4, 64
METHODS = ("plain", "offline", "online", "art-fgsm", "art-pgd", "art-pgd@eps_fgs")
HELDOUT_NET_SEEDS = (100, 101, 102)


@dataclass(frozen=True)
class Profile:
    seeds: tuple[int, ...]
    budget: float  # seconds of the budget clock per (method, seed)
    base_iterations: int
    heldout_per_type: int
    eps_digits: int
    offline_sources: int
    online_sources: int
    checkpoints: int
    pgd_digits: int
    pgd_iter: int
    calib_seconds: float
    curve_mnist: int = 2000


PROFILES = {
    "small": Profile(seeds=(0, 1), budget=12.0, base_iterations=400, heldout_per_type=15, eps_digits=20,
                     offline_sources=60, online_sources=8, checkpoints=4, pgd_digits=200, pgd_iter=10,
                     calib_seconds=1.0, curve_mnist=1000),
    "full": Profile(seeds=(0, 1, 2), budget=45.0, base_iterations=1000, heldout_per_type=150, eps_digits=50,
                    offline_sources=800, online_sources=4, checkpoints=9, pgd_digits=500, pgd_iter=20,
                    calib_seconds=3.0),
}


# --- clocks and the equal-budget loop ----------------------------------------------------------------

class Clock:
    """CPU time of this process and wall time, both excluding paused intervals; `now()` reads the budget one."""

    def __init__(self, kind: str = "cpu", cpu: Callable[[], float] = time.process_time,
                 wall: Callable[[], float] = time.perf_counter):
        if kind not in ("cpu", "wall"):
            raise ValueError(f"clock must be cpu or wall, got {kind!r}")
        self.kind, self._cpu, self._wall = kind, cpu, wall
        self.cpu_total = self.wall_total = 0.0
        self.running = True
        self._c0, self._w0 = cpu(), wall()

    def elapsed(self) -> tuple[float, float]:
        if not self.running:
            return self.cpu_total, self.wall_total
        return self.cpu_total + self._cpu() - self._c0, self.wall_total + self._wall() - self._w0

    def now(self) -> float:
        return self.elapsed()[0 if self.kind == "cpu" else 1]

    def pause(self) -> None:
        self.cpu_total, self.wall_total = self.elapsed()
        self.running = False

    def resume(self) -> None:
        self._c0, self._w0 = self._cpu(), self._wall()
        self.running = True


def run_budget(step: Callable[[], None], budget: float, clock: Clock, checkpoints: int,
               checkpoint: Callable[[int], None]) -> int:
    """Call `step` until `clock.now()` reaches `budget` (the step in flight finishes: the overrun is at most one
    step); call `checkpoint(steps)` with the clock paused each time it passes k * budget / checkpoints (once
    when one step passes several marks; the last mark is the budget itself). Returns the steps taken."""
    marks = [budget * (i + 1) / checkpoints for i in range(checkpoints)]
    steps = 0
    while True:
        t = clock.now()
        if marks and t >= marks[0]:
            while marks and t >= marks[0]:
                marks.pop(0)
            clock.pause()
            checkpoint(steps)
            clock.resume()
        if t >= budget:
            return steps
        step()
        steps += 1


class Batches:
    """Seeded shuffled epochs over n items, `size` indices at a time."""

    def __init__(self, n: int, size: int, seed: int):
        self.n, self.size = n, size
        self.gen = torch.Generator().manual_seed(seed)
        self.order, self.pos = torch.randperm(n, generator=self.gen), 0

    def next(self) -> torch.Tensor:
        if self.pos + self.size > self.n:
            self.order, self.pos = torch.randperm(self.n, generator=self.gen), 0
        idx = self.order[self.pos:self.pos + self.size]
        self.pos += self.size
        return idx


# --- the held-out set --------------------------------------------------------------------------------

def heldout_picks(rows_per_net: Sequence[Sequence[dict]], per_type: int, seed: int = 2016) -> list[tuple[int, int]]:
    """(net, record index) of `per_type` records of each of Table 1's 14 held-out types, drawn as evenly as
    integers allow from every net's generation (its metadata rows), as `hcgen table1` draws its held-out set."""
    from hcgen.experiments.table1.protocol import HELDOUT_TYPES, heldout_shares

    rng = np.random.default_rng(seed)
    shares = heldout_shares(per_type, len(rows_per_net))
    picks: list[tuple[int, int]] = []
    for net, rows in enumerate(rows_per_net):
        for method, scale in HELDOUT_TYPES:
            idx = [i for i, r in enumerate(rows) if r["method"] == method and float(r["scale"]) == scale]
            if len(idx) < shares[net]:
                raise RuntimeError(f"held-out net {net}: only {len(idx)} {method} x{scale:g} records for a share of "
                                   f"{shares[net]}; generate from more test digits")
            picks += [(net, int(i)) for i in rng.choice(idx, size=shares[net], replace=False)]
    return picks


# --- nets, data, evaluation ----------------------------------------------------------------------------

def example():
    spec = importlib.util.spec_from_file_location("torch_lenet_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_net(path: Path) -> torch.nn.Module:
    model = example().lenet()
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


@torch.no_grad()
def predict(model: torch.nn.Module, pixels: torch.Tensor, chunk: int = 2000) -> torch.Tensor:
    was = model.training
    model.eval()
    out = torch.cat([model(pixels[i:i + chunk].float() * SCALE).argmax(1) for i in range(0, len(pixels), chunk)])
    model.train(was)
    return out


def error(model, pixels, labels) -> float:
    return float((predict(model, pixels) != labels).float().mean())


class PixelLeNet(torch.nn.Module):
    """The LeNet on pixels in [0, 255] (ART's classifiers see pixels; eps is in grey levels)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x * SCALE)


def art_classifier(model: torch.nn.Module, optimizer=None):
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(model=PixelLeNet(model), loss=torch.nn.CrossEntropyLoss(), optimizer=optimizer,
                             input_shape=(1, 28, 28), nb_classes=10, clip_values=(0.0, 255.0))


def pgd_accuracy(model, pixels: torch.Tensor, labels: torch.Tensor, eps: float, iters: int, seed: int) -> float:
    from art.attacks.evasion import ProjectedGradientDescent

    np.random.seed(seed)
    attack = ProjectedGradientDescent(art_classifier(model), norm=np.inf, eps=eps, eps_step=2.5 * eps / iters,
                                      max_iter=iters, num_random_init=1, batch_size=250, verbose=False)
    model.eval()
    adv = attack.generate(pixels.float().numpy(), y=labels.numpy())
    with torch.no_grad():
        pred = PixelLeNet(model)(torch.from_numpy(adv)).argmax(1)
    return float((pred == labels).float().mean())


class Context:
    """The data every row shares: MNIST as uint8 tensors, the held-out set, eps."""

    def __init__(self, train_x, train_y, test_x, test_y, held_x, held_y, held_type, eps, eps_fgs):
        self.train_x, self.train_y, self.test_x, self.test_y = train_x, train_y, test_x, test_y
        self.held_x, self.held_y, self.held_type, self.eps = held_x, held_y, held_type, eps
        self.eps_fgs = eps_fgs


def evaluate(model, ctx: Context, profile: Profile, seed: int, full: bool) -> dict:
    pred = predict(model, ctx.held_x)
    wrong = (pred != ctx.held_y).numpy()
    out = {"heldout_error": float(wrong.mean())}
    if full:
        out["mnist_test_error"] = error(model, ctx.test_x, ctx.test_y)
        out["heldout_error_by_type"] = {t: float(wrong[ctx.held_type == t].mean()) for t in dict.fromkeys(ctx.held_type)}
        n = profile.pgd_digits
        out["pgd_accuracy"] = pgd_accuracy(model, ctx.test_x[:n], ctx.test_y[:n], ctx.eps, profile.pgd_iter, seed)
        out["pgd_accuracy_eps_fgs"] = pgd_accuracy(model, ctx.test_x[:n], ctx.test_y[:n], ctx.eps_fgs,
                                                   profile.pgd_iter, seed)
    else:
        n = profile.curve_mnist
        out["mnist_error_curve_digits"] = error(model, ctx.test_x[:n], ctx.test_y[:n])
    return out


# --- methods: each a per-step function on a model being fine-tuned -----------------------------------

def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=DECAY)


def train_step(model, opt, x_pixels: torch.Tensor, y: torch.Tensor) -> None:
    model.train()
    loss = F.cross_entropy(model(x_pixels.float() * SCALE), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def online_variant(method: str) -> dict:
    """'online@k=1,tau=0.8' -> {'k': '1', 'tau': '0.8'} (a variant row of online); 'online' -> {}."""
    if method == "online":
        return {}
    spec = method.split("@", 1)[1] if method.startswith("online@") else ""
    pairs = [p.split("=", 1) for p in spec.split(",") if p]
    if not pairs or any(len(p) != 2 or p[0] not in ("k", "tau") for p in pairs):
        raise ValueError(f"bad online variant {method!r}; write online@k=N or online@k=N,tau=T")
    variant = dict(pairs)
    int(variant.get("k", 1)), float(variant.get("tau", 0))  # numbers, or ValueError
    return variant


def make_stepper(method: str, model, ctx: Context, profile: Profile, seed: int, info: dict) -> Callable[[], None]:
    """The row's step function; work it must do once (the offline generation) happens on the first call,
    inside the budget."""
    batches = Batches(len(ctx.train_x), BATCH, seed)
    if method == "plain":
        opt = sgd(model)

        def step():
            idx = batches.next()
            train_step(model, opt, ctx.train_x[idx], ctx.train_y[idx])
        return step

    if method == "online" or method.startswith("online@"):
        from hcgen.torch import HardPositives

        opt = sgd(model)
        variant = online_variant(method)
        k, tau = int(variant.get("k", profile.online_sources)), variant.get("tau")
        hp = HardPositives(model, methods="hc-d:1-9", scales=(1.05,), tau=None if tau is None else float(tau),
                           preprocess="lenet")
        info.update(hard_positives=0, hp_seconds=0.0, online_sources=k, tau=tau)

        def step():
            idx = batches.next()
            x, y = ctx.train_x[idx], ctx.train_y[idx]
            x_hp, y_hp = hp(x[:k], y[:k])
            info["hard_positives"] += len(x_hp)
            info["hp_seconds"] += hp.last_stats["seconds"].get("total", 0.0)
            train_step(model, opt, torch.cat([x, x_hp]), torch.cat([y, y_hp]))
        return step

    if method == "offline":
        opt = sgd(model)
        state: dict = {}

        def prepare():
            from hcgen.torch import HardPositives

            t_cpu, t_wall = time.process_time(), time.perf_counter()
            gen = torch.Generator().manual_seed(10_000 + seed)
            sources = torch.randperm(len(ctx.train_x), generator=gen)[:profile.offline_sources]
            hp = HardPositives(model, methods="hc-d:1-9", scales=(1.05,), tau=None, preprocess="lenet")
            xs, ys = [], []
            for i in range(0, len(sources), BATCH):
                idx = sources[i:i + BATCH]
                x_hp, y_hp = hp(ctx.train_x[idx], ctx.train_y[idx])
                xs.append(x_hp)
                ys.append(y_hp)
            pool_x = torch.cat([ctx.train_x] + xs)
            pool_y = torch.cat([ctx.train_y] + ys)
            state.update(x=pool_x, y=pool_y, batches=Batches(len(pool_x), BATCH, seed))
            info.update(offline_sources=len(sources), hard_positives=len(pool_x) - len(ctx.train_x),
                        generation_cpu_seconds=time.process_time() - t_cpu,
                        generation_wall_seconds=time.perf_counter() - t_wall)

        def step():
            if not state:
                prepare()
                return
            idx = state["batches"].next()
            train_step(model, opt, state["x"][idx], state["y"][idx])
        return step

    if method.startswith("art-"):
        from art.attacks.evasion import FastGradientMethod
        from art.defences.trainer import AdversarialTrainer, AdversarialTrainerMadryPGD

        np.random.seed(seed)
        classifier = art_classifier(model, sgd(model))
        if method == "art-fgsm":
            trainer = AdversarialTrainer(classifier, FastGradientMethod(classifier, norm=np.inf, eps=ctx.eps),
                                         ratio=0.5)
            info.update(art="AdversarialTrainer(FastGradientMethod(eps), ratio=0.5)", eps=ctx.eps)
        else:
            eps = ctx.eps if method == "art-pgd" else ctx.eps_fgs
            trainer = AdversarialTrainerMadryPGD(classifier, nb_epochs=1, batch_size=BATCH, eps=eps,
                                                 eps_step=eps / 4, max_iter=7, num_random_init=1)
            info.update(art="AdversarialTrainerMadryPGD(eps, eps_step=eps/4, max_iter=7)", eps=eps)

        def step():
            idx = batches.next()
            trainer.fit(ctx.train_x[idx].float().numpy(), ctx.train_y[idx].numpy(), batch_size=BATCH, nb_epochs=1)
        return step

    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def calibrate(base: torch.nn.Module, ctx: Context, seconds: float, kind: str) -> float:
    """Plain LeNet training iterations per second (batches of 64) on a copy of `base`, on the budget clock."""
    model = copy.deepcopy(base)
    step = make_stepper("plain", model, ctx, PROFILES["small"], 0, {})
    clock = Clock(kind)
    n = 0
    while clock.now() < seconds or n < 3:
        step()
        n += 1
    return n / clock.now()


def run_row(method: str, seed: int, base_file: Path, ctx: Context, profile: Profile, clock_kind: str,
            log: Callable[[str], None]) -> dict:
    torch.manual_seed(seed)
    np.random.seed(seed)
    base = load_net(base_file)
    its = calibrate(base, ctx, profile.calib_seconds, clock_kind)
    model = copy.deepcopy(base)
    info: dict = {}
    load0 = os.getloadavg()
    step = make_stepper(method, model, ctx, profile, seed, info)
    clock = Clock(clock_kind)
    curve: list[dict] = []

    def checkpoint(steps: int) -> None:
        cpu, wall = clock.elapsed()
        point = {"cpu_seconds": cpu, "wall_seconds": wall, "steps": steps,
                 **evaluate(model, ctx, profile, seed, full=False)}
        curve.append(point)
        log(f"  {method} seed {seed}: {cpu:6.1f} s cpu {wall:6.1f} s wall {steps:5d} steps  held-out "
            f"{point['heldout_error']:.2%}  MNIST[:{profile.curve_mnist}] {point['mnist_error_curve_digits']:.2%}")

    steps = run_budget(step, profile.budget, clock, profile.checkpoints, checkpoint)
    if method == "offline":
        steps -= 1  # its first call was the generation, not a training step
    cpu, wall = clock.elapsed()
    final = evaluate(model, ctx, profile, seed, full=True)
    return {"method": method, "seed": seed, "budget": profile.budget, "clock": clock_kind, "steps": steps,
            "cpu_seconds": cpu, "wall_seconds": wall, "calibration_its": its, "loadavg_start": load0,
            "loadavg_end": os.getloadavg(), **final, "curve": curve, "info": info}


# --- setup: base nets, held-out set, eps ----------------------------------------------------------------

def train_net(path: Path, seed: int, iterations: int, train_x, train_y) -> None:
    if path.is_file():
        return
    torch.manual_seed(seed)
    model = example().train(example().lenet(), train_x.numpy(), train_y.numpy(), iterations, seed=seed)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)


def generation(net_file: Path, out: Path, methods: str, scales: str, limit: int, seed: int) -> list[dict]:
    """`hcgen generate --framework torch` on MNIST test digits (resumed if `out` exists): its metadata rows."""
    from hcgen.data.lmdb_io import METADATA_FILE, MetadataTable
    from hcgen.generate.run import GenerateSettings, generate
    from hcgen.backends.torch import TorchNet

    settings = GenerateSettings(model=f"{EXAMPLE}:lenet", weights=str(net_file), source=None, split="test",
                                methods=methods, scales=scales, min_pass=-1.0, limit=limit, seed=seed,
                                batch_size=64, framework="torch")
    generate(TorchNet(load_net(net_file)), settings, out)
    return list(MetadataTable(out / METADATA_FILE).rows())


def setup(work: Path, profile: Profile, log) -> Context:
    from hcgen.data.lmdb_io import read_lmdb
    from hcgen.data.mnist import load_mnist
    from hcgen.experiments.table1.protocol import HELDOUT_METHODS, heldout_shares

    tx, ty = load_mnist(None, "train")
    vx, vy = load_mnist(None, "test")
    train_x, train_y = torch.from_numpy(tx[:, None].copy()), torch.from_numpy(ty.astype(np.int64))
    test_x, test_y = torch.from_numpy(vx[:, None].copy()), torch.from_numpy(vy.astype(np.int64))
    nets = work / "nets"
    nets.mkdir(parents=True, exist_ok=True)
    for s in list(profile.seeds) + list(HELDOUT_NET_SEEDS):
        name = f"base-{s}.pt" if s in profile.seeds else f"heldout-{s}.pt"
        if not (nets / name).is_file():
            log(f"training {name} ({profile.base_iterations} iterations)")
        train_net(nets / name, s, profile.base_iterations, train_x, train_y)

    held_file = work / "heldout.npz"
    if not held_file.is_file():
        share = max(heldout_shares(profile.heldout_per_type, len(HELDOUT_NET_SEEDS)))
        digits = share + share // 2 + 10
        rows, folders = [], []
        for s in HELDOUT_NET_SEEDS:
            folder = work / f"gen-heldout-{s}"
            log(f"held-out generation on heldout-{s}.pt: {HELDOUT_METHODS} x1, x1.05, x1.10 from {digits} test digits")
            rows.append(generation(nets / f"heldout-{s}.pt", folder, HELDOUT_METHODS, "1.05,1.10", digits, s))
            folders.append(folder)
        picks = heldout_picks(rows, profile.heldout_per_type)
        data = [read_lmdb(f) for f in folders]
        images = np.stack([data[n][1][i] for n, i in picks])
        labels = np.array([data[n][2][i] for n, i in picks], np.int64)
        types = np.array([f"{rows[n][i]['method']} x{float(rows[n][i]['scale']):g}" for n, i in picks])
        np.savez(held_file, images=images, labels=labels, types=types, nets=np.array([n for n, _ in picks]))
    with np.load(held_file) as d:
        held_x, held_y, held_type = torch.from_numpy(d["images"]), torch.from_numpy(d["labels"]), d["types"]

    eps_file = work / "eps.json"
    if not eps_file.is_file() or "eps_fgs" not in json.loads(eps_file.read_text()):
        linf, by_method = [], {}
        for s in profile.seeds:
            log(f"eps: minimal adversarials of {HELDOUT_METHODS} on base-{s}.pt from {profile.eps_digits} test digits")
            rows = generation(nets / f"base-{s}.pt", work / f"gen-eps-{s}", HELDOUT_METHODS, "", profile.eps_digits,
                              1000 + s)
            for r in rows:
                if float(r["scale"]) == 1.0:
                    linf.append(float(r["linf"]))
                    by_method.setdefault(r["method"], []).append(float(r["linf"]))
        eps_file.write_text(json.dumps({
            "eps": float(np.median(linf)), "records": len(linf),
            "quartiles": [float(q) for q in np.percentile(linf, [25, 50, 75])],
            "eps_fgs": float(np.median(by_method["FGS"])),
            "median_by_method": {m: float(np.median(v)) for m, v in by_method.items()}}) + "\n")
    eps_info = json.loads(eps_file.read_text())
    return Context(train_x, train_y, test_x, test_y, held_x, held_y, held_type, eps_info["eps"], eps_info["eps_fgs"])


# --- the table ------------------------------------------------------------------------------------------

def _ms(values: Sequence[float], pct: bool = True, digits: int = 2) -> str:
    v = np.array([x for x in values if x is not None and not math.isnan(x)], float)
    if not len(v):
        return "-"
    f = 100.0 if pct else 1.0
    sd = f"{f * v.std(ddof=1):.{digits}f}" if len(v) > 1 else "-"
    return f"{f * v.mean():.{digits}f} ± {sd}"


def summarize(rows: list[dict], base_rows: list[dict], settings: dict) -> tuple[dict, str]:
    extra = sorted({r["method"] for r in rows} - set(METHODS))  # variants such as online@k=1
    by = {m: sorted([r for r in rows if r["method"] == m], key=lambda r: r["seed"]) for m in list(METHODS) + extra}
    summary: dict = {"methods": {}}
    for m, rs in [("base", base_rows)] + list(by.items()):
        if not rs:
            continue
        summary["methods"][m] = {k: [r.get(k) for r in rs] for k in (
            "seed", "mnist_test_error", "heldout_error", "pgd_accuracy", "pgd_accuracy_eps_fgs", "cpu_seconds",
            "wall_seconds", "steps", "calibration_its")}
    checks = goal_checks(by)
    summary["goal_checks"] = checks
    eps = settings["eps"]
    lines = [f"# Online hard positives vs offline, plain and ART adversarial training (profile {settings['profile']})",
             "",
             f"Torch LeNet/MNIST, seeds {settings['seeds']}, budget {settings['budget']:g} s of {settings['clock']} "
             f"time per (method, seed), one torch thread. eps = {eps:g} grey levels (median L-inf of "
             f"{settings['eps_records']} minimal adversarials of the 12 held-out methods on the base nets; "
             f"{eps / 255:.3f} of the pixel range), eps_FGS = {settings['eps_fgs']:g} (median over the FGS ones "
             f"only). Held-out set: {settings['heldout_images']} images, {settings['heldout_per_type']} of each of "
             f"14 types from 3 independent nets. PGD: {settings['pgd_iter']} steps, {settings['pgd_digits']} test digits.",
             "",
             "| method | MNIST test error % | held-out adversarial error % | PGD robust acc. % @ eps | "
             "PGD robust acc. % @ eps_FGS | steps | CPU s | wall s | LeNet it/s before the row |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m, rs in [("base", base_rows)] + list(by.items()):
        if not rs:
            continue
        col = lambda k: [r.get(k) for r in rs]  # noqa: E731
        lines.append(f"| {m} | {_ms(col('mnist_test_error'))} | {_ms(col('heldout_error'))} | "
                     f"{_ms(col('pgd_accuracy'))} | {_ms(col('pgd_accuracy_eps_fgs'))} | {_ms(col('steps'), False, 0)} | "
                     f"{_ms(col('cpu_seconds'), False, 1)} "
                     f"| {_ms(col('wall_seconds'), False, 1)} | {_ms(col('calibration_its'), False, 1)} |")
    lines += ["", "Mean ± std over seeds (n = number of seeds; base = the nets every method starts from).", ""]
    lines += curve_table(by, settings)
    types = list(base_rows[0]["heldout_error_by_type"]) if base_rows else []
    if types:
        lines += ["", "Held-out error by type, % (mean over seeds):", "",
                  "| method | " + " | ".join(types) + " |", "|---|" + "---|" * len(types)]
        for m, rs in [("base", base_rows)] + list(by.items()):
            if rs:
                lines.append(f"| {m} | " + " | ".join(
                    f"{100 * np.mean([r['heldout_error_by_type'][t] for r in rs]):.1f}" for t in types) + " |")
    lines += ["", "## Goal checks", ""] + [f"- {c}" for c in checks["text"]]
    return summary, "\n".join(lines) + "\n"


def at_marks(curve: list[dict], clock: str, budget: float, n: int) -> list[Optional[float]]:
    """Held-out error at each mark k * budget / n: the first checkpoint at or after it (a step that passed
    several marks at once -- offline's generation -- left the net as it was at each of them)."""
    out = []
    for k in range(1, n + 1):
        point = next((p for p in curve if p[f"{clock}_seconds"] >= k * budget / n - 1e-9), None)
        out.append(None if point is None else point["heldout_error"])
    return out


def curve_table(by: dict, settings: dict) -> list[str]:
    n, budget, clock = settings["checkpoints"], settings["budget"], settings["clock"]
    lines = [f"Held-out error % along the budget (mean over seeds), at k/{n} of the {budget:g} s:", "",
             "| method | " + " | ".join(f"{budget * k / n:.0f} s" for k in range(1, n + 1)) + " |",
             "|---|" + "---|" * n]
    for m, rs in by.items():
        if not rs:
            continue
        cols = list(zip(*[at_marks(r["curve"], clock, budget, n) for r in rs]))
        lines.append(f"| {m} | " + " | ".join(
            "-" if any(v is None for v in c) else f"{100 * np.mean(c):.2f}" for c in cols) + " |")
    return lines


def goal_checks(by: dict) -> dict:
    text, out = [], {}
    on, off = by.get("online", []), by.get("offline", [])
    if on and off:
        per_seed = []
        for o in off:
            match = [r for r in on if r["seed"] == o["seed"]]
            if not match:
                continue
            r = match[0]
            clock = o["clock"]
            target = o["heldout_error"]
            reach = next((p for p in r["curve"] if p["heldout_error"] <= target), None)
            t_off = o[f"{clock}_seconds"]
            t_on = reach[f"{clock}_seconds"] if reach else None
            per_seed.append({"seed": o["seed"], "offline_heldout_error": target, "offline_seconds": t_off,
                             "online_reached_at_seconds": t_on,
                             "within_half": t_on is not None and t_on <= t_off / 2})
        out["online_reaches_offline_in_half_time"] = per_seed
        n_ok = sum(p["within_half"] for p in per_seed)
        detail = "; ".join(f"seed {p['seed']}: offline {p['offline_heldout_error']:.2%} at {p['offline_seconds']:.0f} s, "
                           + (f"online reached it at {p['online_reached_at_seconds']:.0f} s" if p[
                               "online_reached_at_seconds"] is not None else "online never reached it")
                           for p in per_seed)
        text.append(f"Online reaches the offline row's held-out error in <= half the offline row's time: "
                    f"**{'yes' if per_seed and n_ok == len(per_seed) else 'no'}** ({n_ok} of {len(per_seed)} seeds; "
                    f"{detail}; checkpoint resolution = the curve's spacing).")
    arts = [m for m in ("art-fgsm", "art-pgd", "art-pgd@eps_fgs") if by.get(m)]
    if on and arts:
        mean = lambda rs, k: float(np.mean([r[k] for r in rs]))  # noqa: E731
        held_on, mnist_on = mean(on, "heldout_error"), mean(on, "mnist_test_error")
        parts, ok = [], True
        for m in arts:
            h, e = mean(by[m], "heldout_error"), mean(by[m], "mnist_test_error")
            ok &= held_on < h and mnist_on <= e
            parts.append(f"{m}: held-out {h:.2%}, MNIST {e:.2%}")
        out["online_beats_art"] = {"online_heldout": held_on, "online_mnist": mnist_on, "holds": ok}
        text.append(f"Online beats the ART trainers ({', '.join(arts)}) on the held-out set without a worse MNIST "
                    f"error (means): **{'yes' if ok and len(arts) >= 2 else 'no'}** (online: held-out {held_on:.2%}, MNIST "
                    f"{mnist_on:.2%}; {'; '.join(parts)}).")
    out["text"] = text
    return out


# --- main ---------------------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", choices=sorted(PROFILES), default="small")
    p.add_argument("--work", default=None, help="work folder (default results/bench-online-PROFILE)")
    p.add_argument("--out", default=None, help="folder for bench_online.md / .json (default: the work folder)")
    p.add_argument("--methods", default=" ".join(METHODS), help=f"space-separated subset of {' '.join(METHODS)}; "
                   "online@k=N,tau=T: online with N digits of each batch searched, PASS >= T (a variant row)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the profile's)")
    p.add_argument("--budget", type=float, default=None, help="seconds per (method, seed) (default: the profile's)")
    p.add_argument("--online-sources", type=int, default=None, help="digits per batch searched by online")
    p.add_argument("--offline-sources", type=int, default=None, help="digits the offline row generates from")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="the budget's clock (default cpu)")
    p.add_argument("--redo", action="store_true", help="rerun rows already finished in the work folder")
    p.add_argument("--table-only", action="store_true", help="run no row: rewrite the table from the rows present")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    profile = PROFILES[args.profile]
    changes = {k: v for k, v in (("budget", args.budget), ("online_sources", args.online_sources),
                                 ("offline_sources", args.offline_sources)) if v is not None}
    if args.seeds:
        changes["seeds"] = tuple(int(s) for s in args.seeds.split(","))
    profile = replace(profile, **changes)
    methods = [m for t in args.methods.split() for m in ([t] if "@" in t else t.split(",")) if m]
    unknown = [m for m in methods if m not in METHODS and not m.startswith("online@")]
    for m in methods:
        if m.startswith("online@"):
            online_variant(m)
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {','.join(METHODS)}")
    work = Path(args.work or REPO / "results" / f"bench-online-{args.profile}")
    out = Path(args.out) if args.out else work
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(work / "log.txt", "a")

    def log(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    log(f"bench_online {' '.join(sys.argv[1:] if argv is None else argv)}: {asdict(profile)}, clock {args.clock}")
    t0 = time.perf_counter()
    ctx = setup(work, profile, log)
    log(f"setup done in {time.perf_counter() - t0:.0f} s: eps {ctx.eps:g}, held-out {len(ctx.held_x)} images")
    rows_dir = work / "rows"
    rows_dir.mkdir(exist_ok=True)
    key = f"b{profile.budget:g}-{args.clock}"
    base_rows = []
    for s in profile.seeds:
        model = load_net(work / "nets" / f"base-{s}.pt")
        f = rows_dir / f"base-s{s}.json"
        if not f.is_file():
            row = {"method": "base", "seed": s, "steps": 0, "cpu_seconds": 0.0, "wall_seconds": 0.0,
                   **evaluate(model, ctx, profile, s, full=True)}
            f.write_text(json.dumps(row) + "\n")
        base_rows.append(json.loads(f.read_text()))
    for s in profile.seeds:  # methods interleaved per seed, so load changes hit every method alike
        for m in ([] if args.table_only else methods):
            f = rows_dir / f"{m}-s{s}-{key}.json"
            if f.is_file() and not args.redo:
                continue
            log(f"{m} seed {s}: budget {profile.budget:g} s ({args.clock})")
            row = run_row(m, s, work / "nets" / f"base-{s}.pt", ctx, profile, args.clock, log)
            f.write_text(json.dumps(row) + "\n")
            log(f"{m} seed {s}: MNIST {row['mnist_test_error']:.2%}, held-out {row['heldout_error']:.2%}, PGD acc "
                f"{row['pgd_accuracy']:.2%}, {row['steps']} steps, {row['cpu_seconds']:.0f} s cpu, "
                f"{row['wall_seconds']:.0f} s wall, calibration {row['calibration_its']:.1f} it/s")
    rows = [json.loads(f.read_text()) for f in sorted(rows_dir.glob(f"*-{key}.json"))]
    rows = [r for r in rows if r["seed"] in profile.seeds]
    eps_info = json.loads((work / "eps.json").read_text())
    import art

    settings = {"profile": args.profile, **asdict(profile), "clock": args.clock, "eps": ctx.eps,
                "eps_fgs": ctx.eps_fgs, "eps_median_by_method": eps_info["median_by_method"],
                "eps_records": eps_info["records"], "eps_quartiles": eps_info["quartiles"],
                "heldout_images": len(ctx.held_x), "command": "python benchmarks/bench_online.py " + " ".join(
                    sys.argv[1:] if argv is None else argv),
                "machine": {"cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg(), "python": platform.python_version(),
                            "torch": torch.__version__, "art": art.__version__, "torch_threads": torch.get_num_threads()}}
    summary, md = summarize(rows, base_rows, settings)
    (out / "bench_online.json").write_text(json.dumps({"settings": settings, "summary": summary, "rows": rows,
                                                       "base_rows": base_rows}, indent=1) + "\n")
    (out / "bench_online.md").write_text(md)
    print(md)
    log(f"wrote {out / 'bench_online.md'} and bench_online.json ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
