"""Run a stage graph (e.g. the Table 1 protocol) on Dask distributed instead of one stage at a time.

By default a `LocalCluster` with one single-threaded worker process per core and
``OPENBLAS_NUM_THREADS=1`` and ``HCGEN_THREADS=1`` inside the workers (this CPU Caffe gains nothing
from more BLAS threads, and one-thread runs side by side nearly double the throughput: the figures
are in benchmarks/README.md).
`scheduler="tcp://host:8786"` runs the same graph on an existing cluster (`dask scheduler` +
`dask worker --nthreads 1 ...`, or dask-jobqueue), whose workers must see the same work folder.

Each stage is one Dask task keyed by its folder name (its inputs' hash), submitted once its inputs'
tasks have finished. Stages skip when their folder is complete and every stage function resumes or
rewrites its own folder, so a task retried after its worker died (``retries``) neither duplicates nor
loses output.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Optional

from hcgen.stages.graph import DONE, Stage, critical_path_order, folders, run_stage, topological

# One core per worker: BLAS, OpenMP and hcgen's own PASS threads (metrics._n_workers) all single.
WORKER_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "HCGEN_THREADS": "1"}


def local_cluster(n_workers: Optional[int] = None):
    """One single-threaded worker process per core, BLAS pinned to one thread.

    WORKER_ENV goes to the workers only: each nanny sets `env` in its worker process before the worker
    starts (this driver's os.environ is left alone; Dask's own ``distributed.nanny.pre-spawn-environ``
    defaults pin OMP/MKL/OpenBLAS threads before the spawn as well)."""
    from distributed import LocalCluster  # dask: loaded only when used

    return LocalCluster(n_workers=n_workers or os.cpu_count() or 1, threads_per_worker=1,
                        processes=True, dashboard_address=":0", env=dict(WORKER_ENV))


def run_dask(graph: dict[str, Stage], work: Path, scheduler: Optional[str] = None,
             n_workers: Optional[int] = None, retries: int = 2,
             progress: Optional[Callable[[dict], None]] = None,
             weights: Optional[dict[str, float]] = None, refresh_s: float = 2.0) -> dict[str, Path]:
    """Execute `graph` on Dask; returns stage -> output folder, like `stages.run_sequential`.

    Stages are submitted as soon as their inputs are finished, at most one per worker thread at a
    time (so each lands on a worker that is free; among ready stages, the one with the longest path
    to the end of the graph by `weights` first: `stages.critical_path_order`), each with the finished input
    folders as arguments. Handing Dask the whole graph of futures at once was measured to be slower:
    the scheduler placed a stage next to its inputs' (tiny) results and assigned stages before their
    durations were known, so on 2 workers one worker ran 4 of 6 stages while the other sat idle
    (benchmarks/README.md). Stages that finished before are not resubmitted.

    `progress(state)` receives {"done", "running", "running_names", "left", "total", "elapsed_s",
    "eta_s", "dashboard", "last"} at the start, each time a stage finishes ("last" names it) and every
    `refresh_s` seconds in between ("last" empty). The ETA is elapsed time x work left / work done,
    with each stage's work from `weights` (e.g. its expected seconds; default: 1 per stage).
    """
    from distributed import Client, as_completed  # dask: loaded only when used

    keys = folders(graph)
    deps = {name: tuple(stage.deps) for name, stage in graph.items()}
    # ready stages start longest-path-first (by `weights`; with none, every stage weighs 1)
    pending = critical_path_order({n: (weights or {}).get(n, 1.0) for n in graph}, deps, topological(graph))
    outputs: dict[str, Path] = {}
    for name in list(pending):  # finished in an earlier run: nothing to schedule
        if (Path(work) / keys[name] / DONE).exists():
            outputs[name] = Path(work) / keys[name]
            pending.remove(name)
    total = len(graph)
    cluster = None if scheduler else local_cluster(n_workers)
    client = Client(scheduler or cluster)
    try:
        client.wait_for_workers(1)
        running: dict = {}  # future -> stage name
        queue = as_completed()

        def submit_ready() -> None:
            slots = max(1, sum(client.nthreads().values()))  # re-read: workers may join or leave
            for name in list(pending):
                if len(running) >= slots:
                    return
                stage = graph[name]
                if all(d in outputs for d in stage.deps):
                    pending.remove(name)
                    future = client.submit(run_stage, stage, Path(work), keys[name],
                                           [outputs[d] for d in stage.deps],
                                           key=keys[name], pure=False, retries=retries)
                    running[future] = name
                    queue.add(future)

        start = time.monotonic()
        weight = {name: (weights or {}).get(name, 1.0) for name in graph}
        skipped_work = sum(weight[n] for n in outputs)

        def report(last: str) -> None:
            if progress:
                done = len(outputs)
                work_done = sum(weight[n] for n in outputs) - skipped_work
                work_left = sum(weight[n] for n in graph if n not in outputs)
                elapsed = time.monotonic() - start
                progress({"done": done, "total": total, "left": total - done, "running": len(running),
                          "running_names": sorted(running.values()), "elapsed_s": elapsed,
                          "eta_s": elapsed * work_left / work_done if work_done > 0 else None,
                          "dashboard": client.dashboard_link, "last": last})

        submit_ready()
        report("")
        last_report = time.monotonic()
        while not queue.is_empty():
            if not queue.has_ready():
                time.sleep(0.1)
                if progress and time.monotonic() - last_report >= refresh_s:
                    report("")
                    last_report = time.monotonic()
                continue
            for future in queue.next_batch(block=False):
                name = running.pop(future)
                outputs[name] = Path(future.result())  # re-raises a stage's error here, with its traceback
                submit_ready()
                report(name)
                last_report = time.monotonic()
        if pending:  # only a dependency cycle leaves stages that never become ready
            raise RuntimeError(f"stages never became ready: {', '.join(pending)}")
        return {name: outputs[name] for name in graph}
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
