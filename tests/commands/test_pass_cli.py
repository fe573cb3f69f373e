"""`hcgen pass`: single pairs, directory and LMDB batches, errors; driven through a local argparse parser."""
from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from hcgen.core import metrics
from hcgen.commands import pass_cmd

MNIST_DIR = Path(os.environ.get("HCGEN_MNIST_DIR", Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"))


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    """The first 12 MNIST test digits, read from the IDX file without hcgen.data.mnist."""
    path = MNIST_DIR / "t10k-images-idx3-ubyte.gz"
    if not path.is_file():
        pytest.skip(f"MNIST not found at {path} (set HCGEN_MNIST_DIR)")
    raw = gzip.open(path, "rb").read()
    return np.frombuffer(raw, np.uint8, offset=16, count=12 * 784).reshape(12, 28, 28).copy()


def hcgen_pass(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="hcgen")
    pass_cmd.add_parser(parser.add_subparsers())
    args = parser.parse_args(["pass", *map(str, argv)])
    return args.func(args)


def shifted(img: np.ndarray) -> np.ndarray:
    """One image (H, W) or (H, W, C), shifted right by one pixel."""
    return np.roll(img, 1, axis=1)


def shifted_batch(imgs: np.ndarray) -> np.ndarray:
    return np.stack([shifted(img) for img in imgs])


def write_pngs(folder: Path, images, names) -> None:
    folder.mkdir(exist_ok=True)
    for img, name in zip(images, names):
        assert cv2.imwrite(str(folder / name), img)


def test_single_pair_text(tmp_path, digits, capsys):
    write_pngs(tmp_path, [digits[0], shifted(digits[0])], ["a.png", "b.png"])
    assert hcgen_pass(tmp_path / "a.png", tmp_path / "b.png") == 0
    out = capsys.readouterr().out
    (score,), ok = metrics.pass_scores(digits[:1], shifted_batch(digits[:1]))
    assert f"PASS          {score:.6f}" in out
    assert f"SSIM          {metrics.ssim(digits[0], shifted(digits[0])):.6f}  (unaligned)" in out
    assert f"L∞            {metrics.linf(digits[0], shifted(digits[0])):g}" in out
    assert "L2 per pixel" in out and "aligned       yes (ECC converged)" in out


def test_single_pair_json_and_non_convergence(tmp_path, digits, capsys):
    noise = np.random.default_rng(0).integers(0, 256, (28, 28)).astype(np.uint8)
    write_pngs(tmp_path, [digits[0], noise], ["a.png", "noise.png"])
    assert hcgen_pass(tmp_path / "a.png", tmp_path / "noise.png", "--json") == 0
    r = json.loads(capsys.readouterr().out)
    assert r["aligned"] is False
    assert r["pass"] == pytest.approx(r["ssim"], abs=1e-12) == pytest.approx(metrics.ssim(digits[0], noise))
    assert r["l2"] == pytest.approx(metrics.l2(digits[0], noise))
    assert r["l2_per_pixel"] == pytest.approx(r["l2"] / 784)
    assert set(r) == {"original", "candidate", "pass", "ssim", "l2", "l2_per_pixel", "linf", "aligned"}
    hcgen_pass(tmp_path / "a.png", tmp_path / "noise.png")
    assert "NO: ECC did not converge, PASS is plain SSIM" in capsys.readouterr().out


def test_colour_jpeg_and_grey_flag(tmp_path, digits, capsys):
    colour = np.stack([digits[0], digits[0] // 2 + 40, digits[0] // 4 + 100], axis=-1)
    write_pngs(tmp_path, [colour, shifted(colour)], ["a.jpg", "b.png"])
    hcgen_pass(tmp_path / "a.jpg", tmp_path / "b.png", "--json")
    r = json.loads(capsys.readouterr().out)
    x, y = cv2.imread(str(tmp_path / "a.jpg")), cv2.imread(str(tmp_path / "b.png"))
    assert r["pass"] == pytest.approx(metrics.pass_score(x, y), abs=1e-12)
    hcgen_pass(tmp_path / "a.jpg", tmp_path / "b.png", "--json", "--grey")
    g = json.loads(capsys.readouterr().out)
    gx, gy = cv2.imread(str(tmp_path / "a.jpg"), 0), cv2.imread(str(tmp_path / "b.png"), 0)
    assert g["pass"] == pytest.approx(metrics.pass_score(gx, gy), abs=1e-12)


def read_csv(path_or_text) -> list[dict]:
    text = Path(path_or_text).read_text() if isinstance(path_or_text, Path) else path_or_text
    return list(csv.DictReader(io.StringIO(text)))


def test_directory_batch_writes_csv(tmp_path, digits, capsys):
    names = [f"{i:03d}.png" for i in range(len(digits))]
    candidates = [shifted(d) for d in digits]
    candidates[4] = np.random.default_rng(1).integers(0, 256, (28, 28)).astype(np.uint8)
    write_pngs(tmp_path / "orig", digits, names)
    write_pngs(tmp_path / "adv", candidates, names)
    assert hcgen_pass(tmp_path / "orig", tmp_path / "adv", "--csv", tmp_path / "out.csv", "--jobs", "2") == 0
    summary = capsys.readouterr().out
    rows = read_csv(tmp_path / "out.csv")
    assert [r["name"] for r in rows] == names
    assert list(rows[0]) == list(pass_cmd.COLUMNS)
    want = metrics.pass_report(digits, np.stack(candidates))
    np.testing.assert_allclose([float(r["pass"]) for r in rows], want["pass"], atol=1e-9)
    np.testing.assert_allclose([float(r["linf"]) for r in rows], want["linf"])
    assert [r["aligned"] for r in rows] == ["1" if ok else "0" for ok in want["aligned_ok"]]
    assert rows[4]["aligned"] == "0"
    n_failed = int((~want["aligned_ok"]).sum())
    assert f"12 pairs: mean PASS {want['pass'].mean():.6f}" in summary
    assert f"ECC did not converge for {n_failed} (scored with plain SSIM)" in summary


def test_directory_batch_csv_to_stdout_json_summary_and_unmatched(tmp_path, digits, capsys):
    write_pngs(tmp_path / "orig", digits[:3], ["a.png", "b.png", "c.png"])
    write_pngs(tmp_path / "adv", [shifted(d) for d in digits[:3]], ["a.png", "b.png", "z.png"])
    hcgen_pass(tmp_path / "orig", tmp_path / "adv")
    captured = capsys.readouterr()
    assert [r["name"] for r in read_csv(captured.out)] == ["a.png", "b.png"]
    assert "note: 2 entries have no counterpart in the other directory" in captured.err
    assert "2 pairs: mean PASS" in captured.err
    hcgen_pass(tmp_path / "orig", tmp_path / "adv", "--json", "--csv", tmp_path / "o.csv")
    summary = json.loads(capsys.readouterr().out)
    assert summary["pairs"] == 2 and summary["not_aligned"] >= 0 and 0 < summary["mean_pass"] <= 1


def test_directory_batch_with_mixed_sizes(tmp_path, digits, capsys):
    big = cv2.resize(digits[1], (40, 40))
    write_pngs(tmp_path / "orig", [digits[0], big], ["a.png", "b.png"])
    write_pngs(tmp_path / "adv", [shifted(digits[0]), shifted(big)], ["a.png", "b.png"])
    hcgen_pass(tmp_path / "orig", tmp_path / "adv", "--csv", tmp_path / "o.csv")
    rows = read_csv(tmp_path / "o.csv")
    assert float(rows[1]["pass"]) == pytest.approx(metrics.pass_scores(big[None], shifted(big)[None])[0][0])


def put_datums(path: Path, images: np.ndarray) -> None:
    """A Caffe Datum LMDB written by hand (fields 1-5 as protobuf wire format; all values < 128)."""
    import lmdb

    n, c, h, w = images.shape
    with lmdb.open(str(path), map_size=1 << 24) as env, env.begin(write=True) as txn:
        for i, img in enumerate(images):
            data = img.tobytes()
            length = bytes([len(data) & 0x7F | 0x80, len(data) >> 7])  # two-byte varint (128 <= len < 16384)
            rec = bytes([0x08, c, 0x10, h, 0x18, w]) + b"\x22" + length + data + bytes([0x28, 0])
            txn.put(f"{i:08d}".encode(), rec)


def test_lmdb_batch(tmp_path, digits, capsys):
    pytest.importorskip("hcgen.data.lmdb_io")
    put_datums(tmp_path / "orig", digits[:5, None])
    put_datums(tmp_path / "adv", shifted_batch(digits[:5])[:, None])
    hcgen_pass(tmp_path / "orig", tmp_path / "adv", "--csv", tmp_path / "o.csv")
    rows = read_csv(tmp_path / "o.csv")
    assert [r["name"] for r in rows] == [f"{i:08d}" for i in range(5)]
    want, _ = metrics.pass_scores(digits[:5], shifted_batch(digits[:5]))
    np.testing.assert_allclose([float(r["pass"]) for r in rows], want, atol=1e-9)


# --------------------------------------------------------------------------- errors


def test_errors(tmp_path, digits):
    write_pngs(tmp_path, [digits[0], cv2.resize(digits[0], (30, 28))], ["a.png", "wide.png"])
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "dir").mkdir()
    write_pngs(tmp_path / "dir2", [digits[0]], ["other.png"])
    cases = [
        ((tmp_path / "missing.png", tmp_path / "a.png"), FileNotFoundError, "missing.png does not exist"),
        ((tmp_path / "a.png", tmp_path / "dir"), ValueError, "must both be image files, or both directories"),
        ((tmp_path / "a.png", tmp_path / "text.png"), ValueError, "OpenCV cannot read this file as an image"),
        ((tmp_path / "a.png", tmp_path / "wide.png"), ValueError, "a.png is 28×28 but .*wide.png is 28×30"),
        ((tmp_path / "dir", tmp_path / "dir2"), ValueError, "no image file names in common"),
        ((tmp_path / "dir", tmp_path / "dir2", "--json"), ValueError, "--json in batch mode .* --csv FILE"),
    ]
    for argv, exc, match in cases:
        with pytest.raises(exc, match=match):
            hcgen_pass(*argv)


def test_image_format_errors(tmp_path, digits):
    rgba = np.dstack([np.stack([digits[0]] * 3, -1), np.full((28, 28), 255, np.uint8)])
    cv2.imwrite(str(tmp_path / "rgba.png"), rgba)
    cv2.imwrite(str(tmp_path / "deep.png"), digits[0].astype(np.uint16) * 257)
    cv2.imwrite(str(tmp_path / "grey.png"), digits[0])
    cv2.imwrite(str(tmp_path / "bgr.png"), np.stack([digits[0]] * 3, -1))
    with pytest.raises(ValueError, match="has an alpha channel; save it without one, or pass --grey"):
        hcgen_pass(tmp_path / "rgba.png", tmp_path / "rgba.png")
    with pytest.raises(ValueError, match="uint16 pixels; hcgen pass compares 8-bit images"):
        hcgen_pass(tmp_path / "deep.png", tmp_path / "deep.png")
    with pytest.raises(ValueError, match=r"28×28 but .* 28×28×3; .*\(pass --grey to compare them as grey\)"):
        hcgen_pass(tmp_path / "grey.png", tmp_path / "bgr.png")


def test_batch_shape_mismatch_and_mixed_kinds(tmp_path, digits):
    write_pngs(tmp_path / "orig", [digits[0]], ["a.png"])
    write_pngs(tmp_path / "adv", [cv2.resize(digits[0], (30, 30))], ["a.png"])
    with pytest.raises(ValueError, match="a.png: original is 28×28 but candidate is 30×30"):
        hcgen_pass(tmp_path / "orig", tmp_path / "adv", "--csv", tmp_path / "o.csv")
    (tmp_path / "lmdb").mkdir()
    (tmp_path / "lmdb" / "data.mdb").write_bytes(b"")
    with pytest.raises(ValueError, match="must both be LMDBs or both directories of images"):
        hcgen_pass(tmp_path / "orig", tmp_path / "lmdb", "--csv", tmp_path / "o.csv")
