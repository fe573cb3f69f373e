"""benchmarks/bench_online.py's pieces: the equal-budget loop stops at its budget and checkpoints with the clock
paused; the held-out set holds Table 1's 14 types drawn evenly from 3 nets; the goal checks read the curves."""
from __future__ import annotations

import importlib.util
import sys
from collections import Counter

import pytest

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("bench_online", REPO / "benchmarks" / "bench_online.py")
bench = importlib.util.module_from_spec(spec)
sys.modules.setdefault("bench_online", bench)  # dataclasses look their module up there
spec.loader.exec_module(bench)


class FakeTime:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_the_loop_stops_at_its_budget_and_pauses_for_checkpoints():
    cpu, wall = FakeTime(), FakeTime()
    clock = bench.Clock("cpu", cpu=cpu, wall=wall)
    seen = []

    def step():  # each step costs 0.3 s of CPU and 0.5 s of wall time
        cpu.t += 0.3
        wall.t += 0.5

    def checkpoint(steps):
        seen.append((steps, clock.now()))
        cpu.t += 100.0  # evaluating: never charged to the budget
        wall.t += 100.0

    steps = bench.run_budget(step, 3.0, clock, 4, checkpoint)
    assert steps == 10  # 10 x 0.3 = 3.0 s reaches the budget; no step starts after it
    assert [s for s, _ in seen] == [3, 5, 8, 10]  # first time past 0.75, 1.5, 2.25, 3.0
    assert clock.elapsed() == pytest.approx((3.0, 5.0))
    wall_clock = bench.Clock("wall", cpu=FakeTime(), wall=(w := FakeTime()))

    def slow():
        w.t += 1.25

    assert bench.run_budget(slow, 3.0, wall_clock, 1, lambda s: None) == 3  # overrun: at most one step


def test_one_step_past_several_marks_checkpoints_once():
    cpu = FakeTime()
    clock = bench.Clock("cpu", cpu=cpu, wall=FakeTime())
    costs = iter([2.6, 0.2, 0.2, 0.2])
    seen = []

    def step():
        cpu.t += next(costs)

    assert bench.run_budget(step, 3.0, clock, 10, seen.append) == 3
    assert seen == [1, 2, 3]  # past 0.3 .. 2.4 at once, then 2.7, then 3.0


def test_unknown_clock():
    with pytest.raises(ValueError, match="clock must be cpu or wall, got 'gpu'"):
        bench.Clock("gpu")


def _rows(net: int, per_method: int) -> list[dict]:
    types = [("FGS", 1.0), ("FGV", 1.0), ("HC-S-1", 1.0), ("HC-S-1", 1.05)] + [
        (f"HC-D-{k}", s) for k in range(1, 10) for s in (1.0, 1.05, 1.1)]
    return [{"method": m, "scale": str(s), "net": net} for m, s in types for _ in range(per_method)]


def test_heldout_set_has_14_types_evenly_from_3_nets():
    nets = [_rows(n, 20) for n in range(3)]
    picks = bench.heldout_picks(nets, per_type=10)
    types = Counter((nets[n][i]["method"], float(nets[n][i]["scale"])) for n, i in picks)
    from hcgen.experiments.table1.protocol import HELDOUT_TYPES

    assert set(types) == set(HELDOUT_TYPES) and len(types) == 14
    assert all(v == 10 for v in types.values())
    per_net = Counter(n for n, _ in picks)
    assert sorted(per_net.values()) == [42, 42, 56]  # 10 = 4 + 3 + 3 of each type (hcgen table1's shares)
    assert len(set(picks)) == len(picks)  # no record twice
    assert ("HC-S-1", 1.05) not in types and ("HC-D-2", 1.05) not in types  # only the 14 types
    with pytest.raises(RuntimeError, match=r"held-out net 1: only 2 FGS x1 records for a share of 3"):
        bench.heldout_picks([_rows(0, 20), _rows(1, 2), _rows(2, 20)], per_type=10)


def _row(method, seed, heldout, mnist, curve):
    return {"method": method, "seed": seed, "clock": "cpu", "cpu_seconds": 100.0, "heldout_error": heldout,
            "mnist_test_error": mnist, "curve": [{"cpu_seconds": t, "heldout_error": e} for t, e in curve]}


def test_goal_checks_read_the_curves():
    by = {"offline": [_row("offline", 0, 0.10, 0.010, [])],
          "online": [_row("online", 0, 0.05, 0.009, [(25, 0.2), (50, 0.1), (75, 0.06), (100, 0.05)])],
          "art-fgsm": [_row("art-fgsm", 0, 0.30, 0.012, [])], "art-pgd": [_row("art-pgd", 0, 0.20, 0.009, [])]}
    checks = bench.goal_checks(by)
    assert checks["online_reaches_offline_in_half_time"] == [
        {"seed": 0, "offline_heldout_error": 0.10, "offline_seconds": 100.0, "online_reached_at_seconds": 50,
         "within_half": True}]
    assert checks["online_beats_art"]["holds"]
    by["online"][0]["curve"][1]["heldout_error"] = 0.11  # reached at 75 s only
    by["online"][0]["mnist_test_error"] = 0.0095  # worse than art-pgd's 0.9%
    checks = bench.goal_checks(by)
    assert not checks["online_reaches_offline_in_half_time"][0]["within_half"]
    assert not checks["online_beats_art"]["holds"]
    assert "**no**" in checks["text"][0] and "**no**" in checks["text"][1]


def test_curve_marks_align_when_one_step_passes_several():
    """Offline's first step (the generation) passes marks 1 and 2 at once: both read that first checkpoint."""
    curve = [{"cpu_seconds": t, "heldout_error": e} for t, e in [(13.1, 0.24), (15.0, 0.09), (20.0, 0.10)]]
    assert bench.at_marks(curve, "cpu", 20.0, 4) == [0.24, 0.24, 0.09, 0.10]
    assert bench.at_marks(curve[:1], "cpu", 20.0, 2) == [0.24, None]
