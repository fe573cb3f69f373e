"""`hcgen report`: one self-contained HTML page to look at a generation run or a Table 1 work folder."""
from __future__ import annotations

import argparse
from pathlib import Path

from hcgen.data import genfolder
from hcgen.errors import BadInput
from hcgen.report.gallery import write_generation_report
from hcgen.report.table1_page import write_table1_report


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help="HTML gallery of an `hcgen generate` output, or the page of a Table 1 work folder",
        description="PATH an `hcgen generate` output (the folder with generate.json): write one self-contained "
        "HTML file (images inlined, no scripts, no network) with the run's settings, PASS per type, and per "
        "method a PASS histogram, an L-inf/PASS scatter, seeded random examples per scale (original, "
        "adversarial or hard positive, perturbation) and the ten lowest and highest PASS records, then the "
        "failures. PATH a Table 1 work folder (`hcgen table1 --work`, or one profile's folder in it): a page "
        "with Table 1 beside the paper's, the figures and the stage times, linked to one gallery per "
        "generation stage written beside it.",
    )
    p.add_argument("path", metavar="PATH", help="generation output folder, or Table 1 work folder")
    p.add_argument("--out", default=None, help="HTML file to write (default PATH/report.html)")
    p.add_argument("--per-method", type=int, default=12, metavar="N",
                   help="seeded random examples per method and scale (default 12)")
    p.add_argument("--seed", type=int, default=0, help="seed of the examples (default 0)")
    p.add_argument("--source", default=None,
                   help="generation: the source images (MNIST folder, LMDB or image folder) if they moved since")
    p.add_argument("--results", default=None,
                   help="Table 1: the folder `hcgen table1 --results` wrote (default: PATH/results, PATH, "
                   "results/table1-PROFILE)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = Path(args.path)
    out = Path(args.out) if args.out else path / "report.html"
    is_generation = genfolder.is_generation(path) or genfolder.is_generation(path / "lmdb")
    if is_generation:
        if args.results:
            raise BadInput("--results is for Table 1 work folders; PATH is a generation output")
        written = [write_generation_report(path, out, args.per_method, args.seed, args.source)]
    else:
        if args.source:
            raise BadInput(f"--source is for generation outputs; PATH is not one (no {genfolder.SETTINGS_FILE})")
        written = write_table1_report(path, out, args.results, args.per_method, args.seed)
    for w in written[1:]:
        print(f"gallery: {w.path} ({w.records} records, {w.images} images, {w.bytes / 1e6:.1f} MB, {w.seconds:.1f} s)")
    page = written[0]
    what = f"{page.records} records, {page.images} images, " if is_generation else ""
    print(f"report: {page.path} ({what}{page.bytes / 1e6:.1f} MB, {page.seconds:.1f} s)")
    return 0
