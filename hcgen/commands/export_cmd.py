"""`hcgen export`: a generation's records as PNG class folders (torchvision ImageFolder) or one .npz file.

``--format imagefolder`` writes ``OUT/<label>/<key>.png`` (one PNG per record, lossless: the Datum's uint8
pixels; 3-channel Datums are Caffe's BGR and are written so that the PNG shows RGB) and ``OUT/metadata.csv``
(``path,key,<the generation's metadata columns>``). Class folders are the labels zero-padded to one width,
so that their sorted order (how ImageFolder numbers classes) is the label order; ImageFolder's class index
equals the label when the exported labels are 0..K-1 without a gap (the command says when they are not).

``--format npz`` writes one ``np.savez_compressed`` file: ``images`` uint8 (N, C, H, W) as stored,
``labels`` int64, ``key`` (the LMDB keys), and one array per metadata column (int64 or float64 where every
value parses as such, else str).

Both are written beside the output under a temporary name and renamed into place at the end: an interrupted
export leaves no half-written OUT. A generation that a live run is still writing is refused.
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from hcgen.core.methods import parse_methods
from hcgen.errors import BadInput
from hcgen.data.lmdb_io import iter_lmdb, lmdb_count
from hcgen.data.metadata import METADATA_FILE, MetadataTable
from hcgen.util.locks import check_not_written

FORMATS = ("imagefolder", "npz")
_RESERVED = ("images", "labels", "key")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a generation as PNG class folders (torchvision ImageFolder) or one .npz file",
        description="Export the records of an `hcgen generate` output GEN_DIR. --format imagefolder: OUT/<label>/"
        "<key>.png with class folders zero-padded so that they sort in label order (torchvision.datasets."
        "ImageFolder reads it), plus OUT/metadata.csv (path, key and every metadata column). --format npz: "
        "OUT is one .npz file with images (uint8 N,C,H,W), labels, key and one array per metadata column. "
        "OUT must not exist (or be an empty folder for imagefolder).",
    )
    p.add_argument("gen_dir", metavar="GEN_DIR", help="an `hcgen generate` output folder (with generate.json)")
    p.add_argument("--format", required=True, help="imagefolder or npz")
    p.add_argument("--out", required=True, help="folder to create (imagefolder) or .npz file to write (npz)")
    p.add_argument("--methods", default=None, help="only these methods, e.g. hc-d:1-9,fgs (default: all)")
    p.add_argument("--scales", default=None, help="only these scales, e.g. 1.05 or 1,1.10 (default: all)")
    p.add_argument("--min-pass", type=float, default=None, metavar="TAU", help="only records with PASS >= TAU")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    scales = None
    if args.scales is not None:
        try:
            scales = [float(s) for s in args.scales.split(",") if s.strip()]
        except ValueError:
            raise BadInput(f"--scales {args.scales!r}: give comma-separated numbers, e.g. 1.05 or 1,1.10") from None
    result = export(args.gen_dir, args.out, args.format, methods=args.methods, scales=scales,
                    min_pass=args.min_pass)
    print(f"exported {result['records']} records of {result['source']} to {result['out']} ({args.format})")
    if result.get("note"):
        print(result["note"])
    return 0


def generation_folder(path: str | os.PathLike) -> Path:
    """The folder holding generate.json, data.mdb and metadata.csv (PATH, or PATH/lmdb of a Table 1 stage)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder")
    if not (path / "generate.json").exists() and (path / "lmdb" / "generate.json").exists():
        path = path / "lmdb"
    if not (path / "generate.json").exists():
        raise BadInput(f"{path} is not an `hcgen generate` output (no generate.json)")
    for name in ("data.mdb", "metadata.csv"):
        if not (path / name).exists():
            raise BadInput(f"{path} has no {name}: the generation wrote no record yet")
    return path


def _selected(rows: list[dict], methods: Optional[str], scales: Optional[Sequence[float]],
              min_pass: Optional[float]) -> list[bool]:
    names = None
    if methods is not None:
        names = {m.name for m in parse_methods(methods)}
        present = {r["method"] for r in rows}
        if not names & present:
            raise BadInput(f"no records of method {', '.join(sorted(names))} "
                             f"(the generation holds {', '.join(sorted(present)) or 'no records'})")
    if min_pass is not None and not -1.0 <= min_pass <= 1.0:
        raise BadInput(f"--min-pass must be in [-1, 1] (PASS is an SSIM), got {min_pass}")
    scale_set = None if scales is None else {float(s) for s in scales}
    return [(names is None or r["method"] in names)
            and (scale_set is None or float(r["scale"]) in scale_set)
            and (min_pass is None or float(r["pass"]) >= min_pass) for r in rows]


def _column(values: list[str]) -> np.ndarray:
    """A metadata column as int64 if every value parses as an int, else float64 if every value parses as a
    float, else str (the CSV's own strings)."""
    for parse, dtype in ((int, np.int64), (float, np.float64)):
        try:
            return np.array([parse(v) for v in values], dtype)
        except (ValueError, OverflowError):
            continue
    return np.array(values, dtype=str)


def _check_out(out: Path, fmt: str) -> None:
    if fmt == "imagefolder":
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise FileExistsError(f"--out {out} exists and is not an empty folder; choose a new folder")
    elif out.exists():
        raise FileExistsError(f"--out {out} exists; choose a new .npz file")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: its parent folder {out.parent} does not exist")


def export(gen_dir: str | os.PathLike, out: str | os.PathLike, fmt: str, methods: Optional[str] = None,
           scales: Optional[Sequence[float]] = None, min_pass: Optional[float] = None) -> dict:
    """Export the (selected) records of the generation `gen_dir` to `out` in format `fmt`; returns counts."""

    if fmt not in FORMATS:
        raise BadInput(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    src = generation_folder(gen_dir)
    out = Path(out)
    if fmt == "npz" and out.suffix != ".npz":
        raise BadInput(f"--out {out}: with --format npz, --out is the .npz file to write (name it *.npz)")
    _check_out(out, fmt)
    check_not_written(src)  # a live `hcgen generate` appends to it: refused, naming the process
    table = MetadataTable(src / METADATA_FILE)
    rows = list(table.rows())
    count = lmdb_count(src)
    if len(rows) != count or any(int(r["key"]) != i for i, r in enumerate(rows)):
        raise BadInput(f"{src / METADATA_FILE} has {len(rows)} rows for {count} records; the generation is "
                         "damaged or unfinished (rerun its `hcgen generate` command to complete it)")
    columns = list(table.columns)
    clash = [c for c in columns if c in _RESERVED or c == "path"]
    if clash or "label" not in columns:
        raise BadInput(f"{src / METADATA_FILE} has columns {columns}: not an `hcgen generate` metadata table")
    keep = _selected(rows, methods, scales, min_pass)
    if not any(keep):
        raise BadInput(f"no record of {src} matches --methods/--scales/--min-pass (it holds {count} records)")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    try:
        if fmt == "imagefolder":
            n, labels = _write_imagefolder(iter_lmdb(src), rows, keep, columns, tmp)
        else:
            n, labels = _write_npz(iter_lmdb(src), rows, keep, columns, tmp)
        if out.is_dir():
            out.rmdir()  # empty (checked above); a folder that filled meanwhile makes this fail
        os.rename(tmp, out)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise
    note = ""
    present = sorted(set(labels))
    if fmt == "imagefolder" and present and present != list(range(len(present))):
        note = (f"note: the exported labels are {present[:12]}{' ...' if len(present) > 12 else ''}, not 0..K-1: "
                "ImageFolder numbers the folders 0..K-1 in sorted order; map its index back with "
                "target_transform=lambda i: int(dataset.classes[i])")
    return {"records": n, "source": str(src), "out": str(out), "labels": present, "note": note}


def _write_imagefolder(batches, rows, keep, columns, folder: Path) -> tuple[int, list[int]]:
    import cv2

    folder.mkdir()
    labels = [int(r["label"]) for r, k in zip(rows, keep) if k]
    if min(labels) < 0:
        raise BadInput(f"the label {min(labels)} is negative; ImageFolder classes need labels >= 0")
    width = len(str(max(labels)))  # one zero-padded width: folders sort in label order
    written, meta_rows = [], []
    for keys, images, datum_labels in batches:
        for key, image, label in zip(keys, images, datum_labels):
            row = rows[int(key)]
            if not keep[int(key)]:
                continue
            if int(label) != int(row["label"]):
                raise BadInput(f"record {key} has label {label} but its metadata row says {row['label']}; "
                                 "the generation is damaged")
            if image.shape[0] not in (1, 3):
                raise BadInput(f"record {key} has {image.shape[0]} channels; PNG needs 1 (grey) or 3 (BGR)")
            name = f"{int(label):0{width}d}"
            (folder / name).mkdir(exist_ok=True)
            path = f"{name}/{key}.png"
            pixels = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)  # BGR HxWx3: cv2 writes RGB
            if not cv2.imwrite(str(folder / path), np.ascontiguousarray(pixels)):
                raise OSError(f"could not write {folder / path}")
            meta_rows.append([path, key] + [row[c] for c in columns])
            written.append(int(label))
    with open(folder / "metadata.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["path", "key", *columns])
        writer.writerows(meta_rows)
        f.flush()
        os.fsync(f.fileno())
    return len(written), written


def _write_npz(batches, rows, keep, columns, tmp: Path) -> tuple[int, list[int]]:
    images, labels, keys = [], [], []
    for k, x, y in batches:
        sel = np.array([keep[int(key)] for key in k], bool)
        images.append(x[sel])
        labels.append(y[sel])
        keys += [key for key, s in zip(k, sel) if s]
    kept = [rows[int(k)] for k in keys]
    arrays = {
        "images": np.concatenate(images) if images else np.zeros((0, 0, 0, 0), np.uint8),
        "labels": np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, np.int64),
        "key": np.array(keys, dtype=str),
    }
    for c in columns:
        arrays[c] = _column([r[c] for r in kept])
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    return len(keys), arrays["labels"].tolist()
