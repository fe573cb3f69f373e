"""The Table 1 protocol of Rozsa et al. (Sec. 5.1-5.2) as a graph of resumable stages.

Protocol (profile "full"; "quick" scales every number down, see `PROFILES`):
  1. MNIST -> LMDBs; `base_nets` LeNets trained from scratch, `base_iterations` each, seeds 1, 2, 3.
  2. For each base net, generation from the MNIST *training* images (fgs, fgv, hc-d:1-9, hc-s:1-9,
     hard positives x1.05) -- the training data of the rows -- and from the MNIST *test* images
     (fgs, fgv, hc-d:1-9, hc-s:1, x1.05, x1.10) -- the source of the held-out adversarial test set.
  3. Held-out set: `heldout_per_type` records of each of the 14 types (FGS, FGV, HC-D-1..9, HC-D-1
     x1.05, HC-D-1 x1.10, HC-S-1), drawn evenly from all base nets. It is generated from the MNIST
     test images, which no net ever trains on, so it is disjoint from every training set.
  4. Rows: each base net is fine-tuned `orderings` times (seeded shuffles) for `finetune_iterations`
     on the original 60K training digits plus the row's generated images from that net only:
     FGS, FGV, HC-S-5 (HC-S-1..5), HC-D-5 (HC-D-1..5), HC-D-9 (HC-D-1..9), HC-D-9-1.05 (HC-D-1..9
     scaled x1.05), and InfiMNIST-style deformations (`infimnist_count` images, ours, not InfiMNIST's).
  5. Every net (and each base net, "Basic LeNet") is evaluated on the MNIST test set and the held-out set.
  6. Fig. 6: base net 1 fine-tuned on HC-D hard positives (all scales) binned by PASS.

Every stage writes into its own folder under the work directory, named by the stage and a hash of
its inputs, and is skipped when its result exists, so an interrupted run resumes where it stopped.
`stages(profile, ...)` returns the graph (name -> Stage with its dependencies); `run_sequential`
executes it; `hcgen.pipeline.scale` runs the same graph on Dask.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import os
import shutil
import socket
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

MODELS = Path(__file__).resolve().parents[2] / "models" / "lenet"
ROWS = {  # row -> (methods, scales) of the generated training records it fine-tunes on
    "FGS": (["FGS"], [1.0]),
    "FGV": (["FGV"], [1.0]),
    "HC-S-5": ([f"HC-S-{k}" for k in range(1, 6)], [1.0]),
    "HC-D-5": ([f"HC-D-{k}" for k in range(1, 6)], [1.0]),
    "HC-D-9": ([f"HC-D-{k}" for k in range(1, 10)], [1.0]),
    "HC-D-9-1.05": ([f"HC-D-{k}" for k in range(1, 10)], [1.05]),
}
INFIMNIST_ROW = "InfiMNIST-style"
HELDOUT_TYPES = [("FGS", 1.0), ("FGV", 1.0)] + [(f"HC-D-{k}", 1.0) for k in range(1, 10)] + [
    ("HC-D-1", 1.05), ("HC-D-1", 1.1), ("HC-S-1", 1.0)]
PAPER = {  # Table 1 of the paper: MNIST test error (mean ± std over 9 nets), adversarial error
    "HC-D-9-1.05": (".673% ± .035", "14.85%"), "HC-D-9": (".683% ± .057", "21.10%"),
    INFIMNIST_ROW: (".697% ± .021 (InfiMNIST 1M)", "48.35%"), "FGV": (".697% ± .031", "29.61%"),
    "HC-D-5": (".723% ± .047", "21.52%"), "HC-S-5": (".733% ± .032", "29.29%"),
    "FGS": (".790% ± .122", "31.06%"), "Basic LeNet": (".937% ± .110", "64.21%"),
}


@dataclass(frozen=True)
class Profile:
    name: str
    base_nets: int = 3
    orderings: int = 3
    base_iterations: int = 10_000
    finetune_iterations: int = 20_000
    infimnist_iterations: int = 30_000
    train_images: Optional[int] = None  # generation sources from the 60K training digits (None: all)
    test_images: Optional[int] = None  # generation sources for the held-out set (None: all 10K)
    heldout_per_type: int = 5_000
    infimnist_count: int = 1_000_000
    train_methods: str = "fgs,fgv,hc-d:1-9,hc-s:1-9"
    rows: tuple = tuple(ROWS) + (INFIMNIST_ROW,)
    pass_bins: tuple = ((0.0, 0.7), (0.7, 0.8), (0.8, 0.9), (0.9, 1.01))
    bin_iterations: int = 20_000
    # Each generation split into this many `--shard K/N` stages plus an exact merge: on a cluster the
    # shards run side by side (a full-profile training-set generation is ~1.5 h of one worker here).
    generation_shards: int = 1


PROFILES = {
    "full": Profile("full"),
    "quick": Profile("quick", base_nets=1, orderings=1, base_iterations=5_000, finetune_iterations=3_000,
                     infimnist_iterations=3_000, train_images=3_000, test_images=1_000,
                     heldout_per_type=300, infimnist_count=60_000, train_methods="fgs,fgv,hc-d:1-9,hc-s:1-5",
                     bin_iterations=3_000),
    # for tests: seconds, not minutes
    "tiny": Profile("tiny", base_nets=1, orderings=1, base_iterations=200, finetune_iterations=50,
                    infimnist_iterations=50, train_images=40, test_images=40, heldout_per_type=10,
                    infimnist_count=500, train_methods="fgs,fgv,hc-d:1-5,hc-s:1-5",
                    rows=("FGS", "HC-D-5"), pass_bins=((0.0, 0.8), (0.8, 1.01)), bin_iterations=50),
}


@dataclass
class Stage:
    """One unit of work: `fn(out_dir, *dependency_outputs)` fills `out_dir`; `params` key its folder."""

    name: str
    fn: Callable
    deps: Sequence[str] = ()
    params: dict = field(default_factory=dict)

    def key(self, dep_keys: Sequence[str]) -> str:
        blob = json.dumps([self.name, self.params, list(dep_keys)], sort_keys=True, default=str)
        return f"{self.name}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


DONE = ".stage.json"


def run_stage(stage: Stage, work: Path, folder: str, inputs: Sequence[Path]) -> Path:
    """Run `stage` into work/folder unless it finished before; returns the folder."""
    out = work / folder
    if (out / DONE).exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    started, t0 = time.time(), time.perf_counter()
    stage.fn(out, *inputs)
    tmp = out / (DONE + ".tmp")
    tmp.write_text(json.dumps({"stage": stage.name, "params": stage.params, "started": started,
                               "seconds": round(time.perf_counter() - t0, 3),
                               "host": socket.gethostname(), "pid": os.getpid()}, default=str))
    os.replace(tmp, out / DONE)
    return out


def stage_times(graph: dict[str, Stage], work: Path) -> dict[str, float]:
    """Stage -> seconds its function ran, read from the finished folders' markers (absent: not run here)."""
    times = {}
    for name, folder in folders(graph).items():
        marker = Path(work) / folder / DONE
        if marker.exists():
            seconds = json.loads(marker.read_text()).get("seconds")
            if seconds is not None:
                times[name] = float(seconds)
    return times


def folders(graph: dict[str, Stage]) -> dict[str, str]:
    """Stage -> folder name (its key), resolved in dependency order."""
    keys: dict[str, str] = {}

    def resolve(name: str) -> str:
        if name not in keys:
            stage = graph[name]
            keys[name] = stage.key([resolve(d) for d in stage.deps])
        return keys[name]

    for name in graph:
        resolve(name)
    return keys


def run_sequential(graph: dict[str, Stage], work: Path,
                   progress: Optional[Callable[[str, int, int], None]] = None) -> dict[str, Path]:
    keys = folders(graph)
    outputs: dict[str, Path] = {}
    order = topological(graph)
    for i, name in enumerate(order):
        if progress:
            progress(name, i, len(order))
        stage = graph[name]
        outputs[name] = run_stage(stage, work, keys[name], [outputs[d] for d in stage.deps])
    if progress:
        progress("done", len(order), len(order))
    return outputs


def topological(graph: dict[str, Stage]) -> list[str]:
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        for d in graph[name].deps:
            visit(d)
        order.append(name)

    for name in graph:
        visit(name)
    return order


# ------------------------------------------------------------------------------------------ stages

def _mnist(out: Path, source: Optional[str]) -> None:
    from hcgen.mnist import convert_mnist

    convert_mnist(out, source)


def _train_base(out: Path, mnist: Path, seed: int, iterations: int) -> None:
    from hcgen.pipeline.train import train

    train(MODELS / "lenet_solver.prototxt", out, seed=seed, iterations=iterations, test_every=iterations,
          train_lmdb=mnist / "mnist_train_lmdb", test_lmdb=mnist / "mnist_test_lmdb")


def caffemodel(folder: Path) -> Path:
    models = sorted(folder.glob("*.caffemodel"), key=lambda p: int(p.stem.rsplit("_", 1)[-1]))
    if not models:
        raise FileNotFoundError(f"no .caffemodel in {folder}")
    return models[-1]


def _generate(out: Path, base: Path, mnist: Path, split: str, methods: str, scales: str,
              limit: Optional[int], seed: int, shard: str = "0/1") -> None:
    from hcgen.caffe_net import CaffeNet
    from hcgen.pipeline.generate import GenerateSettings, generate

    deploy = MODELS / "lenet_deploy.prototxt"
    weights = caffemodel(base)
    settings = GenerateSettings(model=str(deploy), weights=str(weights), source=str(mnist / f"mnist_{split}_lmdb"),
                                split=split, methods=methods, scales=scales, min_pass=-1.0, limit=limit,
                                seed=seed, batch_size=64, shard=shard)
    generate(CaffeNet(deploy, weights), settings, out / "lmdb")


def _merge(out: Path, *shards: Path) -> None:
    """The shards' records merged: identical to the unsharded generation (generate.merge_shards)."""
    from hcgen.pipeline.generate import merge_shards

    shutil.rmtree(out / "lmdb", ignore_errors=True)  # left by a merge that died: this stage is not done
    merge_shards([s / "lmdb" for s in shards], out / "lmdb")


def _heldout(out: Path, *generated: Path, per_type: int) -> None:
    """`per_type` records of each held-out type, drawn evenly (seeded) from every net's test generation."""
    from hcgen.lmdb_io import DatumWriter, MetadataTable, read_raw

    rng = np.random.default_rng(2016)
    columns = None
    picks: list[tuple[int, int]] = []  # (source, record index)
    tables = []
    for src, folder in enumerate(generated):
        table = MetadataTable(folder / "lmdb" / "metadata.csv")
        rows = list(table.rows())
        tables.append(rows)
        columns = table.columns
        for method, scale in HELDOUT_TYPES:
            idx = [i for i, r in enumerate(rows) if r["method"] == method and float(r["scale"]) == scale]
            share = per_type // len(generated) + (src < per_type % len(generated))
            if len(idx) < share:
                raise RuntimeError(f"{folder}: only {len(idx)} {method} x{scale:g} records for a held-out "
                                   f"share of {share}; generate from more test images")
            picks += [(src, i) for i in rng.choice(idx, size=share, replace=False)]
    picks = [picks[i] for i in rng.permutation(len(picks))]
    meta_cols = [c for c in columns if c != "key"] + ["net"]
    target = out / "lmdb"
    if target.exists():
        shutil.rmtree(target)
    with DatumWriter(target, metadata_columns=meta_cols) as writer:
        for start in range(0, len(picks), 2048):
            chunk = picks[start:start + 2048]
            raw = {s: dict(zip(idx, read_raw(generated[s] / "lmdb", idx)))
                   for s in {s for s, _ in chunk} for idx in [sorted(i for t, i in chunk if t == s)]}
            values = [raw[s][i] for s, i in chunk]
            meta = {c: [tables[s][i][c] for s, i in chunk] for c in meta_cols if c != "net"}
            meta["net"] = [s for s, _ in chunk]
            writer.write_raw(values, meta)


def _infimnist(out: Path, count: int, source: Optional[str]) -> None:
    from hcgen.infimnist import write_infimnist

    write_infimnist(out / "lmdb", count, seed=0, source=source)


def _mix(out: Path, mnist: Path, data: Path, seed: int, methods, scales, min_pass, max_pass) -> None:
    from hcgen.pipeline.train import mix_training_data

    mix_training_data([data / "lmdb"], out / "lmdb", seed, with_mnist=mnist / "mnist_train_lmdb",
                      methods=methods, scales=scales, min_pass=min_pass, max_pass=max_pass)


def _finetune(out: Path, base: Path, mix: Path, mnist: Path, seed: int, iterations: int) -> None:
    from hcgen.pipeline.train import train

    # Caffe's test phase every 500 iterations only reports (the nets are evaluated afterwards) and cost
    # ~12% of a LeNet fine-tune here (10K test images per 500 iterations): test at the start and the
    # end only; the weights are the same.
    train(MODELS / "lenet_solver.prototxt", out, weights=caffemodel(base), seed=seed, iterations=iterations,
          test_every=iterations,
          train_lmdb=mix / "lmdb", test_lmdb=mnist / "mnist_test_lmdb")


def _evaluate(out: Path, net: Path, mnist: Path, heldout: Path) -> None:
    from hcgen.pipeline.evaluate import evaluate

    results = evaluate(MODELS / "lenet_deploy.prototxt", caffemodel(net),
                       [mnist / "mnist_test_lmdb", heldout / "lmdb"])
    (out / "errors.json").write_text(json.dumps([r.as_dict() for r in results], indent=1))


MNIST_TRAIN, MNIST_TEST = 60_000, 10_000
# Seconds per unit of each kind of stage, measured here (2 GHz EPYC, 2 single-threaded Dask workers
# side by side, `hcgen table1 --profile quick --dask`; benchmarks/estimate_table1.py prints them for
# any finished run). Only the live view's ETA uses them, as relative weights.
SECONDS_PER_UNIT = {
    "mnist conversion": 0.8, "InfiMNIST-style images": 6.2e-5, "training iterations": 0.0503,
    "searches": 0.0056, "searches (test digits)": 0.0075, "held-out records": 9e-5,
    "mixed records": 2.54e-5, "evaluated images": 3.05e-4,
    "merged records": 2.54e-5,  # not measured yet: taken as fast as mixing (both copy Datums)
}


def stage_work(name: str, params: dict, p: Profile) -> tuple[str, float]:
    """(kind, size) of a stage of profile `p`, from its name and parameters: training iterations,
    searches (source digits x directions), records mixed or assembled, images evaluated or deformed.
    Generated counts assume every search succeeds (99.9% did on LeNet)."""
    from hcgen.pipeline.generate import parse_methods

    if name == "mnist":
        return "mnist conversion", 1
    if name == "infimnist":
        return "InfiMNIST-style images", params["count"]
    if name.startswith(("base", "ft-")):
        return "training iterations", params["iterations"]
    if name.startswith("gen-") and "split" not in params:  # the merge of a sharded generation
        split = "train" if name.startswith("gen-train") else "test"
        sources = (p.train_images or MNIST_TRAIN) if split == "train" else (p.test_images or MNIST_TEST)
        methods = p.train_methods if split == "train" else "fgs,fgv,hc-d:1-9,hc-s:1"
        return "merged records", sources * len(parse_methods(methods))
    if name.startswith("gen-"):
        sources = params["limit"] or (MNIST_TRAIN if params["split"] == "train" else MNIST_TEST)
        shards = int(params.get("shard", "0/1").split("/")[1])
        # from the test digits: two hard-positive scales, so more PASS work per search
        kind = "searches" if params["split"] == "train" else "searches (test digits)"
        return kind, sources * len(parse_methods(params["methods"])) / shards
    if name == "heldout":
        return "held-out records", len(HELDOUT_TYPES) * params["per_type"]
    if name.startswith("mix-"):
        if params["methods"] is None:  # the InfiMNIST-style row
            return "mixed records", MNIST_TRAIN + p.infimnist_count
        generated = (p.train_images or MNIST_TRAIN) * len(params["methods"])
        if params["min_pass"] is not None:  # a PASS bin: HC-D at both scales, split over the bins
            generated = generated * 2 / len(p.pass_bins)
        return "mixed records", MNIST_TRAIN + generated
    if name.startswith("eval-"):
        return "evaluated images", MNIST_TEST + len(HELDOUT_TYPES) * p.heldout_per_type
    raise ValueError(f"unknown stage {name}")


def expected_seconds(graph: dict[str, "Stage"], profile: Profile, rates: Optional[dict[str, float]] = None,
                     work: Optional[Path] = None) -> dict[str, float]:
    """Stage -> expected seconds on one worker: its size x seconds per unit of its kind (`rates`, else
    SECONDS_PER_UNIT); 0 for a stage already finished in `work`. Estimates and the live ETA use it."""
    rate = {**SECONDS_PER_UNIT, **(rates or {})}
    keys = folders(graph)
    out = {}
    for name, stage in graph.items():
        kind, size = stage_work(name, stage.params, profile)
        finished = work is not None and (Path(work) / keys[name] / DONE).exists()
        out[name] = 0.0 if finished else rate[kind] * size
    return out


def measured_rates(work: Path, profile: Profile) -> dict[str, tuple[float, float, int]]:
    """kind -> (seconds per unit, total seconds, stages) over every finished stage in `work` that
    recorded its time (a run of `profile`, whose sizes the stages' own parameters do not all give)."""
    seconds, units, count = defaultdict(float), defaultdict(float), defaultdict(int)
    for marker in sorted(work.glob(f"*/{DONE}")):
        info = json.loads(marker.read_text())
        if info.get("seconds") is None:
            continue
        kind, size = stage_work(info["stage"], info["params"], profile)
        seconds[kind] += info["seconds"]
        units[kind] += size
        count[kind] += 1
    return {k: (seconds[k] / units[k], seconds[k], count[k]) for k in seconds}


def simulate(durations: dict[str, float], deps: dict[str, tuple], order: list[str], workers: int) -> float:
    """Wall time of run_dask's policy: in graph order, start every ready stage while a worker is free."""
    pending, done, running, now, free = list(order), set(), [], 0.0, workers
    while pending or running:
        for name in list(pending):
            if free == 0:
                break
            if all(d in done for d in deps[name]):
                pending.remove(name)
                heapq.heappush(running, (now + durations[name], name))
                free -= 1
        if not running:
            raise RuntimeError(f"stages never become ready: {pending}")
        now, name = heapq.heappop(running)
        done.add(name)
        free += 1
    return now


def estimate(graph: dict[str, "Stage"], profile: Profile, work: Path, workers: int) -> tuple[float, float, bool]:
    """(seconds of stage work left, wall seconds with `workers`, calibrated) for the unfinished stages
    of `graph`: rates from the finished stages in `work` where there are any (calibrated), else
    SECONDS_PER_UNIT."""
    measured = {kind: r[0] for kind, r in measured_rates(work, profile).items()}
    durations = expected_seconds(graph, profile, measured, work)
    deps = {name: tuple(stage.deps) for name, stage in graph.items()}
    return sum(durations.values()), simulate(durations, deps, topological(graph), workers), bool(measured)


def stages(profile: Profile, mnist_source: Optional[str] = None) -> dict[str, Stage]:
    """The protocol's stage graph for `profile` (see the module docstring)."""
    p = profile
    g: dict[str, Stage] = {}

    def add(name, fn, deps=(), **params):
        g[name] = Stage(name, lambda out, *ins, _fn=fn, _kw=params: _fn(out, *ins, **_kw), deps, params)

    add("mnist", _mnist, source=mnist_source)
    if INFIMNIST_ROW in p.rows:
        add("infimnist", _infimnist, count=p.infimnist_count, source=mnist_source)
    for b in range(1, p.base_nets + 1):
        add(f"base{b}", _train_base, ["mnist"], seed=b, iterations=p.base_iterations)
        for split, kw in (("train", dict(methods=p.train_methods, scales="1.05", limit=p.train_images)),
                          ("test", dict(methods="fgs,fgv,hc-d:1-9,hc-s:1", scales="1.05,1.10", limit=p.test_images))):
            name, n = f"gen-{split}{b}", p.generation_shards
            if n == 1:
                add(name, _generate, [f"base{b}", "mnist"], split=split, seed=b, **kw)
                continue
            for k in range(n):
                add(f"{name}-shard{k}", _generate, [f"base{b}", "mnist"], split=split, seed=b, **kw,
                    shard=f"{k}/{n}")
            add(name, _merge, [f"{name}-shard{k}" for k in range(n)])
    add("heldout", _heldout, [f"gen-test{b}" for b in range(1, p.base_nets + 1)], per_type=p.heldout_per_type)
    for b in range(1, p.base_nets + 1):
        add(f"eval-base{b}", _evaluate, [f"base{b}", "mnist", "heldout"])
        for row in p.rows:
            for o in range(1, p.orderings + 1):
                tag = f"{row}-net{b}-order{o}"
                if row == INFIMNIST_ROW:
                    add(f"mix-{tag}", _mix, ["mnist", "infimnist"], seed=10 * b + o, methods=None,
                        scales=None, min_pass=None, max_pass=None)
                    iterations = p.infimnist_iterations
                else:
                    methods, scales = ROWS[row]
                    add(f"mix-{tag}", _mix, ["mnist", f"gen-train{b}"], seed=10 * b + o, methods=methods,
                        scales=scales, min_pass=None, max_pass=None)
                    iterations = p.finetune_iterations
                add(f"ft-{tag}", _finetune, [f"base{b}", f"mix-{tag}", "mnist"], seed=100 * b + o,
                    iterations=iterations)
                add(f"eval-{tag}", _evaluate, [f"ft-{tag}", "mnist", "heldout"])
    hc_d = [f"HC-D-{k}" for k in range(1, 10)]
    for lo, hi in p.pass_bins:
        tag = f"pass{lo:.2f}-{min(hi, 1.0):.2f}"
        add(f"mix-{tag}", _mix, ["mnist", "gen-train1"], seed=7, methods=hc_d, scales=None,
            min_pass=lo, max_pass=hi)
        add(f"ft-{tag}", _finetune, ["base1", f"mix-{tag}", "mnist"], seed=7, iterations=p.bin_iterations)
        add(f"eval-{tag}", _evaluate, [f"ft-{tag}", "mnist", "heldout"])
    return g
