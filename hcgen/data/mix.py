"""Shuffled training LMDBs: Caffe's Data layer reads an LMDB in key order and never shuffles, so the
"different random orderings" of the paper (Sec. 5.2) are shuffled copies made here for a seed.

`mix_lmdbs` copies every (selected) record of several LMDBs exactly once, in a seeded order, with a
metadata table naming each record's source; `mix_training_data` does so for generated LMDBs (filtered
by method, scale and PASS) and optionally the original MNIST training set, keeping its settings in
``mix.json`` so that a rerun resumes and other settings are refused.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from hcgen.data.lmdb_io import (DatumWriter, contiguous_count, key_for, lmdb_count, open_readonly, read_raw,
                                require_lmdb)
from hcgen.data.metadata import METADATA_FILE, MetadataTable
from hcgen.errors import BadInput
from hcgen.util.fileio import atomic_write_json
from hcgen.util.locks import folder_lock

__all__ = ["mix_lmdbs", "mix_training_data", "MIX_FILE"]

MIX_FILE = "mix.json"  # the settings of `mix_training_data`, beside the LMDB's data.mdb


# --- any LMDBs ------------------------------------------------------------------------------------------

def _open_metadata(path: Path) -> MetadataTable | None:
    return MetadataTable(path / METADATA_FILE) if (path / METADATA_FILE).exists() else None


def _rows_by_index(table: MetadataTable | None, count: int) -> Iterator[Mapping[str, str]]:
    """Row i for i in range(count), {} where record i has no row."""
    rows = iter(table.rows()) if table is not None else iter(())
    row = next(rows, None)
    for i in range(count):
        while row is not None and int(row["key"]) < i:
            row = next(rows, None)
        yield row if row is not None and int(row["key"]) == i else {}


def _free_name(column: str, own: Sequence[str]) -> str:
    """`column` of a source table, renamed ``parent_...`` if it collides with the columns mixing adds."""
    name = column
    while name in ("source_lmdb", "source_key") or (name != column and name in own):
        name = "parent_" + name
    return name


def mix_lmdbs(sources: Sequence[str | os.PathLike], out: str | os.PathLike, seed: int,
              include: Callable[[int, str, Mapping[str, str]], bool] | None = None,
              chunk_size: int = 4096, progress: Callable[[int], None] | None = None) -> int:
    """Write every (included) record of `sources` exactly once to `out`, in a seeded random order.

    Sources need contiguous ``%08d`` keys; output keys are fresh ``%08d``; Datum bytes are copied
    unchanged. `include(source_index, key, metadata_row)` selects records (the row is {} without
    metadata). `out` gets a metadata table with columns ``source_lmdb``, ``source_key`` and the union
    of the sources' columns (a source column that collides is renamed ``parent_<name>``). Records are
    read `chunk_size` at a time; only an index of (source, key) pairs is held in memory. Rerunning with
    the same arguments after a crash resumes.
    Returns the number of records in `out`.
    """
    paths = [Path(s) for s in sources]
    counts = []
    for p in paths:
        with open_readonly(p) as env:
            counts.append(contiguous_count(env, p))
    tables = [_open_metadata(p) for p in paths]
    src_ids, rec_ids = [], []
    for s, (n, table) in enumerate(zip(counts, tables)):
        if include is None:
            chosen = np.arange(n)
        else:
            rows = _rows_by_index(table, n)
            chosen = np.array([i for i in range(n) if include(s, key_for(i), next(rows))], np.int64)
        rec_ids.append(chosen.astype(np.int64))
        src_ids.append(np.full(len(chosen), s, np.int32))
    order = np.random.default_rng(seed).permutation(sum(len(r) for r in rec_ids))
    src_all, rec_all = np.concatenate(src_ids)[order], np.concatenate(rec_ids)[order]

    columns = ["source_lmdb", "source_key"]
    renames: list[dict[str, str]] = []
    for table in tables:
        own = table.columns if table is not None else ()
        renames.append({c: _free_name(c, own) for c in own})
        columns += [c for c in renames[-1].values() if c not in columns]

    with DatumWriter(out, metadata_columns=columns) as writer:
        if writer.count > len(order):
            raise BadInput(f"{out} already holds {writer.count} records, more than the {len(order)} to mix")
        for start in range(writer.count, len(order), chunk_size):
            src, rec = src_all[start:start + chunk_size], rec_all[start:start + chunk_size]
            values: list[bytes] = [b""] * len(src)
            meta = {c: [""] * len(src) for c in columns}
            for s in np.unique(src):
                where = np.flatnonzero(src == s)
                for j, v in zip(where, read_raw(paths[s], rec[where])):
                    values[j] = v
                rows = tables[s].get(rec[where]) if tables[s] is not None else [{}] * len(where)
                for j, i, row in zip(where, rec[where], rows):
                    meta["source_lmdb"][j] = str(paths[s])
                    meta["source_key"][j] = key_for(int(i))
                    for c, v in row.items():
                        if c != "key":
                            meta[renames[s][c]][j] = v
            writer.write_raw(values, meta)
            if progress is not None:
                progress(len(values))
        return writer.count


# --- fine-tuning data --------------------------------------------------------------------------------

def mix_training_data(generated: Sequence[str | os.PathLike], out: str | os.PathLike, seed: int, *,
                      with_mnist: str | os.PathLike | None = None, methods: Sequence[str] | None = None,
                      scales: Sequence[float] | None = None, min_pass: float | None = None,
                      max_pass: float | None = None,
                      progress: Callable[[int], None] | None = None) -> tuple[int, int]:
    """Write the selected records of the `generated` LMDBs (and all of `with_mnist`) to `out`, shuffled.

    Filters read the generation metadata (``metadata.csv``) of each generated LMDB: `methods` keeps
    records whose ``method`` is listed, `scales` those whose ``scale`` is listed, `min_pass` /
    `max_pass` those with ``min_pass <= pass < max_pass``. `with_mnist` (e.g. the 60K MNIST training
    LMDB) is never filtered. Every selected record is written exactly once, in an order fixed by `seed`.
    The settings are kept in ``out/mix.json``: rerunning with the same ones resumes (or does nothing),
    other settings are refused. Returns (records in `out`, records it held before).
    """
    sources = [Path(p) for p in generated]
    if not sources and with_mnist is None:
        raise BadInput("nothing to mix: give at least one generated LMDB (or --with-mnist)")
    if min_pass is not None and max_pass is not None and min_pass >= max_pass:
        raise BadInput(f"--min-pass {min_pass} must be below --max-pass {max_pass}")
    needs = {"method": methods is not None, "scale": scales is not None,
             "pass": min_pass is not None or max_pass is not None}
    for path in sources:
        require_lmdb(str(path), "generated", "an existing LMDB")
        wanted = [c for c, on in needs.items() if on]
        if wanted:
            table = path / METADATA_FILE
            columns = MetadataTable(table).columns if table.is_file() else ()
            lacking = [c for c in wanted if c not in columns]
            if lacking:
                where = f"columns of {table}: {', '.join(columns)}" if table.is_file() else f"no {METADATA_FILE}"
                raise BadInput(f"{path} lacks the metadata column(s) {', '.join(lacking)} "
                               f"to filter on ({where})")
    if with_mnist is not None:
        require_lmdb(str(with_mnist), "MNIST training", "--with-mnist")
    method_set = set(methods) if methods is not None else None
    scale_set = {float(s) for s in scales} if scales is not None else None

    def include(source: int, key: str, row: Mapping[str, str]) -> bool:
        if source >= len(sources):
            return True  # the original training set
        if not row:
            raise BadInput(f"{sources[source]}: record {key} has no metadata row; cannot filter it")
        if method_set is not None and row["method"] not in method_set:
            return False
        if scale_set is not None and float(row["scale"]) not in scale_set:
            return False
        if min_pass is not None and not float(row["pass"]) >= min_pass:
            return False
        return max_pass is None or float(row["pass"]) < max_pass

    settings = {"generated": [str(p.absolute()) for p in sources], "seed": seed,
                "with_mnist": str(Path(with_mnist).absolute()) if with_mnist is not None else None,
                "methods": list(methods) if methods is not None else None,
                "scales": sorted(scale_set) if scale_set is not None else None,
                "min_pass": min_pass, "max_pass": max_pass}
    with folder_lock(out):  # one writer per output: a second mix (or a Dask retry) fails at once
        before = lmdb_count(out)
        record = Path(out) / MIX_FILE
        try:
            previous = json.loads(record.read_text()) if record.is_file() else None
        except ValueError:  # empty or partial (written in place by an earlier hcgen)
            previous = None
        if before and previous != settings:
            why = "other settings" if previous is not None else f"unknown settings ({record} missing or damaged)"
            raise BadInput(f"{out} already holds {before} records mixed with {why} (see {record}); "
                           "write to another LMDB or delete it")
        if previous != settings:
            atomic_write_json(record, settings, indent=2)
        filtered = any(needs.values())
        count = mix_lmdbs(sources + ([Path(with_mnist)] if with_mnist is not None else []), out, seed,
                          include=include if filtered else None, progress=progress)
    return count, before
