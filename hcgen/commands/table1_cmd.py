"""`hcgen table1`: the paper's Table 1 protocol and Figures 2, 4, 5, 6, resumable."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

from hcgen.errors import BadInput
from hcgen.experiments.table1.estimate import estimate_for_cli, expected_seconds, measured_rates
from hcgen.experiments.table1.protocol import PROFILES, report_spec, stages
from hcgen.experiments.table1.results import write_report
from hcgen.stages.graph import run_sequential, stage_times
from hcgen.util.locks import folder_lock
from hcgen.util.text import duration


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "table1",
        help="reproduce Table 1 and Figs. 2, 4, 5, 6 on LeNet/MNIST",
        description="Train base LeNets, generate adversarial images and hard positives, fine-tune one "
        "net per row and ordering, evaluate on MNIST and a held-out adversarial set, and write "
        "results/table1.md and the figures beside the paper's numbers. Every stage is kept in --work "
        "under a name keyed by its inputs: rerunning skips finished stages, so a run can span restarts. "
        "Profiles: medium (the paper's structure: 3 base nets of 10K iterations x 3 orderings, every row, "
        "held-out set from all 3 nets; smaller sizes), paper-rows (the paper's sizes for Basic LeNet, FGS, FGV, "
        "HC-D-9, HC-D-9-1.05 and an images-only ablation, 3 nets per row), quick (smoke test: 1 base net, "
        "1 ordering), full (the paper's sizes, every row, 9 nets per row), tiny (seconds; for tests). "
        "Measured wall times are in README's profiles table; run --estimate first: it prints the expected "
        "time on this machine.",
    )
    p.add_argument("--profile", choices=sorted(PROFILES), default="quick", help="protocol size (default quick)")
    p.add_argument("--work", default="work/table1", help="stage outputs (default work/table1)")
    p.add_argument("--results", default=None, help="table and figures (default results/table1-PROFILE)")
    p.add_argument("--mnist", default=None, help="folder with the MNIST IDX files (default: search path)")
    p.add_argument("--dask", action="store_true",
                   help="run independent stages in parallel on a Dask LocalCluster (one single-threaded "
                   "worker per core)")
    p.add_argument("--workers", type=int, default=None, help="LocalCluster workers (default: cores)")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="run on an existing Dask cluster (e.g. tcp://host:8786); workers must share --work")
    p.add_argument("--shards", type=int, default=None, metavar="N",
                   help="split each generation into N shard stages and an exact merge, so that a cluster runs "
                   "them side by side (default 1; changes those stages' folders, not their records)")
    p.add_argument("--estimate", action="store_true",
                   help="print the expected wall time for this profile and worker count, then exit (rates "
                   "from the finished stages in --work, else from other profiles' runs beside it, else defaults)")
    p.set_defaults(func=run_locked)


def run_locked(args: argparse.Namespace) -> int:
    """`run`, holding the work folder's lock (hcgen.util.locks): a second run on it exits 2 at once."""

    if args.estimate:  # reads the work folder only
        return run(args)
    with folder_lock(Path(args.work) / PROFILES[args.profile].name):
        return run(args)


def run(args: argparse.Namespace) -> int:
    profile = PROFILES[args.profile]
    if args.shards is not None:
        if args.shards < 1:
            raise BadInput(f"--shards must be a positive integer, got {args.shards}")
        profile = replace(profile, generation_shards=args.shards)
    work = Path(args.work).absolute() / profile.name  # Dask workers may start in another folder
    results = Path(args.results or f"results/table1-{profile.name}")
    graph = stages(profile, args.mnist)
    start = time.time()
    workers = 1 if not (args.dask or args.scheduler) else (args.workers or os.cpu_count() or 1)
    if args.estimate and args.scheduler:
        raise BadInput("--estimate works for this machine only (a cluster's size and speed are unknown here)")
    if not args.scheduler:  # a remote cluster's size and speed are unknown here
        left, wall, source = estimate_for_cli(graph, profile, work, workers)
        if left == 0 and args.estimate:
            print(f"every stage of the {profile.name} profile in {work} is finished")
        elif left > 0:
            print(f"expected: ~{duration(wall, 0)} with {workers} worker{'s' * (workers > 1)} "
                  f"({duration(left, 0)} of stage work left; {source})", flush=True)
        if args.estimate:
            return 0

    # finished earlier: 0, skipped; rates of this folder's finished stages where there are any (they order
    # the Dask queue longest-path-first and weigh the ETA)
    weights = expected_seconds(graph, profile, {k: r[0] for k, r in measured_rates(work, profile).items()}, work=work)
    order = list(graph)
    finished: list[str] = []

    def progress(name: str, i: int, n: int) -> None:
        """Sequential runs: a line as each stage starts, with an ETA weighted like the Dask view's."""
        elapsed = time.time() - start
        done = sum(weights[s] for s in finished)
        left = sum(weights[s] for s in order if s not in finished)
        eta = f", ETA {duration(elapsed * left / done, 0)}" if done > 0 and elapsed > 1 and left > 0 else ""
        print(f"[{elapsed:7.0f} s] stage {i + 1 if i < n else n}/{n}: {name}{eta}", flush=True)
        if name in graph:
            finished.append(name)  # reported as it starts: counted once the next one starts

    try:
        if args.dask or args.scheduler:
            from hcgen.stages.dask_runner import run_dask  # dask: loaded only when used

            status = sys.stderr.isatty()  # the self-overwriting status line: stderr, and only on a terminal
            shown = []

            def live(state: dict) -> None:
                if not shown:
                    shown.append(True)
                    print(f"Dask dashboard: {state['dashboard']}", flush=True)
                eta = "?" if state["eta_s"] is None else f"{state['eta_s'] / 60:.1f} min"
                running = ", ".join(state["running_names"]) or "-"
                line = (f"[{state['elapsed_s']:7.0f} s] done {state['done']}/{state['total']}, left {state['left']}, "
                        f"ETA {eta}; running {state['running']}: {running}")
                width = shutil.get_terminal_size().columns - 1
                if state["last"]:  # one line per finished stage, on stdout (also in logs, without \r)
                    if status:
                        print("\r".ljust(width) + "\r", end="", file=sys.stderr, flush=True)  # clear the status
                    print(f"{line} | finished {state['last']}", flush=True)
                elif status:  # in between, a status line that overwrites itself
                    print(f"\r{line[:width]}".ljust(width), end="", file=sys.stderr, flush=True)

            print(f"Dask: {args.scheduler or f'LocalCluster, {args.workers or os.cpu_count()} workers'}", flush=True)
            outputs = run_dask(graph, work, scheduler=args.scheduler, n_workers=args.workers, progress=live,
                               weights=weights)
            if status:
                print(file=sys.stderr)
        else:
            outputs = run_sequential(graph, work, progress)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished stages are kept in {work}; rerun the same command to go on "
              "(a stage that was running starts again, or resumes from its own snapshots)", flush=True)
        return 130
    report = write_report(report_spec(profile), outputs, results, stage_times(graph, work))
    print(report["table"])
    print(f"figures: {', '.join(report['figures'])} in {results}; took {time.time() - start:.0f} s")
    return 0
