"""A graph of resumable stages: the generic machinery under `hcgen table1` (and anything like it).

A `Stage` is one unit of work, `fn(out_dir, *dependency_outputs)`, with the parameters and the files
(prototxts, solvers) it reads. Its folder under the work directory is named by the stage and a hash of
its parameters, the *contents* of its files and its dependencies' folder names, so a changed input
(an edited prototxt included) gives a new folder and everything downstream of it runs again, while a
finished folder (marked by `DONE`) is never run twice. `run_sequential` executes a graph here,
`hcgen.stages.dask_runner.run_dask` on Dask; `stage_times`, `measured_rates`, `simulate` and `estimate`
turn the markers' recorded seconds into rates and expected wall times. The protocol itself (which
stages, their sizes) lives with its user, e.g. `hcgen.experiments.table1.protocol`.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import os
import re
import socket
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from hcgen.util.hashing import sha256

DONE = ".stage.json"
# (stage name, its params) -> (kind of work, size in units of that kind), given by the protocol
WorkOf = Callable[[str, dict], tuple[str, float]]

_digests: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (cached per path, size and mtime)."""
    p = Path(path)
    st = p.stat()
    cache_key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if cache_key not in _digests:
        _digests[cache_key] = sha256(p)
    return _digests[cache_key]


@dataclass
class Stage:
    """One unit of work: `fn(out_dir, *dependency_outputs)` fills `out_dir`; `params` and the contents
    of `files` (and the dependencies' keys) key its folder."""

    name: str
    fn: Callable
    deps: Sequence[str] = ()
    params: dict = field(default_factory=dict)
    files: Sequence[str | os.PathLike] = ()

    def key(self, dep_keys: Sequence[str]) -> str:
        digests = {Path(f).name: file_digest(f) for f in self.files}
        blob = json.dumps([self.name, self.params, list(dep_keys)] + ([digests] if digests else []),
                          sort_keys=True, default=str)
        return f"{self.name}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def run_stage(stage: Stage, work: Path, folder: str, inputs: Sequence[Path]) -> Path:
    """Run `stage` into work/folder unless it finished before; returns the folder."""
    out = Path(work) / folder
    if (out / DONE).exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    started, t0 = time.time(), time.perf_counter()
    stage.fn(out, *inputs)
    tmp = out / (DONE + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps({"stage": stage.name, "params": stage.params, "started": started,
                            "seconds": round(time.perf_counter() - t0, 3),
                            "host": socket.gethostname(), "pid": os.getpid()}, default=str))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / DONE)
    return out


def folders(graph: dict[str, Stage]) -> dict[str, str]:
    """Stage -> folder name (its key), resolved in dependency order."""
    keys: dict[str, str] = {}

    def resolve(name: str) -> str:
        if name not in keys:
            stage = graph[name]
            keys[name] = stage.key([resolve(d) for d in stage.deps])
        return keys[name]

    for name in graph:
        resolve(name)
    return keys


def topological(graph: dict[str, Stage]) -> list[str]:
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        for d in graph[name].deps:
            visit(d)
        order.append(name)

    for name in graph:
        visit(name)
    return order


def run_sequential(graph: dict[str, Stage], work: Path,
                   progress: Optional[Callable[[str, int, int], None]] = None) -> dict[str, Path]:
    """Run every unfinished stage of `graph` in dependency order; returns stage -> output folder."""
    keys = folders(graph)
    outputs: dict[str, Path] = {}
    order = topological(graph)
    for i, name in enumerate(order):
        if progress:
            progress(name, i, len(order))
        stage = graph[name]
        outputs[name] = run_stage(stage, work, keys[name], [outputs[d] for d in stage.deps])
    if progress:
        progress("done", len(order), len(order))
    return outputs


def stage_times(graph: dict[str, Stage], work: Path) -> dict[str, float]:
    """Stage -> seconds its function ran, read from the finished folders' markers (absent: not run here)."""
    times = {}
    for name, folder in folders(graph).items():
        marker = Path(work) / folder / DONE
        if marker.exists():
            seconds = json.loads(marker.read_text()).get("seconds")
            if seconds is not None:
                times[name] = float(seconds)
    return times


def expected_seconds(graph: dict[str, Stage], work_of: WorkOf, rates: dict[str, float],
                     work: Optional[Path] = None) -> dict[str, float]:
    """Stage -> expected seconds on one worker: its size x seconds per unit of its kind (`rates`);
    0 for a stage already finished in `work`."""
    keys = folders(graph)
    out = {}
    for name, stage in graph.items():
        kind, size = work_of(name, stage.params)
        finished = work is not None and (Path(work) / keys[name] / DONE).exists()
        out[name] = 0.0 if finished else rates[kind] * size
    return out


def rates(samples) -> dict[str, tuple[float, float, int]]:
    """kind -> (seconds per unit, total seconds, stages) over (kind, size, seconds) samples."""
    seconds, units, count = defaultdict(float), defaultdict(float), defaultdict(int)
    for kind, size, secs in samples:
        seconds[kind] += secs
        units[kind] += size
        count[kind] += 1
    return {k: (seconds[k] / units[k], seconds[k], count[k]) for k in seconds if units[k] > 0}


def measured_rates(work: Path, work_of: WorkOf) -> dict[str, tuple[float, float, int]]:
    """kind -> (seconds per unit, total seconds, stages) over every finished stage in `work` that
    recorded its time; `work_of` sizes each from its marker's name and parameters."""
    samples = []
    for marker in sorted(Path(work).glob(f"*/{DONE}")):
        info = json.loads(marker.read_text())
        if info.get("seconds") is None:
            continue
        try:
            kind, size = work_of(info["stage"], info["params"])
        except (ValueError, KeyError, TypeError):  # a stage of another protocol version: not a rate
            continue
        samples.append((kind, size, info["seconds"]))
    return rates(samples)


def critical_path_order(durations: dict[str, float], deps: dict[str, tuple], order: Sequence[str]) -> list[str]:
    """`order` (a topological order) re-sorted by each stage's longest path to the end of the graph,
    its own duration included (its "upward rank"), longest first; ties keep `order`.

    run_dask starts ready stages in this order: on 2 workers the Table 1 graph otherwise starts the held-out
    generations before the last base net and the generations that gate every fine-tune (`simulate` of the
    paper-rows profile: benchmarks/README.md). A stage's inputs always rank above it when durations are
    positive, so the list is still a valid order for `run_sequential`."""
    children: dict[str, list[str]] = {n: [] for n in order}
    for n in order:
        for d in deps[n]:
            children[d].append(n)
    rank: dict[str, float] = {}
    for n in reversed(list(order)):
        rank[n] = durations[n] + max((rank[c] for c in children[n]), default=0.0)
    position = {n: i for i, n in enumerate(order)}
    return sorted(order, key=lambda n: (-rank[n], position[n]))


def simulate(durations: dict[str, float], deps: dict[str, tuple], order: list[str], workers: int) -> float:
    """Wall time of run_dask's policy: in `order` (run_dask: `critical_path_order`), start every ready
    stage while a worker is free."""
    pending, done, running, now, free = list(order), set(), [], 0.0, workers
    while pending or running:
        for name in list(pending):
            if free == 0:
                break
            if all(d in done for d in deps[name]):
                pending.remove(name)
                heapq.heappush(running, (now + durations[name], name))
                free -= 1
        if not running:
            raise RuntimeError(f"stages never become ready: {pending}")
        now, name = heapq.heappop(running)
        done.add(name)
        free += 1
    return now


def estimate(graph: dict[str, Stage], work_of: WorkOf, default_rates: dict[str, float], work: Path,
             workers: int) -> tuple[float, float, bool]:
    """(seconds of stage work left, wall seconds with `workers`, calibrated) for the unfinished stages
    of `graph`: rates from the finished stages in `work` where there are any (calibrated), else
    `default_rates`."""
    measured = {kind: r[0] for kind, r in measured_rates(work, work_of).items()}
    durations = expected_seconds(graph, work_of, {**default_rates, **measured}, work)
    deps = {name: tuple(stage.deps) for name, stage in graph.items()}
    order = critical_path_order(durations, deps, topological(graph))
    return sum(durations.values()), simulate(durations, deps, order, workers), bool(measured)


# --- a work folder read back ----------------------------------------------------------------------

@dataclass
class StageInfo:
    """A stage folder of a work folder, as its marker tells (None: the stage has not finished)."""

    folder: Path
    name: str
    marker: Optional[dict]  # None: not finished


def read_stages(work: Path) -> list[StageInfo]:
    """Every stage folder of a work folder with its marker (finished) or without (unfinished)."""
    stages = []
    for folder in sorted(p for p in work.iterdir() if p.is_dir()):
        marker = folder / DONE
        if marker.exists():
            info = json.loads(marker.read_text())
            stages.append(StageInfo(folder, str(info.get("stage", folder.name)), info))
        elif re.fullmatch(r".+-[0-9a-f]{10}", folder.name):
            stages.append(StageInfo(folder, folder.name.rsplit("-", 1)[0], None))
    return sorted(stages, key=lambda s: (s.marker is None, (s.marker or {}).get("started", 0), s.name))
