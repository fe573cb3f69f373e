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
  generate.json      the settings, the resolved --layer, the sha256 of the weights and the prototxt,
                     the preprocessing, the hcgen version and the source's size; a rerun with the
                     same ones resumes, anything else is refused, naming what differs
  summary.json       counts per method, failures, PASS quantiles (written at the end)
  done.txt           the committed batch numbers

Work is done in batches of source images, each committed atomically (failures rows, then metadata
+ LMDB in one transaction, then the batch number in done.txt), so a killed run restarted with the
same command neither loses nor duplicates records. The sidecars are replaced atomically
(`hcgen.fileio`), a partial metadata header or failures row left by a crash is repaired on resume,
and the folder is locked (`hcgen.locks`) while a run writes it: a second run on it exits at once.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from hcgen import __version__, directions, metrics, search
from hcgen.backend import Backend
from hcgen.fileio import atomic_write, atomic_write_json, crash_point
from hcgen.lmdb_io import METADATA_FILE, DatumWriter, MetadataTable, lmdb_count, read_lmdb
from hcgen.locks import LOCK_FILE, folder_lock

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
    from hcgen.mnist import load_mnist, missing_files

    if path is not None and path.is_dir() and missing_files(path):
        raise ValueError(f"--input {path} is neither an LMDB (no data.mdb), a folder of JPEG/PNG images, nor a "
                         "folder of MNIST IDX files")
    images, labels = load_mnist(source, split)
    return images[:, None], labels.astype(np.int64)


def select(n: int, limit: Optional[int], seed: int) -> np.ndarray:
    """Source indices to use: all in order, or the first `limit` of a seeded permutation."""
    if limit is None or limit >= n:
        return np.arange(n)
    if limit <= 0:
        raise ValueError(f"--limit must be positive, got {limit}")
    return np.sort(np.random.default_rng(seed).permutation(n)[:limit])


def compute_directions(net: Backend, x: np.ndarray, y: np.ndarray, h: np.ndarray,
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


def generate_batch(net: Backend, x: np.ndarray, y: np.ndarray, source_index: np.ndarray, batch: int,
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
    framework: str = "caffe"  # or torch: model = FILE.py:FACTORY or a TorchScript file
    device: str = "cpu"


def _read_done(path: Path) -> set[int]:
    """Batch numbers in done.txt (a line cut short by a crash does not count)."""
    if not path.exists():
        return set()
    return {int(line) for line in path.read_text().splitlines(keepends=True)
            if line.endswith("\n") and line.strip().isdigit()}


def _done_batches(out: Path, mine: Sequence[int], count: int) -> set[int]:
    """The batches of `mine` committed in `out`, which holds `count` records: done.txt, plus every batch
    up to the batch of the last record (a kill between the LMDB commit and done.txt leaves its number
    out of done.txt)."""
    done = _read_done(out / "done.txt")
    if count and (out / METADATA_FILE).exists():
        last = MetadataTable(out / METADATA_FILE).get([count - 1])[0]
        if last:
            done |= {b for b in mine if b <= int(last["batch"])}
    return done & set(mine)


def _repair_done(path: Path, done: set[int]) -> None:
    """Rewrite done.txt if a crash left a line cut short or a committed batch out of it."""
    text = path.read_text() if path.exists() else ""
    recorded = _read_done(path)
    if not done <= recorded or (text and not text.endswith("\n")):
        atomic_write(path, "".join(f"{b}\n" for b in sorted(recorded | done)))


def _rewrite_failures(path: Path, resume_batch: int) -> None:
    """Keep the header and the complete failure rows of committed batches (< `resume_batch`): rows of a
    batch in flight at a crash, a row cut short and a partial header are dropped (atomic rewrite)."""
    rows = []
    if path.exists():
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    header, body = list(FAILURE_COLUMNS), rows[1:] if rows and rows[0] == list(FAILURE_COLUMNS) else rows
    kept = [r for r in body if len(r) == len(FAILURE_COLUMNS) and r[0].isdigit() and int(r[0]) < resume_batch]
    if [header] + kept != rows:
        buf = io.StringIO()
        csv.writer(buf).writerows([header] + kept)
        atomic_write(path, buf.getvalue())


def parse_shard(spec: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)/(\d+)", spec.strip())
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise ValueError(f"--shard must be K/N with 0 <= K < N, got {spec!r}")
    return int(m.group(1)), int(m.group(2))


_OWN_FILES = {"generate.json", "data.mdb", "lock.mdb", METADATA_FILE, "failures.csv", "done.txt", "summary.json",
              LOCK_FILE}


def _file_sha256(path: str | os.PathLike | None) -> Optional[str]:
    from hcgen.validate import sha256

    return sha256(path) if path is not None and Path(path).is_file() else None


def _model_file(model: str) -> str:
    """The file of a --model: the prototxt / TorchScript file itself, FILE.py of a torch FILE.py:FACTORY."""
    path, sep, _ = model.rpartition(":")
    return path if sep and path.endswith(".py") else model


def recorded_settings(net, settings: GenerateSettings, source_images: int, batches: int) -> dict:
    """What generate.json records: the options, and what decides the records beyond them (the layer the
    net resolved, the content of the weights and the prototxt, the preprocessing, the hcgen version,
    the size of the source)."""
    pre = getattr(net, "preprocessing", None)
    record = {**asdict(settings),
              "layer": getattr(net, "layer", None),
              "model_sha256": _file_sha256(_model_file(settings.model)),
              "weights_sha256": _file_sha256(settings.weights),
              "preprocessing": asdict(pre) if pre is not None and hasattr(pre, "__dataclass_fields__") else repr(pre),
              "hcgen_version": __version__, "source_images": source_images, "batches": batches}
    return json.loads(json.dumps(record))  # tuples -> lists, as read back


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 24 else text[:10] + "..." + text[-10:]


def _differences(previous: dict, current: dict) -> list[str]:
    """'name: before -> now' for each recorded setting that differs (keys an older hcgen did not record
    are not compared)."""
    defaults = {f.name: f.default for f in fields(GenerateSettings) if f.default is not MISSING}
    previous = {**defaults, **previous}
    return [f"{k}: {_short(previous[k])} there, {_short(current[k])} now"
            for k in current if k in previous and previous[k] != current[k]]


def _open_settings(out: Path, record: dict) -> None:
    """Write out/generate.json for a new run, or check that it records the same run (resume)."""
    settings_file = out / "generate.json"
    previous = None
    if settings_file.exists():
        try:
            previous = json.loads(settings_file.read_text())
        except ValueError:  # an empty or partial file (written in place by an earlier hcgen)
            if lmdb_count(out) or _read_done(out / "done.txt"):
                raise ValueError(f"{settings_file} is damaged and {out} holds records; the run cannot be "
                                 "resumed safely: use another --out or delete this one") from None
    else:
        foreign = sorted(p.name for p in out.iterdir() if p.name in _OWN_FILES - {LOCK_FILE}
                         or not p.name.startswith("."))
        if foreign:
            raise ValueError(f"{out} is not empty ({', '.join(foreign[:3])}) and holds no `hcgen generate` run "
                             "(no generate.json); use a new or empty --out")
    if previous is None:
        atomic_write_json(settings_file, record)
        return
    changed = _differences(previous, record)
    if changed:
        names = ", ".join(c.split(":")[0] for c in changed)
        raise ValueError(f"{out} holds a generation with other settings ({names}): {'; '.join(changed)}; "
                         "use another --out or the same options and files to resume")


def generate(net: Backend, settings: GenerateSettings, out: str | os.PathLike,
             progress: Optional[Callable[[int, int, dict], None]] = None) -> dict:
    """Run (or resume) a generation into the LMDB folder `out`; returns the summary (also summary.json).

    `progress(images_in_batch, images_to_do, stats)` is called after each committed batch. The folder
    is locked for the run (`hcgen.locks.FolderInUse` if another run holds it).
    """
    out = Path(out)
    methods = parse_methods(settings.methods)
    scales = parse_scales(settings.scales)
    if not -1.0 <= settings.min_pass <= 1.0:
        raise ValueError(f"--min-pass must be in [-1, 1] (PASS is an SSIM), got {settings.min_pass}")
    if settings.batch_size < 1:
        raise ValueError(f"--batch must be positive, got {settings.batch_size}")
    k_shard, n_shards = parse_shard(settings.shard)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; generate writes an LMDB folder: choose another path")
    images, labels = load_source(settings.source, settings.split)
    check_source(images, labels, net, settings.source)
    chosen = select(len(images), settings.limit, settings.seed)
    batches = [chosen[i:i + settings.batch_size] for i in range(0, len(chosen), settings.batch_size)]
    mine = [b for b in range(len(batches)) if b % n_shards == k_shard]
    record = recorded_settings(net, settings, len(images), len(batches))

    with folder_lock(out):
        _open_settings(out, record)
        done_file, failures_file = out / "done.txt", out / "failures.csv"
        with DatumWriter(out, metadata_columns=COLUMNS) as writer:
            done = _done_batches(out, mine, writer.count)
            _repair_done(done_file, done)
            todo = [b for b in mine if b not in done]
            _rewrite_failures(failures_file, todo[0] if todo else len(batches))
            stats = {"forwards": 0, "searches": 0}
            total = int(sum(len(batches[b]) for b in todo))
            for b in todo:
                idx = batches[b]
                r = generate_batch(net, images[idx], labels[idx], idx, b, methods, scales, settings.min_pass)
                with open(failures_file, "a", newline="") as f:
                    csv.writer(f).writerows(r.failures)
                    f.flush()
                    os.fsync(f.fileno())
                crash_point("generate-failures-written")
                if len(r.images):
                    writer.write(r.images, r.labels, r.metadata)
                crash_point("generate-batch-committed")
                with open(done_file, "a") as f:
                    f.write(f"{b}\n")
                stats["forwards"] += r.forwards
                stats["searches"] += r.searches
                if progress:
                    progress(len(idx), total, {"records": writer.count, **stats})
        crash_point("generate-before-summary")
        summary = summarize(out, methods)
        summary["source_images"] = int(sum(len(batches[b]) for b in mine))
        atomic_write_json(out / "summary.json", summary)
    return summary


def check_source(images: np.ndarray, labels: np.ndarray, net, source) -> None:
    """The source images fit the net's input (channels first, in words) and the labels its classes."""
    where = source if source is not None else "the MNIST source"
    if not len(images):
        raise ValueError(f"{where} holds no images")
    shape, want = tuple(images.shape[1:]), tuple(net.input_shape)
    if shape[:1] != want[:1] and len(want) == 3:
        kind = {1: "grey (1 channel)", 3: "colour (3 channels)"}
        raise ValueError(f"{where} holds {kind.get(shape[0], f'{shape[0]}-channel')} images {shape} but the net "
                         f"takes {kind.get(want[0], f'{want[0]}-channel')} input {want}; use a matching source "
                         "or net (and --preprocess)")
    if shape != want:
        raise ValueError(f"{where} holds images of shape {shape} but the net takes {want}")
    classes = getattr(net, "num_classes", None)
    if classes is not None and (labels.min() < 0 or labels.max() >= classes):
        bad = labels[(labels < 0) | (labels >= classes)]
        raise ValueError(f"{where} has labels outside the net's {classes} classes [0, {classes}), e.g. {int(bad[0])} "
                         f"({len(bad)} of {len(labels)}); a source labelled for another net?")


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


MERGE_FILE = "merge.json"  # in a merge's output until it is complete: what it merges


def _shard_settings(path: Path) -> dict:
    settings_file = path / "generate.json"
    if not path.is_dir():
        raise FileNotFoundError(f"shard folder not found: {path}")
    if not settings_file.exists():
        raise FileNotFoundError(f"{path} is not a `hcgen generate` output (no generate.json)")
    try:
        return json.loads(settings_file.read_text())
    except ValueError:
        raise ValueError(f"{settings_file} is damaged; rerun that shard's `hcgen generate` into a new folder") from None


def _missing(path: Path, settings: dict) -> Optional[tuple[int, int]]:
    """(batches lacking, batches of the shard) of a shard output, None if complete."""
    k, n = parse_shard(settings.get("shard", "0/1"))
    if "batches" not in settings:  # written by an older hcgen: only summary.json (written last) tells
        return None if (path / "summary.json").exists() else (-1, -1)
    mine = [b for b in range(settings["batches"]) if b % n == k]
    lacking = len(set(mine) - _done_batches(path, mine, lmdb_count(path)))
    return (lacking, len(mine)) if lacking else None


def _lock_if_writable(stack: contextlib.ExitStack, path: Path) -> None:
    """Lock a shard we only read (so that no run writes it meanwhile), unless it is on read-only media."""
    try:
        stack.enter_context(folder_lock(path))
    except PermissionError:
        pass


def merge_shards(shards: Sequence[str | os.PathLike], out: str | os.PathLike) -> int:
    """Merge the outputs of ``--shard K/N`` runs (K = 0..N-1) into `out`, exactly as the unsharded run.

    Every shard must be complete (ValueError naming each one that is not, and how many batches it
    lacks). Records are written in batch order, which is the unsharded run's key order, so keys,
    Datums and metadata rows are identical to one `generate` over all batches; failures and done
    batches are merged likewise, and `out/generate.json` (written last) holds the settings with
    ``shard = "0/1"``, so `generate` accepts `out` as that run (e.g. to resume or extend it). `out` may
    exist empty; a merge killed midway resumes when rerun (`out/merge.json` says what it merges).
    The shards and `out` are locked meanwhile. Returns the number of records.
    """
    from hcgen.lmdb_io import read_raw

    paths = [Path(s) for s in shards]
    if len({p.resolve() for p in paths}) != len(paths):
        raise ValueError("a shard folder is given twice")
    settings = [_shard_settings(p) for p in paths]
    specs = [parse_shard(s.get("shard", "0/1")) for s in settings]
    n = specs[0][1]
    got = sorted(f"{k}/{m}" for k, m in specs)
    wanted = [f"{k}/{n}" for k in range(n)]
    if got != wanted:
        raise ValueError(f"merge needs each of the shards {wanted} once, got {got}")
    common = [{k: v for k, v in s.items() if k != "shard"} for s in settings]
    if any(c != common[0] for c in common):
        diff = sorted(k for c in common for k in set(c) | set(common[0]) if c.get(k) != common[0].get(k))
        raise ValueError(f"the shards were generated with different settings ({', '.join(dict.fromkeys(diff))}); "
                         "they cannot be merged")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; merge writes an LMDB folder: choose another path")
    if out.resolve() in {p.resolve() for p in paths}:
        raise ValueError(f"--out {out} is one of the shards; merge into a new folder")
    merged = {**settings[0], "shard": "0/1"}
    plan = {"shards": [str(p.resolve()) for p in paths], "settings": merged}
    with contextlib.ExitStack() as stack:
        for p in sorted(paths, key=lambda p: str(p.resolve())):
            _lock_if_writable(stack, p)
        incomplete = [(p, s["shard"], m) for p, s in zip(paths, settings) for m in [_missing(p, s)] if m]
        if incomplete:
            raise ValueError("cannot merge unfinished shards: " + "; ".join(
                f"{shard} ({p}) lacks {lack} of {total} batches" if lack >= 0 else f"{shard} ({p}) has no summary.json"
                for p, shard, (lack, total) in incomplete) + "; rerun their `hcgen generate --shard` commands to finish")
        stack.enter_context(folder_lock(out))
        if (out / "generate.json").exists() and not (out / MERGE_FILE).exists():
            if json.loads((out / "generate.json").read_text()) != merged:
                raise ValueError(f"{out} holds another generation; merge into a new folder")
            if (out / "summary.json").exists():
                return lmdb_count(out)  # merged before: nothing to do
        if (out / MERGE_FILE).exists():
            if json.loads((out / MERGE_FILE).read_text()) != plan:
                raise ValueError(f"{out} holds an unfinished merge of other shards ({out / MERGE_FILE}); "
                                 "merge into a new folder")
        else:
            present = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
            if present:
                raise ValueError(f"{out} is not empty ({', '.join(present[:3])}); merge into a new or empty folder")
            atomic_write_json(out / MERGE_FILE, plan)
        count = _merge_records(paths, out, read_raw)
        failures = []
        for p in paths:
            with open(p / "failures.csv", newline="") as f:
                failures += list(csv.reader(f))[1:]
        failures.sort(key=lambda r: int(r[0]))  # stable: keeps each batch's own order
        buf = io.StringIO()
        csv.writer(buf).writerows([list(FAILURE_COLUMNS)] + failures)
        atomic_write(out / "failures.csv", buf.getvalue())
        done = sorted(set().union(*(_read_done(p / "done.txt") for p in paths)))
        atomic_write(out / "done.txt", "".join(f"{b}\n" for b in done))
        summary = summarize(out, parse_methods(settings[0]["methods"]))
        shard_summaries = [json.loads((p / "summary.json").read_text()) for p in paths if (p / "summary.json").exists()]
        summary["source_images"] = (sum(x["source_images"] for x in shard_summaries)
                                    if len(shard_summaries) == n else None)
        atomic_write_json(out / "summary.json", summary)
        atomic_write_json(out / "generate.json", merged)  # last: from here on `out` is a finished generation
        (out / MERGE_FILE).unlink()
    return count


def _merge_records(paths: Sequence[Path], out: Path, read_raw) -> int:
    """Append the shards' records to `out` in batch order, continuing after the records already there."""
    order = []  # (batch, shard, record index)
    rows: list[list[dict]] = []
    for s, p in enumerate(paths):
        count = lmdb_count(p)
        table = list(MetadataTable(p / METADATA_FILE).rows())[:count] if (p / METADATA_FILE).exists() else []
        if len(table) != count:
            raise ValueError(f"{p}: {count} records but {len(table)} metadata rows; the shard is damaged")
        rows.append(table)
        order += [(int(r["batch"]), s, i) for i, r in enumerate(table)]
    order.sort()
    with DatumWriter(out, metadata_columns=COLUMNS) as writer:
        for start in range(writer.count, len(order), 4096):
            chunk = order[start:start + 4096]
            raw = {s: dict(zip(idx, read_raw(paths[s], idx)))
                   for s in {s for _, s, _ in chunk} for idx in [[i for _, t, i in chunk if t == s]]}
            writer.write_raw([raw[s][i] for _, s, i in chunk],
                             {c: [rows[s][i][c] for _, s, i in chunk] for c in COLUMNS})
        return writer.count
