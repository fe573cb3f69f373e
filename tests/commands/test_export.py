"""`hcgen export`: PNG class folders that torchvision's ImageFolder reads, and one .npz, both an exact round trip
of the generation's Datums, labels and metadata rows; filters; one-line errors; no partial output."""
from __future__ import annotations

import csv
import json
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hcgen.cli import main
from hcgen.data.lmdb_io import METADATA_FILE, DatumWriter, MetadataTable, read_lmdb
from hcgen.data.genfolder import COLUMNS

from tests.util.test_locks import _holder

METHODS = np.array(["FGS", "FGV", "HC-D-1", "HC-D-9", "HC-S-2"])
SCALES = np.array(["1.0", "1.05", "1.1"])


def _generation(folder: Path, n: int, channels: int, n_labels: int, seed: int = 0, label_map=None) -> Path:
    """A folder as `hcgen generate` writes it: Datums + metadata.csv with its columns, generate.json."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, channels, 9, 7), dtype=np.uint8)
    labels = rng.permutation(np.arange(n) % n_labels)
    if label_map is not None:
        labels = label_map[labels]
    meta = {c: [str(v) for v in rng.integers(0, 99, n)] for c in COLUMNS}
    meta.update(label=[str(v) for v in labels], method=list(METHODS[np.arange(n) % 5]),
                scale=list(SCALES[(np.arange(n) // 5) % 3]), eps=[repr(float(v)) for v in rng.uniform(0, 9, n)],
                **{"pass": [repr(float(v)) for v in rng.uniform(0.5, 1.0, n)]})
    with DatumWriter(folder, metadata_columns=COLUMNS) as writer:
        for s in (slice(0, n // 2), slice(n // 2, n)):
            writer.write(images[s], labels[s], {c: v[s] for c, v in meta.items()})
    (folder / "generate.json").write_text(json.dumps({"framework": "caffe"}))
    return folder


@pytest.fixture(scope="module")
def grey(tmp_path_factory) -> Path:
    return _generation(tmp_path_factory.mktemp("grey") / "gen", 60, 1, 12)


def _image_folder(root: Path):
    """What torchvision.datasets.ImageFolder does (find_classes + make_dataset + pil_loader), without it:
    classes are the sorted subfolder names numbered 0..K-1, samples the sorted files of each class."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    samples = [(p, i) for i, c in enumerate(classes) for p in sorted((root / c).iterdir()) if p.suffix == ".png"]
    return classes, samples


def _export(*args: str) -> int:
    return main(["export", *map(str, args)])


def test_imagefolder_round_trip(grey, tmp_path, capsys):
    out = tmp_path / "folder"
    assert _export(grey, "--format", "imagefolder", "--out", out) == 0
    assert capsys.readouterr().out == f"exported 60 records of {grey} to {out} (imagefolder)\n"
    keys, images, labels = read_lmdb(grey)
    classes, samples = _image_folder(out)
    assert classes == [f"{i:02d}" for i in range(12)]  # labels 0..11: zero-padded, so "10" sorts after "09"
    assert len(samples) == 60
    got = {}
    for path, index in samples:
        with Image.open(path) as im:
            assert im.mode == "L"
            got[path.stem] = (np.asarray(im), index)
    for key, image, label in zip(keys, images, labels):
        pixels, index = got[key]
        np.testing.assert_array_equal(pixels, image[0])
        assert index == label  # ImageFolder's class index is the original label
    with open(out / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    lmdb_rows = list(MetadataTable(grey / METADATA_FILE).rows())
    assert [r["path"] for r in rows] == [f"{int(lab):02d}/{k}.png" for k, lab in zip(keys, labels)]
    assert [{c: v for c, v in r.items() if c != "path"} for r in rows] == lmdb_rows  # every column, as written
    assert sorted(p.name for p in out.iterdir()) == classes + ["metadata.csv"]


def test_imagefolder_with_torchvision_if_installed(grey, tmp_path):
    datasets = pytest.importorskip("torchvision.datasets")
    out = tmp_path / "folder"
    assert _export(grey, "--format", "imagefolder", "--out", out) == 0
    ds = datasets.ImageFolder(out)
    keys, images, labels = read_lmdb(grey)
    by_key = {Path(p).stem: i for i, (p, _) in enumerate(ds.samples)}
    for key, image, label in zip(keys, images, labels):
        pil, target = ds[by_key[key]]
        assert target == label
        np.testing.assert_array_equal(np.asarray(pil)[..., 0], image[0])  # the default loader converts to RGB


def test_colour_png_shows_rgb(tmp_path, capsys):
    gen = _generation(tmp_path / "gen", 20, 3, 4)
    out = tmp_path / "folder"
    assert _export(gen, "--format", "imagefolder", "--out", out) == 0
    assert "note" not in capsys.readouterr().out  # labels 0..3, all present
    keys, images, labels = read_lmdb(gen)
    for key, image, label in zip(keys, images, labels):
        with Image.open(out / str(label) / f"{key}.png") as im:
            assert im.mode == "RGB"
            np.testing.assert_array_equal(np.asarray(im), image[::-1].transpose(1, 2, 0))  # Caffe BGR -> RGB


def test_labels_with_a_gap_are_named(tmp_path, capsys):
    gen = _generation(tmp_path / "gen", 20, 1, 4, label_map=np.array([1, 3, 3, 12]))  # labels 1, 3, 12
    out = tmp_path / "folder"
    assert _export(gen, "--format", "imagefolder", "--out", out) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[1] == ("note: the exported labels are [1, 3, 12], not 0..K-1: ImageFolder numbers the folders "
                          "0..K-1 in sorted order; map its index back with "
                          "target_transform=lambda i: int(dataset.classes[i])")
    classes, samples = _image_folder(out)
    assert classes == ["01", "03", "12"]
    keys, _, labels = read_lmdb(gen)
    label_of = dict(zip(keys, labels))
    assert all(int(classes[i]) == label_of[p.stem] for p, i in samples)


def test_npz_round_trip(grey, tmp_path):
    out = tmp_path / "gen.npz"
    assert _export(grey, "--format", "npz", "--out", out) == 0
    keys, images, labels = read_lmdb(grey)
    rows = list(MetadataTable(grey / METADATA_FILE).rows())
    with np.load(out) as d:
        assert sorted(d.files) == sorted(["images", "labels", "key", *COLUMNS])
        assert d["images"].dtype == np.uint8 and d["images"].tobytes() == images.tobytes()
        assert d["images"].shape == images.shape
        assert d["labels"].dtype == np.int64 and (d["labels"] == labels).all()
        assert d["key"].tolist() == keys
        assert d["method"].tolist() == [r["method"] for r in rows]
        assert d["source_index"].dtype == np.int64
        assert d["source_index"].tolist() == [int(r["source_index"]) for r in rows]
        for c in ("pass", "eps", "scale"):
            assert d[c].dtype == np.float64
            assert d[c].tolist() == [float(r[c]) for r in rows]  # exact: the CSV holds repr()s


def test_filters_select_what_generated_dataset_would(grey, tmp_path):
    rows = list(MetadataTable(grey / METADATA_FILE).rows())
    want = [r["key"] for r in rows if r["method"] in ("HC-D-1", "HC-D-9") and r["scale"] == "1.05"
            and float(r["pass"]) >= 0.7]
    out = tmp_path / "sel.npz"
    assert _export(grey, "--format", "npz", "--out", out, "--methods", "hc-d:1,9", "--scales", "1.05",
                   "--min-pass", "0.7") == 0
    with np.load(out) as d:
        assert d["key"].tolist() == want and len(want) > 0
        assert set(d["method"].tolist()) <= {"HC-D-1", "HC-D-9"}


def _error(capsys, *args) -> str:
    assert _export(*args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hcgen export: error: ")
    return err[len("hcgen export: error: "):].strip()


def test_errors_are_one_line(grey, tmp_path, capsys):
    plain = tmp_path / "plain"
    plain.mkdir()
    assert _error(capsys, plain, "--format", "npz", "--out", tmp_path / "a.npz") == \
        f"{plain} is not an `hcgen generate` output (no generate.json)"
    assert _error(capsys, tmp_path / "nope", "--format", "npz", "--out", tmp_path / "a.npz") == \
        f"{tmp_path / 'nope'}: no such folder"
    assert _error(capsys, grey, "--format", "tfrecord", "--out", tmp_path / "x") == \
        "unknown --format 'tfrecord'; choose one of imagefolder, npz"
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("")
    assert _error(capsys, grey, "--format", "imagefolder", "--out", full) == \
        f"--out {full} exists and is not an empty folder; choose a new folder"
    assert _error(capsys, grey, "--format", "npz", "--out", tmp_path / "a.zip") == \
        f"--out {tmp_path / 'a.zip'}: with --format npz, --out is the .npz file to write (name it *.npz)"
    (tmp_path / "old.npz").write_bytes(b"")
    assert _error(capsys, grey, "--format", "npz", "--out", tmp_path / "old.npz") == \
        f"--out {tmp_path / 'old.npz'} exists; choose a new .npz file"
    assert _error(capsys, grey, "--format", "npz", "--out", tmp_path / "no" / "a.npz") == \
        f"--out {tmp_path / 'no' / 'a.npz'}: its parent folder {tmp_path / 'no'} does not exist"
    assert _error(capsys, grey, "--format", "npz", "--out", tmp_path / "a.npz", "--methods", "hc-s:7") == \
        "no records of method HC-S-7 (the generation holds FGS, FGV, HC-D-1, HC-D-9, HC-S-2)"
    assert _error(capsys, grey, "--format", "npz", "--out", tmp_path / "a.npz", "--min-pass", "1.0") == \
        f"no record of {grey} matches --methods/--scales/--min-pass (it holds 60 records)"
    assert _error(capsys, grey, "--format", "npz", "--out", tmp_path / "a.npz", "--scales", "x1.05") == \
        "--scales 'x1.05': give comma-separated numbers, e.g. 1.05 or 1,1.10"
    empty_out = tmp_path / "empty"
    empty_out.mkdir()  # an existing empty folder is fine for imagefolder
    assert _export(grey, "--format", "imagefolder", "--out", empty_out, "--methods", "fgs") == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no partial left


def test_refuses_a_generation_a_live_run_writes(grey, tmp_path, capsys):
    proc = _holder(grey)
    try:
        msg = _error(capsys, grey, "--format", "npz", "--out", tmp_path / "a.npz")
        assert msg == (f"{grey} is being written by process {proc.pid} (host {socket.gethostname()}); "
                       "wait for that run to finish")
    finally:
        proc.kill()
        proc.wait()
    assert not (tmp_path / "a.npz").exists()


def test_an_interrupted_export_leaves_nothing(grey, tmp_path, monkeypatch):
    import cv2

    calls = []

    def failing(path, image):
        calls.append(path)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real(path, image)

    real = cv2.imwrite
    monkeypatch.setattr(cv2, "imwrite", failing)
    out = tmp_path / "folder"
    assert main(["export", str(grey), "--format", "imagefolder", "--out", str(out)]) == 130
    assert list(tmp_path.iterdir()) == []  # neither OUT nor the .partial folder
    monkeypatch.setattr(cv2, "imwrite", real)
    assert _export(grey, "--format", "imagefolder", "--out", out) == 0  # the same command then works


def test_a_table1_stage_folder_is_found_in_lmdb(grey, tmp_path):
    import shutil

    stage = tmp_path / "stage"
    stage.mkdir()
    shutil.copytree(grey, stage / "lmdb")
    assert _export(stage, "--format", "npz", "--out", tmp_path / "s.npz") == 0
    with np.load(tmp_path / "s.npz") as d:
        assert d["key"].tolist() == read_lmdb(grey)[0]
