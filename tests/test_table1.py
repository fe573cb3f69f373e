"""The Table 1 protocol end to end on the 'tiny' profile: stages, held-out set, report, resume."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from hcgen.lmdb_io import MetadataTable, lmdb_count
from hcgen.pipeline import stages, table1
from hcgen.pipeline.report import write_report

from .conftest import SHARED_MNIST


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("table1")
    profile = table1.PROFILES["tiny"]
    graph = table1.stages(profile, str(SHARED_MNIST))
    outputs = stages.run_sequential(graph, work)
    report = write_report(table1.report_spec(profile), outputs, work / "results", stages.stage_times(graph, work))
    return profile, graph, work, outputs, report


def test_graph_is_keyed_by_inputs():
    profile = table1.PROFILES["tiny"]
    a = stages.folders(table1.stages(profile))
    b = stages.folders(table1.stages(table1.PROFILES["tiny"].__class__(**{**profile.__dict__, "finetune_iterations": 51})))
    assert a["base1"] == b["base1"] and a["gen-train1"] == b["gen-train1"]  # upstream of the change: same
    assert a["ft-FGS-net1-order1"] != b["ft-FGS-net1-order1"]  # changed stage and everything after it
    assert a["eval-FGS-net1-order1"] != b["eval-FGS-net1-order1"]
    order = stages.topological(table1.stages(profile))
    assert order.index("order1") < order.index("base1") < order.index("gen-train1") < order.index("tau") \
        < order.index("mix-FGS-net1-order1")


def test_heldout_has_14_types_evenly(tiny_run):
    profile, _, _, outputs, _ = tiny_run
    rows = list(MetadataTable(outputs["heldout"] / "lmdb" / "metadata.csv").rows())
    types = Counter((r["method"], float(r["scale"])) for r in rows)
    assert set(types) == set(table1.HELDOUT_TYPES)
    assert set(types.values()) == {profile.heldout_per_type}
    assert lmdb_count(outputs["heldout"] / "lmdb") == 14 * profile.heldout_per_type


def test_tau_keeps_the_papers_fgv_share_and_the_rows_train_on_it(tiny_run):
    profile, _, _, outputs, _ = tiny_run
    gen = list(MetadataTable(outputs["gen-train1"] / "lmdb" / "metadata.csv").rows())
    info = json.loads((outputs["tau"] / "tau.json").read_text())
    tau = info["tau"]
    fgv = sorted((float(r["pass"]) for r in gen if r["method"] == "FGV" and float(r["scale"]) == 1.0), reverse=True)
    k = round(37663 / 60000 * profile.train_images)  # the paper's FGV share of the digits searched
    assert len(fgv) >= k and tau == fgv[k - 1]
    assert info["rows"]["FGV"]["kept_per_net"] == [k]
    kept_fgs = sum(r["method"] == "FGS" and float(r["scale"]) == 1.0 and float(r["pass"]) >= tau for r in gen)
    assert 0 < kept_fgs < sum(r["method"] == "FGS" and float(r["scale"]) == 1.0 for r in gen)  # tau filters
    assert info["rows"]["FGS"]["kept_per_net"] == [kept_fgs]
    assert lmdb_count(outputs["mix-FGS-net1-order1"] / "lmdb") == 60000 + kept_fgs
    assert lmdb_count(outputs["mix-FGV-net1-order1"] / "lmdb") == 60000 + k
    hcd = sum(r["method"] in {f"HC-D-{k}" for k in range(1, 10)} and float(r["scale"]) == 1.05
              and float(r["pass"]) >= tau for r in gen)
    assert hcd > 0 and lmdb_count(outputs["mix-HC-D-9-1.05-net1-order1"] / "lmdb") == 60000 + hcd
    # the InfiMNIST-style row: trained from scratch on the 60K digits plus the deformations, no tau
    assert lmdb_count(outputs["mix-InfiMNIST-style-net1"] / "lmdb") == 60000 + profile.infimnist_count
    from hcgen.pipeline.train import SOLVER_FILE

    assert "random initialization" in (outputs["scratch-InfiMNIST-style-net1"] / SOLVER_FILE).read_text()
    assert "fine-tuning" in (outputs["ft-FGS-net1-order1"] / SOLVER_FILE).read_text()


def test_report_table_and_figures(tiny_run):
    profile, _, work, _, report = tiny_run
    results = work / "results"
    text = (results / "table1.md").read_text()
    for row in list(profile.rows) + ["Basic LeNet"]:
        assert f"| {row} |" in text
    assert "| .937% ± .110 | 64.21% |" in text  # the paper's Basic LeNet numbers beside ours
    numbers = json.loads((results / "table1.json").read_text())["rows"]
    for row in numbers.values():
        assert all(0 <= v <= 100 for v in row["mnist"] + row["adversarial"])
    for name in ("fig2_adversarials.png", "fig4_pass_distributions.png", "fig5_metrics.png", "fig6_pass_bins.png"):
        assert (results / name).stat().st_size > 10_000, name
    # the base net misclassifies its own minimal adversarials in the held-out set: high adversarial error
    assert numbers["Basic LeNet"]["adversarial"][0] > 50


def test_rerun_skips_finished_stages(tiny_run):
    profile, graph, work, outputs, _ = tiny_run

    def must_not_run(*args):
        raise AssertionError("a finished stage ran again")

    again = table1.stages(profile, str(SHARED_MNIST))
    for stage in again.values():
        stage.fn = must_not_run
    assert stages.run_sequential(again, work) == outputs


def _estimator():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "estimate_table1.py"
    spec = importlib.util.spec_from_file_location("estimate_table1", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stage_markers_time_each_stage(tiny_run):
    _, graph, work, outputs, _ = tiny_run
    times = stages.stage_times(graph, work)
    assert set(times) == set(graph)
    assert times["base1"] > 0.5 and times["ft-FGS-net1-order1"] > 0.5  # caffe train runs take seconds
    marker = json.loads((outputs["base1"] / ".stage.json").read_text())
    assert marker["stage"] == "base1" and marker["seconds"] == times["base1"] and marker["pid"] > 0


def test_estimate_replays_the_measured_run(tiny_run):
    """Estimating a profile from its own run: one worker takes exactly the measured stage time; two
    workers take at least half of it and at least the longest chain of stages."""
    profile, graph, work, _, _ = tiny_run
    rates = table1.measured_rates(work, profile)
    assert {"training iterations", "searches", "mixed records", "evaluated images"} <= set(rates)
    durations = {n: rates[table1.stage_work(n, s.params, profile)[0]][0] * table1.stage_work(n, s.params, profile)[1]
                 for n, s in graph.items()}
    measured = sum(stages.stage_times(graph, work).values())
    deps = {n: tuple(s.deps) for n, s in graph.items()}
    order = stages.topological(graph)
    assert stages.simulate(durations, deps, order, 1) == pytest.approx(measured, rel=1e-9)
    two = stages.simulate(durations, deps, order, 2)
    chain = durations["order1"] + durations["base1"] + durations["gen-train1"] + durations["tau"] + \
        durations["mix-FGS-net1-order1"] + durations["ft-FGS-net1-order1"] + durations["eval-FGS-net1-order1"]
    assert max(measured / 2, chain) - 1e-9 <= two < measured
    left, wall, calibrated = table1.estimate(graph, profile, work, 2)
    assert (left, wall, calibrated) == (0.0, 0.0, True)  # everything finished: nothing left


def test_estimate_script_prints_the_target_profile(tiny_run, capsys, monkeypatch):
    _, _, work, _, _ = tiny_run
    est = _estimator()
    monkeypatch.setattr("sys.argv", ["estimate_table1.py", "--work", str(work), "--measured", "tiny",
                                     "--target", "tiny", "--workers", "1", "2"])
    est.main()
    out = capsys.readouterr().out
    assert "training iterations" in out and "estimated wall time with 2 worker(s)" in out
    monkeypatch.setattr("sys.argv", ["estimate_table1.py", "--work", str(work), "--target", "quick",
                                     "--shards", "4"])
    est.main()  # the tiny profile has no merges: those take hcgen's default rates
    out = capsys.readouterr().out
    assert "InfiMNIST-style images" in out and "merged records" in out and "(not measured in --work" in out
    assert "estimated wall time with 2 worker(s)" in out


def test_cli_estimate_prints_and_runs_nothing(tiny_run, tmp_path, capsys):
    from hcgen.cli import main

    _, _, work, _, _ = tiny_run
    assert main(["table1", "--profile", "full", "--work", str(tmp_path), "--dask", "--workers", "2",
                 "--estimate"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("expected: ~") and "with 2 workers" in out and "2-core 2 GHz EPYC" in out
    assert list(tmp_path.iterdir()) == []  # nothing ran, nothing was written
    (tmp_path / "tiny").symlink_to(work)
    assert main(["table1", "--profile", "tiny", "--work", str(tmp_path), "--mnist", str(SHARED_MNIST),
                 "--estimate"]) == 0
    assert "every stage of the tiny profile" in capsys.readouterr().out
    assert main(["table1", "--scheduler", "tcp://127.0.0.1:1", "--estimate"]) == 2
    assert "hcgen table1: error: --estimate works for this machine only (a cluster's size and speed are " \
        "unknown here)" in capsys.readouterr().err
    assert main(["table1", "--shards", "0", "--estimate", "--work", str(tmp_path)]) == 2
    assert "hcgen table1: error: --shards must be a positive integer, got 0" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [tmp_path / "tiny"]  # the refused runs wrote nothing


def test_cli_dask_run_reproduces_the_sequential_table(tiny_run, tmp_path, capsys):
    """scripts/reproduce_table1.sh runs `hcgen table1 --dask`: the same Table 1, byte for byte."""
    from hcgen.cli import main

    _, _, work, _, _ = tiny_run
    assert main(["table1", "--profile", "tiny", "--dask", "--workers", "2", "--work", str(tmp_path / "work"),
                 "--results", str(tmp_path / "results"), "--mnist", str(SHARED_MNIST)]) == 0
    out = capsys.readouterr().out
    assert "Dask dashboard: http" in out and "| finished ft-FGS-net1-order1" in out
    assert (tmp_path / "results" / "table1.md").read_text() == (work / "results" / "table1.md").read_text()
    assert json.loads((tmp_path / "results" / "table1.json").read_text()) == \
        json.loads((work / "results" / "table1.json").read_text())


def test_sharded_generation_stages_merge_to_the_unsharded_records(tiny_run, tmp_path):
    """--shards 2: each generation runs as 2 shard stages plus a merge, with the same records."""
    from dataclasses import replace

    from hcgen.lmdb_io import read_raw

    profile, _, _, outputs, _ = tiny_run
    graph = table1.stages(replace(profile, generation_shards=2), str(SHARED_MNIST))
    assert {"gen-train1-shard0", "gen-train1-shard1", "gen-test1-shard1"} <= set(graph)
    assert graph["gen-train1"].deps == ["gen-train1-shard0", "gen-train1-shard1"]
    needed = ["mnist", "order1", "base1"] + [n for n in graph if n.startswith("gen-")]
    sharded = stages.run_sequential({n: graph[n] for n in needed}, tmp_path)
    for name in ("gen-train1", "gen-test1"):
        a, b = outputs[name] / "lmdb", sharded[name] / "lmdb"
        n = lmdb_count(a)
        assert n > 0 and lmdb_count(b) == n
        assert read_raw(a, list(range(n))) == read_raw(b, list(range(n)))  # the Datums, in key order
        assert (a / "metadata.csv").read_text() == (b / "metadata.csv").read_text()
    assert table1.stage_work("gen-train1-shard0", graph["gen-train1-shard0"].params, profile)[1] == \
        table1.stage_work("gen-train1", table1.stages(profile)["gen-train1"].params, profile)[1] / 2


def test_ctrl_c_stops_a_dask_run_cleanly(tmp_path):
    """Ctrl-C during `hcgen table1 --dask`: exit 130 with how to go on, and no caffe left running."""
    import signal
    import subprocess
    import sys
    import time

    work = tmp_path / "work"
    cmd = [sys.executable, "-m", "hcgen.cli", "table1", "--profile", "tiny", "--dask", "--workers", "2",
           "--work", str(work), "--results", str(tmp_path / "results"), "--mnist", str(SHARED_MNIST)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def caffe_runs() -> str:
        return subprocess.run(["pgrep", "-af", f"caffe train --solver={work}"], capture_output=True,
                              text=True).stdout

    deadline = time.monotonic() + 120
    while not caffe_runs() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert caffe_runs(), "base1's caffe train never started"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert f"interrupted: finished stages are kept in {work / 'tiny'}; rerun the same command" in out
    time.sleep(1)
    assert caffe_runs() == ""  # the workers' caffe processes went down with them
    assert (work / "tiny").is_dir() and not (tmp_path / "results" / "table1.md").exists()
