"""The folder of one `hcgen generate` run: its file names, columns and rows, read and written in one place.

The folder is itself the LMDB that ``caffe train`` reads:

  data.mdb, lock.mdb  Caffe Datums, uint8 C×H×W, keys %08d, label = the ORIGINAL label
  metadata.csv        one row per key, `COLUMNS` (written by `hcgen.data.lmdb_io.DatumWriter`)
  failures.csv        one `Failure` per (source image, method) without a record: the search failed
                      (its status), the record fell below --min-pass ("below_min_pass", per scale), or
                      the source image itself is misclassified (method "*", "source_misclassified")
  generate.json       the recorded settings (see `hcgen.generate.run.recorded_settings`)
  summary.json        counts per method, failures, PASS quantiles (written at the end)
  done.txt            the committed batch numbers
  merge.json          only while `hcgen merge` fills the folder: what it merges

Writers commit a batch as: failure rows (appended, fsynced), then metadata + LMDB in one transaction,
then the batch number in done.txt; `done_batches`, `repair_done` and `rewrite_failures` turn whatever
a crash left into the committed state.
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterable, NamedTuple, Optional, Sequence

import numpy as np

from hcgen.core.methods import Method, parse_methods
from hcgen.data.lmdb_io import DATA_FILES, lmdb_count
from hcgen.data.metadata import METADATA_FILE, MetadataTable
from hcgen.errors import BadInput, NotFound
from hcgen.util.fileio import atomic_write
from hcgen.util.locks import LOCK_FILE

SETTINGS_FILE = "generate.json"
SUMMARY_FILE = "summary.json"
FAILURES_FILE = "failures.csv"
DONE_FILE = "done.txt"
MERGE_FILE = "merge.json"  # in a merge's output until it is complete: what it merges
OWN_FILES = {SETTINGS_FILE, *DATA_FILES, METADATA_FILE, FAILURES_FILE, DONE_FILE, SUMMARY_FILE, LOCK_FILE}

COLUMNS = ("source_index", "batch", "label", "method", "k", "hot", "scale", "eps", "pred",
           "pass", "aligned", "l2", "l2_per_pixel", "linf")
FAILURE_COLUMNS = ("batch", "source_index", "method", "scale", "status")
MISCLASSIFIED = "*"  # the method of a failure row for a source image the net misclassifies


class Failure(NamedTuple):
    """One row of failures.csv. `scale` is "" for a failed search, the factor (``f"{s:g}"``) for a record
    below --min-pass."""

    batch: int
    source_index: int
    method: str
    scale: str
    status: str

    @classmethod
    def parse(cls, row: Sequence[str]) -> Optional["Failure"]:
        """The failure of a CSV row; None for a row cut short by a crash."""
        if len(row) != len(FAILURE_COLUMNS) or not row[0].isdigit() or not row[1].lstrip("-").isdigit():
            return None
        return cls(int(row[0]), int(row[1]), row[2], row[3], row[4])

    @property
    def kind(self) -> str:
        """The status, with the scale where it is a below --min-pass row (``below_min_pass x1.05``)."""
        return self.status if not self.scale else f"{self.status} x{self.scale}"


# --- failures.csv ------------------------------------------------------------------------------------

def _failure_rows(folder: Path) -> list[list[str]]:
    path = Path(folder) / FAILURES_FILE
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.reader(f))


def read_failures(folder: str | os.PathLike) -> list[Failure]:
    """The complete failure rows of a folder, in file order ([] without failures.csv)."""
    return [f for f in map(Failure.parse, _failure_rows(Path(folder))[1:]) if f is not None]


def append_failures(folder: str | os.PathLike, failures: Iterable[Failure]) -> None:
    """Append rows to failures.csv and fsync them (the first step of a batch's commit)."""
    with open(Path(folder) / FAILURES_FILE, "a", newline="") as f:
        csv.writer(f).writerows(failures)
        f.flush()
        os.fsync(f.fileno())


def write_failures(folder: str | os.PathLike, failures: Iterable[Sequence]) -> None:
    """Replace failures.csv by the header and `failures`, atomically."""
    buf = io.StringIO()
    csv.writer(buf).writerows([list(FAILURE_COLUMNS), *failures])
    atomic_write(Path(folder) / FAILURES_FILE, buf.getvalue())


def rewrite_failures(folder: str | os.PathLike, resume_batch: int) -> None:
    """Keep the header and the complete failure rows of committed batches (< `resume_batch`): rows of a
    batch in flight at a crash, a row cut short and a partial header are dropped (atomic rewrite)."""
    rows = _failure_rows(Path(folder))
    header, body = list(FAILURE_COLUMNS), rows[1:] if rows and rows[0] == list(FAILURE_COLUMNS) else rows
    kept = [r for r in body if len(r) == len(FAILURE_COLUMNS) and r[0].isdigit() and int(r[0]) < resume_batch]
    if [header] + kept != rows:
        write_failures(folder, kept)


# --- done.txt ----------------------------------------------------------------------------------------

def read_done(folder: str | os.PathLike) -> set[int]:
    """Batch numbers in done.txt (a line cut short by a crash does not count)."""
    path = Path(folder) / DONE_FILE
    if not path.exists():
        return set()
    return {int(line) for line in path.read_text().splitlines(keepends=True)
            if line.endswith("\n") and line.strip().isdigit()}


def write_done(folder: str | os.PathLike, batches: Iterable[int]) -> None:
    atomic_write(Path(folder) / DONE_FILE, "".join(f"{b}\n" for b in sorted(batches)))


def append_done(folder: str | os.PathLike, batch: int) -> None:
    """The last step of a batch's commit."""
    with open(Path(folder) / DONE_FILE, "a") as f:
        f.write(f"{batch}\n")


def done_batches(folder: str | os.PathLike, mine: Sequence[int], count: int) -> set[int]:
    """The batches of `mine` committed in `folder`, which holds `count` records: done.txt, plus every batch
    up to the batch of the last record (a kill between the LMDB commit and done.txt leaves its number
    out of done.txt)."""
    folder = Path(folder)
    done = read_done(folder)
    if count and (folder / METADATA_FILE).exists():
        last = MetadataTable(folder / METADATA_FILE).get([count - 1])[0]
        if last:
            done |= {b for b in mine if b <= int(last["batch"])}
    return done & set(mine)


def repair_done(folder: str | os.PathLike, done: set[int]) -> None:
    """Rewrite done.txt if a crash left a line cut short or a committed batch out of it."""
    path = Path(folder) / DONE_FILE
    text = path.read_text() if path.exists() else ""
    recorded = read_done(folder)
    if not done <= recorded or (text and not text.endswith("\n")):
        write_done(folder, recorded | done)


# --- settings and summary ----------------------------------------------------------------------------

def is_generation(folder: str | os.PathLike) -> bool:
    return (Path(folder) / SETTINGS_FILE).exists()


def read_settings(folder: str | os.PathLike) -> dict:
    return json.loads((Path(folder) / SETTINGS_FILE).read_text())


def read_summary(folder: str | os.PathLike) -> dict:
    """summary.json, {} while the run has not finished."""
    path = Path(folder) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.exists() else {}


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
    for failure in read_failures(out):
        entry = per.setdefault(failure.method, {"records": {}, "failures": {}})
        entry["failures"][failure.kind] = entry["failures"].get(failure.kind, 0) + 1
    quantiles = {key: dict(zip(("min", "q25", "median", "q75", "max"),
                               np.round(np.quantile(v, [0, 0.25, 0.5, 0.75, 1]), 4).tolist()))
                 for key, v in passes.items()}
    return {"records": lmdb_count(out), "methods": per, "pass_quantiles": quantiles}


# --- a finished (or running) generation, read whole for a report --------------------------------------

_REPORT_COLUMNS = ["key", "method", "scale", "pass", "l2_per_pixel", "linf", "label", "pred", "source_index", "eps"]


@dataclass
class Generation:
    """An `hcgen generate` output folder read for a report: settings, every record's metadata, failures."""

    path: Path
    settings: dict
    summary: dict
    key: np.ndarray  # record key index
    method: np.ndarray  # str
    scale: np.ndarray
    pass_: np.ndarray
    l2_per_pixel: np.ndarray
    linf: np.ndarray
    label: np.ndarray
    pred: np.ndarray
    source: np.ndarray  # source image index
    eps: np.ndarray
    failures: list[Failure]

    @cached_property
    def methods(self) -> list[str]:
        """Method names in the order of the settings, then any others found in the records."""
        try:
            order = [m.name for m in parse_methods(self.settings.get("methods", ""))]
        except ValueError:
            order = []
        found = set(self.method.tolist()) | {f.method for f in self.failures if f.method != MISCLASSIFIED}
        return [m for m in order if m in found] + sorted(found - set(order))

    @cached_property
    def scales(self) -> list[float]:
        return sorted(set(self.scale.tolist()))


def load_generation(path: str | os.PathLike) -> Generation:
    """Read the folder written by `hcgen generate --out PATH` (or a Table 1 generation stage holding it in lmdb/)."""
    path = Path(path)
    if not is_generation(path) and is_generation(path / "lmdb"):
        path = path / "lmdb"
    if not is_generation(path):
        raise NotFound(f"{path} is not an `hcgen generate` output (no {SETTINGS_FILE})")
    if not (path / METADATA_FILE).exists():
        raise NotFound(f"{path} has no {METADATA_FILE}: the generation wrote no record yet")
    count = lmdb_count(path)
    needed = _REPORT_COLUMNS
    with open(path / METADATA_FILE, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        missing = [c for c in needed if c not in header]
        if missing:
            raise BadInput(f"{path / METADATA_FILE} lacks the columns {missing} of an `hcgen generate` output")
        where = [header.index(c) for c in needed]
        rows = [[r[i] for i in where] for r, _ in zip(reader, range(count)) if len(r) == len(header)]
    columns = dict(zip(needed, zip(*rows))) if rows else {c: () for c in needed}

    def num(name: str, dtype) -> np.ndarray:
        return np.array(columns[name], dtype=np.float64).astype(dtype)

    return Generation(
        path=path, settings=read_settings(path), summary=read_summary(path),
        key=num("key", np.int64), method=np.array(columns["method"], dtype=str), scale=num("scale", np.float64),
        pass_=num("pass", np.float64), l2_per_pixel=num("l2_per_pixel", np.float64), linf=num("linf", np.float64),
        label=num("label", np.int64), pred=num("pred", np.int64), source=num("source_index", np.int64),
        eps=num("eps", np.float64), failures=read_failures(path))
