"""`hcgen pass A B`: PASS, SSIM, L2 and L∞ of two images, or of every pair in two directories / LMDBs."""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import sys
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from hcgen.core import metrics
from hcgen.data.lmdb_io import read_lmdb
from hcgen.errors import BadInput, NotFound
from hcgen.util.fileio import atomic_write

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm", ".tif", ".tiff", ".webp"}
COLUMNS = ("name", "pass", "ssim", "l2", "l2_per_pixel", "linf", "aligned")
_BLOCK = 4096  # pairs per pass_report call in batch mode (progress granularity)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "pass",
        help="PASS (ECC-aligned SSIM), SSIM, L2 and L-inf between original and candidate images",
        description="Score candidate images against their originals with PASS (Rozsa et al. 2016, "
        "Eq. 4): align the candidate to the original with an ECC homography, then take SSIM. "
        "A and B are two image files (PNG/JPEG/... read by OpenCV), or two directories of images "
        "paired by file name, or two Caffe Datum LMDBs paired by key; a batch writes one CSV row "
        "per pair. L2 and L-inf are of the unaligned difference, in [0, 255] units; "
        "'L2 per pixel' is L2 / (H*W).",
    )
    p.add_argument("original", help="original image file, directory of images, or LMDB")
    p.add_argument("candidate", help="candidate (e.g. adversarial) image file, directory or LMDB")
    p.add_argument("--json", action="store_true", help="print JSON (batch mode: the summary) instead of text")
    p.add_argument("--csv", default="-", metavar="FILE", help="batch mode: write the per-pair CSV here (default: stdout)")
    p.add_argument("--grey", action="store_true", help="read image files as greyscale")
    p.add_argument("--jobs", type=int, default=None, metavar="N", help="threads for ECC alignment (default: all cores)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    a, b = Path(args.original), Path(args.candidate)
    for path in (a, b):
        if not path.exists():
            raise NotFound(f"{path} does not exist")
    if a.is_file() and b.is_file():
        return _single(a, b, args)
    if a.is_dir() and b.is_dir():
        return _batch(a, b, args)
    raise BadInput(f"{a} and {b} must both be image files, or both directories (of images, or LMDBs)")


def read_image(path: Path, grey: bool = False) -> np.ndarray:
    """An 8-bit image as OpenCV reads it: (H, W) grey or (H, W, 3) BGR."""
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE if grey else cv2.IMREAD_UNCHANGED)
    if img is None:
        raise BadInput(f"{path}: OpenCV cannot read this file as an image (PNG, JPEG, BMP, ...)")
    if img.dtype != np.uint8:
        raise BadInput(f"{path}: {img.dtype} pixels; hcgen pass compares 8-bit images (values in [0, 255])")
    if img.ndim == 3 and img.shape[2] == 4:
        raise BadInput(f"{path} has an alpha channel; save it without one, or pass --grey")
    return img


def _single(a: Path, b: Path, args: argparse.Namespace) -> int:
    x, y = read_image(a, args.grey), read_image(b, args.grey)
    if x.shape != y.shape:
        raise BadInput(f"{a} is {_shape(x)} but {b} is {_shape(y)}; PASS compares images of the same size"
                       + ("" if x.shape[:2] != y.shape[:2] else " (pass --grey to compare them as grey)"))
    r = {k: v[0].item() for k, v in metrics.pass_report(x[None], y[None], n_jobs=1).items()}
    if args.json:
        print(json.dumps({"original": str(a), "candidate": str(b), **_row(r)}))
        return 0
    print(f"PASS          {r['pass']:.6f}")
    print(f"SSIM          {r['ssim']:.6f}  (unaligned)")
    print(f"L2            {r['l2']:.4f}")
    print(f"L2 per pixel  {r['l2_per_pixel']:.6f}")
    print(f"L∞            {r['linf']:g}")
    print("aligned       " + ("yes (ECC converged)" if r["aligned_ok"] else
                              "NO: ECC did not converge, PASS is plain SSIM"))
    return 0


def _batch(a: Path, b: Path, args: argparse.Namespace) -> int:
    if args.json and args.csv == "-":
        raise BadInput("--json in batch mode prints a summary; send the CSV to a file with --csv FILE")
    lmdb_a, lmdb_b = (a / "data.mdb").is_file(), (b / "data.mdb").is_file()
    if lmdb_a != lmdb_b:
        raise BadInput(f"{a} and {b} must both be LMDBs or both directories of images")
    names, xs, ys, unmatched = (_pair_lmdbs if lmdb_a else _pair_dirs)(a, b, args.grey)
    if unmatched:
        print(f"note: {unmatched} entries have no counterpart in the other {'LMDB' if lmdb_a else 'directory'}"
              " and were skipped", file=sys.stderr)
    results = _score(names, xs, ys, args.jobs)
    with (contextlib.nullcontext(sys.stdout) if args.csv == "-" else io.StringIO(newline="")) as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for name, r in zip(names, results):
            w.writerow([name, *(_fmt(v) for v in _row(r).values())])
        if args.csv != "-":
            atomic_write(args.csv, f.getvalue())  # a killed run leaves the old file, never half a CSV
    scores = np.array([r["pass"] for r in results])
    failed = sum(not r["aligned_ok"] for r in results)
    summary = {"pairs": len(names), "mean_pass": float(scores.mean()), "min_pass": float(scores.min()),
               "not_aligned": failed, "csv": args.csv}
    out = sys.stderr if args.csv == "-" else sys.stdout
    if args.json:
        print(json.dumps(summary), file=out)
    else:
        print(f"{len(names)} pairs: mean PASS {summary['mean_pass']:.6f}, min {summary['min_pass']:.6f}; "
              f"ECC did not converge for {failed} (scored with plain SSIM); CSV: {args.csv}", file=out)
    return 0


def _pair_dirs(a: Path, b: Path, grey: bool):
    fa, fb = _image_names(a), _image_names(b)
    names = sorted(fa & fb)
    if not names:
        raise BadInput(f"no image file names in common between {a} and {b}; pairs are matched by file name")
    xs, ys = [], []
    for name in tqdm(names, desc="reading", unit="pair", disable=None):
        xs.append(read_image(a / name, grey))
        ys.append(read_image(b / name, grey))
    return names, xs, ys, len(fa ^ fb)


def _image_names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}


def _pair_lmdbs(a: Path, b: Path, grey: bool):
    (ka, xa, _), (kb, xb, _) = read_lmdb(a), read_lmdb(b)
    ib = {k: i for i, k in enumerate(kb)}
    names = [k for k in ka if k in ib]
    if not names:
        raise BadInput(f"no keys in common between the LMDBs {a} and {b}; pairs are matched by key")
    ia = {k: i for i, k in enumerate(ka)}
    xs = [xa[ia[k]].transpose(1, 2, 0) for k in names]  # Caffe (C, H, W) -> (H, W, C)
    ys = [xb[ib[k]].transpose(1, 2, 0) for k in names]
    if grey:
        xs, ys = [_to_grey(x) for x in xs], [_to_grey(y) for y in ys]
    return names, xs, ys, len(ka) + len(kb) - 2 * len(names)


def _to_grey(img: np.ndarray) -> np.ndarray:
    return img[..., 0] if img.shape[2] == 1 else cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)


def _score(names: list[str], xs: list[np.ndarray], ys: list[np.ndarray], jobs: int | None) -> list[dict]:
    """pass_report per pair, batched over pairs of equal shape."""
    results: list[dict] = [{}] * len(names)
    groups: dict[tuple, list[int]] = {}
    for i, (name, x, y) in enumerate(zip(names, xs, ys)):
        if x.shape != y.shape:
            raise BadInput(f"{name}: original is {_shape(x)} but candidate is {_shape(y)}; "
                           "PASS compares images of the same size")
        groups.setdefault(x.shape, []).append(i)
    with tqdm(total=len(names), desc="scoring", unit="pair", disable=None) as bar:
        for idx in groups.values():
            for lo in range(0, len(idx), _BLOCK):
                block = idx[lo : lo + _BLOCK]
                try:
                    rep = metrics.pass_report(np.stack([xs[i] for i in block]), np.stack([ys[i] for i in block]), jobs)
                except ValueError as exc:
                    raise BadInput(f"pairs {names[block[0]]} .. {names[block[-1]]}: {exc}") from exc
                for j, i in enumerate(block):
                    results[i] = {k: v[j].item() for k, v in rep.items()}
                bar.update(len(block))
    return results


def _row(r: dict) -> dict:
    """The CSV / JSON fields (COLUMNS without the name) of one pass_report row."""
    return {"pass": r["pass"], "ssim": r["ssim"], "l2": r["l2"], "l2_per_pixel": r["l2_per_pixel"],
            "linf": r["linf"], "aligned": bool(r["aligned_ok"])}


def _fmt(v) -> str:
    return str(int(v)) if isinstance(v, bool) else f"{v:.10g}"


def _shape(img: np.ndarray) -> str:
    return "×".join(map(str, img.shape[:2])) + ("" if img.ndim == 2 else f"×{img.shape[2]}")
