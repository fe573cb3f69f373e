"""Error rates of a trained net on Datum LMDBs, overall and per generation method (Table 1, Sec. 5.2).

A record is an error when the net's top-1 class differs from the Datum's label. Generated LMDBs
carry the ORIGINAL label of the image each record was made from, so on adversarial and hard
positive sets the error rate is the fraction still misclassified. When an LMDB has a generation
sidecar (``metadata.csv``), the records are also grouped by its ``method`` column (or any columns
given); a ``label`` column there must agree with the Datum labels.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from hcgen.backends.base import Backend, check_class_labels
from hcgen.backends.factory import BackendSpec
from hcgen.data.lmdb_io import iter_lmdb
from hcgen.data.metadata import METADATA_FILE, MetadataTable
from hcgen.errors import BadInput, NotFound

ALL = "all"


@dataclass(frozen=True)
class ErrorRate:
    dataset: str
    group: str  # ALL, or the record's values of the grouping columns joined by " " (e.g. "HC-D-1")
    records: int
    errors: int

    @property
    def error_rate(self) -> float:
        return self.errors / self.records if self.records else float("nan")

    def as_dict(self) -> dict:
        return {**asdict(self), "error_rate": self.error_rate if self.records else None}


def evaluate(model: str | os.PathLike, weights: str | os.PathLike | None, datasets: Sequence[str | os.PathLike], *,
             group_by: Sequence[str] = ("method",), framework: str = "caffe", preprocess: str = "lenet",
             batch_size: int = 1000, progress: Callable[[int], None] | None = None) -> list[ErrorRate]:
    """Top-1 error of the net (`hcgen.backends.factory.BackendSpec`: a Caffe deploy prototxt + caffemodel by
    default) on each LMDB; see `error_rates`. The datasets are checked before the net is loaded."""
    if batch_size < 1:
        raise BadInput(f"--batch-size must be positive, got {batch_size}")
    _check_datasets(datasets)
    net = BackendSpec(model, weights, framework=framework, preprocess=preprocess, batch_size=batch_size).open()
    return error_rates(net, datasets, group_by=group_by, batch_size=batch_size, progress=progress)


def _check_datasets(datasets: Sequence[str | os.PathLike]) -> None:
    for path in datasets:
        if not (Path(path) / "data.mdb").is_file():
            raise NotFound(f"no LMDB at {path} (expected {Path(path) / 'data.mdb'})")


def error_rates(net: Backend, datasets: Sequence[str | os.PathLike], *, group_by: Sequence[str] = ("method",),
                batch_size: int = 1000, progress: Callable[[int], None] | None = None) -> list[ErrorRate]:
    """Top-1 error of any `Backend` on each LMDB: one ALL row per dataset, then one per group.

    Groups are the distinct values of the `group_by` columns of the dataset's ``metadata.csv``
    (datasets without the sidecar or the columns get only their ALL row). `progress(n)` is called
    after each batch of n records.
    """
    _check_datasets(datasets)
    results: list[ErrorRate] = []
    for path in datasets:
        table = MetadataTable(Path(path) / METADATA_FILE) if (Path(path) / METADATA_FILE).is_file() else None
        columns = [c for c in group_by if table is not None and c in table.columns]
        check_label = table is not None and "label" in table.columns
        groups: dict[str, list[int]] = {}  # group -> [records, errors]
        records = errors = 0
        for keys, images, labels in iter_lmdb(path, batch_size=batch_size):
            check_class_labels(labels, net.num_classes, str(path), keys)
            wrong = net.predict(images)[0] != labels
            records += len(labels)
            errors += int(wrong.sum())
            if columns or check_label:
                rows = table.get([int(k) for k in keys])
                if not all(rows):
                    key = keys[[bool(r) for r in rows].index(False)]
                    raise BadInput(f"{path}: record {key} has no row in {METADATA_FILE}")
                if check_label:
                    bad = np.flatnonzero(np.array([int(r["label"]) for r in rows]) != labels)
                    if len(bad):
                        i = bad[0]
                        raise BadInput(f"{path}: record {keys[i]} has label {labels[i]} but {METADATA_FILE} "
                                       f"says {rows[i]['label']}; the LMDB and its metadata do not "
                                       "belong together")
            if columns:
                names, which = np.unique([" ".join(r[c] for c in columns) for r in rows], return_inverse=True)
                for name, n, e in zip(names, np.bincount(which), np.bincount(which, weights=wrong)):
                    counts = groups.setdefault(str(name), [0, 0])
                    counts[0] += int(n)
                    counts[1] += int(e)
            if progress is not None:
                progress(len(labels))
        results.append(ErrorRate(str(path), ALL, records, errors))
        results += [ErrorRate(str(path), g, n, e) for g, (n, e) in sorted(groups.items())]
    return results


def format_table(results: Sequence[ErrorRate]) -> str:
    """A plain-text table: dataset, group, records, errors, error %."""
    header = ("dataset", "group", "records", "errors", "error %")
    rows = [(r.dataset if r.group == ALL else "", r.group, str(r.records), str(r.errors),
             f"{100 * r.error_rate:.3f}") for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header)] + [line(r) for r in rows])
