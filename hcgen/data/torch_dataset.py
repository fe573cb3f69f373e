"""`hcgen generate` output as a ``torch.utils.data.Dataset``, to fine-tune a PyTorch model with a DataLoader.

`GeneratedDataset(lmdb_dir, methods=..., scales=..., min_pass=...)` selects records of a generation folder by
its ``metadata.csv`` (method names as written there, e.g. ``HC-D-9``, or a ``--methods`` spec such as
``"hc-d:1-9"``; scales, 1 being the minimal adversarial itself and 1.05 / 1.10 the hard positives; PASS at
least ``min_pass``) and yields ``(image, label)``: the uint8 Datum as a float32 tensor (C, H, W) of pixel
values in [0, 255] (pass ``transform`` for the model's preprocessing, e.g. ``lambda x: x / 256`` for LeNet)
and the ORIGINAL label, as ``caffe train`` reads the same LMDB.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Optional

import lmdb
import numpy as np
import torch
from torch.utils.data import Dataset

from hcgen.core.methods import parse_methods
from hcgen.data.lmdb_io import decode_datum, key_for, lmdb_count
from hcgen.data.metadata import METADATA_FILE, MetadataTable
from hcgen.errors import BadInput, NoSuchRecord, NotFound

__all__ = ["GeneratedDataset"]


def _method_names(methods: str | Iterable[str]) -> list[str]:
    if isinstance(methods, str):
        return [m.name for m in parse_methods(methods)]
    return [str(m) for m in methods]


class GeneratedDataset(Dataset):
    """Records of the generation folder `lmdb_dir` (an LMDB with ``metadata.csv``), filtered.

    Parameters
    ----------
    methods : method names (``["FGS", "HC-D-9"]``) or a spec (``"fgs,hc-d:1-9"``); None: all.
    scales : e.g. ``[1.05]`` for the x1.05 hard positives only, ``[1.0]`` for the minimal adversarials;
        None: all.
    min_pass : keep records with PASS >= min_pass; None: all.
    transform : applied to each float32 pixel tensor (C, H, W).

    Attributes: ``indices`` (key indices of the selected records, in key order), ``labels`` (their
    original labels, int64), ``rows`` (their metadata rows, as strings); `images` reads many at once.
    """

    def __init__(self, lmdb_dir: str | os.PathLike, methods: str | Iterable[str] | None = None,
                 scales: Optional[Iterable[float]] = None, min_pass: Optional[float] = None,
                 transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        self.path = Path(lmdb_dir)
        if not (self.path / "data.mdb").is_file():
            raise NotFound(f"no LMDB at {self.path} (expected {self.path / 'data.mdb'}; "
                           "write one with `hcgen generate`)")
        table = self.path / METADATA_FILE
        if not table.is_file():
            raise NotFound(f"{self.path} has no {METADATA_FILE}: not an `hcgen generate` output")
        rows = list(MetadataTable(table).rows())
        count = lmdb_count(self.path)
        if len(rows) != count:
            raise BadInput(f"{table} has {len(rows)} rows for {count} records; is a generation still writing it?")
        names = None if methods is None else _method_names(methods)
        if names is not None:
            present = sorted({r["method"] for r in rows})
            unknown = [n for n in names if n not in present]
            if unknown:
                raise BadInput(f"no records of method {', '.join(unknown)} in {self.path} "
                               f"(it holds {', '.join(present) or 'no records'})")
        scale_set = None if scales is None else {float(s) for s in scales}
        if min_pass is not None and not -1.0 <= float(min_pass) <= 1.0:
            raise BadInput(f"min_pass must be in [-1, 1] (PASS is an SSIM), got {min_pass}")

        def keep(r: dict) -> bool:
            return ((names is None or r["method"] in names)
                    and (scale_set is None or float(r["scale"]) in scale_set)
                    and (min_pass is None or float(r["pass"]) >= float(min_pass)))

        selected = [r for r in rows if keep(r)]
        self.rows = selected
        self.indices = np.array([int(r["key"]) for r in selected], dtype=np.int64)
        self.labels = np.array([int(r["label"]) for r in selected], dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def images(self, positions: Iterable[int]) -> np.ndarray:
        """The selected records at `positions` as stored: uint8 (n, C, H, W), one LMDB read transaction.

        The LMDB is opened per call (about 40 us here), never kept open: py-lmdb refuses a second
        environment on one folder in a process, and an environment must not cross a DataLoader's fork.
        """
        positions = [int(p) for p in positions]
        bad = [p for p in positions if not -len(self) <= p < len(self)]
        if bad:
            raise IndexError(f"index {bad[0]} out of range for {len(self)} records")
        keys = [key_for(int(self.indices[p])) for p in positions]
        with lmdb.open(str(self.path), readonly=True, lock=False, readahead=False) as env, env.begin() as txn:
            raws = [txn.get(k.encode()) for k in keys]
        out = []
        for key, raw in zip(keys, raws):
            if raw is None:
                raise NoSuchRecord(f"{self.path} has no record {key}")
            d = decode_datum(raw)
            if d.encoded or len(d.data) != d.channels * d.height * d.width:
                raise BadInput(f"record {key} of {self.path} is not a raw uint8 Datum")
            out.append(np.frombuffer(d.data, np.uint8).reshape(d.channels, d.height, d.width))
        return np.stack(out) if out else np.zeros((0, 0, 0, 0), np.uint8)

    def _item(self, image: np.ndarray, position: int) -> tuple[torch.Tensor, int]:
        x = torch.from_numpy(image.astype(np.float32))
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.labels[position])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self._item(self.images([i])[0], i)

    def __getitems__(self, positions: list[int]) -> list[tuple[torch.Tensor, int]]:
        """A DataLoader batch in one LMDB transaction (torch calls this instead of __getitem__ per item)."""
        return [self._item(image, p) for image, p in zip(self.images(positions), positions)]
