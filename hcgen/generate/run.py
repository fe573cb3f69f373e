"""`hcgen generate`: many diverse adversarial images and hard positives per input image (Sec. 4-5).

For every correctly classified source image x with label y and every requested method, a direction
eta is built (FGS, FGV, HC-D-k, HC-S-k; see `hcgen.core.directions`), the minimal adversarial integer
image along it is searched (`hcgen.core.search`), and each success gives one record at scale 1 (the
adversarial image) plus one hard positive per factor in `scales`. Every record keeps the ORIGINAL
label y (Caffe trains on them as positives of y) and carries PASS, L2, L∞, eps, predicted label.

The output folder (`hcgen.data.genfolder`) is itself the LMDB that `caffe train` reads.

Work is done in batches of source images, each committed atomically (failures rows, then metadata
+ LMDB in one transaction, then the batch number in done.txt), so a killed run restarted with the
same command neither loses nor duplicates records. The sidecars are replaced atomically
(`hcgen.util.fileio`), a partial metadata header or failures row left by a crash is repaired on resume,
and the folder is locked (`hcgen.util.locks`) while a run writes it: a second run on it exits at once.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import lmdb
import numpy as np

from hcgen import __version__
from hcgen.backends.base import Backend, check_class_labels
from hcgen.core import directions, metrics, search
from hcgen.core.methods import Method, parse_methods, parse_scales
from hcgen.data import genfolder
from hcgen.data.genfolder import COLUMNS, Failure
from hcgen.data.lmdb_io import DatumWriter, lmdb_count
from hcgen.data.sources import load_source
from hcgen.errors import BadInput, DiskFull, NotAFolder
from hcgen.generate.shards import parse_shard
from hcgen.util.fileio import atomic_write_json, crash_point, free_bytes, is_disk_full
from hcgen.util.hashing import file_sha256
from hcgen.util.locks import LOCK_FILE, folder_lock


def select(n: int, limit: Optional[int], seed: int) -> np.ndarray:
    """Source indices to use: all in order, or the first `limit` of a seeded permutation."""
    if limit is None or limit >= n:
        return np.arange(n)
    if limit <= 0:
        raise BadInput(f"--limit must be positive, got {limit}")
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


def _tensor_engine(net: Backend):
    """`hcgen.torch.engine` for a `hcgen.backends.torch.TorchNet` (whose module is loaded only if torch is: no
    import of torch here), None for every other backend (the numpy path)."""
    torch_backend = sys.modules.get("hcgen.backends.torch")
    if torch_backend is None or not isinstance(net, torch_backend.TorchNet):
        return None
    from hcgen.torch import engine  # torch: loaded only for a TorchNet, which has loaded it already

    return engine


@dataclass
class BatchResult:
    images: np.ndarray
    labels: np.ndarray
    metadata: dict
    failures: list[Failure] = field(default_factory=list)
    forwards: int = 0
    searches: int = 0


def generate_batch(net: Backend, x: np.ndarray, y: np.ndarray, source_index: np.ndarray, batch: int,
                   methods: Sequence[Method], scales: Sequence[float], min_pass: float,
                   n_jobs: Optional[int] = None) -> BatchResult:
    """All records of one batch of source images (only the correctly classified ones are searched)."""
    h = net.scores(x).astype(np.float64)
    correct = h.argmax(axis=1) == y
    skipped = [Failure(batch, int(i), genfolder.MISCLASSIFIED, "", "source_misclassified")
               for i in source_index[~correct]]
    x, y, h, source_index = x[correct], y[correct], h[correct], source_index[correct]
    if not len(x):
        return BatchResult(np.empty((0,) + x.shape[1:], np.uint8), np.empty(0, np.int64),
                           {c: np.empty(0) for c in COLUMNS}, skipped)
    engine = _tensor_engine(net)
    if engine is not None:  # a TorchNet: directions, search and hard positives on tensors, the same records
        res, hp = engine.search_batch(net, x, y, h, methods, scales)
    else:
        eta, _ = compute_directions(net, x, y, h, methods)
        res = search.adversarial_search(net.scores, x, eta, y, clean_scores=h)
        hp = search.hard_positives(net.scores, x, eta, y, res, scales) if scales else None
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
    if hp is not None:
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
    failures = skipped + [Failure(batch, int(source_index[i]), str(names[j]), "",
                                  search.Status(res.status[i, j]).name.lower())
                          for i, j in zip(*np.nonzero(~ok))]
    failures += [Failure(batch, int(meta["source_index"][i]), str(meta["method"][i]), f"{meta['scale'][i]:g}",
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


def _model_file(model: str) -> str:
    """The file of a --model: the prototxt / TorchScript file itself, FILE.py of a torch FILE.py:FACTORY."""
    path, sep, _ = model.rpartition(":")
    return path if sep and path.endswith(".py") else model


def recorded_settings(net: Backend, settings: GenerateSettings, source_images: int, batches: int) -> dict:
    """What generate.json records: the options, and what decides the records beyond them (the layer the
    net resolved, the content of the weights and the prototxt, the preprocessing, the hcgen version,
    the size of the source)."""
    pre = net.preprocessing
    record = {**asdict(settings),
              "layer": net.layer,
              "model_sha256": file_sha256(_model_file(settings.model)),
              "weights_sha256": file_sha256(settings.weights),
              "preprocessing": asdict(pre) if is_dataclass(pre) else repr(pre),
              "hcgen_version": __version__, "source_images": source_images, "batches": batches}
    return json.loads(json.dumps(record))  # tuples -> lists, as read back


def _check_provenance(net: Backend, settings: GenerateSettings) -> None:
    """A net opened from a `hcgen.backends.factory.BackendSpec` (``net.spec``) was opened from what `settings`
    records; a mismatch is a bug of the caller (ValueError), not of the user."""
    spec = getattr(net, "spec", None)
    if spec is None:
        return
    opened = spec.provenance()
    recorded = {k: getattr(settings, k) for k in opened}
    if recorded != opened:
        raise ValueError(f"generate.json would record {recorded} but the net was opened from {opened}; "
                         "build GenerateSettings with **spec.provenance()")


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
    """Write the settings file (generate.json) for a new run, or check that it records the same run (resume)."""
    settings_file = out / genfolder.SETTINGS_FILE
    previous = None
    if settings_file.exists():
        try:
            previous = json.loads(settings_file.read_text())
        except ValueError:  # an empty or partial file (written in place by an earlier hcgen)
            if lmdb_count(out) or genfolder.read_done(out):
                raise BadInput(f"{settings_file} is damaged and {out} holds records; the run cannot be "
                               "resumed safely: use another --out or delete this one") from None
    else:
        foreign = sorted(p.name for p in out.iterdir() if p.name in genfolder.OWN_FILES - {LOCK_FILE}
                         or not p.name.startswith("."))
        if foreign:
            raise BadInput(f"{out} is not empty ({', '.join(foreign[:3])}) and holds no `hcgen generate` run "
                           f"(no {genfolder.SETTINGS_FILE}); use a new or empty --out")
    if previous is None:
        atomic_write_json(settings_file, record)
        return
    changed = _differences(previous, record)
    if changed:
        names = ", ".join(c.split(":")[0] for c in changed)
        raise BadInput(f"{out} holds a generation with other settings ({names}): {'; '.join(changed)}; "
                       "use another --out or the same options and files to resume")


def generate(net: Backend, settings: GenerateSettings, out: str | os.PathLike,
             progress: Optional[Callable[[int, int, dict], None]] = None) -> dict:
    """Run (or resume) a generation into the LMDB folder `out`; returns the summary (also summary.json).

    `progress(images_in_batch, images_to_do, stats)` is called after each committed batch. The folder
    is locked for the run (`hcgen.util.locks.FolderInUse` if another run holds it).
    """
    out = Path(out)
    _check_provenance(net, settings)
    methods = parse_methods(settings.methods)
    scales = parse_scales(settings.scales)
    if not -1.0 <= settings.min_pass <= 1.0:
        raise BadInput(f"--min-pass must be in [-1, 1] (PASS is an SSIM), got {settings.min_pass}")
    if settings.batch_size < 1:
        raise BadInput(f"--batch must be positive, got {settings.batch_size}")
    k_shard, n_shards = parse_shard(settings.shard)
    if out.exists() and not out.is_dir():
        raise NotAFolder(f"--out {out} is a file; generate writes an LMDB folder: choose another path")
    images, labels = load_source(settings.source, settings.split)
    check_source(images, labels, net, settings.source)
    chosen = select(len(images), settings.limit, settings.seed)
    batches = [chosen[i:i + settings.batch_size] for i in range(0, len(chosen), settings.batch_size)]
    mine = [b for b in range(len(batches)) if b % n_shards == k_shard]
    record = recorded_settings(net, settings, len(images), len(batches))

    with folder_lock(out), _disk_full_resumes(out):
        _open_settings(out, record)
        with DatumWriter(out, metadata_columns=COLUMNS) as writer:
            done = genfolder.done_batches(out, mine, writer.count)
            genfolder.repair_done(out, done)
            todo = [b for b in mine if b not in done]
            genfolder.rewrite_failures(out, todo[0] if todo else len(batches))
            stats = {"forwards": 0, "searches": 0}
            total = int(sum(len(batches[b]) for b in todo))
            for b in todo:
                idx = batches[b]
                r = generate_batch(net, images[idx], labels[idx], idx, b, methods, scales, settings.min_pass)
                genfolder.append_failures(out, r.failures)
                crash_point("generate-failures-written")
                if len(r.images):
                    writer.write(r.images, r.labels, r.metadata)
                crash_point("generate-batch-committed")
                genfolder.append_done(out, b)
                stats["forwards"] += r.forwards
                stats["searches"] += r.searches
                if progress:
                    progress(len(idx), total, {"records": writer.count, **stats})
        crash_point("generate-before-summary")
        summary = genfolder.summarize(out, methods)
        summary["source_images"] = int(sum(len(batches[b]) for b in mine))
        atomic_write_json(out / genfolder.SUMMARY_FILE, summary)
    return summary


@contextlib.contextmanager
def _disk_full_resumes(out: Path) -> Iterator[None]:
    """A full disk while writing `out` as a `DiskFull` that says where and that the same command resumes
    (every batch is committed atomically: what was committed stays, the batch in flight is redone)."""
    try:
        yield
    except (OSError, lmdb.Error) as exc:
        if not is_disk_full(exc, out):
            raise
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise DiskFull(f"disk full: cannot write {out.absolute()} ({reason}; {free_bytes(out) / 1e6:.1f} MB free "
                       "there); free some space on that disk and rerun the same command: it resumes after the "
                       "last committed batch") from exc


def check_source(images: np.ndarray, labels: np.ndarray, net: Backend, source) -> None:
    """The source images fit the net's input (channels first, in words) and the labels its classes."""
    where = source if source is not None else "the MNIST source"
    if not len(images):
        raise BadInput(f"{where} holds no images")
    shape, want = tuple(images.shape[1:]), tuple(net.input_shape)
    if shape[:1] != want[:1] and len(want) == 3:
        kind = {1: "grey (1 channel)", 3: "colour (3 channels)"}
        raise BadInput(f"{where} holds {kind.get(shape[0], f'{shape[0]}-channel')} images {shape} but the net "
                       f"takes {kind.get(want[0], f'{want[0]}-channel')} input {want}; use a matching source "
                       "or net (and --preprocess)")
    if shape != want:
        raise BadInput(f"{where} holds images of shape {shape} but the net takes {want}")
    check_class_labels(labels, net.num_classes, str(where))
