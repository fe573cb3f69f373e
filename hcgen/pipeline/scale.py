"""Run a stage graph (e.g. the Table 1 protocol) on Dask distributed instead of one stage at a time.

By default a `LocalCluster` with one single-threaded worker process per core and
``OPENBLAS_NUM_THREADS=1`` inside the workers (measured here: this CPU Caffe gains nothing from more
BLAS threads, and two one-thread `caffe train` runs side by side do 109 it/s against 57 it/s for one).
`scheduler="tcp://host:8786"` runs the same graph on an existing cluster (`dask scheduler` +
`dask worker --nthreads 1 ...`, or dask-jobqueue), whose workers must see the same work folder.

Each stage is one Dask task keyed by its folder name (its inputs' hash), depending on its inputs'
tasks. Stages skip when their folder is complete and every stage function resumes or rewrites its
own folder, so a task retried after its worker died (``retries``) neither duplicates nor loses output.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Optional

from hcgen.pipeline.table1 import Stage, folders, run_stage, topological

WORKER_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


def local_cluster(n_workers: Optional[int] = None):
    """One single-threaded worker process per core, BLAS pinned to one thread."""
    from distributed import LocalCluster

    os.environ.update(WORKER_ENV)  # inherited by the worker processes the nanny spawns
    return LocalCluster(n_workers=n_workers or os.cpu_count() or 1, threads_per_worker=1,
                        processes=True, dashboard_address=":0", env=dict(WORKER_ENV))


def run_dask(graph: dict[str, Stage], work: Path, scheduler: Optional[str] = None,
             n_workers: Optional[int] = None, retries: int = 2,
             progress: Optional[Callable[[dict], None]] = None) -> dict[str, Path]:
    """Execute `graph` on Dask; returns stage -> output folder, like `table1.run_sequential`.

    `progress(state)` receives {"done", "running", "left", "total", "eta_s", "dashboard", "last"}
    each time a stage finishes.
    """
    from distributed import Client, as_completed

    keys = folders(graph)
    cluster = None if scheduler else local_cluster(n_workers)
    client = Client(scheduler or cluster)
    try:
        futures = {}
        for name in topological(graph):
            stage = graph[name]
            futures[name] = client.submit(run_stage, stage, Path(work), keys[name],
                                          [futures[d] for d in stage.deps],
                                          key=keys[name], pure=False, retries=retries)
        start, done = time.monotonic(), 0
        names = {f.key: n for n, f in futures.items()}
        if progress:
            progress({"done": 0, "total": len(futures), "left": len(futures), "running": 0, "eta_s": 0.0,
                      "dashboard": client.dashboard_link, "last": ""})
        for future in as_completed(list(futures.values())):
            future.result()  # re-raise a stage's error here, with its traceback
            done += 1
            if progress:
                elapsed = time.monotonic() - start
                running = sum(len(v) for v in client.processing().values())
                progress({"done": done, "total": len(futures), "left": len(futures) - done,
                          "running": running, "eta_s": elapsed / done * (len(futures) - done),
                          "dashboard": client.dashboard_link, "last": names[future.key]})
        return {name: f.result() for name, f in futures.items()}
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
