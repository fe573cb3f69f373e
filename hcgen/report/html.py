"""The pieces every hcgen HTML report is made of: one stylesheet, escaping, tables, inlined images and
figures, and the markdown subset `hcgen table1` writes.

A report is one self-contained HTML file: images are inlined as ``data:`` URIs, the figures are
matplotlib PNGs inlined likewise, the styling is a ``<style>`` block, and there is no script and no
reference to any other file or host.

Images: a record is a Caffe (C, H, W) uint8 Datum, grey or BGR. Images of at most `THUMB` pixels a side
(MNIST, CIFAR) are inlined as lossless PNGs of the record's exact pixels (colour converted to the RGB
order of image files) and drawn 2x with pixelated scaling; larger ones (ImageNet crops) as JPEG
thumbnails of 2 x `THUMB` pixels on the longer side, so that a report stays a few MB. The perturbation
δ = x̃ − x is drawn as 128 + 127 δ / max|δ| per image: grey where nothing changed, as in the paper's figures.
"""
from __future__ import annotations

import base64
import html
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from hcgen.errors import BadInput

THUMB = 64  # largest side inlined losslessly (drawn 2x); larger images: JPEG thumbnails, 2 x THUMB a side


@dataclass
class Written:
    """A report file written: its size, the images inlined, the seconds it took, the records it shows."""

    path: Path
    bytes: int
    images: int
    seconds: float
    records: int = 0


def encode_image(image: np.ndarray) -> str:
    """``data:`` URI of a Caffe (C, H, W) uint8 image: grey (C = 1) or BGR colour (C = 3), shown in RGB order.

    Images with both sides <= THUMB are exact PNGs; larger ones JPEG (quality 90) resized to 2 x THUMB
    on the longer side.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
        raise BadInput(f"expected a (1 or 3, H, W) uint8 image, got {image.dtype} {image.shape}")
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


def display_size(shape: Sequence[int]) -> tuple[int, int]:
    h, w = shape[-2:]
    f = 2 if max(h, w) <= THUMB else 2 * THUMB / max(h, w)
    return round(w * f), round(h * f)


def png_figure(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return f"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"


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


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def page(title: str, body: Sequence[str]) -> str:
    return "".join([
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>\n", *body, "\n</body></html>\n"])


def table(header: Sequence[str], rows: Sequence[Sequence[object]], numeric_from: int = 1) -> str:
    head = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>\n" if any(header) else ""
    numeric = " class=\"n\""
    body = "".join("<tr>" + "".join(
        f"<td{numeric if j >= numeric_from else ''}>{c if isinstance(c, Html) else esc(c)}</td>"
        for j, c in enumerate(r)) + "</tr>\n" for r in rows)
    return f"<table>{head}{body}</table>"


class Html(str):
    """A table cell that is already HTML."""


def fmt_scale(s: float) -> str:
    return f"x{s:g}"


def inline_markdown(text: str) -> str:
    text = esc(text)
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
            items.append(f"<li>{inline_markdown(line[2:])}</li>")
            continue
        if items:
            out.append("<ul>" + "".join(items) + "</ul>")
            items = []
        if table:
            head = "".join(f"<th>{inline_markdown(c)}</th>" for c in table[0])
            rows = "".join("<tr>" + "".join(f"<td>{inline_markdown(c)}</td>" for c in r) + "</tr>\n"
                           for r in table[1:])
            out.append(f"<table class=\"table1\"><tr>{head}</tr>\n{rows}</table>")
            table = []
        if line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")) + 1, 4)
            out.append(f"<h{level}>{inline_markdown(line.lstrip('#').strip())}</h{level}>")
        elif line.strip():
            out.append(f"<p>{inline_markdown(line)}</p>")
    return "\n".join(out)
