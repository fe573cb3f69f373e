"""`hcgen generate`: many diverse adversarial images and hard positives per input image (Sec. 4-5).

For every correctly classified source image x with label y and every requested method, a direction
eta is built (FGS, FGV, HC-D-k, HC-S-k; see `hcgen.directions`), the minimal adversarial integer
image along it is searched (`hcgen.search`), and each success gives one record at scale 1 (the
adversarial image) plus one hard positive per factor in `scales`. Every record keeps the ORIGINAL
label y (Caffe trains on them as positives of y) and carries PASS, L2, L∞, eps, predicted label.

Output folder (it is itself the LMDB that `caffe train` reads):
  data.mdb           Caffe Datums, uint8 C×H×W, keys %08d, label = original label
  metadata.csv       one row per key: source_index, batch, label, method, k, hot, scale, eps, pred,
                     pass, aligned, l2, l2_per_pixel, linf
  failures.csv       one row per (source image, method) without a record: the search failed
                     (status), the record fell below --min-pass ("below_min_pass"), or the source
                     image itself is misclassified (method "*", "source_misclassified")
  generate.json      the settings; a rerun with the same settings resumes, other settings are refused
  summary.json       counts per method, failures, PASS quantiles (written at the end)

Work is done in batches of source images, each committed atomically (failures rows, then metadata
+ LMDB in one transaction, then the batch number in done.txt), so a killed run restarted with the
same command neither loses nor duplicates records.
"""
from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from hcgen import directions, metrics, search
from hcgen.lmdb_io import METADATA_FILE, DatumWriter, MetadataTable, lmdb_count, read_lmdb

COLUMNS = ("source_index", "batch", "label", "method", "k", "hot", "scale", "eps", "pred",
           "pass", "aligned", "l2", "l2_per_pixel", "linf")
FAILURE_COLUMNS = ("batch", "source_index", "method", "scale", "status")
PAPER_METHODS = "fgs,fgv,hc-d:1-9,hc-s:1-9"


@dataclass(frozen=True)
class Method:
    """One direction type: kind in {fgs, fgv, hc-d, hc-s}; k = hot class rank for hot/cold (1 = most similar)."""

    kind: str
    k: int = 0

    @property
    def name(self) -> str:
        return self.kind.upper() if not self.k else f"{self.kind.upper()}-{self.k}"


def parse_methods(spec: str) -> list[Method]:
    """'fgs,fgv,hc-d:1-9,hc-s:1,3' -> methods. Ranges a-b and lists are allowed after ':'."""
    methods: list[Method] = []
    tokens = [t.strip().lower() for t in spec.split(",") if t.strip()]
    current: Optional[str] = None
    for token in tokens:
        if ":" in token:
            current, _, ks = token.partition(":")
        elif token in ("fgs", "fgv"):
            methods.append(Method(token))
            current = None
            continue
        elif current and re.fullmatch(r"\d+(-\d+)?", token):
            ks = token
        else:
            raise ValueError(f"unknown method {token!r}; use fgs, fgv, hc-d:K or hc-s:K (K like 1-9 or 1,3)")
        if current not in ("hc-d", "hc-s"):
            raise ValueError(f"unknown method {current!r}; hot/cold methods are hc-d:K and hc-s:K")
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", ks)
        if not m:
            raise ValueError(f"bad k range {ks!r} in {token!r}; write e.g. hc-d:1-9")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if lo < 1 or hi < lo:
            raise ValueError(f"bad k range {ks!r}: k starts at 1 (the most similar class)")
        methods.extend(Method(current, k) for k in range(lo, hi + 1))
    if not methods:
        raise ValueError("no methods given; e.g. --methods fgs,fgv,hc-d:1-9,hc-s:1-9")
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods repeat in {spec!r}")
    return methods


def parse_scales(spec: str) -> list[float]:
    if not spec.strip():
        return []
    try:
        scales = [float(s) for s in spec.split(",")]
    except ValueError:
        raise ValueError(f"--scales must be numbers like 1.05,1.10, got {spec!r}") from None
    if any(not np.isfinite(s) or s <= 1 for s in scales):
        raise ValueError(f"hard-positive scales must be > 1 (paper: 1.05,1.10), got {spec!r}")
    return scales


def load_source(source: str | os.PathLike | None, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Source images (N, C, H, W) uint8 and labels: an LMDB of Datums, a folder of JPEG/PNG images, or a
    folder with MNIST IDX files.

    Images of a folder are BGR 224x224 centre crops of a 256x256 resize, labelled by a labels.txt or by
    class subfolders (see `hcgen.images`). Colour 256x256 Datums (BVLC's ilsvrc12 LMDBs) are centre-cropped
    to 224x224, as Caffe's Data layer does in the TEST phase with crop_size: 224.
    """
    from hcgen import images as imageio

    path = Path(source) if source is not None else None
    if path is not None and (path / "data.mdb").exists():
        _, images, labels = read_lmdb(path)
        if images.shape[1:] == (3, imageio.RESIZE, imageio.RESIZE):
            images = np.ascontiguousarray(imageio.center_crop(images))
        return images, labels.astype(np.int64)
    if path is not None and imageio.is_image_folder(path):
        return imageio.load_image_folder(path)
    from hcgen.mnist import load_mnist

    images, labels = load_mnist(source, split)
    return images[:, None], labels.astype(np.int64)


def select(n: int, limit: Optional[int], seed: int) -> np.ndarray:
    """Source indices to use: all in order, or the first `limit` of a seeded permutation."""
    if limit is None or limit >= n:
        return np.arange(n)
    if limit <= 0:
        raise ValueError(f"--limit must be positive, got {limit}")
    return np.sort(np.random.default_rng(seed).permutation(n)[:limit])


def compute_directions(net, x: np.ndarray, y: np.ndarray, h: np.ndarray,
                       methods: Sequence[Method]) -> tuple[np.ndarray, np.ndarray]:
    """eta (N, D, C, H, W) and valid (N, D) for D methods; one loss backward, one B_l per distinct k."""
    kinds = {m.kind for m in methods}
    eta = np.empty((len(x), len(methods)) + x.shape[1:])
    valid = np.empty((len(x), len(methods)), dtype=bool)
    if kinds & {"fgs", "fgv"}:
        grad = net.loss_gradient(x, y)  # Eq. 6
    ks = sorted({m.k for m in methods if m.k})
    if ks:
        omegas = np.stack([directions.omega_hc(h, y, k) for k in ks])  # Eq. 7
        hc_grads = dict(zip(ks, net.backward_from(x, omegas)))  # B_l
    for d, m in enumerate(methods):
        if m.kind == "fgv":
            dirs = directions.fgv(grad)
        elif m.kind == "fgs":
            dirs = directions.fgs(grad)
        elif m.kind == "hc-d":
            dirs = directions.hc_d(h, y, m.k, hc_grads[m.k])
        else:
            dirs = directions.hc_s(h, y, m.k, hc_grads[m.k])
        eta[:, d], valid[:, d] = dirs.eta, dirs.valid
    return eta, valid


def _hwc(images: np.ndarray) -> np.ndarray:
    """(M, C, H, W) -> (M, H, W) grey or (M, H, W, C) colour, as metrics expects."""
    return images[:, 0] if images.shape[1] == 1 else images.transpose(0, 2, 3, 1)


@dataclass
class BatchResult:
    images: np.ndarray
    labels: np.ndarray
    metadata: dict
    failures: list = field(default_factory=list)
    forwards: int = 0
    searches: int = 0


def generate_batch(net, x: np.ndarray, y: np.ndarray, source_index: np.ndarray, batch: int,
                   methods: Sequence[Method], scales: Sequence[float], min_pass: float,
                   n_jobs: Optional[int] = None) -> BatchResult:
    """All records of one batch of source images (only the correctly classified ones are searched)."""
    h = net.scores(x).astype(np.float64)
    correct = h.argmax(axis=1) == y
    skipped = [(batch, int(i), "*", "", "source_misclassified") for i in source_index[~correct]]
    x, y, h, source_index = x[correct], y[correct], h[correct], source_index[correct]
    if not len(x):
        return BatchResult(np.empty((0,) + x.shape[1:], np.uint8), np.empty(0, np.int64),
                           {c: np.empty(0) for c in COLUMNS}, skipped)
    eta, _ = compute_directions(net, x, y, h, methods)
    res = search.adversarial_search(net.scores, x, eta, y, clean_scores=h)
    ok = res.success  # (N, D)
    n, d = np.nonzero(ok)
    names = np.array([m.name for m in methods])
    ks = np.array([m.k for m in methods])
    hot = np.full(ok.shape, -1)
    for j, m in enumerate(methods):
        if m.k:
            hot[:, j] = directions.hot_class(h, y, m.k)

    images = [res.x_adv[n, d]]
    pred = [res.label[n, d]]
    scale = [np.ones(len(n))]
    if scales:
        hp = search.hard_positives(net.scores, x, eta, y, res, scales)
        for f, s in enumerate(hp.factors):
            images.append(hp.images[f][n, d])
            pred.append(hp.pred[f][n, d])
            scale.append(np.full(len(n), s))
    rep = len(images)
    images = np.concatenate(images)
    originals = np.tile(x[n], (rep, 1, 1, 1))
    score, aligned = metrics.pass_scores(_hwc(originals), _hwc(images), n_jobs=n_jobs)
    norms = metrics.perturbation_norms(_hwc(originals), _hwc(images))

    nn, dd = np.tile(n, rep), np.tile(d, rep)
    keep = score >= min_pass  # Eq. 5: PASS(x, x~) >= tau
    meta = {
        "source_index": source_index[nn], "batch": np.full(len(nn), batch), "label": y[nn],
        "method": names[dd], "k": ks[dd], "hot": hot[nn, dd], "scale": np.concatenate(scale),
        "eps": np.tile(res.eps[n, d], rep), "pred": np.concatenate(pred), "pass": score,
        "aligned": aligned.astype(int), "l2": norms["l2"], "l2_per_pixel": norms["l2_per_pixel"],
        "linf": norms["linf"],
    }
    meta = {c: np.asarray(v) for c, v in meta.items()}
    failures = skipped + [(batch, int(source_index[i]), str(names[j]), "", search.Status(res.status[i, j]).name.lower())
                          for i, j in zip(*np.nonzero(~ok))]
    failures += [(batch, int(meta["source_index"][i]), str(meta["method"][i]), f"{meta['scale'][i]:g}",
                  "below_min_pass") for i in np.flatnonzero(~keep)]
    return BatchResult(images[keep], y[nn][keep], {c: v[keep] for c, v in meta.items()}, failures,
                       forwards=int(res.forwards.sum()), searches=int(ok.size))


@dataclass
class GenerateSettings:
    model: str
    weights: str
    source: Optional[str]
    split: str
    methods: str
    scales: str
    min_pass: float
    limit: Optional[int]
    seed: int
    batch_size: int
    shard: str = "0/1"
    preprocess: str = "lenet"


def _read_done(path: Path) -> set[int]:
    return {int(line) for line in path.read_text().split()} if path.exists() else set()


def _rewrite_failures(path: Path, resume_batch: int) -> None:
    """Drop failure rows of batches that were not committed (a crash mid-batch)."""
    if not path.exists():
        with open(path, "w", newline="") as f:
            csv.writer(f).writerow(FAILURE_COLUMNS)
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    kept = [rows[0]] + [r for r in rows[1:] if len(r) == len(FAILURE_COLUMNS) and int(r[0]) < resume_batch]
    if len(kept) != len(rows):
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(kept)
        os.replace(tmp, path)


def parse_shard(spec: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)/(\d+)", spec.strip())
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise ValueError(f"--shard must be K/N with 0 <= K < N, got {spec!r}")
    return int(m.group(1)), int(m.group(2))


def generate(net, settings: GenerateSettings, out: str | os.PathLike,
             progress: Optional[Callable[[int, int, dict], None]] = None) -> dict:
    """Run (or resume) a generation into the LMDB folder `out`; returns the summary (also summary.json).

    `progress(images_in_batch, images_to_do, stats)` is called after each committed batch.
    """
    out = Path(out)
    methods = parse_methods(settings.methods)
    scales = parse_scales(settings.scales)
    if not -1.0 <= settings.min_pass <= 1.0:
        raise ValueError(f"--min-pass must be in [-1, 1] (PASS is an SSIM), got {settings.min_pass}")
    if settings.batch_size < 1:
        raise ValueError(f"--batch must be positive, got {settings.batch_size}")
    k_shard, n_shards = parse_shard(settings.shard)
    images, labels = load_source(settings.source, settings.split)
    if tuple(images.shape[1:]) != tuple(net.input_shape):
        raise ValueError(f"source images have shape {images.shape[1:]} but the net takes {net.input_shape}")
    chosen = select(len(images), settings.limit, settings.seed)
    batches = [chosen[i:i + settings.batch_size] for i in range(0, len(chosen), settings.batch_size)]
    mine = [b for b in range(len(batches)) if b % n_shards == k_shard]

    out.mkdir(parents=True, exist_ok=True)
    settings_file = out / "generate.json"
    if settings_file.exists():
        # settings added in later versions take their defaults in older files
        defaults = {f.name: f.default for f in fields(GenerateSettings) if f.default is not MISSING}
        previous = {**defaults, **json.loads(settings_file.read_text())}
        current = asdict(settings)
        if previous != current:
            changed = sorted(k for k in current if previous.get(k) != current[k])
            raise ValueError(f"{out} holds a generation with other settings ({', '.join(changed)}); "
                             "use another --out or the same options to resume")
    else:
        settings_file.write_text(json.dumps(asdict(settings), indent=1))

    done_file, failures_file = out / "done.txt", out / "failures.csv"
    with DatumWriter(out, metadata_columns=COLUMNS) as writer:
        done = _read_done(done_file)
        if writer.count:
            last = list(MetadataTable(out / METADATA_FILE).get([writer.count - 1]))[0]
            done |= {b for b in mine if b <= int(last["batch"])}
        todo = [b for b in mine if b not in done]
        _rewrite_failures(failures_file, todo[0] if todo else len(batches))
        stats = {"forwards": 0, "searches": 0}
        total = int(sum(len(batches[b]) for b in todo))
        for i, b in enumerate(todo):
            idx = batches[b]
            r = generate_batch(net, images[idx], labels[idx], idx, b, methods, scales, settings.min_pass)
            with open(failures_file, "a", newline="") as f:
                csv.writer(f).writerows(r.failures)
                f.flush()
                os.fsync(f.fileno())
            if len(r.images):
                writer.write(r.images, r.labels, r.metadata)
            with open(done_file, "a") as f:
                f.write(f"{b}\n")
            stats["forwards"] += r.forwards
            stats["searches"] += r.searches
            if progress:
                progress(len(idx), total, {"records": writer.count, **stats})
    summary = summarize(out, methods)
    summary["source_images"] = int(sum(len(batches[b]) for b in mine))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def summarize(out: str | os.PathLike, methods: Sequence[Method] = ()) -> dict:
    """Counts per method (records by scale, failures by status) and PASS quantiles of an output folder."""
    out = Path(out)
    per: dict[str, dict] = {m.name: {"records": {}, "failures": {}} for m in methods}
    passes: dict[str, list[float]] = {}
    for row in MetadataTable(out / METADATA_FILE).rows():
        entry = per.setdefault(row["method"], {"records": {}, "failures": {}})
        scale = f"x{float(row['scale']):g}"
        entry["records"][scale] = entry["records"].get(scale, 0) + 1
        passes.setdefault(f"{row['method']} {scale}", []).append(float(row["pass"]))
    with open(out / "failures.csv", newline="") as f:
        for row in list(csv.reader(f))[1:]:
            entry = per.setdefault(row[2], {"records": {}, "failures": {}})
            status = row[4] if not row[3] else f"{row[4]} x{row[3]}"
            entry["failures"][status] = entry["failures"].get(status, 0) + 1
    quantiles = {key: dict(zip(("min", "q25", "median", "q75", "max"),
                               np.round(np.quantile(v, [0, 0.25, 0.5, 0.75, 1]), 4).tolist()))
                 for key, v in passes.items()}
    return {"records": lmdb_count(out), "methods": per, "pass_quantiles": quantiles}


def merge_shards(shards: Sequence[str | os.PathLike], out: str | os.PathLike) -> int:
    """Merge the outputs of ``--shard K/N`` runs (K = 0..N-1) into `out`, exactly as the unsharded run.

    Records are written in batch order, which is the unsharded run's key order, so keys, Datums and
    metadata rows are identical to one `generate` over all batches; failures and done batches are
    merged likewise, and `out/generate.json` holds the settings with ``shard = "0/1"``, so `generate`
    accepts `out` as that run (e.g. to resume or extend it). Returns the number of records.
    """
    from hcgen.lmdb_io import read_raw

    paths = [Path(s) for s in shards]
    settings = []
    for p in paths:
        if not (p / "generate.json").exists():
            raise FileNotFoundError(f"{p} is not a `hcgen generate` output (no generate.json)")
        settings.append(json.loads((p / "generate.json").read_text()))
    specs = [parse_shard(s.get("shard", "0/1")) for s in settings]
    n = specs[0][1]
    got = sorted(f"{k}/{m}" for k, m in specs)
    wanted = [f"{k}/{n}" for k in range(n)]
    if got != wanted:
        raise ValueError(f"merge needs each of the shards {wanted} once, got {got}")
    common = [{k: v for k, v in s.items() if k != "shard"} for s in settings]
    if any(c != common[0] for c in common):
        raise ValueError("the shards were generated with different settings; they cannot be merged")
    out = Path(out)
    if (out / "data.mdb").exists():
        raise ValueError(f"{out} already holds an LMDB; merge into a new folder")
    order = []  # (batch, shard, record index)
    rows: list[list[dict]] = []
    for s, p in enumerate(paths):
        table = list(MetadataTable(p / METADATA_FILE).rows()) if (p / METADATA_FILE).exists() else []
        rows.append(table)
        order += [(int(r["batch"]), s, i) for i, r in enumerate(table)]
    order.sort()
    out.mkdir(parents=True)
    with DatumWriter(out, metadata_columns=COLUMNS) as writer:
        for start in range(0, len(order), 4096):
            chunk = order[start:start + 4096]
            raw = {s: dict(zip(idx, read_raw(paths[s], idx)))
                   for s in {s for _, s, _ in chunk} for idx in [[i for _, t, i in chunk if t == s]]}
            writer.write_raw([raw[s][i] for _, s, i in chunk],
                             {c: [rows[s][i][c] for _, s, i in chunk] for c in COLUMNS})
        count = writer.count
    failures = []
    for p in paths:
        with open(p / "failures.csv", newline="") as f:
            failures += list(csv.reader(f))[1:]
    failures.sort(key=lambda r: int(r[0]))  # stable: keeps each batch's own order
    with open(out / "failures.csv", "w", newline="") as f:
        csv.writer(f).writerows([list(FAILURE_COLUMNS)] + failures)
    done = sorted(set().union(*(_read_done(p / "done.txt") for p in paths)))
    (out / "done.txt").write_text("".join(f"{b}\n" for b in done))
    (out / "generate.json").write_text(json.dumps({**settings[0], "shard": "0/1"}, indent=1))
    summary = summarize(out, parse_methods(settings[0]["methods"]))
    shard_summaries = [json.loads((p / "summary.json").read_text()) for p in paths if (p / "summary.json").exists()]
    summary["source_images"] = (sum(x["source_images"] for x in shard_summaries)
                                if len(shard_summaries) == n else None)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return count
