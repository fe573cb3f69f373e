"""Claims of Sec. 5.2 of several Table 1 runs side by side, and which verdicts are settled.

    .venv/bin/python scripts/compare_table1_runs.py docs/table1-medium/table1.json \\
        ../shared/runs/table1-medium-rerun/table1.json [--names committed rerun]

Each run's claims are recomputed from its table1.json with today's tests (paired where the design pairs the
nets, Welch otherwise: `hcgen.experiments.table1.claims.claims`), so runs written by an older hcgen compare on the
same footing. A verdict is *settled* only where every run gives the same one; otherwise the effect sits
inside the run-to-run (machine-to-machine) spread. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from hcgen.experiments.table1.claims import claims, load_numbers  # noqa: E402


def compare_runs(paths: list[Path], names: list[str]) -> str:
    checked = []
    for path in paths:
        rows, bins = load_numbers(path)
        checked.append({c["id"]: c for c in claims(rows, bins)})
    ids = sorted(set().union(*checked))
    head = "| claim | " + " | ".join(names) + " | settled? |"
    lines = [head, "|---" * (len(names) + 2) + "|"]
    for cid in ids:
        texts = [c[cid]["claim"] for c in checked if cid in c]
        cells, verdicts = [], []
        for c in checked:
            if cid not in c:
                cells.append("—")
                continue
            p = c[cid]["p"]
            cells.append(f"{c[cid]['verdict']} (p={p:.2g}; {c[cid]['key']})" if np.isfinite(p) else c[cid]["verdict"])
            verdicts.append(c[cid]["verdict"])
        settled = (f"yes: {verdicts[0]}" if len(verdicts) == len(checked) and len(set(verdicts)) == 1
                   else "no" if len(verdicts) == len(checked) else "one run only")
        lines.append(f"| ({cid}) {texts[0]} | " + " | ".join(cells) + f" | {settled} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="table1.json files (or folders holding one)")
    ap.add_argument("--names", nargs="+", help="a column name per run (default: the folder names)")
    args = ap.parse_args()
    paths = [p / "table1.json" if p.is_dir() else p for p in args.runs]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"error: no table1.json at {', '.join(missing)}")
    names = args.names or [p.parent.name for p in paths]
    if len(names) != len(paths):
        raise SystemExit(f"error: {len(paths)} runs but {len(names)} --names")
    print(compare_runs(paths, names))


if __name__ == "__main__":
    main()
