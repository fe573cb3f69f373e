"""The Table 1 protocol end to end on the 'tiny' profile: stages, held-out set, report, resume."""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from hcgen.data.lmdb_io import MetadataTable, lmdb_count
from hcgen.experiments.table1 import estimate
from hcgen.experiments.table1 import protocol as table1
from hcgen.stages import graph as stages
from hcgen.experiments.table1.results import write_report

from tests.conftest import SHARED_MNIST


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
    from hcgen.training.caffe_train import SOLVER_FILE

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
    assert sorted(re.findall(r"`(fig\d_\w+\.png)`", (results / "README.md").read_text())) == sorted(
        p.name for p in results.glob("fig*.png"))


def test_results_readme_lists_only_the_figures_made(tiny_run, tmp_path):
    """A profile without Fig. 6 bins (paper-rows) gets no fig6 file and no line about one."""
    from dataclasses import replace

    profile, _, _, outputs, _ = tiny_run
    report = write_report(replace(table1.report_spec(profile), bins=[]), outputs, tmp_path)
    assert "fig6_pass_bins.png" not in report["figures"] and not (tmp_path / "fig6_pass_bins.png").exists()
    readme = (tmp_path / "README.md").read_text()
    assert "fig6" not in readme and "`fig5_metrics.png`: per adversarial type" in readme


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

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "estimate_table1.py"
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
    rates = estimate.measured_rates(work, profile)
    assert {"training iterations", "searches", "mixed records", "evaluated images"} <= set(rates)
    durations = {n: rates[estimate.stage_work(n, s.params, profile)[0]][0] * estimate.stage_work(n, s.params, profile)[1]
                 for n, s in graph.items()}
    measured = sum(stages.stage_times(graph, work).values())
    deps = {n: tuple(s.deps) for n, s in graph.items()}
    order = stages.topological(graph)
    assert stages.simulate(durations, deps, order, 1) == pytest.approx(measured, rel=1e-9)
    two = stages.simulate(durations, deps, order, 2)
    chain = durations["order1"] + durations["base1"] + durations["gen-train1"] + durations["tau"] + \
        durations["mix-FGS-net1-order1"] + durations["ft-FGS-net1-order1"] + durations["eval-FGS-net1-order1"]
    assert max(measured / 2, chain) - 1e-9 <= two < measured
    left, wall, calibrated = estimate.estimate(graph, profile, work, 2)
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


def test_estimate_script_takes_a_runs_stage_times_json(tmp_path):
    """--times: the rates of a stage_times.json are those measured_rates reads from the run's own markers."""
    profile = table1.PROFILES["tiny"]
    graph = table1.stages(profile)
    keys = stages.folders(graph)
    times = {"base1": 4.0, "ft-FGS-net1-order1": 2.0, "gen-train1": 3.0, "eval-base1": 0.5}
    for name, seconds in times.items():
        (tmp_path / keys[name]).mkdir()
        (tmp_path / keys[name] / stages.DONE).write_text(json.dumps(
            {"stage": name, "params": graph[name].params, "seconds": seconds}, default=str))
    est = _estimator()
    got, want = est.rates_from_times(times, profile), estimate.measured_rates(tmp_path, profile)
    assert set(got) == set(want) == {"training iterations", "searches", "evaluated images"}
    for kind in got:
        assert got[kind] == pytest.approx(want[kind])
    assert got["training iterations"] == pytest.approx((6.0 / 250, 6.0, 2))  # 200 + 50 iterations
    committed = json.loads((Path(__file__).resolve().parents[2] / "docs" / "table1-medium" / "stage_times.json")
                           .read_text())
    rates = est.rates_from_times(committed, table1.PROFILES["medium"])
    assert rates["training iterations"][2] == 72 and rates["searches"][2] == 3


def test_cli_estimate_prints_and_runs_nothing(tiny_run, tmp_path, capsys):
    from hcgen.cli import main

    _, _, work, _, _ = tiny_run
    assert main(["table1", "--profile", "full", "--work", str(tmp_path), "--dask", "--workers", "2",
                 "--estimate"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("expected: ~") and "with 2 workers" in out and "default rates, from a 2-core machine" in out
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

    from hcgen.data.lmdb_io import read_raw

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
    assert estimate.stage_work("gen-train1-shard0", graph["gen-train1-shard0"].params, profile)[1] == \
        estimate.stage_work("gen-train1", table1.stages(profile)["gen-train1"].params, profile)[1] / 2


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


# ---------------------------------------------------------------- the protocol's graph, without running it

def test_full_profile_graph_has_the_papers_structure():
    p = table1.PROFILES["full"]
    g = table1.stages(p)
    assert sorted(n for n in g if n.startswith("base")) == ["base1", "base2", "base3"]
    assert {g[f"base{b}"].params["iterations"] for b in (1, 2, 3)} == {10_000}
    # every base net reads its own seeded ordering of the 60K digits
    assert [g[f"base{b}"].deps for b in (1, 2, 3)] == [["mnist", f"order{b}"] for b in (1, 2, 3)]
    assert len({g[f"order{b}"].params["seed"] for b in (1, 2, 3)}) == 3
    for row in table1.ROWS:  # 3 base nets x 3 orderings = 9 fine-tunes of 20K iterations per row
        fts = [n for n in g if n.startswith(f"ft-{row}-net")]
        assert len(fts) == 9 and {g[n].params["iterations"] for n in fts} == {20_000}, row
        assert {g[n].deps[0] for n in fts} == {"base1", "base2", "base3"}
        assert len({g[n].params["seed"] for n in fts}) == 9
        assert len({g[f"mix-{n[3:]}"].params["seed"] for n in fts}) == 9  # distinct orderings
        assert all("tau" in g[f"mix-{n[3:]}"].deps for n in fts)
        assert len(table1.row_evals(p)[row]) == 9
    # InfiMNIST-style: 3 nets trained from scratch for 30K iterations on 1M deformations, no fine-tunes
    row = table1.INFIMNIST_ROW
    assert not [n for n in g if n.startswith(f"ft-{row}")]
    scratch = [n for n in g if n.startswith(f"scratch-{row}")]
    assert len(scratch) == 3 and {g[n].params["iterations"] for n in scratch} == {30_000}
    assert all(not any(d.startswith("base") for d in g[n].deps) for n in scratch)
    assert g["infimnist"].params["count"] == 1_000_000
    assert table1.row_evals(p)[table1.BASIC] == ["eval-base1", "eval-base2", "eval-base3"]
    # held-out set: 14 types x 5,000, from the test-digit generations of all three nets
    assert g["heldout"].deps == ["gen-test1", "gen-test2", "gen-test3"]
    assert g["heldout"].params["per_type"] == 5_000 and len(table1.HELDOUT_TYPES) == 14
    assert table1.heldout_shares(5_000, 3) == [1667, 1667, 1666]
    assert all(g[f"gen-test{b}"].params["limit"] is None for b in (1, 2, 3))  # all 10K test digits
    assert g["tau"].params["tau"] == "calibrate"
    # Fig. 6: every base net fine-tuned once per PASS bin
    assert len([n for n in g if n.startswith("ft-pass")]) == 3 * len(p.pass_bins)


def test_medium_profile_keeps_the_structure_and_shrinks_sizes_only():
    full, medium = table1.PROFILES["full"], table1.PROFILES["medium"]
    gf, gm = table1.stages(full), table1.stages(medium)
    kinds = lambda g: sorted({n.split("-")[0].rstrip("0123456789") for n in g})  # noqa: E731
    assert kinds(gm) == kinds(gf)
    assert len(gm) == len(gf)
    assert {row: len(e) for row, e in table1.row_evals(medium).items()} == \
        {row: len(e) for row, e in table1.row_evals(full).items()}
    assert medium.base_iterations == 10_000 and medium.base_nets == 3 and medium.orderings == 3
    assert (medium.train_tau, medium.base_orderings, medium.infimnist_from_scratch) == ("calibrate", True, True)


def test_paper_rows_profile_has_the_papers_sizes_for_its_rows():
    """Issue 23: 3 base nets x 1 ordering, five rows plus the images-only ablation, 60K sources per net,
    20K fine-tuning iterations, a 14 x 5K held-out set from all 10K test digits of the 3 nets."""
    p = table1.PROFILES["paper-rows"]
    g = table1.stages(p)
    rows = table1.row_evals(p)
    assert set(rows) == {"Basic LeNet", "FGS", "FGV", "HC-D-9", "HC-D-9-1.05", "HC-D-9-1.05-only"}
    assert all(len(evals) == 3 for evals in rows.values())  # 3 nets per row
    assert {g[f"base{b}"].params["iterations"] for b in (1, 2, 3)} == {10_000}
    assert [g[f"base{b}"].deps for b in (1, 2, 3)] == [["mnist", f"order{b}"] for b in (1, 2, 3)]
    for b in (1, 2, 3):
        train, test = g[f"gen-train{b}"].params, g[f"gen-test{b}"].params
        assert train["limit"] is None and test["limit"] is None  # all 60K / all 10K digits
        # the methods the rows need: FGS, FGV, HC-D-1..9 (x1.05 for HC-D-9-1.05); no HC-S row, no HC-S
        assert [m.name for m in table1_methods(train["methods"])] == ["FGS", "FGV"] + [f"HC-D-{k}" for k in range(1, 10)]
        assert train["scales"] == "1.05"
    fts = [n for n in g if n.startswith("ft-")]
    assert len(fts) == 5 * 3 and {g[n].params["iterations"] for n in fts} == {20_000}
    assert {g[n].deps[0] for n in fts} == {"base1", "base2", "base3"}
    # every row's fine-tunes of base net b read the same ordering seed: paired across rows
    for b in (1, 2, 3):
        assert len({g[n].params["seed"] for n in fts if f"-net{b}-" in n}) == 1
    assert g["heldout"].deps == ["gen-test1", "gen-test2", "gen-test3"] and g["heldout"].params["per_type"] == 5_000
    assert g["tau"].params["tau"] == "calibrate" and "HC-D-9-1.05-only" not in g["tau"].params["rows"]
    for b in (1, 2, 3):
        only, full = g[f"mix-HC-D-9-1.05-only-net{b}-order1"].params, g[f"mix-HC-D-9-1.05-net{b}-order1"].params
        assert only["with_mnist"] is False and full["with_mnist"] is True  # the ablation: no MNIST digits
        assert (only["methods"], only["scales"], only["seed"]) == (full["methods"], full["scales"], full["seed"])
        assert "tau" in g[f"mix-HC-D-9-1.05-only-net{b}-order1"].deps
    assert not any(n.startswith(("infimnist", "scratch-", "ft-pass")) for n in g)  # no InfiMNIST row, no Fig. 6
    spec = table1.report_spec(p)
    assert spec.claims and spec.bins == [] and "images only" in spec.description
    # the ablation's mix holds the row's images and no digits; the full row's holds both
    kind, size = estimate.stage_work("mix-HC-D-9-1.05-only-net1-order1", only, p)
    assert (kind, size) == ("mixed records", 9 * 60_000)


def table1_methods(spec):
    from hcgen.core.methods import parse_methods

    return parse_methods(spec)


def test_unknown_row_in_a_profile_is_refused():
    from dataclasses import replace

    with pytest.raises(ValueError, match="unknown rows \\['HC-X'\\]"):
        table1.stages(replace(table1.PROFILES["tiny"], rows=("FGS", "HC-X")))


def test_critical_path_order_runs_the_long_chain_first():
    """Two workers, a long chain behind `a` and short stages listed before it: graph order starts the short
    ones first and finishes later than longest-path-first, which is also a valid dependency order."""
    durations = {"s1": 1.0, "s2": 1.0, "a": 1.0, "b": 10.0, "c": 10.0}
    deps = {"s1": (), "s2": (), "a": (), "b": ("a",), "c": ("b",)}
    order = ["s1", "s2", "a", "b", "c"]
    ranked = stages.critical_path_order(durations, deps, order)
    assert ranked[0] == "a" and ranked.index("b") < ranked.index("c")
    assert stages.simulate(durations, deps, order, 2) == 22.0  # s1, s2 first; a waits for a worker
    assert stages.simulate(durations, deps, ranked, 2) == 21.0
    for name in ranked:  # every stage after its inputs
        assert all(ranked.index(d) < ranked.index(name) for d in deps[name])
    # the paper-rows graph on 2 workers: never worse than graph order, and close to half the work
    p = table1.PROFILES["paper-rows"]
    g = table1.stages(p)
    d = estimate.expected_seconds(g, p)
    gdeps = {n: tuple(st.deps) for n, st in g.items()}
    topo = stages.topological(g)
    best = stages.simulate(d, gdeps, stages.critical_path_order(d, gdeps, topo), 2)
    assert best < stages.simulate(d, gdeps, topo, 2) and best <= 1.05 * sum(d.values()) / 2


def test_tiny_profile_covers_every_row_kind():
    g = table1.stages(table1.PROFILES["tiny"])
    assert any(n.startswith("scratch-InfiMNIST-style") for n in g)  # from scratch
    assert "ft-HC-D-9-1.05-net1-order1" in g and g["mix-HC-D-9-1.05-net1-order1"].params["scales"] == [1.05]
    assert "ft-FGS-net1-order1" in g and "ft-FGV-net1-order1" in g
    assert any(n.startswith("ft-pass") for n in g) and "tau" in g and "order1" in g


def test_shuffled_orderings_of_the_base_nets_differ(tmp_path):
    """order1 and order2: the same 60K digits, each in its own seeded order."""
    from hcgen.data.lmdb_io import read_lmdb
    from hcgen.data.mnist import convert_mnist

    mnist = tmp_path / "mnist"
    convert_mnist(mnist, str(SHARED_MNIST))
    table1._shuffle(tmp_path / "o1", mnist, 1)
    table1._shuffle(tmp_path / "o2", mnist, 2)
    _, _, labels0 = read_lmdb(mnist / "mnist_train_lmdb")
    _, _, labels1 = read_lmdb(tmp_path / "o1" / "lmdb")
    _, _, labels2 = read_lmdb(tmp_path / "o2" / "lmdb")
    assert len(labels1) == len(labels2) == 60_000
    assert sorted(labels1) == sorted(labels2) == sorted(labels0)
    assert list(labels1) != list(labels2) and list(labels1) != list(labels0)


def test_a_changed_prototxt_or_solver_gives_new_stage_keys(tmp_path, monkeypatch):
    import shutil

    models = tmp_path / "lenet"
    shutil.copytree(table1.MODELS, models)
    monkeypatch.setattr(table1, "MODELS", models)
    profile = table1.PROFILES["tiny"]
    before = stages.folders(table1.stages(profile))
    deploy = models / "lenet_deploy.prototxt"
    deploy.write_text(deploy.read_text() + "\n# edited\n")
    after = stages.folders(table1.stages(profile))
    assert after["base1"] == before["base1"]  # trains with the solver and train/test net: unchanged
    assert after["gen-train1"] != before["gen-train1"] and after["eval-base1"] != before["eval-base1"]
    assert after["ft-FGS-net1-order1"] != before["ft-FGS-net1-order1"]  # downstream of a changed stage
    solver = models / "lenet_solver.prototxt"
    solver.write_text(solver.read_text().replace("base_lr: 0.01", "base_lr: 0.02"))
    again = stages.folders(table1.stages(profile))
    assert again["base1"] != after["base1"] and again["mnist"] == after["mnist"]


def test_claims_are_checked_with_welch_tests():
    from hcgen.experiments.table1.claims import claims

    nine = lambda m, s=0.02: [m + s * d for d in (-4, -3, -2, -1, 0, 1, 2, 3, 4)]  # noqa: E731
    numbers = {"Basic LeNet": {"mnist": [0.95, 0.93, 0.94], "adversarial": [64.0, 65.0, 63.0]},
               "FGS": {"mnist": nine(0.79), "adversarial": nine(31.0, 0.5)},
               "FGV": {"mnist": nine(0.70), "adversarial": nine(29.6, 0.5)},
               "HC-D-9": {"mnist": nine(0.68), "adversarial": nine(21.1, 0.5)},
               "HC-D-9-1.05": {"mnist": nine(0.67), "adversarial": nine(14.9, 0.5)},
               "InfiMNIST-style": {"mnist": nine(0.70), "adversarial": nine(48.0, 0.5)}}
    bins = {"0.00-0.70": {"mnist": [0.8] * 3, "adversarial": [30.0, 31.0, 29.0]},
            "0.80-0.90": {"mnist": [0.7] * 3, "adversarial": [20.0, 21.0, 19.0]},
            "0.90-1.00": {"mnist": [0.8] * 3, "adversarial": [25.0, 26.0, 24.0]}}
    verdicts = {c["id"]: c["verdict"] for c in claims(numbers, bins)}
    assert verdicts == {"a": "holds", "b": "holds", "c": "holds", "d": "holds", "e": "holds"}
    numbers["FGV"]["adversarial"] = nine(31.2, 0.5)  # worse than FGS: (c) fails
    numbers["HC-D-9"]["adversarial"] = nine(15.0, 0.5)  # next to HC-D-9-1.05: (b) not significant
    verdicts = {c["id"]: c["verdict"] for c in claims(numbers, bins)}
    assert verdicts["c"] == "does not hold" and verdicts["b"] == "not significant"


def test_claims_pair_the_nets_as_the_design_does():
    """Fine-tuned rows pair by (base net, ordering), a row against Basic LeNet by base net: a consistent
    per-net improvement that Welch's test cannot see through the spread between base nets holds paired."""
    from hcgen.experiments.table1.claims import claims, compare, paired_values

    units = [[b, o] for b in (1, 2, 3) for o in (1, 2, 3)]
    spread = [0.0, 0.01, 0.02, 1.0, 1.01, 1.02, 2.0, 2.01, 2.02]  # base nets differ a lot
    numbers = {"Basic LeNet": {"mnist": [1.0, 2.0, 3.0], "adversarial": [60.0, 61.0, 62.0],
                               "units": [[1, None], [2, None], [3, None]]},
               "FGS": {"mnist": [0.9 + v for v in spread], "adversarial": [30 + v for v in spread], "units": units},
               "HC-D-9": {"mnist": [0.8 + v for v in spread], "adversarial": [29.9 + v for v in spread],
                          "units": units},
               "HC-D-9-1.05": {"mnist": [0.8 + v for v in spread], "adversarial": [29.8 + v for v in spread],
                               "units": units},
               "FGV": {"mnist": [0.8 + v for v in spread], "adversarial": [29.95 + v for v in spread],
                       "units": units}}
    x, y, test = paired_values(numbers["HC-D-9"], numbers["FGS"], "adversarial")
    assert len(x) == 9 and test.startswith("paired t over 9 (base net, ordering)")
    x, y, test = paired_values(numbers["FGS"], numbers["Basic LeNet"], "mnist")
    assert x == pytest.approx([0.91, 1.91, 2.91]) and y == [1.0, 2.0, 3.0] and "by base net (n = 3)" in test
    c = compare(numbers, "HC-D-9", "FGS", "adversarial")
    assert c["verdict"] == "holds" and c["p"] < 1e-6 and "Welch p=" in c["text"]  # Welch alone: far from 0.05
    checked = {c["id"]: c for c in claims(numbers, {})}
    assert checked["c"]["verdict"] == "holds" and checked["c"]["test"] == "paired t"
    assert checked["a"]["verdict"] == "holds" and checked["b"]["verdict"] == "holds"
    # the same values without units: Welch's test, and the base nets' spread hides the 0.1 point
    bare = {r: {k: v for k, v in n.items() if k != "units"} for r, n in numbers.items()}
    assert {c["id"]: c["verdict"] for c in claims(bare, {})}["c"] == "not significant"
    # the ablation row is reported, not claimed about
    numbers["HC-D-9-1.05-only"] = {**numbers["HC-D-9-1.05"], "adversarial": [1.0] * 9}
    assert {c["id"]: c["verdict"] for c in claims(numbers, {})}["b"] == "holds"


def test_claims_render_as_a_table_with_the_evidence_below():
    from hcgen.experiments.table1.claims import claims, claims_markdown

    numbers = {"Basic LeNet": {"mnist": [0.95, 0.93, 0.94], "adversarial": [64.0, 65.0, 63.0]},
               "FGS": {"mnist": [0.8, 0.79, 0.81], "adversarial": [31.0, 30.0, 32.0]},
               "HC-D-9-1.05": {"mnist": [0.7, 0.69, 0.71], "adversarial": [15.0, 14.0, 16.0]}}
    lines = claims_markdown(claims(numbers, {}))
    assert lines[0] == "| claim | verdict | key numbers (mean error) | test | p |"
    rows = [line for line in lines if line.startswith("| (")]
    assert [r.split(" ")[1] for r in rows] == ["(a)", "(b)", "(c)"]
    assert all("**holds**" in r and "one-sided Welch t" in r for r in rows)
    assert "### Evidence" in lines and any(line.startswith("- **(a)") for line in lines)


def test_estimate_takes_rates_from_other_profiles_runs_beside_it(tiny_run, tmp_path, capsys):
    """A finished tiny run in work/tiny calibrates `--profile quick --estimate` in work/quick."""
    from hcgen.cli import main

    profile, _, work, _, _ = tiny_run
    (tmp_path / "tiny").symlink_to(work)
    rates, used = estimate.sibling_rates(tmp_path / "quick")
    assert used == ["tiny"]
    assert rates["training iterations"] == pytest.approx(estimate.measured_rates(work, profile)["training iterations"][0])
    assert main(["table1", "--profile", "quick", "--work", str(tmp_path), "--dask", "--workers", "2",
                 "--estimate"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("expected: ~") and f"rates from the finished tiny run(s) in {tmp_path}" in out
    left, wall, source = estimate.estimate_for_cli(table1.stages(table1.PROFILES["quick"]), table1.PROFILES["quick"],
                                                 tmp_path / "quick", 2)
    durations = estimate.expected_seconds(table1.stages(table1.PROFILES["quick"]), table1.PROFILES["quick"], rates)
    assert left == pytest.approx(sum(durations.values())) and 0 < wall < left
    assert not (tmp_path / "quick").exists()  # nothing ran, nothing was written


def test_compare_runs_recomputes_claims_from_older_table1_json(tmp_path):
    """docs/table1-medium/table1.json predates `units`: they are inferred from the row sizes, the claims are
    recomputed with paired tests, and a verdict is settled only where the runs agree."""
    import importlib.util
    from pathlib import Path

    from hcgen.experiments.table1.claims import load_numbers

    committed = Path(__file__).resolve().parents[2] / "docs" / "table1-medium" / "table1.json"
    rows, bins = load_numbers(committed)
    assert rows["Basic LeNet"]["units"] == [[1, None], [2, None], [3, None]]
    assert rows["FGS"]["units"][:4] == [[1, 1], [1, 2], [1, 3], [2, 1]] and "units" not in rows["InfiMNIST-style"]
    data = json.loads(committed.read_text())
    flipped = json.loads(committed.read_text())
    flipped["rows"]["HC-D-9-1.05"]["adversarial"] = [v - 5.0 for v in data["rows"]["HC-D-9-1.05"]["adversarial"]]
    other = tmp_path / "table1.json"
    other.write_text(json.dumps(flipped))
    path = Path(__file__).resolve().parents[2] / "scripts" / "compare_table1_runs.py"
    spec = importlib.util.spec_from_file_location("compare_table1_runs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    table = module.compare_runs([committed, other], ["committed", "flipped"])
    lines = {line.split(" ")[1]: line for line in table.splitlines() if line.startswith("| (")}
    assert lines["(b)"].endswith("| no |") and "does not hold" in lines["(b)"] and "holds (p=" in lines["(b)"]
    assert lines["(c)"].endswith("| yes: holds |")
