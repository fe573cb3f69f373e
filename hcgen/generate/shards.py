"""Sharded generation: `--shard K/N` splits a run's batches, `merge_shards` joins the shards' folders into
the folder the unsharded run would have written (the same keys, Datums, metadata rows and failures)."""
from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Optional, Sequence

from hcgen.core.methods import parse_methods
from hcgen.data import genfolder
from hcgen.data.genfolder import COLUMNS, MERGE_FILE, SETTINGS_FILE, SUMMARY_FILE
from hcgen.data.lmdb_io import DatumWriter, lmdb_count, read_raw
from hcgen.data.metadata import METADATA_FILE, MetadataTable
from hcgen.errors import BadInput, NotAFolder, NotFound
from hcgen.util.fileio import atomic_write_json
from hcgen.util.locks import folder_lock

__all__ = ["parse_shard", "merge_shards"]


def parse_shard(spec: str) -> tuple[int, int]:
    """'K/N' -> (K, N) with 0 <= K < N."""
    m = re.fullmatch(r"(\d+)/(\d+)", spec.strip())
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise BadInput(f"--shard must be K/N with 0 <= K < N, got {spec!r}")
    return int(m.group(1)), int(m.group(2))



def _shard_settings(path: Path) -> dict:
    settings_file = path / SETTINGS_FILE
    if not path.is_dir():
        raise NotFound(f"shard folder not found: {path}")
    if not settings_file.exists():
        raise NotFound(f"{path} is not a `hcgen generate` output (no {SETTINGS_FILE})")
    try:
        return json.loads(settings_file.read_text())
    except ValueError:
        raise BadInput(f"{settings_file} is damaged; rerun that shard's `hcgen generate` into a new folder") from None


def _missing(path: Path, settings: dict) -> Optional[tuple[int, int]]:
    """(batches lacking, batches of the shard) of a shard output, None if complete."""
    k, n = parse_shard(settings.get("shard", "0/1"))
    if "batches" not in settings:  # written by an older hcgen: only summary.json (written last) tells
        return None if (path / SUMMARY_FILE).exists() else (-1, -1)
    mine = [b for b in range(settings["batches"]) if b % n == k]
    lacking = len(set(mine) - genfolder.done_batches(path, mine, lmdb_count(path)))
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
    paths = [Path(s) for s in shards]
    if len({p.resolve() for p in paths}) != len(paths):
        raise BadInput("a shard folder is given twice")
    settings = [_shard_settings(p) for p in paths]
    specs = [parse_shard(s.get("shard", "0/1")) for s in settings]
    n = specs[0][1]
    got = sorted(f"{k}/{m}" for k, m in specs)
    wanted = [f"{k}/{n}" for k in range(n)]
    if got != wanted:
        raise BadInput(f"merge needs each of the shards {wanted} once, got {got}")
    common = [{k: v for k, v in s.items() if k != "shard"} for s in settings]
    if any(c != common[0] for c in common):
        diff = sorted(k for c in common for k in set(c) | set(common[0]) if c.get(k) != common[0].get(k))
        raise BadInput(f"the shards were generated with different settings ({', '.join(dict.fromkeys(diff))}); "
                       "they cannot be merged")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotAFolder(f"--out {out} is a file; merge writes an LMDB folder: choose another path")
    if out.resolve() in {p.resolve() for p in paths}:
        raise BadInput(f"--out {out} is one of the shards; merge into a new folder")
    merged = {**settings[0], "shard": "0/1"}
    plan = {"shards": [str(p.resolve()) for p in paths], "settings": merged}
    with contextlib.ExitStack() as stack:
        for p in sorted(paths, key=lambda p: str(p.resolve())):
            _lock_if_writable(stack, p)
        incomplete = [(p, s["shard"], m) for p, s in zip(paths, settings) for m in [_missing(p, s)] if m]
        if incomplete:
            raise BadInput("cannot merge unfinished shards: " + "; ".join(
                f"{shard} ({p}) lacks {lack} of {total} batches" if lack >= 0 else f"{shard} ({p}) has no {SUMMARY_FILE}"
                for p, shard, (lack, total) in incomplete) + "; rerun their `hcgen generate --shard` commands to finish")
        stack.enter_context(folder_lock(out))
        if genfolder.is_generation(out) and not (out / MERGE_FILE).exists():
            if genfolder.read_settings(out) != merged:
                raise BadInput(f"{out} holds another generation; merge into a new folder")
            if (out / SUMMARY_FILE).exists():
                return lmdb_count(out)  # merged before: nothing to do
        if (out / MERGE_FILE).exists():
            if json.loads((out / MERGE_FILE).read_text()) != plan:
                raise BadInput(f"{out} holds an unfinished merge of other shards ({out / MERGE_FILE}); "
                               "merge into a new folder")
        else:
            present = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
            if present:
                raise BadInput(f"{out} is not empty ({', '.join(present[:3])}); merge into a new or empty folder")
            atomic_write_json(out / MERGE_FILE, plan)
        count = _merge_records(paths, out)
        failures = [f for p in paths for f in genfolder.read_failures(p)]
        failures.sort(key=lambda f: f.batch)  # stable: keeps each batch's own order
        genfolder.write_failures(out, failures)
        genfolder.write_done(out, set().union(*(genfolder.read_done(p) for p in paths)))
        summary = genfolder.summarize(out, parse_methods(settings[0]["methods"]))
        shard_summaries = [genfolder.read_summary(p) for p in paths if (p / SUMMARY_FILE).exists()]
        summary["source_images"] = (sum(x["source_images"] for x in shard_summaries)
                                    if len(shard_summaries) == n else None)
        atomic_write_json(out / SUMMARY_FILE, summary)
        atomic_write_json(out / SETTINGS_FILE, merged)  # last: from here on `out` is a finished generation
        (out / MERGE_FILE).unlink()
    return count


def _merge_records(paths: Sequence[Path], out: Path) -> int:
    """Append the shards' records to `out` in batch order, continuing after the records already there."""
    order = []  # (batch, shard, record index)
    rows: list[list[dict]] = []
    for s, p in enumerate(paths):
        count = lmdb_count(p)
        table = list(MetadataTable(p / METADATA_FILE).rows())[:count] if (p / METADATA_FILE).exists() else []
        if len(table) != count:
            raise BadInput(f"{p}: {count} records but {len(table)} metadata rows; the shard is damaged")
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
