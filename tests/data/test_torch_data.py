"""GeneratedDataset: records of a generation folder round-trip bit-exactly, filtered by method / scale / PASS."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from hcgen.data.lmdb_io import DatumWriter
from hcgen.data.genfolder import COLUMNS
from hcgen.data.torch_dataset import GeneratedDataset

METHODS = np.array(["FGS", "FGV", "HC-D-1", "HC-D-9", "HC-S-2"])
SCALES = np.array([1.0, 1.05, 1.1])


@pytest.fixture(scope="module")
def generation(tmp_path_factory):
    """A folder as `hcgen generate` writes it (Datums + metadata.csv with its columns): 90 random records."""
    rng = np.random.default_rng(0)
    n = 90
    images = rng.integers(0, 256, size=(n, 1, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n)
    meta = {c: np.zeros(n) for c in COLUMNS}
    meta.update(source_index=np.arange(n) // 6, batch=np.zeros(n, int), label=labels,
                method=METHODS[np.arange(n) % 5], scale=SCALES[(np.arange(n) // 5) % 3],
                pred=(labels + 1) % 10, **{"pass": rng.uniform(0.5, 1.0, n)})
    out = tmp_path_factory.mktemp("gen") / "gen"
    with DatumWriter(out, metadata_columns=COLUMNS) as writer:
        writer.write(images[:40], labels[:40], {c: v[:40] for c, v in meta.items()})
        writer.write(images[40:], labels[40:], {c: v[40:] for c, v in meta.items()})
    return out, images, labels, meta


def test_round_trip_bit_exact(generation):
    out, images, labels, _ = generation
    ds = GeneratedDataset(out)
    assert len(ds) == 90
    for i in (0, 39, 40, 89, -1):
        x, y = ds[i]
        assert x.dtype == torch.float32 and x.shape == (1, 28, 28)
        np.testing.assert_array_equal(x.numpy().astype(np.uint8), images[i])
        assert (x.numpy() == images[i]).all() and y == labels[i]
    batches = list(DataLoader(ds, batch_size=32, num_workers=2))
    np.testing.assert_array_equal(torch.cat([b[0] for b in batches]).numpy(), images.astype(np.float32))
    np.testing.assert_array_equal(torch.cat([b[1] for b in batches]).numpy(), labels)
    with pytest.raises(IndexError, match="index 90 out of range for 90 records"):
        ds[90]


def test_filters(generation):
    out, images, labels, meta = generation
    method, scale, pas = meta["method"], meta["scale"], meta["pass"]
    cases = [
        (dict(methods=["HC-D-9"]), method == "HC-D-9"),
        (dict(methods="hc-d:1,9"), np.isin(method, ["HC-D-1", "HC-D-9"])),
        (dict(scales=[1.05]), scale == 1.05),
        (dict(scales=[1.0, 1.1]), scale != 1.05),
        (dict(min_pass=0.8), pas >= 0.8),
        (dict(methods="fgs,fgv", scales=[1.0], min_pass=0.6), np.isin(method, ["FGS", "FGV"]) & (scale == 1.0)
         & (pas >= 0.6)),
    ]
    for kwargs, want in cases:
        ds = GeneratedDataset(out, **kwargs)
        np.testing.assert_array_equal(ds.indices, np.flatnonzero(want), err_msg=str(kwargs))
        np.testing.assert_array_equal(ds.labels, labels[want])
        got = np.stack([ds[i][0].numpy() for i in range(len(ds))])
        np.testing.assert_array_equal(got, images[want])
        assert {r["method"] for r in ds.rows} <= set(method[want])
    half = GeneratedDataset(out, methods=["FGS"], transform=lambda x: x / 256)
    np.testing.assert_array_equal(half[0][0].numpy(), images[0] / np.float32(256))


def test_errors(generation, tmp_path):
    out = generation[0]
    with pytest.raises(ValueError, match=r"no records of method HC-D-5 in .*it holds FGS, FGV, HC-D-1, HC-D-9, HC-S-2"):
        GeneratedDataset(out, methods="hc-d:5")
    with pytest.raises(ValueError, match="unknown method 'pgd'"):
        GeneratedDataset(out, methods="pgd")
    with pytest.raises(ValueError, match=r"min_pass must be in \[-1, 1\]"):
        GeneratedDataset(out, min_pass=2)
    with pytest.raises(FileNotFoundError, match="no LMDB at"):
        GeneratedDataset(tmp_path)
    with DatumWriter(tmp_path / "plain") as writer:
        writer.write(np.zeros((2, 1, 4, 4), np.uint8), [0, 1])
    with pytest.raises(FileNotFoundError, match="has no metadata.csv: not an `hcgen generate` output"):
        GeneratedDataset(tmp_path / "plain")
