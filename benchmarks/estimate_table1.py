"""Extrapolate a Table 1 profile's wall time from the stage times of a run that finished here.

    .venv/bin/python benchmarks/estimate_table1.py --work work/table1-dask [--measured quick] \\
        [--target full] [--workers 1 2]

Every finished stage records how long its function ran (`seconds` in its `.stage.json`). This script
reads those of a finished run of the `--measured` profile, turns each kind of stage into a rate per
unit of work, scales the `--target` profile's stages by their sizes, and replays the target graph
with `--workers` workers under run_dask's policy (stages in graph order, each started as soon as its
inputs are done and a worker is free). It prints the rates, the busiest kinds and the estimates.

Kinds and units: training (base nets and fine-tunes: iterations), generation (source digits x
directions), mixing (records written), evaluation (images), InfiMNIST-style deformation (images),
held-out assembly (records), MNIST conversion (once). Rates include each stage's fixed costs
(process start, Caffe's test at the start and end of a fine-tune), so scaling a short measured
stage up slightly overestimates. Stages of a run with N workers ran beside N - 1 others, so their
rates already include the slowdown of sharing the machine: estimate for the worker count you measured
with, or expect the others to be a few percent off.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from hcgen.experiments.table1.estimate import expected_seconds, measured_rates, stage_work
from hcgen.experiments.table1.protocol import PROFILES, stages
from hcgen.stages.graph import critical_path_order, rates, simulate, topological


def rates_from_times(times: dict[str, float], profile) -> dict[str, tuple[float, float, int]]:
    """kind -> (seconds per unit, total seconds, stages) from a stage_times.json of a `profile` run."""
    graph = stages(profile)
    return rates((*stage_work(name, graph[name].params, profile), secs) for name, secs in times.items()
                 if name in graph)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--work", type=Path, help="work folder of the finished, measured run")
    src.add_argument("--times", type=Path, help="instead of --work: a run's stage_times.json (e.g. "
                     "docs/table1-medium/stage_times.json), sized with the --measured profile's graph")
    ap.add_argument("--measured", default="quick", choices=sorted(PROFILES), help="profile that ran in --work")
    ap.add_argument("--target", default="full", choices=sorted(PROFILES), help="profile to estimate")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--shards", type=int, default=None, help="generation shards of the target (default: its own)")
    args = ap.parse_args()
    if args.times:
        work = args.times
        rates = rates_from_times(json.loads(args.times.read_text()), PROFILES[args.measured])
    else:
        work = args.work / args.measured if (args.work / args.measured).is_dir() else args.work
        rates = measured_rates(work, PROFILES[args.measured])
    if not rates:
        raise SystemExit(f"no finished stages with recorded times for profile {args.measured} in {work}")
    target = PROFILES[args.target]
    if args.shards:
        target = replace(target, generation_shards=args.shards)
    graph = stages(target)
    durations = expected_seconds(graph, target, {kind: r[0] for kind, r in rates.items()})
    by_kind, defaults = defaultdict(float), set()
    for name, stage in graph.items():
        kind = stage_work(name, stage.params, target)[0]
        by_kind[kind] += durations[name]
        if kind not in rates:  # e.g. merges of sharded generations, when the measured run had none
            defaults.add(kind)
    print(f"rates measured in {work} ({args.measured} profile):")
    for kind, (rate, total, n) in sorted(rates.items()):
        per = f"{1 / rate:,.1f} per s" if rate > 0 else "-"
        print(f"  {kind:24s} {per:>16s}  ({n} stages, {total:,.0f} s)")
    total = sum(durations.values())
    print(f"\n{args.target} profile: {len(graph)} stages, {total / 3600:.1f} h of stage time:")
    for kind, s in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        note = "  (not measured in --work: hcgen's default rate)" if kind in defaults else ""
        print(f"  {kind:24s} {s / 3600:6.2f} h  ({s / total:.0%}){note}")
    deps = {name: tuple(stage.deps) for name, stage in graph.items()}
    for w in args.workers:
        wall = simulate(durations, deps, critical_path_order(durations, deps, topological(graph)), w)
        print(f"estimated wall time with {w} worker(s): {wall / 3600:.1f} h  (extrapolated, not measured)")


if __name__ == "__main__":
    main()
