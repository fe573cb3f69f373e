"""The Table 1 protocol of Rozsa et al. (Sec. 5.1-5.2) as a graph of resumable stages.

Protocol (profile "full" is the paper's sizes; every default below is our reading of Sec. 5.2, and
each choice the paper does not state is a `Profile` field, listed in README "Deviations and
interpretations"):
  1. MNIST -> LMDBs. `base_nets` LeNets trained from scratch with Caffe's stock solver for
     `base_iterations`, seeds 1, 2, 3, each reading its own seeded shuffle of the 60K training digits
     ("different random initializations/orderings"; `base_orderings`).
  2. For each base net, generation from the MNIST *training* digits (fgs, fgv, hc-d:1-9, hc-s:1-9,
     hard positives x1.05) -- the training data of the rows -- and from the MNIST *test* digits
     (fgs, fgv, hc-d:1-9, hc-s:1, x1.05, x1.10) -- the source of the held-out adversarial test set.
  3. PASS threshold tau of the training rows (Eq. 5; the paper does not state it for MNIST): with
     `train_tau="calibrate"` one tau over all base nets, chosen so the FGV row keeps the paper's share
     of FGV images (37,663 of 60K digits); `tau.json` reports what it leaves of every row.
  4. Held-out set: `heldout_per_type` records of each of the 14 types (FGS, FGV, HC-D-1..9, HC-D-1
     x1.05, HC-D-1 x1.10, HC-S-1), drawn evenly from all base nets. It is generated from the MNIST
     test digits, which no net ever trains on, so it is disjoint from every training set.
  5. Rows: each base net is fine-tuned `orderings` times (seeded shuffles) for `finetune_iterations`
     with the stock solver on the 60K training digits plus the row's generated images from that net
     (PASS >= tau): FGS, FGV, HC-S-5 (HC-S-1..5), HC-D-5 (HC-D-1..5), HC-D-9 (HC-D-1..9), HC-D-9-1.05
     (HC-D-1..9 scaled x1.05). InfiMNIST-style: `base_nets` nets trained from scratch for
     `infimnist_iterations` on the 60K digits plus `infimnist_count` deformations (ours, not
     InfiMNIST's data), as the paper's "trained three networks for 30K iterations".
  6. Every net (and each base net, "Basic LeNet") is evaluated on the MNIST test set and the held-out set.
  7. Fig. 6: base nets 1..`bin_nets` fine-tuned on their HC-D images (all scales) binned by PASS.

`stages(profile)` returns the graph (name -> `hcgen.stages.graph.Stage`); the generic runner,
keys, timing and estimator are in `hcgen.stages.graph`, the Dask runner in
`hcgen.stages.dask_runner`, the table and figures in `hcgen.experiments.table1.results` (fed by `report_spec`).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from hcgen.backends.factory import BackendSpec
from hcgen.data.infimnist import write_infimnist
from hcgen.data.lmdb_io import DatumWriter, read_raw
from hcgen.data.metadata import MetadataTable
from hcgen.data.mix import mix_training_data
from hcgen.data.mnist import convert_mnist
from hcgen.errors import BadInput, NotFound
from hcgen.experiments.table1.results import ReportSpec
from hcgen.generate.run import GenerateSettings, generate
from hcgen.generate.shards import merge_shards
from hcgen.stages.graph import Stage
from hcgen.training.caffe_train import train
from hcgen.util.fileio import atomic_write

MODELS = Path(__file__).resolve().parents[3] / "models" / "lenet"
ROWS = {  # row -> (methods, scales) of the generated training records it fine-tunes on
    "FGS": (["FGS"], [1.0]),
    "FGV": (["FGV"], [1.0]),
    "HC-S-5": ([f"HC-S-{k}" for k in range(1, 6)], [1.0]),
    "HC-D-5": ([f"HC-D-{k}" for k in range(1, 6)], [1.0]),
    "HC-D-9": ([f"HC-D-{k}" for k in range(1, 10)], [1.0]),
    "HC-D-9-1.05": ([f"HC-D-{k}" for k in range(1, 10)], [1.05]),
}
INFIMNIST_ROW = "InfiMNIST-style"
BASIC = "Basic LeNet"
# Ablation rows: a row of ROWS fine-tuned on its generated images only, without the 60K MNIST digits (tests
# our reading of "random orderings of the adversarial training data", README "Deviations and interpretations").
ONLY_ROWS = {"HC-D-9-1.05-only": "HC-D-9-1.05"}
HELDOUT_TYPES = [("FGS", 1.0), ("FGV", 1.0)] + [(f"HC-D-{k}", 1.0) for k in range(1, 10)] + [
    ("HC-D-1", 1.05), ("HC-D-1", 1.1), ("HC-S-1", 1.0)]
HELDOUT_METHODS = "fgs,fgv,hc-d:1-9,hc-s:1"
PAPER = {  # Table 1 of the paper: MNIST test error (mean ± std over 9 nets), adversarial error
    "HC-D-9-1.05": (".673% ± .035", "14.85%"), "HC-D-9": (".683% ± .057", "21.10%"),
    INFIMNIST_ROW: (".697% ± .021 (InfiMNIST 1M)", "48.35%"), "FGV": (".697% ± .031", "29.61%"),
    "HC-D-5": (".723% ± .047", "21.52%"), "HC-S-5": (".733% ± .032", "29.29%"),
    "FGS": (".790% ± .122", "31.06%"), BASIC: (".937% ± .110", "64.21%"),
}
# Training images per row in the paper (Sec. 5.2): FGV 37,663; HC-D-9 and HC-D-9-1.05 "approximately
# 340K" each; InfiMNIST 1M. Other rows are not stated.
PAPER_TRAIN_IMAGES = {"FGV": 37_663, "HC-D-9": 340_000, "HC-D-9-1.05": 340_000, INFIMNIST_ROW: 1_000_000}
MNIST_TRAIN, MNIST_TEST = 60_000, 10_000


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
    bin_nets: int = 3  # Fig. 6: base nets fine-tuned once per PASS bin (the paper does not say how many)
    # Each generation split into this many `--shard K/N` stages plus an exact merge: on a cluster the
    # shards run side by side.
    generation_shards: int = 1
    # --- protocol choices (defaults: our reading of the paper; README "Deviations and interpretations")
    base_orderings: bool = True  # each base net reads its own seeded shuffle of the 60K (False: file order)
    # PASS threshold of the rows' training images: "calibrate" (one tau so the FGV row keeps 37,663 / 60K
    # of the digits, the paper's count), a number, or None (every successful search)
    train_tau: Union[str, float, None] = "calibrate"
    infimnist_from_scratch: bool = True  # 3 nets from scratch (paper); False: fine-tunes of the base nets
    finetune_with_mnist: bool = True  # fine-tune on the 60K digits plus the row's images (False: images only)
    finetune_solver: str = "lenet_solver.prototxt"  # in models/lenet; the stock solver (lr restarts at 0.01)


PROFILES = {
    "full": Profile("full"),
    # The paper's structure (3 base nets of 10K iterations x 3 orderings, every row, held-out set from
    # all 3 nets, Fig. 6 over 3 nets), smaller sizes (measured wall times: README, "Reproducing Table 1").
    # InfiMNIST-style nets train as many iterations as a base net plus its fine-tune (the paper: 30K = 10K + 20K).
    "medium": Profile("medium", base_iterations=10_000, finetune_iterations=2_000, infimnist_iterations=12_000,
                      train_images=3_000, test_images=200, heldout_per_type=450, infimnist_count=100_000,
                      train_methods="fgs,fgv,hc-d:1-9,hc-s:1-5", bin_iterations=2_000),
    # The smoke profile: one base net, so its held-out set comes from that net alone.
    "quick": Profile("quick", base_nets=1, orderings=1, base_iterations=5_000, finetune_iterations=3_000,
                     infimnist_iterations=3_000, train_images=3_000, test_images=1_000,
                     heldout_per_type=300, infimnist_count=60_000, train_methods="fgs,fgv,hc-d:1-9,hc-s:1-5",
                     bin_iterations=3_000, bin_nets=1),
    # The paper's sizes for the rows that carry the size-dependent claims: 3 base nets (10K iterations, own
    # orderings) x 1 fine-tuning ordering, generation from all 60K training digits (no HC-S: no row uses
    # it), 20K fine-tuning iterations, a 70K held-out set (5K x 14 types) from all 10K test digits of the 3
    # nets, plus the images-only ablation of HC-D-9-1.05. No InfiMNIST-style row and no Fig. 6.
    "paper-rows": Profile("paper-rows", orderings=1, train_methods="fgs,fgv,hc-d:1-9",
                          rows=("FGS", "FGV", "HC-D-9", "HC-D-9-1.05", "HC-D-9-1.05-only"), pass_bins=(),
                          bin_nets=0),
    # for tests: seconds, not minutes; every kind of row (InfiMNIST-style from scratch, hard positives)
    "tiny": Profile("tiny", base_nets=1, orderings=1, base_iterations=200, finetune_iterations=50,
                    infimnist_iterations=50, train_images=40, test_images=40, heldout_per_type=10,
                    infimnist_count=500, train_methods="fgs,fgv,hc-d:1-9,hc-s:1-5",
                    rows=("FGS", "FGV", "HC-D-9-1.05", INFIMNIST_ROW), pass_bins=((0.0, 0.8), (0.8, 1.01)),
                    bin_iterations=50, bin_nets=1),
}


# ------------------------------------------------------------------------------------------ stages

def _mnist(out: Path, source: Optional[str]) -> None:
    convert_mnist(out, source)


def _shuffle(out: Path, mnist: Path, seed: int) -> None:
    """The 60K training digits in a seeded order: one base net's "random ordering"."""

    mix_training_data([], out / "lmdb", seed, with_mnist=mnist / "mnist_train_lmdb")


def _solver(name: str) -> Path:
    return MODELS / name


def _train_base(out: Path, mnist: Path, *order: Path, seed: int, iterations: int, solver: str) -> None:
    data = order[0] / "lmdb" if order else mnist / "mnist_train_lmdb"
    train(_solver(solver), out, seed=seed, iterations=iterations, test=False,
          train_lmdb=data, test_lmdb=mnist / "mnist_test_lmdb")


def caffemodel(folder: Path) -> Path:
    models = sorted(folder.glob("*.caffemodel"), key=lambda p: int(p.stem.rsplit("_", 1)[-1]))
    if not models:
        raise NotFound(f"no .caffemodel in {folder}")
    return models[-1]


def _generate(out: Path, base: Path, mnist: Path, split: str, methods: str, scales: str,
              limit: Optional[int], seed: int, shard: str = "0/1") -> None:
    spec = BackendSpec(str(MODELS / "lenet_deploy.prototxt"), str(caffemodel(base)))
    settings = GenerateSettings(**spec.provenance(), source=str(mnist / f"mnist_{split}_lmdb"), split=split,
                                methods=methods, scales=scales, min_pass=-1.0, limit=limit, seed=seed, batch_size=64,
                                shard=shard)
    generate(spec.open(), settings, out / "lmdb")


def _merge(out: Path, *shards: Path) -> None:
    """The shards' records merged: identical to the unsharded generation (hcgen.generate.shards.merge_shards)."""

    shutil.rmtree(out / "lmdb", ignore_errors=True)  # left by a merge that died: this stage is not done
    merge_shards([s / "lmdb" for s in shards], out / "lmdb")


def _records(folder: Path) -> list[dict]:
    return list(MetadataTable(folder / "lmdb" / "metadata.csv").rows())


def _in_row(r: dict, row: str) -> bool:
    methods, scales = ROWS[row]
    return r["method"] in methods and float(r["scale"]) in scales


def _tau(out: Path, *generated: Path, tau: Union[str, float, None], sources: int, rows: tuple) -> None:
    """tau.json: the rows' PASS threshold and what it keeps of every row on every net.

    "calibrate": one tau over all nets' FGV records so that they keep, together, the paper's share of
    FGV images, 37,663 of 60K source digits (the k-th highest FGV PASS, k = that share of the digits
    searched on all nets; PASS values are continuous, so ties do not move the count)."""
    records = [_records(g) for g in generated]
    target_share = PAPER_TRAIN_IMAGES["FGV"] / MNIST_TRAIN
    info: dict = {"mode": tau if isinstance(tau, str) or tau is None else "fixed", "sources_per_net": sources,
                  "nets": len(generated), "paper_fgv_share": target_share}
    if tau == "calibrate":
        fgv = np.sort([float(r["pass"]) for recs in records for r in recs if _in_row(r, "FGV")])[::-1]
        k = int(round(target_share * sources * len(generated)))
        info["target_fgv_records"] = k
        if len(fgv) < k:  # fewer FGV successes than the paper kept: keep them all
            value = float("-inf")
        else:
            value = float(fgv[k - 1])
    else:
        value = float("-inf") if tau is None else float(tau)
    info["tau"] = value if np.isfinite(value) else None
    table = {}
    for row in [r for r in rows if r in ROWS]:
        kept = [sum(_in_row(r, row) and float(r["pass"]) >= value for r in recs) for recs in records]
        found = [sum(_in_row(r, row) for r in recs) for recs in records]
        table[row] = {"kept_per_net": kept, "found_per_net": found,
                      "kept_share_of_digits": float(np.mean(kept)) / sources,
                      "kept_per_60k_digits": float(np.mean(kept)) * MNIST_TRAIN / sources,
                      "paper": PAPER_TRAIN_IMAGES.get(row)}
    info["rows"] = table
    atomic_write(out / "tau.json", json.dumps(info, indent=1))


def read_tau(folder: Path) -> Optional[float]:
    value = json.loads((folder / "tau.json").read_text())["tau"]
    return None if value is None else float(value)


def heldout_shares(per_type: int, nets: int) -> list[int]:
    """Records of each held-out type drawn from each base net's generation: as even as integers allow."""
    return [per_type // nets + (src < per_type % nets) for src in range(nets)]


def _heldout(out: Path, *generated: Path, per_type: int) -> None:
    """`per_type` records of each held-out type, drawn evenly (seeded) from every net's test generation."""

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
            share = heldout_shares(per_type, len(generated))[src]
            if len(idx) < share:
                raise BadInput(f"{folder}: only {len(idx)} {method} x{scale:g} records for a held-out "
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
            meta["net"] = [s + 1 for s, _ in chunk]  # base net 1, 2, 3
            writer.write_raw(values, meta)


def _infimnist(out: Path, count: int, source: Optional[str]) -> None:
    write_infimnist(out / "lmdb", count, seed=0, source=source)


def _mix(out: Path, mnist: Path, data: Path, *tau: Path, seed: int, methods, scales, min_pass, max_pass,
         with_mnist: bool = True) -> None:
    if tau:  # the rows' PASS threshold, calibrated by the tau stage
        min_pass = read_tau(tau[0])
    mix_training_data([data / "lmdb"], out / "lmdb", seed,
                      with_mnist=mnist / "mnist_train_lmdb" if with_mnist else None,
                      methods=methods, scales=scales, min_pass=min_pass, max_pass=max_pass)


def _finetune(out: Path, base: Path, mix: Path, mnist: Path, seed: int, iterations: int, solver: str) -> None:
    # Caffe's test phases only report (every net is evaluated afterwards) and cost ~12% of a 1,000-
    # iteration LeNet fine-tune (benchmarks/bench_stage_rate.py): none at all; the weights are the same.
    train(_solver(solver), out, weights=caffemodel(base), seed=seed, iterations=iterations,
          test=False, train_lmdb=mix / "lmdb", test_lmdb=mnist / "mnist_test_lmdb")


def _scratch(out: Path, mix: Path, mnist: Path, seed: int, iterations: int, solver: str) -> None:
    train(_solver(solver), out, seed=seed, iterations=iterations, test=False,
          train_lmdb=mix / "lmdb", test_lmdb=mnist / "mnist_test_lmdb")


def _evaluate(out: Path, net: Path, mnist: Path, heldout: Path) -> None:
    from hcgen.training.evaluate import evaluate  # pycaffe: loaded only when used

    results = evaluate(MODELS / "lenet_deploy.prototxt", caffemodel(net),
                       [mnist / "mnist_test_lmdb", heldout / "lmdb"])
    atomic_write(out / "errors.json", json.dumps([r.as_dict() for r in results], indent=1))


def row_evals(p: Profile) -> dict[str, list[str]]:
    """Table 1 row -> the eval stages of its nets (Basic LeNet: the base nets)."""
    out = {}
    for row in p.rows:
        if row == INFIMNIST_ROW and p.infimnist_from_scratch:
            out[row] = [f"eval-{row}-net{b}" for b in range(1, p.base_nets + 1)]
        else:
            out[row] = [f"eval-{row}-net{b}-order{o}" for b in range(1, p.base_nets + 1)
                        for o in range(1, p.orderings + 1)]
    out[BASIC] = [f"eval-base{b}" for b in range(1, p.base_nets + 1)]
    return out


def row_units(p: Profile) -> dict[str, Optional[list[tuple[int, Optional[int]]]]]:
    """Table 1 row -> (base net, ordering) of each of its nets, in `row_evals` order: the design the claims'
    paired tests follow. Basic LeNet: (base net, None). InfiMNIST-style from scratch: None (its nets descend
    from no base net, so they pair with nothing)."""
    out: dict[str, Optional[list[tuple[int, Optional[int]]]]] = {}
    for row in p.rows:
        if row == INFIMNIST_ROW and p.infimnist_from_scratch:
            out[row] = None
        else:
            out[row] = [(b, o) for b in range(1, p.base_nets + 1) for o in range(1, p.orderings + 1)]
    out[BASIC] = [(b, None) for b in range(1, p.base_nets + 1)]
    return out


def bin_tag(lo: float, hi: float) -> str:
    return f"pass{lo:.2f}-{min(hi, 1.0):.2f}"


def stages(profile: Profile, mnist_source: Optional[str] = None) -> dict[str, Stage]:
    """The protocol's stage graph for `profile` (see the module docstring)."""
    p = profile
    g: dict[str, Stage] = {}
    solver_files = (_solver(p.finetune_solver), MODELS / "lenet_train_test.prototxt")
    base_files = (_solver("lenet_solver.prototxt"), MODELS / "lenet_train_test.prototxt")
    deploy_files = (MODELS / "lenet_deploy.prototxt",)

    def add(name, fn, deps=(), files=(), **params):
        g[name] = Stage(name, lambda out, *ins, _fn=fn, _kw=params: _fn(out, *ins, **_kw), deps, params, files)

    add("mnist", _mnist, source=mnist_source)
    if INFIMNIST_ROW in p.rows:
        add("infimnist", _infimnist, count=p.infimnist_count, source=mnist_source)
    for b in range(1, p.base_nets + 1):
        if p.base_orderings:
            add(f"order{b}", _shuffle, ["mnist"], seed=b)
        add(f"base{b}", _train_base, ["mnist"] + ([f"order{b}"] if p.base_orderings else []), base_files,
            seed=b, iterations=p.base_iterations, solver="lenet_solver.prototxt")
        for split, kw in (("train", dict(methods=p.train_methods, scales="1.05", limit=p.train_images)),
                          ("test", dict(methods=HELDOUT_METHODS, scales="1.05,1.10", limit=p.test_images))):
            name, n = f"gen-{split}{b}", p.generation_shards
            if n == 1:
                add(name, _generate, [f"base{b}", "mnist"], deploy_files, split=split, seed=b, **kw)
                continue
            for k in range(n):
                add(f"{name}-shard{k}", _generate, [f"base{b}", "mnist"], deploy_files, split=split, seed=b,
                    **kw, shard=f"{k}/{n}")
            add(name, _merge, [f"{name}-shard{k}" for k in range(n)])
    nets = range(1, p.base_nets + 1)
    unknown = [r for r in p.rows if r not in ROWS and r not in ONLY_ROWS and r != INFIMNIST_ROW]
    if unknown:
        raise ValueError(f"profile {p.name}: unknown rows {unknown}; rows are {list(ROWS) + list(ONLY_ROWS)} "
                         f"and {INFIMNIST_ROW!r}")
    generated_rows = [r for r in p.rows if r in ROWS or r in ONLY_ROWS]
    if generated_rows:
        add("tau", _tau, [f"gen-train{b}" for b in nets], tau=p.train_tau, sources=p.train_images or MNIST_TRAIN,
            rows=tuple(r for r in generated_rows if r in ROWS))
    add("heldout", _heldout, [f"gen-test{b}" for b in nets], per_type=p.heldout_per_type)
    for b in nets:
        add(f"eval-base{b}", _evaluate, [f"base{b}", "mnist", "heldout"], deploy_files)
        for row in p.rows:
            if row == INFIMNIST_ROW and p.infimnist_from_scratch:
                tag = f"{row}-net{b}"
                add(f"mix-{tag}", _mix, ["mnist", "infimnist"], seed=10 * b, methods=None, scales=None,
                    min_pass=None, max_pass=None)
                add(f"scratch-{tag}", _scratch, [f"mix-{tag}", "mnist"], solver_files, seed=100 * b,
                    iterations=p.infimnist_iterations, solver=p.finetune_solver)
                add(f"eval-{tag}", _evaluate, [f"scratch-{tag}", "mnist", "heldout"], deploy_files)
                continue
            for o in range(1, p.orderings + 1):
                tag = f"{row}-net{b}-order{o}"
                if row == INFIMNIST_ROW:
                    add(f"mix-{tag}", _mix, ["mnist", "infimnist"], seed=10 * b + o, methods=None,
                        scales=None, min_pass=None, max_pass=None)
                    iterations = p.infimnist_iterations
                else:
                    methods, scales = ROWS[ONLY_ROWS.get(row, row)]
                    add(f"mix-{tag}", _mix, ["mnist", f"gen-train{b}", "tau"], seed=10 * b + o, methods=methods,
                        scales=scales, min_pass=None, max_pass=None,
                        with_mnist=p.finetune_with_mnist and row not in ONLY_ROWS)
                    iterations = p.finetune_iterations
                add(f"ft-{tag}", _finetune, [f"base{b}", f"mix-{tag}", "mnist"], solver_files, seed=100 * b + o,
                    iterations=iterations, solver=p.finetune_solver)
                add(f"eval-{tag}", _evaluate, [f"ft-{tag}", "mnist", "heldout"], deploy_files)
    hc_d = [f"HC-D-{k}" for k in range(1, 10)]
    for b in range(1, p.bin_nets + 1):
        for lo, hi in p.pass_bins:
            tag = f"{bin_tag(lo, hi)}-net{b}"
            add(f"mix-{tag}", _mix, ["mnist", f"gen-train{b}"], seed=7 + 10 * b, methods=hc_d, scales=None,
                min_pass=lo, max_pass=hi, with_mnist=p.finetune_with_mnist)
            add(f"ft-{tag}", _finetune, [f"base{b}", f"mix-{tag}", "mnist"], solver_files, seed=7 + 10 * b,
                iterations=p.bin_iterations, solver=p.finetune_solver)
            add(f"eval-{tag}", _evaluate, [f"ft-{tag}", "mnist", "heldout"], deploy_files)
    return g


def report_spec(profile: Profile) -> ReportSpec:
    """What `hcgen.experiments.table1.results` needs to know of this protocol: rows, their paper numbers, figures' inputs."""
    p = profile
    return ReportSpec(
        profile=p.name,
        rows=row_evals(p),
        units=row_units(p),
        paper=PAPER,
        paper_train_images=PAPER_TRAIN_IMAGES,
        row_stages={row: [n.replace("eval-", "mix-", 1) for n in evals] for row, evals in row_evals(p).items()
                    if row != BASIC},
        bins=[(f"{lo:.2f}-{min(hi, 1.0):.2f}", [f"eval-{bin_tag(lo, hi)}-net{b}" for b in range(1, p.bin_nets + 1)])
              for lo, hi in p.pass_bins],
        tau_stage="tau" if any(r in ROWS or r in ONLY_ROWS for r in p.rows) else None,
        description=(
            f"Profile `{p.name}`: {p.base_nets} base net(s) ({p.base_iterations} iterations) x {p.orderings} "
            f"ordering(s), fine-tuning {p.finetune_iterations} iterations, "
            + (f"InfiMNIST-style {'from scratch' if p.infimnist_from_scratch else 'fine-tuned'} "
               f"{p.infimnist_iterations} iterations on {p.infimnist_count} deformations + 60K, "
               if INFIMNIST_ROW in p.rows else "no InfiMNIST-style row, ")
            + "".join(f"{r}: {ONLY_ROWS[r]} fine-tuned on its images only (no MNIST digits), " for r in p.rows
                      if r in ONLY_ROWS)
            + f"generation from {p.train_images or MNIST_TRAIN} training digits "
            f"per net, held-out set {p.heldout_per_type} x 14 types from {p.base_nets} net(s)' "
            f"{p.test_images or MNIST_TEST} test digits each, tau {p.train_tau}."),
        caveat=(None if p.name == "full" else
                (f"**This is the {p.name} profile: the paper's sizes for its rows, but {p.base_nets} nets per "
                 f"row ({p.base_nets} base nets x {p.orderings} ordering) where the paper has 9, and only the "
                 "rows listed.**" if (p.train_images, p.test_images, p.finetune_iterations) == (None, None, 20_000)
                 else f"**This is the {p.name} profile, not the paper's sizes: compare the structure and the "
                 "ordering of the rows, not the absolute numbers.**")
                + (" Its Basic LeNet row is 100% on adversarial images because with one base net every held-out "
                   "image is a minimal adversarial of that very net (the paper draws them from all three nets)."
                   if p.base_nets == 1 else "")),
        heldout_types=len(HELDOUT_TYPES),
        claims=p.base_nets > 1,
        example_generation="gen-test1", training_generation="gen-train1", mnist_stage="mnist",
    )
