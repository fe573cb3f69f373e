"""The metadata sidecar of an LMDB: ``metadata.csv``, one CSV row per record key (Caffe ignores the file).

`hcgen.data.lmdb_io.DatumWriter` appends a batch's rows and fsyncs them *before* the batch's LMDB
transaction commits, and `MetadataTable.reconcile` truncates rows beyond the LMDB's count when a writer
reopens, so the two agree after any crash.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from hcgen.errors import BadInput, NotFound
from hcgen.util.fileio import atomic_write

METADATA_FILE = "metadata.csv"


class MetadataTable:
    """CSV table keyed by LMDB key: header ``key,<columns>``, rows appended in key order, one line each.

    Open an existing file with ``MetadataTable(path)``; create one with ``MetadataTable(path, columns)``.
    Values are written with `str`; read back as strings. Values may not contain newlines.
    """

    def __init__(self, path: str | os.PathLike, columns: Sequence[str] | None = None):
        self.path = Path(path)
        self._index: tuple[np.ndarray, np.ndarray, int] | None = None
        first = b""
        if self.path.exists():
            with open(self.path, "rb") as f:
                first = f.readline()
        if self.path.exists() and (first.endswith(b"\n") or columns is None):
            header = next(csv.reader([first.decode(errors="replace")]), [])
            if not header or header[0] != "key":
                raise BadInput(f"{self.path} is not a metadata table (first header column must be 'key')")
            self.columns = tuple(header[1:])
            if columns is not None and tuple(columns) != self.columns:
                raise BadInput(f"{self.path} has columns {list(self.columns)}, not {list(columns)}; "
                               "write to a new LMDB or delete the table")
        elif columns is None:
            raise NotFound(f"no metadata table at {self.path}")
        else:  # a new table, or an empty / partial header left by a crash (no row follows one)
            self.columns = tuple(columns)
            if len(set(self.columns)) != len(self.columns) or "key" in self.columns:
                raise BadInput(f"metadata columns must be unique and not 'key': {list(self.columns)}")
            atomic_write(self.path, self._format([list(self.columns)], ["key"]))

    @staticmethod
    def _format(rows: Sequence[Sequence[object]], keys: Sequence[str]) -> str:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows([k, *r] for k, r in zip(keys, rows))
        text = buf.getvalue()
        if text.count("\n") + text.count("\r") != len(keys):
            raise BadInput("metadata values may not contain newlines")
        return text

    def _write_text(self, text: str, mode: str) -> None:
        self._index = None
        with open(self.path, mode) as f:
            f.write(text.encode())
            f.flush()
            os.fsync(f.fileno())

    def append(self, keys: Sequence[str], values: Mapping[str, Sequence[object]]) -> None:
        """Append one row per key, `values[column][i]` for row i; durable (fsync) on return."""
        if set(values) != set(self.columns):
            raise BadInput(f"metadata needs exactly the columns {list(self.columns)}, got {sorted(values)}")
        cols = [values[c] for c in self.columns]
        if any(len(c) != len(keys) for c in cols):
            raise BadInput(f"every metadata column needs {len(keys)} values")
        self._write_text(self._format(list(zip(*cols)) if cols else [()] * len(keys), keys), "ab")

    def _scan(self) -> tuple[np.ndarray, np.ndarray, int]:
        """Key indices and byte offsets of complete rows, and the offset where complete rows end (cached)."""
        if self._index is None:
            self._index = self._scan_file()
        return self._index

    def _scan_file(self) -> tuple[np.ndarray, np.ndarray, int]:
        indices, offsets = [], []
        with open(self.path, "rb") as f:
            pos = len(f.readline())
            for line in f:
                if not line.endswith(b"\n"):
                    break  # partial last row of an interrupted append
                indices.append(int(line.split(b",", 1)[0]))
                offsets.append(pos)
                pos += len(line)
        indices_a = np.array(indices, np.int64)
        if np.any(np.diff(indices_a) <= 0):
            raise BadInput(f"{self.path}: keys are not strictly increasing; the table is corrupt")
        return indices_a, np.array(offsets, np.int64), pos

    def reconcile(self, count: int) -> np.ndarray:
        """Drop rows with key index >= `count` (and a partial last row); return the indices < `count` without a row."""
        indices, offsets, end = self._scan()
        keep = int(np.searchsorted(indices, count))
        cut = int(offsets[keep]) if keep < len(offsets) else end
        if cut != self.path.stat().st_size:
            self._index = None
            with open(self.path, "r+b") as f:
                f.truncate(cut)
                os.fsync(f.fileno())
        return np.setdiff1d(np.arange(count), indices[:keep])

    def _parse(self, line: bytes) -> dict[str, str]:
        return dict(zip(("key",) + self.columns, next(csv.reader([line.decode()]))))

    def rows(self) -> Iterator[dict[str, str]]:
        """All complete rows in key order, as dicts including 'key'."""
        with open(self.path, "rb") as f:
            f.readline()
            for line in f:
                if not line.endswith(b"\n"):
                    return
                yield self._parse(line)

    def get(self, key_indices: Sequence[int]) -> list[dict[str, str]]:
        """Rows for `key_indices` in that order; {} where a record has no row."""
        indices, offsets, _ = self._scan()
        pos = np.searchsorted(indices, key_indices)
        out: list[dict[str, str]] = []
        with open(self.path, "rb") as f:
            for i, p in zip(key_indices, pos):
                if p < len(indices) and indices[p] == i:
                    f.seek(offsets[p])
                    out.append(self._parse(f.readline()))
                else:
                    out.append({})
        return out
