"""The page of a Table 1 work folder: the table beside the paper's, the figures, one gallery per generation
stage (written beside the page and linked from it) and the stages' times."""
from __future__ import annotations

import base64
import os
import re
import time
from pathlib import Path
from typing import Optional

from hcgen.data.genfolder import SETTINGS_FILE, is_generation
from hcgen.errors import BadInput, NotFound
from hcgen.report.gallery import write_generation_report
from hcgen.report.html import Html, Written, esc, inline_markdown, markdown_html, page, table
from hcgen.stages.graph import DONE as STAGE_MARKER, StageInfo, read_stages
from hcgen.util.text import duration

GENERATION_STAGE = re.compile(r"gen-(train|test)\d+")


def find_stage_folder(work: Path) -> Path:
    """`work` if it holds stage folders (``*/.stage.json``), else its one subfolder that does (a profile)."""
    if not work.is_dir():
        raise NotFound(f"no folder {work}")
    if any(work.glob(f"*/{STAGE_MARKER}")):
        return work
    profiles = sorted(p for p in work.iterdir() if p.is_dir() and any(p.glob(f"*/{STAGE_MARKER}")))
    if len(profiles) == 1:
        return profiles[0]
    if profiles:
        raise BadInput(f"{work} holds the Table 1 work folders of several profiles "
                       f"({', '.join(p.name for p in profiles)}); pass one, e.g. {profiles[0]}")
    raise BadInput(f"{work} is neither an `hcgen generate` output (no {SETTINGS_FILE}) nor a Table 1 work "
                   f"folder (no stage folders with a {STAGE_MARKER})")


def _results_folder(work: Path, results: Optional[str | os.PathLike]) -> tuple[Optional[Path], list[Path]]:
    if results is not None:
        candidates = [Path(results)]
    else:
        candidates = [work / "results", work, work.parent / "results", Path("results") / f"table1-{work.name}"]
    return next((c for c in candidates if (c / "table1.md").exists()), None), candidates


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
            bar = Html(f"<div class=\"gantt\"><span style=\"left:{left:.2f}%;width:{width:.2f}%\"></span></div>")
        elif seconds is not None:
            bar = Html(f"<span class=\"bar\" style=\"width:{max(1, round(300 * seconds / longest))}px\"></span>")
        else:
            bar = Html("not finished")
        name = Html(f"<a href=\"{esc(galleries[s.folder])}\">{esc(s.name)}</a>" if s.folder in galleries else esc(s.name))
        rows.append([name, Html(f"<code>{esc(s.folder.name)}</code>"), duration(seconds) if seconds is not None else "-",
                     m.get("host", "-"), bar])
    hosts = sorted({str(s.marker.get("host")) for s in done})
    wall = f"; first start to last end {duration(t1 - t0)}" if timed else ""
    return ("<h2 id=\"stages\">Stage times</h2>"
            f"<p>{len(done)} finished stages ({len(stages) - len(done)} unfinished), {duration(total)} of stage "
            f"work{wall}, on {', '.join(hosts) or '-'}. The bars place each stage on the run's time line "
            "(stages run side by side under <code>--dask</code>); times are each stage's own run, from its "
            f"<code>{STAGE_MARKER}</code>.</p>"
            + table(["stage", "folder", "time", "host", "time line"], rows, numeric_from=2))


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
        raise NotFound(f"no table1.md in --results {results}")
    written: list[Written] = []
    galleries: dict[Path, str] = {}
    gen_rows = []
    for s in stages:
        if s.marker is None or not GENERATION_STAGE.fullmatch(s.name) or not is_generation(s.folder / "lmdb"):
            continue
        name = f"{out.stem}-{s.folder.name}.html"
        w = write_generation_report(s.folder / "lmdb", out.parent / name, per_method, seed,
                                    title=f"hcgen report: Table 1 stage {s.name}")
        written.append(w)
        galleries[s.folder] = name
        gen_rows.append([Html(f"<a href=\"{esc(name)}\">{esc(s.name)}</a>"), Html(f"<code>{esc(s.folder.name)}</code>"),
                         w.records, f"{w.bytes / 1e6:.1f} MB"])

    profile = work.name
    body = [f"<header><h1>hcgen report: Table 1 ({esc(profile)})</h1><p class=\"sub\">work folder "
            f"<code>{esc(work)}</code>; results <code>{esc(found if found else 'not found')}</code></p>"
            "<nav><a href=\"#table1\">Table 1</a><a href=\"#figures\">figures</a><a href=\"#generations\">generations</a>"
            "<a href=\"#stages\">stage times</a></nav></header><main><div id=\"table1\"></div>"]
    if found is None:
        body.append(f"<p class=\"note\">No <code>table1.md</code> in {', '.join(f'<code>{esc(c)}</code>' for c in looked)}: "
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
            body.append(f"<figure><img class=\"fig\" src=\"{uri}\" alt=\"{esc(png.name)}\"><figcaption><code>"
                        f"{esc(png.name)}</code>: {inline_markdown(captions.get(png.name, ''))}</figcaption></figure>")
    body.append("<h2 id=\"generations\">Generations</h2>")
    body.append(table(["stage", "folder", "records", "gallery"], gen_rows, numeric_from=2) if gen_rows
                else "<p>No finished generation stage yet.</p>")
    body.append(_stage_times_section(stages, galleries))
    body.append("</main><footer>Written by <code>hcgen report</code> from the files of the work folder. "
                "Galleries are the files linked above, beside this one.</footer>")
    out.write_text(page(f"hcgen report: Table 1 ({profile})", body), encoding="utf-8")
    return [Written(out, out.stat().st_size, 0, time.perf_counter() - t0)] + written
