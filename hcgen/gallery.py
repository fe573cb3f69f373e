"""HTML reports: a gallery of one `hcgen generate` output, and a page for a Table 1 work folder.

Each report is one self-contained HTML file: images are inlined as ``data:`` URIs, the figures are
matplotlib PNGs inlined likewise, the styling is a ``<style>`` block, and there is no script and no
reference to any other file or host (the Table 1 page links only to its galleries, written beside it).

Images: a record is a Caffe (C, H, W) uint8 Datum, grey or BGR. Images of at most `THUMB` pixels a side
(MNIST, CIFAR) are inlined as lossless PNGs of the record's exact pixels (colour converted to the RGB
order of image files) and drawn 2x with pixelated scaling; larger ones (ImageNet crops) as JPEG
thumbnails of 2 x `THUMB` pixels on the longer side, so that a report stays a few MB. The perturbation δ = x̃ − x is drawn
as 128 + 127 δ / max|δ| per image: grey where nothing changed, as in the paper's figures.

Sampling is seeded: the gallery of each (method, scale) shows `per_method` records drawn with the same
seed, so in a run without a PASS threshold (equal group sizes) the columns of a method's scales
show the same source images; the ten lowest and highest PASS records of each method follow.
Figures use every record (the scatter plots at most `SCATTER_POINTS` per scale, seeded).
"""
from __future__ import annotations

import base64
import csv
import hashlib
import html
import io
import json
import os
import re
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

THUMB = 64  # largest side inlined losslessly (drawn 2x); larger images: JPEG thumbnails, 2 x THUMB a side
SCATTER_POINTS = 2000
EXTREMES = 10
STAGE_MARKER = ".stage.json"
GENERATION_STAGE = re.compile(r"gen-(train|test)\d+")


# --- images ------------------------------------------------------------------------------------------

def encode_image(image: np.ndarray) -> str:
    """``data:`` URI of a Caffe (C, H, W) uint8 image: grey (C = 1) or BGR colour (C = 3), shown in RGB order.

    Images with both sides <= THUMB are exact PNGs; larger ones JPEG (quality 90) resized to 2 x THUMB
    on the longer side.
    """
    import cv2

    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected a (1 or 3, H, W) uint8 image, got {image.dtype} {image.shape}")
    pixels = image[0] if image.shape[0] == 1 else np.ascontiguousarray(image.transpose(1, 2, 0))
    h, w = pixels.shape[:2]
    if max(h, w) <= THUMB:  # cv2 takes BGR and writes an RGB file
        ok, buf = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, 6])
        mime = "png"
    else:
        f = 2 * THUMB / max(h, w)
        small = cv2.resize(pixels, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
        ok, buf = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 90])
        mime = "jpeg"
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {image.shape} image")
    return f"data:image/{mime};base64,{base64.b64encode(buf.tobytes()).decode()}"


def perturbation_image(original: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """δ = candidate − original as uint8 128 + 127 δ / max|δ| (grey = unchanged), same shape."""
    delta = candidate.astype(np.int16) - original.astype(np.int16)
    scale = 127.0 / max(int(np.abs(delta).max(initial=0)), 1)
    return np.clip(np.rint(128 + delta * scale), 0, 255).astype(np.uint8)


def _display_size(shape: Sequence[int]) -> tuple[int, int]:
    h, w = shape[-2:]
    f = 2 if max(h, w) <= THUMB else 2 * THUMB / max(h, w)
    return round(w * f), round(h * f)


def _png_figure(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return f"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"


# --- a generation run on disk ------------------------------------------------------------------------

@dataclass
class Generation:
    """An `hcgen generate` output folder read for a report: settings, every record's metadata, failures."""

    path: Path
    settings: dict
    summary: dict
    key: np.ndarray  # record key index
    method: np.ndarray  # str
    scale: np.ndarray
    pass_: np.ndarray
    l2_per_pixel: np.ndarray
    linf: np.ndarray
    label: np.ndarray
    pred: np.ndarray
    source: np.ndarray  # source image index
    eps: np.ndarray
    failures: list  # (batch, source_index, method, scale, status) strings

    @cached_property
    def methods(self) -> list[str]:
        """Method names in the order of the settings, then any others found in the records."""
        from hcgen.pipeline.generate import parse_methods

        try:
            order = [m.name for m in parse_methods(self.settings.get("methods", ""))]
        except ValueError:
            order = []
        found = set(self.method.tolist()) | {f[2] for f in self.failures if f[2] != "*"}
        return [m for m in order if m in found] + sorted(found - set(order))

    @cached_property
    def scales(self) -> list[float]:
        return sorted(set(self.scale.tolist()))


def load_generation(path: str | os.PathLike) -> Generation:
    """Read the folder written by `hcgen generate --out PATH` (or a Table 1 generation stage holding it in lmdb/)."""
    from hcgen.lmdb_io import METADATA_FILE, lmdb_count

    path = Path(path)
    if not (path / "generate.json").exists() and (path / "lmdb" / "generate.json").exists():
        path = path / "lmdb"
    if not (path / "generate.json").exists():
        raise FileNotFoundError(f"{path} is not an `hcgen generate` output (no generate.json)")
    if not (path / METADATA_FILE).exists():
        raise FileNotFoundError(f"{path} has no {METADATA_FILE}: the generation wrote no record yet")
    count = lmdb_count(path)
    columns: dict[str, list[str]] = {}
    with open(path / METADATA_FILE, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        needed = ["key", "method", "scale", "pass", "l2_per_pixel", "linf", "label", "pred", "source_index", "eps"]
        missing = [c for c in needed if c not in header]
        if missing:
            raise ValueError(f"{path / METADATA_FILE} lacks the columns {missing} of an `hcgen generate` output")
        where = [header.index(c) for c in needed]
        rows = [[r[i] for i in where] for r, _ in zip(reader, range(count)) if len(r) == len(header)]
    columns = dict(zip(needed, zip(*rows))) if rows else {c: () for c in needed}
    failures = []
    if (path / "failures.csv").exists():
        with open(path / "failures.csv", newline="") as f:
            failures = [tuple(r) for r in list(csv.reader(f))[1:] if len(r) == 5]
    summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").exists() else {}

    def num(name: str, dtype) -> np.ndarray:
        return np.array(columns[name], dtype=np.float64).astype(dtype)

    return Generation(
        path=path, settings=json.loads((path / "generate.json").read_text()), summary=summary,
        key=num("key", np.int64), method=np.array(columns["method"], dtype=str), scale=num("scale", np.float64),
        pass_=num("pass", np.float64), l2_per_pixel=num("l2_per_pixel", np.float64), linf=num("linf", np.float64),
        label=num("label", np.int64), pred=num("pred", np.int64), source=num("source_index", np.int64),
        eps=num("eps", np.float64), failures=failures)


def load_originals(settings: dict, indices: Sequence[int], source: Optional[str] = None) -> dict[int, np.ndarray]:
    """Source image index -> its (C, H, W) uint8 image, as `hcgen.pipeline.generate.load_source` gives it,
    reading only `indices` from LMDBs and image folders. `source` overrides the settings' (moved data)."""
    from hcgen import images as imageio
    from hcgen.lmdb_io import decode_datum, read_raw

    indices = sorted({int(i) for i in indices})
    src = source if source is not None else settings.get("source")
    path = Path(src) if src is not None else None
    hint = "pass --source with the folder or LMDB the generation read"
    if path is not None and not path.exists():
        raise FileNotFoundError(f"the source images of this generation, {path}, are not here; {hint}")
    if path is not None and (path / "data.mdb").exists():
        out = {}
        for i, raw in zip(indices, read_raw(path, indices)):
            d = decode_datum(raw)
            img = np.frombuffer(d.data, np.uint8).reshape(d.channels, d.height, d.width)
            if img.shape == (3, imageio.RESIZE, imageio.RESIZE):
                img = imageio.center_crop(img)
            out[i] = np.ascontiguousarray(img)
        return out
    if path is not None and imageio.is_image_folder(path):
        paths, _ = imageio.list_image_folder(path)
        return {i: imageio.caffe_crop(imageio.read_image(paths[i])) for i in indices}
    from hcgen.mnist import load_mnist

    try:
        images, _ = load_mnist(src, settings.get("split", "train"))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise FileNotFoundError(f"cannot read the MNIST source images of this generation ({exc}); {hint}") from exc
    return {i: images[i][None] for i in indices}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- HTML --------------------------------------------------------------------------------------------

CSS = """
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: #1d232b;
       background: #f6f7f9; margin: 0; }
header, main, footer { max-width: 1500px; margin: 0 auto; padding: 0 20px; }
header { padding-top: 14px; }
h1 { font-size: 22px; margin: 8px 0 2px; } h2 { font-size: 18px; margin: 26px 0 8px; border-bottom: 1px solid #ccd; }
h3 { font-size: 14px; margin: 14px 0 6px; color: #444; }
.sub { color: #556; margin: 0 0 8px; }
nav { margin: 10px 0; } nav a { display: inline-block; margin: 0 8px 4px 0; padding: 1px 7px; border-radius: 10px;
  background: #e3e8f0; color: #1d3d6b; text-decoration: none; font-size: 13px; }
table { border-collapse: collapse; background: #fff; font-size: 13px; }
th, td { border: 1px solid #d6dae0; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #eef1f5; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
code { font-size: 12px; background: #eef1f5; padding: 0 3px; border-radius: 3px; word-break: break-all; }
section.method { background: #fff; border: 1px solid #d6dae0; border-radius: 6px; padding: 4px 14px 12px;
  margin: 18px 0; }
section.method h2 { border: none; margin-top: 8px; }
.grid { display: flex; flex-wrap: wrap; gap: 4px; align-items: flex-start; }
figure.ex { margin: 0; padding: 3px; border: 1px solid #e1e4e8; border-radius: 4px; background: #fafbfc;
  display: flex; flex-direction: column; align-items: center; }
figure.ex.low { background: #fff3f0; } figure.ex.high { background: #f0f8f1; }
figure.ex img { display: block; margin-bottom: 2px; background: #000; }
img.px { image-rendering: pixelated; }
figure.ex figcaption { font-size: 10.5px; line-height: 1.25; color: #333; text-align: center;
  font-variant-numeric: tabular-nums; white-space: nowrap; }
.legend { font-size: 12px; color: #556; margin: 2px 0 6px; }
.fig { max-width: 100%; height: auto; }
.bar { background: #4a78b5; height: 10px; display: inline-block; vertical-align: middle; }
.gantt { position: relative; height: 12px; background: #eef1f5; min-width: 360px; }
.gantt span { position: absolute; top: 1px; height: 10px; background: #4a78b5; }
.note { color: #7a4b00; background: #fff6e0; border: 1px solid #f0d9a0; padding: 6px 10px; border-radius: 4px; }
footer { color: #778; font-size: 12px; padding: 20px 20px 30px; }
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _page(title: str, body: Sequence[str]) -> str:
    return "".join([
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>\n", *body, "\n</body></html>\n"])


def _table(header: Sequence[str], rows: Sequence[Sequence[object]], numeric_from: int = 1) -> str:
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>\n" if any(header) else ""
    numeric = " class=\"n\""
    body = "".join("<tr>" + "".join(
        f"<td{numeric if j >= numeric_from else ''}>{c if isinstance(c, _Html) else _e(c)}</td>"
        for j, c in enumerate(r)) + "</tr>\n" for r in rows)
    return f"<table>{head}{body}</table>"


class _Html(str):
    """A table cell that is already HTML."""


def _fmt_scale(s: float) -> str:
    return f"x{s:g}"


class _Gallery:
    """Builds the gallery of one generation (see the module docstring)."""

    def __init__(self, gen: Generation, per_method: int, seed: int, source: Optional[str]):
        if per_method < 0:
            raise ValueError(f"--per-method must be >= 0, got {per_method}")
        self.gen, self.per_method, self.seed = gen, per_method, seed
        self.picks = self._pick()
        misclassified = sorted({int(f[1]) for f in gen.failures if f[2] == "*"})
        rng = np.random.default_rng(seed)
        shown = rng.choice(misclassified, size=min(per_method, len(misclassified)), replace=False) \
            if misclassified else []
        self.misclassified, self.misclassified_shown = misclassified, sorted(int(i) for i in shown)
        wanted = np.unique(np.concatenate([v for v in self.picks.values()] + [np.zeros(0, np.int64)]))
        self.records = self._read_records(gen.key[wanted]) if len(wanted) else {}
        self.originals = load_originals(
            gen.settings, np.concatenate([gen.source[wanted], self.misclassified_shown]).astype(int), source)
        self.images = 0

    def _pick(self) -> dict[tuple, np.ndarray]:
        """(method, scale) -> record rows of its gallery; (method, 'low'|'high') -> its PASS extremes."""
        g = self.gen
        picks: dict[tuple, np.ndarray] = {}
        for m in g.methods:
            rows = np.flatnonzero(g.method == m)
            for s in g.scales:
                group = rows[g.scale[rows] == s]
                if len(group):
                    rng = np.random.default_rng(self.seed)  # same seed per group: aligned columns (docstring)
                    picks[(m, s)] = group[np.sort(rng.choice(len(group), min(self.per_method, len(group)),
                                                             replace=False))]
            order = rows[np.lexsort((g.key[rows], g.pass_[rows]))]
            picks[(m, "low")] = order[:EXTREMES]
            picks[(m, "high")] = order[::-1][:EXTREMES]
        return picks

    def _read_records(self, keys: np.ndarray) -> dict[int, np.ndarray]:
        from hcgen.lmdb_io import decode_datum, read_raw

        out = {}
        for k, raw in zip(keys.tolist(), read_raw(self.gen.path, keys.tolist())):
            d = decode_datum(raw)
            out[k] = np.frombuffer(d.data, np.uint8).reshape(d.channels, d.height, d.width)
        return out

    def _img(self, image: np.ndarray, cls: str, alt: str, **data: object) -> str:
        self.images += 1
        w, h = _display_size(image.shape)
        px = " px" if max(image.shape[-2:]) <= THUMB else ""
        attrs = "".join(f" data-{k}=\"{_e(v)}\"" for k, v in data.items())
        return (f"<img class=\"{cls}{px}\" src=\"{encode_image(image)}\" width=\"{w}\" height=\"{h}\" "
                f"alt=\"{_e(alt)}\"{attrs}>")

    def _card(self, row: int, extra: str = "", show_scale: bool = False) -> str:
        g = self.gen
        key, src = int(g.key[row]), int(g.source[row])
        x, adv = self.originals[src], self.records[key]
        kind = "adversarial" if g.scale[row] == 1 else "hard positive"
        scale = f" {_fmt_scale(g.scale[row])}" if show_scale else ""
        title = (f"{g.method[row]} {_fmt_scale(g.scale[row])}: PASS {g.pass_[row]:.4f}, L2 per pixel "
                 f"{g.l2_per_pixel[row]:.4f}, L∞ {g.linf[row]:.0f}, label {g.label[row]}, predicted {g.pred[row]}; "
                 f"key {key:08d}, source image {src}, eps {g.eps[row]:g}")
        return (f"<figure class=\"ex{extra}\" title=\"{_e(title)}\" data-key=\"{key}\">"
                + self._img(x, "orig", f"original {src}", source=src)
                + self._img(adv, "adv", f"{kind} {key:08d}", key=key)
                + self._img(perturbation_image(x, adv), "delta", f"perturbation of {key:08d}")
                + f"<figcaption><b>{g.pass_[row]:.4f}</b><br>{g.l2_per_pixel[row]:.3f} · {g.linf[row]:.0f}<br>"
                  f"{g.label[row]} → {g.pred[row]}{scale}</figcaption></figure>")

    # figures
    def _overview_figure(self) -> str:
        from matplotlib.figure import Figure

        g = self.gen
        types = [(m, s) for m in g.methods for s in g.scales if ((g.method == m) & (g.scale == s)).any()]
        if not types:
            return ""
        width = min(16, 2 + 0.42 * len(types))
        fig = Figure(figsize=(width, 3.8))
        fig.subplots_adjust(left=0.7 / width, right=1 - 0.2 / width, top=0.92, bottom=0.3)
        ax = fig.subplots()
        ax.boxplot([g.pass_[(g.method == m) & (g.scale == s)] for m, s in types], showfliers=False)
        ax.set_xticks(range(1, len(types) + 1), [m if s == 1 else f"{m} {_fmt_scale(s)}" for m, s in types],
                      rotation=90, fontsize=8)
        ax.set_ylabel("PASS")
        ax.set_title("PASS per type (boxes: quartiles, whiskers 1.5 IQR; cf. the paper's Fig. 4)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        return f"<img class=\"fig\" src=\"{_png_figure(fig)}\" alt=\"PASS per type\">"

    def _method_figure(self, m: str) -> str:
        from matplotlib.figure import Figure

        g = self.gen
        fig = Figure(figsize=(10, 2.6))
        fig.subplots_adjust(left=0.07, right=0.99, top=0.9, bottom=0.18, wspace=0.18)
        hist, scatter = fig.subplots(1, 2)
        rows = np.flatnonzero(g.method == m)
        lo = float(min(g.pass_[rows].min(), 0.9)) if len(rows) else 0.0
        bins = np.linspace(lo, 1.0, 41)
        rng = np.random.default_rng(self.seed)
        for j, s in enumerate(g.scales):
            group = rows[g.scale[rows] == s]
            if not len(group):
                continue
            label = f"{_fmt_scale(s)} ({len(group)})"
            hist.hist(g.pass_[group], bins=bins, histtype="step", lw=1.4, color=f"C{j}", label=label)
            shown = group if len(group) <= SCATTER_POINTS else rng.choice(group, SCATTER_POINTS, replace=False)
            scatter.scatter(g.pass_[shown], g.linf[shown], s=12 if len(shown) < 300 else 4, alpha=0.6,
                            color=f"C{j}", label=label, lw=0)
        hist.set_xlabel("PASS")
        hist.set_ylabel("records")
        hist.set_title(f"{m}: PASS histogram", fontsize=10)
        scatter.set_xlabel("PASS")
        scatter.set_ylabel("L∞")
        scatter.set_title(f"{m}: L∞ against PASS", fontsize=10)
        for ax in (hist, scatter):
            ax.grid(alpha=0.3)
        if len(rows):
            hist.legend(fontsize=8, loc="upper left")
        return f"<img class=\"fig\" src=\"{_png_figure(fig)}\" alt=\"{_e(m)}: PASS histogram and L∞ against PASS\">"

    # sections
    def settings_section(self) -> str:
        import hcgen

        g, s = self.gen, self.gen.settings

        def file_cell(key: str) -> _Html:
            """The path, and the sha256 the run recorded (older runs: of the file as it is now)."""
            path = Path(str(s.get(key, "")))
            if s.get(f"{key}_sha256"):
                digest = f"sha256 {s[f'{key}_sha256']} (recorded by the run)"
            else:
                digest = f"sha256 {_sha256(path)} (of the file now)" if path.is_file() else "(not found here: no digest)"
            return _Html(f"<code>{_e(path)}</code><br>{_e(digest)}")

        tau = s.get("min_pass", -1.0)
        net = ", ".join(f"{k} {s[k]}" for k in ("framework", "layer", "device") if s.get(k))
        rows = [
            ("model", file_cell("model")), ("weights", file_cell("weights")),
            ("source images", _Html(f"<code>{_e(s.get('source') or 'MNIST search path')}</code> ({_e(s.get('split'))} "
                                    f"split for MNIST), {_e(g.summary.get('source_images', '?'))} used"
                                    + (f" (--limit {_e(s['limit'])}, seed {_e(s.get('seed'))})" if s.get("limit") else ""))),
            ("methods", s.get("methods")), ("hard-positive scales", s.get("scales") or "none"),
            ("τ (--min-pass)", f"{tau:g}" + (" (keep all)" if tau <= -1 else "")),
            ("preprocessing, batch, shard", f"{s.get('preprocess', 'lenet')}, {s.get('batch_size')}, {s.get('shard', '0/1')}"
             + (f"; {net}" if net else "")),
            ("records", f"{len(g.key)}"),
            ("hcgen", f"{s['hcgen_version']} wrote the run, {hcgen.__version__} this report" if s.get("hcgen_version")
             else hcgen.__version__),
        ]
        return "<h2 id=\"settings\">Settings</h2>" + _table(["", ""], rows, numeric_from=99)

    def overview_section(self) -> str:
        g = self.gen
        scales = g.scales
        fails: dict[str, int] = {}
        for f in g.failures:
            fails[f[2]] = fails.get(f[2], 0) + 1
        rows = []
        for m in g.methods:
            sel = g.method == m
            cells = [_Html(f"<a href=\"#m-{_e(m)}\">{_e(m)}</a>")]
            for s in scales:
                p = g.pass_[sel & (g.scale == s)]
                cells += [len(p), f"{np.median(p):.4f}" if len(p) else "-", f"{p.min():.4f}" if len(p) else "-"]
            cells.append(fails.get(m, 0))
            rows.append(cells)
        header = ["method"] + [f"{_fmt_scale(s)} {h}" for s in scales for h in ("records", "median PASS", "min PASS")]
        return ("<h2 id=\"overview\">Overview</h2>" + _table(header + ["failures"], rows)
                + f"<p>{self._overview_figure()}</p>")

    def method_section(self, m: str) -> str:
        g = self.gen
        parts = [f"<section class=\"method\" id=\"m-{_e(m)}\" data-method=\"{_e(m)}\"><h2>{_e(m)}</h2>",
                 f"<p>{self._method_figure(m)}</p>",
                 "<p class=\"legend\">Each example, top to bottom: the original, the adversarial image or hard "
                 "positive, the perturbation (grey = unchanged, scaled to its own max |δ|); under it <b>PASS</b>, "
                 "L2 per pixel · L∞ (0-255 units), true → predicted class. Hover for the key, source image and eps.</p>"]
        for s in g.scales:
            rows = self.picks.get((m, s))
            if rows is None:
                continue
            n = int(((g.method == m) & (g.scale == s)).sum())
            what = "minimal adversarials" if s == 1 else f"hard positives {_fmt_scale(s)}"
            parts.append(f"<h3>{_e(what)}: {len(rows)} of {n}, seeded random (seed {self.seed})</h3>")
            parts.append(f"<div class=\"grid sample\" data-method=\"{_e(m)}\" data-scale=\"{s:g}\">"
                         + "".join(self._card(r) for r in rows) + "</div>")
        for which, cls, word in (("low", " low", "lowest"), ("high", " high", "highest")):
            rows = self.picks[(m, which)]
            if len(rows):
                parts.append(f"<h3>{len(rows)} {word} PASS (all scales)</h3>")
                parts.append(f"<div class=\"grid extremes {which}\" data-method=\"{_e(m)}\">"
                             + "".join(self._card(r, cls, show_scale=True) for r in rows) + "</div>")
        if not (g.method == m).any():
            parts.append("<p>No records: every search of this method failed or fell below τ (see Failures).</p>")
        return "".join(parts) + "</section>\n"

    def failures_section(self) -> str:
        g = self.gen
        counts: dict[str, dict[str, int]] = {}
        for _, _, method, scale, status in g.failures:
            name = status if not scale else f"{status} x{scale}"
            counts.setdefault(method, {})[name] = counts.setdefault(method, {}).get(name, 0) + 1
        statuses = sorted({s for c in counts.values() for s in c})
        parts = ["<h2 id=\"failures\">Failures</h2>",
                 "<p>One row of <code>failures.csv</code> per (source image, method) without a record: the search "
                 "failed (its status), the record fell below τ (<code>below_min_pass</code>, per scale), or the "
                 "net misclassifies the source image itself (method <code>*</code>, never searched).</p>"]
        if not counts:
            return "".join(parts) + "<p>No failures.</p>"
        order = [m for m in ["*"] + g.methods if m in counts] + sorted(set(counts) - {"*", *g.methods})
        parts.append(_table(["method"] + statuses, [[m] + [counts[m].get(s, "") for s in statuses] for m in order]))
        if self.misclassified:
            parts.append(f"<h3>Misclassified source images: {len(self.misclassified_shown)} of "
                         f"{len(self.misclassified)}</h3><div class=\"grid misclassified\">")
            for i in self.misclassified_shown:
                parts.append(f"<figure class=\"ex\" title=\"source image {i}\">"
                             + self._img(self.originals[i], "orig", f"misclassified source {i}", source=i)
                             + f"<figcaption>source {i}</figcaption></figure>")
            parts.append("</div>")
        return "".join(parts)

    def html(self, title: str) -> str:
        g = self.gen
        nav = "".join(f"<a href=\"#m-{_e(m)}\">{_e(m)}</a>" for m in g.methods)
        body = [
            f"<header><h1>{_e(title)}</h1><p class=\"sub\"><code>{_e(g.path)}</code>: {len(g.key)} records, "
            f"{len(g.methods)} methods, scales {', '.join(_fmt_scale(s) for s in g.scales) or '-'}; "
            f"{len(g.failures)} failure{'s' * (len(g.failures) != 1)}</p>",
            f"<nav><a href=\"#settings\">settings</a><a href=\"#overview\">overview</a>{nav}"
            "<a href=\"#failures\">failures</a></nav></header><main>",
            self.settings_section(), self.overview_section(),
            *[self.method_section(m) for m in g.methods],
            self.failures_section(),
            "</main><footer>Written by <code>hcgen report</code>; one self-contained file (no scripts, no "
            "external resources). Rozsa, Rudd, Boult: Adversarial Diversity and Hard Positive Generation, "
            "CVPRW 2016.</footer>",
        ]
        return _page(title, body)


@dataclass
class Written:
    path: Path
    bytes: int
    images: int
    seconds: float
    records: int = 0


def write_generation_report(gen_dir: str | os.PathLike, out: str | os.PathLike, per_method: int = 12,
                            seed: int = 0, source: Optional[str] = None, title: Optional[str] = None) -> Written:
    """Write the gallery of the `hcgen generate` output `gen_dir` to the HTML file `out`."""
    t0 = time.perf_counter()
    gen = load_generation(gen_dir)
    gallery = _Gallery(gen, per_method, seed, source)
    text = gallery.html(title or f"hcgen report: {gen.path.name}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return Written(out, out.stat().st_size, gallery.images, time.perf_counter() - t0, len(gen.key))


# --- a Table 1 work folder ---------------------------------------------------------------------------

def _inline_markdown(text: str) -> str:
    text = _e(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def markdown_html(text: str) -> str:
    """The markdown subset `hcgen table1` writes (headings, paragraphs, tables, bullets, bold, code) as HTML."""
    out, table, items = [], [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                table.append(cells)
            continue
        if line.startswith("- "):
            items.append(f"<li>{_inline_markdown(line[2:])}</li>")
            continue
        if items:
            out.append("<ul>" + "".join(items) + "</ul>")
            items = []
        if table:
            head = "".join(f"<th>{_inline_markdown(c)}</th>" for c in table[0])
            rows = "".join("<tr>" + "".join(f"<td>{_inline_markdown(c)}</td>" for c in r) + "</tr>\n"
                           for r in table[1:])
            out.append(f"<table class=\"table1\"><tr>{head}</tr>\n{rows}</table>")
            table = []
        if line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")) + 1, 4)
            out.append(f"<h{level}>{_inline_markdown(line.lstrip('#').strip())}</h{level}>")
        elif line.strip():
            out.append(f"<p>{_inline_markdown(line)}</p>")
    return "\n".join(out)


def find_stage_folder(work: Path) -> Path:
    """`work` if it holds stage folders (``*/.stage.json``), else its one subfolder that does (a profile)."""
    if not work.is_dir():
        raise FileNotFoundError(f"no folder {work}")
    if any(work.glob(f"*/{STAGE_MARKER}")):
        return work
    profiles = sorted(p for p in work.iterdir() if p.is_dir() and any(p.glob(f"*/{STAGE_MARKER}")))
    if len(profiles) == 1:
        return profiles[0]
    if profiles:
        raise ValueError(f"{work} holds the Table 1 work folders of several profiles "
                         f"({', '.join(p.name for p in profiles)}); pass one, e.g. {profiles[0]}")
    raise ValueError(f"{work} is neither an `hcgen generate` output (no generate.json) nor a Table 1 work "
                     f"folder (no stage folders with a {STAGE_MARKER})")


@dataclass
class StageInfo:
    folder: Path
    name: str
    marker: Optional[dict]  # None: not finished


def read_stages(work: Path) -> list[StageInfo]:
    """Every stage folder of a Table 1 work folder with its marker (finished) or without (unfinished)."""
    stages = []
    for folder in sorted(p for p in work.iterdir() if p.is_dir()):
        marker = folder / STAGE_MARKER
        if marker.exists():
            info = json.loads(marker.read_text())
            stages.append(StageInfo(folder, str(info.get("stage", folder.name)), info))
        elif re.fullmatch(r".+-[0-9a-f]{10}", folder.name):
            stages.append(StageInfo(folder, folder.name.rsplit("-", 1)[0], None))
    return sorted(stages, key=lambda s: (s.marker is None, (s.marker or {}).get("started", 0), s.name))


def _results_folder(work: Path, results: Optional[str | os.PathLike]) -> tuple[Optional[Path], list[Path]]:
    if results is not None:
        candidates = [Path(results)]
    else:
        candidates = [work / "results", work, work.parent / "results", Path("results") / f"table1-{work.name}"]
    return next((c for c in candidates if (c / "table1.md").exists()), None), candidates


def _duration(seconds: float) -> str:
    if seconds >= 5400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.1f} s"


def _stage_times_section(stages: list[StageInfo], galleries: dict[Path, str]) -> str:
    done = [s for s in stages if s.marker is not None and s.marker.get("seconds") is not None]
    timed = [s for s in done if s.marker.get("started") is not None]
    t0 = min((s.marker["started"] for s in timed), default=0.0)
    t1 = max((s.marker["started"] + s.marker["seconds"] for s in timed), default=0.0)
    span = max(t1 - t0, 1e-9)
    longest = max((s.marker["seconds"] for s in done), default=1.0) or 1.0
    total = sum(s.marker["seconds"] for s in done)
    rows = []
    for s in stages:
        m = s.marker or {}
        seconds = m.get("seconds")
        if seconds is not None and m.get("started") is not None and len(timed) == len(done):
            left, width = 100 * (m["started"] - t0) / span, max(100 * seconds / span, 0.3)
            bar = _Html(f"<div class=\"gantt\"><span style=\"left:{left:.2f}%;width:{width:.2f}%\"></span></div>")
        elif seconds is not None:
            bar = _Html(f"<span class=\"bar\" style=\"width:{max(1, round(300 * seconds / longest))}px\"></span>")
        else:
            bar = _Html("not finished")
        name = _Html(f"<a href=\"{_e(galleries[s.folder])}\">{_e(s.name)}</a>" if s.folder in galleries else _e(s.name))
        rows.append([name, _Html(f"<code>{_e(s.folder.name)}</code>"), _duration(seconds) if seconds is not None else "-",
                     m.get("host", "-"), bar])
    hosts = sorted({str(s.marker.get("host")) for s in done})
    wall = f"; first start to last end {_duration(t1 - t0)}" if timed else ""
    return ("<h2 id=\"stages\">Stage times</h2>"
            f"<p>{len(done)} finished stages ({len(stages) - len(done)} unfinished), {_duration(total)} of stage "
            f"work{wall}, on {', '.join(hosts) or '-'}. The bars place each stage on the run's time line "
            "(stages run side by side under <code>--dask</code>); times are each stage's own run, from its "
            f"<code>{STAGE_MARKER}</code>.</p>"
            + _table(["stage", "folder", "time", "host", "time line"], rows, numeric_from=2))


def write_table1_report(work_dir: str | os.PathLike, out: str | os.PathLike, results: Optional[str | os.PathLike] = None,
                        per_method: int = 12, seed: int = 0) -> list[Written]:
    """The page of a Table 1 work folder (table beside the paper's, figures, stage times) at `out`, and one
    gallery per generation stage beside it (``<out stem>-<stage folder>.html``), linked from the page.
    Returns the files written, the page first."""
    t0 = time.perf_counter()
    work = find_stage_folder(Path(work_dir))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stages = read_stages(work)
    found, looked = _results_folder(work, results)
    if results is not None and found is None:
        raise FileNotFoundError(f"no table1.md in --results {results}")
    written: list[Written] = []
    galleries: dict[Path, str] = {}
    gen_rows = []
    for s in stages:
        if s.marker is None or not GENERATION_STAGE.fullmatch(s.name) or not (s.folder / "lmdb" / "generate.json").exists():
            continue
        name = f"{out.stem}-{s.folder.name}.html"
        w = write_generation_report(s.folder / "lmdb", out.parent / name, per_method, seed,
                                    title=f"hcgen report: Table 1 stage {s.name}")
        written.append(w)
        galleries[s.folder] = name
        gen_rows.append([_Html(f"<a href=\"{_e(name)}\">{_e(s.name)}</a>"), _Html(f"<code>{_e(s.folder.name)}</code>"),
                         w.records, f"{w.bytes / 1e6:.1f} MB"])

    profile = work.name
    body = [f"<header><h1>hcgen report: Table 1 ({_e(profile)})</h1><p class=\"sub\">work folder "
            f"<code>{_e(work)}</code>; results <code>{_e(found if found else 'not found')}</code></p>"
            "<nav><a href=\"#table1\">Table 1</a><a href=\"#figures\">figures</a><a href=\"#generations\">generations</a>"
            "<a href=\"#stages\">stage times</a></nav></header><main><div id=\"table1\"></div>"]
    if found is None:
        body.append(f"<p class=\"note\">No <code>table1.md</code> in {', '.join(f'<code>{_e(c)}</code>' for c in looked)}: "
                    "the run has not finished, or its results are elsewhere (pass <code>--results DIR</code>, the "
                    "folder <code>hcgen table1 --results</code> wrote).</p>")
    else:
        body.append(markdown_html((found / "table1.md").read_text()))
        captions = {}
        if (found / "README.md").exists():
            for line in (found / "README.md").read_text().splitlines():
                m = re.match(r"- `([^`]+\.png)`: (.*)", line)
                if m:
                    captions[m.group(1)] = m.group(2)
        body.append("<h2 id=\"figures\">Figures</h2>")
        for png in sorted(found.glob("*.png")):
            uri = f"data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}"
            body.append(f"<figure><img class=\"fig\" src=\"{uri}\" alt=\"{_e(png.name)}\"><figcaption><code>"
                        f"{_e(png.name)}</code>: {_inline_markdown(captions.get(png.name, ''))}</figcaption></figure>")
    body.append("<h2 id=\"generations\">Generations</h2>")
    body.append(_table(["stage", "folder", "records", "gallery"], gen_rows, numeric_from=2) if gen_rows
                else "<p>No finished generation stage yet.</p>")
    body.append(_stage_times_section(stages, galleries))
    body.append("</main><footer>Written by <code>hcgen report</code> from the files of the work folder. "
                "Galleries are the files linked above, beside this one.</footer>")
    out.write_text(_page(f"hcgen report: Table 1 ({profile})", body), encoding="utf-8")
    page = Written(out, out.stat().st_size, 0, time.perf_counter() - t0)
    return [page] + written
