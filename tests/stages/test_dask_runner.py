"""Stage graphs on a 2-worker Dask LocalCluster: same results as a sequential run, survives a killed worker."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from hcgen.stages.dask_runner import run_dask
from hcgen.stages.graph import Stage, run_sequential

pytest.importorskip("distributed")


def _leaf(out: Path, value: int) -> None:
    (out / "value").write_text(str(value))


def _combine(out: Path, *inputs: Path) -> None:
    total = sum(int((p / "value").read_text()) for p in inputs)
    (out / "value").write_text(str(total * 10))
    with open(out.parent / "runs.log", "a") as f:  # how often a stage's work really ran
        f.write(out.name + "\n")


def _dies_once(out: Path, *inputs: Path) -> None:
    flag = out / "attempted"
    if not flag.exists():
        flag.write_text("1")
        os._exit(1)  # the worker process dies mid-task, like a kill -9
    _combine(out, *inputs)


def _graph(combine=_combine) -> dict[str, Stage]:
    g = {f"leaf{i}": Stage(f"leaf{i}", (lambda out, _v=i: _leaf(out, _v)), (), {"v": i}) for i in range(4)}
    g["pair01"] = Stage("pair01", combine, ("leaf0", "leaf1"))
    g["pair23"] = Stage("pair23", _combine, ("leaf2", "leaf3"))
    g["top"] = Stage("top", _combine, ("pair01", "pair23"))
    return g


def _values(outputs: dict[str, Path]) -> dict[str, str]:
    return {name: (path / "value").read_text() for name, path in outputs.items()}


def test_dask_equals_sequential(tmp_path):
    seq = run_sequential(_graph(), tmp_path / "seq")
    par = run_dask(_graph(), tmp_path / "dask", n_workers=2)
    assert _values(par) == _values(seq) and _values(seq)["top"] == str(((0 + 1) * 10 + (2 + 3) * 10) * 10)
    assert {p.name for p in par.values()} == {p.name for p in seq.values()}  # same keyed folders


def test_killed_worker_is_retried_without_duplicates(tmp_path):
    states = []
    out = run_dask(_graph(_dies_once), tmp_path, n_workers=2, progress=states.append)
    assert _values(out)["top"] == "600"
    runs = (tmp_path / "runs.log").read_text().split()
    assert sorted(runs) == sorted({p.name for n, p in out.items() if not n.startswith("leaf")})
    assert states[-1]["done"] == states[-1]["total"] == 7 and states[-1]["left"] == 0


def _timed(out: Path, *inputs: Path) -> None:
    import time

    start = time.time()
    time.sleep(0.5)
    (out / "ran").write_text(f"{os.getpid()} {start} {time.time()}")


def test_independent_stages_spread_over_both_workers(tmp_path):
    """Stages that share an input must not pile up on the worker that produced it (Dask's locality rule)."""
    g = {"root": Stage("root", lambda out: _leaf(out, 1))}
    g.update({f"s{i}": Stage(f"s{i}", _timed, ("root",), {"i": i}) for i in range(6)})
    out = run_dask(g, tmp_path, n_workers=2)
    runs = [(out[f"s{i}"] / "ran").read_text().split() for i in range(6)]
    pids = [r[0] for r in runs]
    assert len(set(pids)) == 2 and max(pids.count(p) for p in set(pids)) == 3
    events = sorted([(float(r[1]), 1) for r in runs] + [(float(r[2]), -1) for r in runs])
    busy = [sum(e for _, e in events[: k + 1]) for k in range(len(events))]
    assert max(busy) <= 2  # at most one stage per worker thread at a time


def test_finished_stages_are_not_resubmitted(tmp_path):
    first = run_dask(_graph(), tmp_path, n_workers=1)
    log = (tmp_path / "runs.log").read_text()
    states = []
    again = run_dask(_graph(), tmp_path, n_workers=1, progress=states.append)
    assert again == first and (tmp_path / "runs.log").read_text() == log
    assert states[0]["done"] == states[0]["total"] == 7 and states[0]["left"] == 0


def test_live_view_ticks_and_weighs_the_eta(tmp_path):
    g = {"root": Stage("root", lambda out: _leaf(out, 1))}
    g.update({f"s{i}": Stage(f"s{i}", _timed, ("root",), {"i": i}) for i in range(2)})
    states = []
    run_dask(g, tmp_path, n_workers=1, progress=states.append, weights={"root": 1, "s0": 1, "s1": 3},
             refresh_s=0.1)
    assert states[0]["done"] == 0 and states[0]["eta_s"] is None
    root = next(s for s in states if s["last"] == "root")
    assert root["eta_s"] == pytest.approx(root["elapsed_s"] * (1 + 3) / 1)  # work left / work done
    finished = [s["last"] for s in states if s["last"]]
    assert finished == ["root", "s1", "s0"]  # longest path first: the heavier s1 before s0
    s1 = next(s for s in states if s["last"] == "s1")
    assert s1["eta_s"] == pytest.approx(s1["elapsed_s"] * 1 / 4)
    ticks = [s for s in states if not s["last"] and s["done"] > 0]
    assert any(s["running_names"] == ["s1"] and s["running"] == 1 for s in ticks)  # between finishes
    assert states[-1]["left"] == 0 and states[-1]["eta_s"] == 0


def test_existing_cluster_by_scheduler_address(tmp_path):
    """--scheduler ADDRESS: the graph runs on a cluster the client does not own, which stays up after."""
    from distributed import Client, LocalCluster

    seq = run_sequential(_graph(), tmp_path / "seq")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        out = run_dask(_graph(), tmp_path / "remote", scheduler=cluster.scheduler_address)
        assert _values(out) == _values(seq)
        with Client(cluster.scheduler_address) as client:
            assert len(client.nthreads()) == 2  # run_dask closed its client, not the cluster
