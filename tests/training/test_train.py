"""`hcgen train` / `hcgen mix`: caffe train runs that learn, resume, skip and fine-tune; filtered shuffling."""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from hcgen.data import mnist
from hcgen.commands import train_cmd
from hcgen.data.lmdb_io import DatumWriter, read_lmdb, write_datums
from hcgen.data.mix import mix_training_data
from hcgen.training.caffe_train import train

from tests.conftest import MODELS, SHARED_MNIST

SOLVER = MODELS / "lenet" / "lenet_solver.prototxt"


def write_fast_solver(directory: Path) -> Path:
    """The stock LeNet solver with 10 test batches instead of 100 and a display every 50 iterations."""
    text = SOLVER.read_text().replace("test_iter: 100", "test_iter: 10").replace("display: 100", "display: 50")
    net = MODELS / "lenet" / "lenet_train_test.prototxt"
    text = text.replace('net: "lenet_train_test.prototxt"', f'net: "{net}"')
    path = directory / "solver.prototxt"
    path.write_text(text)
    return path


def write_mnist_slices(directory: Path, n_train: int = 2000, n_test: int = 1000) -> tuple[Path, Path]:
    """The first `n_train` MNIST training digits and `n_test` test digits as Datum LMDBs."""
    x, y = mnist.load_mnist(SHARED_MNIST, "train")
    xt, yt = mnist.load_mnist(SHARED_MNIST, "test")
    write_datums(directory / "train_lmdb", x[:n_train, None], y[:n_train])
    write_datums(directory / "test_lmdb", xt[:n_test, None], yt[:n_test])
    return directory / "train_lmdb", directory / "test_lmdb"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train_data")
    train_lmdb, test_lmdb = write_mnist_slices(root)
    return {"solver": write_fast_solver(root), "train": train_lmdb, "test": test_lmdb, "root": root}


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """LeNet, 300 iterations on 2,000 MNIST digits, seed 1, with the progress events it reported."""
    out = tmp_path_factory.mktemp("trained")
    events = []
    result = train(data["solver"], out, seed=1, train_lmdb=data["train"], test_lmdb=data["test"],
                   iterations=300, progress=events.append)
    return result, events, out


def test_training_reduces_loss_and_leaves_its_files(trained, data):
    result, _, out = trained
    assert result.status == "trained" and result.start_iter == 0 and result.max_iter == 300
    assert [it for it, _ in result.losses] == [0, 50, 100, 150, 200, 250, 300]
    first, last = result.losses[0][1], result.losses[-1][1]
    assert first > 1.5 and last < 0.4 * first  # ln(10) = 2.3 at random init
    assert result.caffemodel == out / "lenet_iter_300.caffemodel" and result.caffemodel.is_file()
    assert result.solverstate == out / "lenet_iter_300.solverstate" and result.solverstate.is_file()
    log = (out / "train.log").read_text()
    assert "Optimization Done." in log and result.log == out / "train.log"
    solver = (out / "solver.prototxt").read_text()
    assert "random_seed: 1\n" in solver and "max_iter: 300\n" in solver
    assert f'snapshot_prefix: "{out / "lenet"}"' in solver and f'net: "{out / "net.prototxt"}"' in solver
    net = (out / "net.prototxt").read_text()
    assert f'source: "{data["train"]}"' in net and f'source: "{data["test"]}"' in net


def test_progress_reports_losses_rates_and_tests(trained):
    result, events, _ = trained
    losses = [e for e in events if e.loss is not None]
    assert [(e.iteration, e.loss) for e in losses] == result.losses
    assert all(e.max_iter == 300 for e in events)
    assert all(e.it_per_s and e.it_per_s > 0 for e in losses[1:])
    tests = [e for e in events if e.test]
    assert tests[0].iteration == 0 and set(tests[0].test) == {"accuracy", "loss"}
    assert result.tests[0] == (0, tests[0].test)


def test_test_every_changes_the_test_phases_not_the_weights(trained, data, tmp_path):
    result = train(data["solver"], tmp_path, seed=1, train_lmdb=data["train"], test_lmdb=data["test"],
                   iterations=300, test_every=100)
    assert [it for it, _ in result.tests] == [0, 100, 200, 300]
    assert [it for it, _ in trained[0].tests] == [0]  # the solver's test_interval: 500
    assert result.caffemodel.read_bytes() == trained[0].caffemodel.read_bytes()
    assert "test_interval: 100\n" in (tmp_path / "solver.prototxt").read_text()


def test_no_test_phase_at_all_same_weights(trained, data, tmp_path):
    """test=False (Table 1's training stages): no test phase, not even at iterations 0 and 300."""
    result = train(data["solver"], tmp_path, seed=1, train_lmdb=data["train"], test_lmdb=data["test"],
                   iterations=300, test=False)
    assert result.tests == [] and "Testing net" not in result.log.read_text()
    assert result.caffemodel.read_bytes() == trained[0].caffemodel.read_bytes()
    solver = (tmp_path / "solver.prototxt").read_text()
    assert "test_interval: 301\n" in solver and "test_initialization: false\n" in solver


def test_seed_changes_the_initialization(trained, data, tmp_path):
    other = train(data["solver"], tmp_path, seed=2, train_lmdb=data["train"], test_lmdb=data["test"], iterations=1)
    assert other.losses[0][1] != trained[0].losses[0][1]  # iteration 0: same batch, other random weights


def test_rerun_skips_a_finished_run_and_reuses_its_seed(trained, data):
    result, _, out = trained
    log_size = (out / "train.log").stat().st_size
    again = train(data["solver"], out, train_lmdb=data["train"], test_lmdb=data["test"], iterations=300)
    assert again.status == "skipped" and again.seed == 1 and again.caffemodel == result.caffemodel
    assert again.losses == result.losses  # read back from train.log
    assert (out / "train.log").stat().st_size == log_size


def test_other_settings_in_a_used_directory_are_refused(trained, data):
    _, _, out = trained
    with pytest.raises(ValueError, match="holds snapshots of a run with different settings"):
        train(data["solver"], out, seed=2, train_lmdb=data["train"], test_lmdb=data["test"], iterations=300)
    with pytest.raises(ValueError, match="different settings"):
        train(data["solver"], out, seed=1, train_lmdb=data["train"], test_lmdb=data["test"], iterations=200)


def test_killed_run_resumes_from_its_last_complete_snapshot(data, tmp_path):
    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        from hcgen.training.caffe_train import train
        train({str(data["solver"])!r}, {str(out)!r}, seed=3, train_lmdb={str(data["train"])!r},
              test_lmdb={str(data["test"])!r}, iterations=300, snapshot_every=100)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    deadline = time.monotonic() + 120
    try:
        log = out / "train.log"
        while "Iteration 150, loss" not in (log.read_text() if log.exists() else ""):
            assert child.poll() is None and time.monotonic() < deadline, "training ended before it could be killed"
            time.sleep(0.05)
    finally:
        os.killpg(child.pid, signal.SIGKILL)  # the Python parent and its caffe child
        child.wait()
    assert (out / "lenet_iter_100.solverstate").is_file() and not (out / "lenet_iter_300.caffemodel").exists()
    # A snapshot cut short by the kill must not be resumed from.
    state = (out / "lenet_iter_100.solverstate").read_bytes()
    (out / "lenet_iter_250.solverstate").write_bytes(state[: len(state) // 2])
    (out / "lenet_iter_250.caffemodel").write_bytes((out / "lenet_iter_100.caffemodel").read_bytes())

    result = train(data["solver"], out, train_lmdb=data["train"], test_lmdb=data["test"], iterations=300,
                   snapshot_every=100)
    assert result.status == "resumed" and result.seed == 3 and result.start_iter in (100, 200)
    assert result.caffemodel == out / "lenet_iter_300.caffemodel" and result.caffemodel.is_file()
    assert result.losses[0][0] >= result.start_iter  # no iteration was redone from 0
    log = (out / "train.log").read_text()
    assert f"Resuming from {out / f'lenet_iter_{result.start_iter}.solverstate'}" in log
    assert train(data["solver"], out, iterations=300, snapshot_every=100, train_lmdb=data["train"],
                 test_lmdb=data["test"]).status == "skipped"


def test_fine_tuning_starts_from_the_weights(trained, data, tmp_path):
    """`caffe train --weights` starts from the weights (the sdist's tool loaded nothing; patches/0004)."""
    base = trained[0]
    result = train(data["solver"], tmp_path, weights=base.caffemodel, seed=4, train_lmdb=data["train"],
                   test_lmdb=data["test"], iterations=50)
    assert result.status == "trained" and result.caffemodel == tmp_path / "lenet_iter_50.caffemodel"
    assert result.losses[0][0] == 0 and result.losses[0][1] < 0.5  # random init gives ~2.3
    assert result.tests[0][1]["accuracy"] > 0.8
    assert "fine-tuning" in (tmp_path / "solver.prototxt").read_text().splitlines()[0]


def test_user_errors(data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the net's own sources are relative to the current directory
    kwargs = dict(train_lmdb=data["train"], test_lmdb=data["test"], iterations=10)
    with pytest.raises(FileNotFoundError, match="solver not found: .*nope.prototxt"):
        train(tmp_path / "nope.prototxt", tmp_path / "a", **kwargs)
    with pytest.raises(FileNotFoundError, match="weights not found: .*base.caffemodel"):
        train(data["solver"], tmp_path / "b", weights=tmp_path / "base.caffemodel", **kwargs)
    with pytest.raises(FileNotFoundError, match="training LMDB not found: .*missing_lmdb"):
        train(data["solver"], tmp_path / "c", seed=1, train_lmdb=tmp_path / "missing_lmdb",
              test_lmdb=data["test"], iterations=10)
    with pytest.raises(FileNotFoundError, match="test LMDB not found"):
        train(data["solver"], tmp_path / "d", seed=1, train_lmdb=data["train"], iterations=10)  # relative default
    with pytest.raises(ValueError, match="iterations must be positive"):
        train(data["solver"], tmp_path / "e", seed=1, train_lmdb=data["train"], test_lmdb=data["test"],
              iterations=0)
    with pytest.raises(ValueError, match="test_every must be positive, got -5"):
        train(data["solver"], tmp_path / "e", test_every=-5, **kwargs)
    with pytest.raises(ValueError, match="training and test LMDB are both .*hangs opening one LMDB twice"):
        train(data["solver"], tmp_path / "g", seed=1, train_lmdb=data["test"], test_lmdb=data["test"], iterations=1)
    with pytest.raises(RuntimeError, match="cannot run .*no-such-caffe"):
        train(data["solver"], tmp_path / "f", seed=1, executable=str(tmp_path / "no-such-caffe"), **kwargs)


def test_solver_and_net_errors(data, tmp_path):
    bad = tmp_path / "bad_solver.prototxt"
    bad.write_text('net: "missing_net.prototxt"\nmax_iter: 10\n')
    with pytest.raises(FileNotFoundError, match="net 'missing_net.prototxt' named by .* not found"):
        train(bad, tmp_path / "a", seed=1)
    bad.write_text("this is not a solver")
    with pytest.raises(ValueError, match="not a valid Caffe SolverParameter prototxt"):
        train(bad, tmp_path / "b", seed=1)
    deploy_only = tmp_path / "deploy_solver.prototxt"
    deploy_only.write_text(f'net: "{MODELS / "lenet" / "lenet_deploy.prototxt"}"\nmax_iter: 10\n')
    with pytest.raises(ValueError, match="has no TRAIN-phase Data layer"):
        train(deploy_only, tmp_path / "c", seed=1, train_lmdb=data["train"])


def test_caffe_failure_raises_with_the_log_tail(data, tmp_path):
    net = (MODELS / "lenet" / "lenet_train_test.prototxt").read_text()
    net = net.replace('type: "ReLU"', 'type: "NoSuchLayer"')
    (tmp_path / "net.prototxt").write_text(net)
    solver = tmp_path / "solver.prototxt"
    solver.write_text(data["solver"].read_text().replace(
        f'net: "{MODELS / "lenet" / "lenet_train_test.prototxt"}"', f'net: "{tmp_path / "net.prototxt"}"'))
    with pytest.raises(RuntimeError, match="caffe train (exited with|was killed by signal)") as info:
        train(solver, tmp_path / "run", seed=1, train_lmdb=data["train"], test_lmdb=data["test"], iterations=10)
    assert "Unknown layer type: NoSuchLayer" in str(info.value)
    assert "Unknown layer type: NoSuchLayer" in (tmp_path / "run" / "train.log").read_text()


def test_fine_tuning_refuses_weights_of_another_shape(data, tmp_path):
    net = (MODELS / "lenet" / "lenet_train_test.prototxt").read_text().replace("num_output: 500", "num_output: 30")
    (tmp_path / "net.prototxt").write_text(net)
    solver = tmp_path / "solver.prototxt"
    solver.write_text(data["solver"].read_text().replace(
        f'net: "{MODELS / "lenet" / "lenet_train_test.prototxt"}"', f'net: "{tmp_path / "net.prototxt"}"'))
    small = train(solver, tmp_path / "small", seed=1, train_lmdb=data["train"], test_lmdb=data["test"],
                  iterations=1)
    with pytest.raises(RuntimeError, match="caffe train (was killed|exited)") as info:
        train(data["solver"], tmp_path / "ft", weights=small.caffemodel, seed=1, train_lmdb=data["train"],
              test_lmdb=data["test"], iterations=10)
    assert "Cannot copy param 0 weights from layer 'ip1'; shape mismatch" in str(info.value)


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="hcgen")
    train_cmd.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_train_cli_reports_a_finished_run(trained, data, capsys):
    _, _, out = trained
    assert _cli("train", "--solver", str(data["solver"]), "--out", str(out), "--train", str(data["train"]),
                "--test", str(data["test"]), "--iterations", "300") == 0
    expected = f"already trained: {out / 'lenet_iter_300.caffemodel'} (300 iterations, seed 1)"
    assert expected in capsys.readouterr().out


# --- mixing ------------------------------------------------------------------------------------------

def _generated(path: Path, methods: list[str], scales: list[float], passes: list[float], base: int) -> Path:
    """A fake generated LMDB: record i is a constant image of value base+i, with generation metadata."""
    n = len(methods)
    images = (base + np.arange(n, dtype=np.uint8))[:, None, None, None] * np.ones((1, 1, 4, 4), np.uint8)
    labels = np.arange(n) % 10
    with DatumWriter(path, metadata_columns=("label", "method", "scale", "pass")) as writer:
        writer.write(images, labels, {"label": labels, "method": methods, "scale": scales, "pass": passes})
    return path


@pytest.fixture()
def sources(tmp_path):
    a = _generated(tmp_path / "gen_a", ["FGS", "HC-D-1", "HC-D-1", "HC-D-2", "FGV", "HC-D-1"],
                   [1, 1, 1.05, 1, 1, 1.05], [0.99, 0.95, 0.80, 0.97, 0.50, 0.999], base=0)
    b = _generated(tmp_path / "gen_b", ["HC-D-1", "FGS", "HC-D-2"], [1, 1, 1.05], [0.91, 0.92, 0.93], base=100)
    mnist_like = tmp_path / "mnist_like"
    values = (200 + np.arange(5, dtype=np.uint8))[:, None, None, None]
    write_datums(mnist_like, values * np.ones((1, 1, 4, 4), np.uint8), np.arange(5))
    return a, b, mnist_like


def _values(path: Path) -> list[int]:
    _, images, _ = read_lmdb(path)
    return [int(v) for v in images[:, 0, 0, 0]]


def test_mix_filters_on_metadata_and_keeps_each_record_once(sources, tmp_path):
    a, b, mnist_like = sources
    count, before = mix_training_data([a, b], tmp_path / "mix", seed=7, with_mnist=mnist_like,
                                      methods=["HC-D-1", "FGS"], min_pass=0.9, max_pass=0.995)
    # a: FGS 0.99 (0), HC-D-1 0.95 (1); 0.80 and 0.999 fall outside [0.9, 0.995). b: HC-D-1 (100), FGS (101).
    expected = [0, 1, 100, 101, 200, 201, 202, 203, 204]
    assert (count, before) == (len(expected), 0)
    got = _values(tmp_path / "mix")
    assert sorted(got) == expected and got != expected  # every record once, shuffled

    count, _ = mix_training_data([a, b], tmp_path / "scaled", seed=7, scales=[1.05])
    assert sorted(_values(tmp_path / "scaled")) == [2, 5, 102] and count == 3


def test_mix_order_depends_only_on_the_seed(sources, tmp_path):
    a, b, mnist_like = sources
    orders = []
    for name, seed in (("one", 1), ("again", 1), ("two", 2)):
        mix_training_data([a, b], tmp_path / name, seed=seed, with_mnist=mnist_like)
        orders.append(_values(tmp_path / name))
    assert orders[0] == orders[1] != orders[2] and sorted(orders[0]) == sorted(orders[2])
    assert mix_training_data([a, b], tmp_path / "one", seed=1, with_mnist=mnist_like) == (14, 14)  # nothing to add
    with pytest.raises(ValueError, match="already holds 14 records mixed with other settings"):
        mix_training_data([a, b], tmp_path / "one", seed=2, with_mnist=mnist_like)


def test_mix_errors(sources, tmp_path):
    a, b, mnist_like = sources
    with pytest.raises(ValueError, match="nothing to mix"):
        mix_training_data([], tmp_path / "out", seed=0)
    with pytest.raises(FileNotFoundError, match="generated LMDB not found: .*nope"):
        mix_training_data([tmp_path / "nope"], tmp_path / "out", seed=0)
    with pytest.raises(FileNotFoundError, match="MNIST training LMDB not found"):
        mix_training_data([a], tmp_path / "out", seed=0, with_mnist=tmp_path / "nope")
    with pytest.raises(ValueError, match=r"mnist_like lacks the metadata column\(s\) pass to filter on"):
        mix_training_data([a, mnist_like], tmp_path / "out", seed=0, min_pass=0.9)
    with pytest.raises(ValueError, match="--min-pass 0.9 must be below --max-pass 0.5"):
        mix_training_data([a], tmp_path / "out", seed=0, min_pass=0.9, max_pass=0.5)


def test_mix_cli(sources, tmp_path, capsys):
    a, b, mnist_like = sources
    assert _cli("mix", str(a), str(b), "--out", str(tmp_path / "mix"), "--seed", "3", "--with-mnist",
                str(mnist_like), "--methods", "HC-D-2", "--min-pass", "0.9") == 0
    assert f"{tmp_path / 'mix'}: 7 records, shuffled with seed 3" in capsys.readouterr().out
    assert sorted(_values(tmp_path / "mix")) == [3, 102, 200, 201, 202, 203, 204]
