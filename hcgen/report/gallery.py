"""The gallery of one `hcgen generate` output: a self-contained HTML page (see `hcgen.report.html`).

Sampling is seeded: the gallery of each (method, scale) shows `per_method` records drawn with the same
seed, so in a run without a PASS threshold (equal group sizes) the columns of a method's scales
show the same source images; the ten lowest and highest PASS records of each method follow.
Figures use every record (the scatter plots at most `SCATTER_POINTS` per scale, seeded).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import numpy as np

import hcgen

from hcgen.data.genfolder import MISCLASSIFIED, Generation, load_generation
from hcgen.data.lmdb_io import datum_array, read_raw
from hcgen.data.sources import load_originals
from hcgen.report.html import (THUMB, Html, Written, display_size, encode_image, esc, fmt_scale, page,
                               perturbation_image, png_figure, table)

from hcgen.errors import BadInput
from hcgen.util.hashing import sha256

SCATTER_POINTS = 2000
EXTREMES = 10


class Gallery:
    """Builds the gallery of one generation (see the module docstring)."""

    def __init__(self, gen: Generation, per_method: int, seed: int, source: Optional[str]):
        if per_method < 0:
            raise BadInput(f"--per-method must be >= 0, got {per_method}")
        self.gen, self.per_method, self.seed = gen, per_method, seed
        self.picks = self._pick()
        misclassified = sorted({f.source_index for f in gen.failures if f.method == MISCLASSIFIED})
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
        return {k: datum_array(raw) for k, raw in zip(keys.tolist(), read_raw(self.gen.path, keys.tolist()))}

    def _img(self, image: np.ndarray, cls: str, alt: str, **data: object) -> str:
        self.images += 1
        w, h = display_size(image.shape)
        px = " px" if max(image.shape[-2:]) <= THUMB else ""
        attrs = "".join(f" data-{k}=\"{esc(v)}\"" for k, v in data.items())
        return (f"<img class=\"{cls}{px}\" src=\"{encode_image(image)}\" width=\"{w}\" height=\"{h}\" "
                f"alt=\"{esc(alt)}\"{attrs}>")

    def _card(self, row: int, extra: str = "", show_scale: bool = False) -> str:
        g = self.gen
        key, src = int(g.key[row]), int(g.source[row])
        x, adv = self.originals[src], self.records[key]
        kind = "adversarial" if g.scale[row] == 1 else "hard positive"
        scale = f" {fmt_scale(g.scale[row])}" if show_scale else ""
        title = (f"{g.method[row]} {fmt_scale(g.scale[row])}: PASS {g.pass_[row]:.4f}, L2 per pixel "
                 f"{g.l2_per_pixel[row]:.4f}, L∞ {g.linf[row]:.0f}, label {g.label[row]}, predicted {g.pred[row]}; "
                 f"key {key:08d}, source image {src}, eps {g.eps[row]:g}")
        return (f"<figure class=\"ex{extra}\" title=\"{esc(title)}\" data-key=\"{key}\">"
                + self._img(x, "orig", f"original {src}", source=src)
                + self._img(adv, "adv", f"{kind} {key:08d}", key=key)
                + self._img(perturbation_image(x, adv), "delta", f"perturbation of {key:08d}")
                + f"<figcaption><b>{g.pass_[row]:.4f}</b><br>{g.l2_per_pixel[row]:.3f} · {g.linf[row]:.0f}<br>"
                  f"{g.label[row]} → {g.pred[row]}{scale}</figcaption></figure>")

    # figures
    def _overview_figure(self) -> str:
        from matplotlib.figure import Figure  # matplotlib: loaded only when used

        g = self.gen
        types = [(m, s) for m in g.methods for s in g.scales if ((g.method == m) & (g.scale == s)).any()]
        if not types:
            return ""
        width = min(16, 2 + 0.42 * len(types))
        fig = Figure(figsize=(width, 3.8))
        fig.subplots_adjust(left=0.7 / width, right=1 - 0.2 / width, top=0.92, bottom=0.3)
        ax = fig.subplots()
        ax.boxplot([g.pass_[(g.method == m) & (g.scale == s)] for m, s in types], showfliers=False)
        ax.set_xticks(range(1, len(types) + 1), [m if s == 1 else f"{m} {fmt_scale(s)}" for m, s in types],
                      rotation=90, fontsize=8)
        ax.set_ylabel("PASS")
        ax.set_title("PASS per type (boxes: quartiles, whiskers 1.5 IQR; cf. the paper's Fig. 4)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        return f"<img class=\"fig\" src=\"{png_figure(fig)}\" alt=\"PASS per type\">"

    def _method_figure(self, m: str) -> str:
        from matplotlib.figure import Figure  # matplotlib: loaded only when used

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
            label = f"{fmt_scale(s)} ({len(group)})"
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
        return f"<img class=\"fig\" src=\"{png_figure(fig)}\" alt=\"{esc(m)}: PASS histogram and L∞ against PASS\">"

    # sections
    def settings_section(self) -> str:
        g, s = self.gen, self.gen.settings

        def file_cell(key: str) -> Html:
            """The path, and the sha256 the run recorded (older runs: of the file as it is now)."""
            path = Path(str(s.get(key, "")))
            if s.get(f"{key}_sha256"):
                digest = f"sha256 {s[f'{key}_sha256']} (recorded by the run)"
            else:
                digest = f"sha256 {sha256(path)} (of the file now)" if path.is_file() else "(not found here: no digest)"
            return Html(f"<code>{esc(path)}</code><br>{esc(digest)}")

        tau = s.get("min_pass", -1.0)
        net = ", ".join(f"{k} {s[k]}" for k in ("framework", "layer", "device") if s.get(k))
        rows = [
            ("model", file_cell("model")), ("weights", file_cell("weights")),
            ("source images", Html(f"<code>{esc(s.get('source') or 'MNIST search path')}</code> ({esc(s.get('split'))} "
                                    f"split for MNIST), {esc(g.summary.get('source_images', '?'))} used"
                                    + (f" (--limit {esc(s['limit'])}, seed {esc(s.get('seed'))})" if s.get("limit") else ""))),
            ("methods", s.get("methods")), ("hard-positive scales", s.get("scales") or "none"),
            ("τ (--min-pass)", f"{tau:g}" + (" (keep all)" if tau <= -1 else "")),
            ("preprocessing, batch, shard", f"{s.get('preprocess', 'lenet')}, {s.get('batch_size')}, {s.get('shard', '0/1')}"
             + (f"; {net}" if net else "")),
            ("records", f"{len(g.key)}"),
            ("hcgen", f"{s['hcgen_version']} wrote the run, {hcgen.__version__} this report" if s.get("hcgen_version")
             else hcgen.__version__),
        ]
        return "<h2 id=\"settings\">Settings</h2>" + table(["", ""], rows, numeric_from=99)

    def overview_section(self) -> str:
        g = self.gen
        scales = g.scales
        fails: dict[str, int] = {}
        for f in g.failures:
            fails[f.method] = fails.get(f.method, 0) + 1
        rows = []
        for m in g.methods:
            sel = g.method == m
            cells = [Html(f"<a href=\"#m-{esc(m)}\">{esc(m)}</a>")]
            for s in scales:
                p = g.pass_[sel & (g.scale == s)]
                cells += [len(p), f"{np.median(p):.4f}" if len(p) else "-", f"{p.min():.4f}" if len(p) else "-"]
            cells.append(fails.get(m, 0))
            rows.append(cells)
        header = ["method"] + [f"{fmt_scale(s)} {h}" for s in scales for h in ("records", "median PASS", "min PASS")]
        return ("<h2 id=\"overview\">Overview</h2>" + table(header + ["failures"], rows)
                + f"<p>{self._overview_figure()}</p>")

    def method_section(self, m: str) -> str:
        g = self.gen
        parts = [f"<section class=\"method\" id=\"m-{esc(m)}\" data-method=\"{esc(m)}\"><h2>{esc(m)}</h2>",
                 f"<p>{self._method_figure(m)}</p>",
                 "<p class=\"legend\">Each example, top to bottom: the original, the adversarial image or hard "
                 "positive, the perturbation (grey = unchanged, scaled to its own max |δ|); under it <b>PASS</b>, "
                 "L2 per pixel · L∞ (0-255 units), true → predicted class. Hover for the key, source image and eps.</p>"]
        for s in g.scales:
            rows = self.picks.get((m, s))
            if rows is None:
                continue
            n = int(((g.method == m) & (g.scale == s)).sum())
            what = "minimal adversarials" if s == 1 else f"hard positives {fmt_scale(s)}"
            parts.append(f"<h3>{esc(what)}: {len(rows)} of {n}, seeded random (seed {self.seed})</h3>")
            parts.append(f"<div class=\"grid sample\" data-method=\"{esc(m)}\" data-scale=\"{s:g}\">"
                         + "".join(self._card(r) for r in rows) + "</div>")
        for which, cls, word in (("low", " low", "lowest"), ("high", " high", "highest")):
            rows = self.picks[(m, which)]
            if len(rows):
                parts.append(f"<h3>{len(rows)} {word} PASS (all scales)</h3>")
                parts.append(f"<div class=\"grid extremes {which}\" data-method=\"{esc(m)}\">"
                             + "".join(self._card(r, cls, show_scale=True) for r in rows) + "</div>")
        if not (g.method == m).any():
            parts.append("<p>No records: every search of this method failed or fell below τ (see Failures).</p>")
        return "".join(parts) + "</section>\n"

    def failures_section(self) -> str:
        g = self.gen
        counts: dict[str, dict[str, int]] = {}
        for f in g.failures:
            counts.setdefault(f.method, {})[f.kind] = counts.setdefault(f.method, {}).get(f.kind, 0) + 1
        statuses = sorted({s for c in counts.values() for s in c})
        parts = ["<h2 id=\"failures\">Failures</h2>",
                 "<p>One row of <code>failures.csv</code> per (source image, method) without a record: the search "
                 "failed (its status), the record fell below τ (<code>below_min_pass</code>, per scale), or the "
                 "net misclassifies the source image itself (method <code>*</code>, never searched).</p>"]
        if not counts:
            return "".join(parts) + "<p>No failures.</p>"
        order = [m for m in [MISCLASSIFIED] + g.methods if m in counts] + sorted(set(counts) - {MISCLASSIFIED, *g.methods})
        parts.append(table(["method"] + statuses, [[m] + [counts[m].get(s, "") for s in statuses] for m in order]))
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
        nav = "".join(f"<a href=\"#m-{esc(m)}\">{esc(m)}</a>" for m in g.methods)
        body = [
            f"<header><h1>{esc(title)}</h1><p class=\"sub\"><code>{esc(g.path)}</code>: {len(g.key)} records, "
            f"{len(g.methods)} methods, scales {', '.join(fmt_scale(s) for s in g.scales) or '-'}; "
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
        return page(title, body)


def write_generation_report(gen_dir: str | os.PathLike, out: str | os.PathLike, per_method: int = 12,
                            seed: int = 0, source: Optional[str] = None, title: Optional[str] = None) -> Written:
    """Write the gallery of the `hcgen generate` output `gen_dir` to the HTML file `out`."""
    t0 = time.perf_counter()
    gen = load_generation(gen_dir)
    gallery = Gallery(gen, per_method, seed, source)
    text = gallery.html(title or f"hcgen report: {gen.path.name}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return Written(out, out.stat().st_size, gallery.images, time.perf_counter() - t0, len(gen.key))
