"""`hcgen evaluate`: error rates that agree with `caffe test`, per generation method, and its errors."""
from __future__ import annotations

import json
import os
import re
import subprocess

import numpy as np
import pytest

from hcgen.backends.caffe import CaffeNet
from hcgen.backends.factory import BackendSpec
from hcgen.data.lmdb_io import DatumWriter, read_lmdb, write_datums
from hcgen.training.evaluate import ALL, ErrorRate, error_rates, evaluate, format_table
from hcgen.training.caffe_train import caffe_executable, train

from tests.conftest import MODELS, REPO
from tests.training.test_train import _cli, write_fast_solver, write_mnist_slices

DEPLOY = MODELS / "lenet" / "lenet_deploy.prototxt"


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    """LeNet after 150 iterations on 2,000 MNIST digits (~90% accurate: errors to count), and 1,000 test digits."""
    root = tmp_path_factory.mktemp("evaluate")
    train_lmdb, test_lmdb = write_mnist_slices(root)
    result = train(write_fast_solver(root), root / "run", seed=11, train_lmdb=train_lmdb, test_lmdb=test_lmdb,
                   iterations=150)
    return {"weights": result.caffemodel, "net": root / "run" / "net.prototxt", "test": test_lmdb, "root": root}


def test_error_rate_agrees_with_caffe_test(net):
    """`caffe test` on the train/test net (batch 100 x 10 iterations = the same 1,000 records)."""
    env = {**os.environ, "GLOG_minloglevel": "0", "GLOG_logtostderr": "1", "OPENBLAS_NUM_THREADS": "1"}
    out = subprocess.run([caffe_executable(), "test", f"--model={net['net']}", f"--weights={net['weights']}",
                          "--iterations=10"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    accuracy = float(re.findall(r"\] accuracy = ([\d.]+)", out.stderr)[-1])
    (result,) = evaluate(DEPLOY, net["weights"], [net["test"]])
    assert (result.dataset, result.group, result.records) == (str(net["test"]), ALL, 1000)
    assert 0 < result.errors < 500  # a partly trained net: the comparison is not vacuous
    assert abs((1000 - result.errors) - accuracy * 1000) <= 1


@pytest.fixture(scope="module")
def generated(net):
    """A generated-style LMDB: 300 test digits under three methods; 'shifted' records are rolled 6 pixels."""
    _, images, labels = read_lmdb(net["test"])
    images, labels = images[:300], labels[:300]
    methods = np.array(["FGS", "HC-D-1", "shifted"])[np.arange(300) % 3]
    images = images.copy()
    images[methods == "shifted"] = np.roll(images[methods == "shifted"], 6, axis=3)
    scales = np.where(np.arange(300) % 2 == 0, "1", "1.05")
    path = net["root"] / "generated"
    with DatumWriter(path, metadata_columns=("label", "method", "scale")) as writer:
        writer.write(images, labels, {"label": labels, "method": methods, "scale": scales})
    return path, images, labels, methods, scales


def test_errors_per_method_match_predictions(net, generated):
    path, images, labels, methods, scales = generated
    wrong = CaffeNet(DEPLOY, net["weights"]).predict(images)[0] != labels  # original labels
    results = evaluate(DEPLOY, net["weights"], [path], batch_size=64)
    expected = [ErrorRate(str(path), ALL, 300, int(wrong.sum()))] + [
        ErrorRate(str(path), m, 100, int(wrong[methods == m].sum())) for m in ("FGS", "HC-D-1", "shifted")]
    assert results == expected
    by_shift = {r.group: r.error_rate for r in results}
    assert by_shift["shifted"] > by_shift["FGS"]  # rolled digits are harder: labels are the originals

    two = evaluate(DEPLOY, net["weights"], [net["test"], path], group_by=("method", "scale"))
    assert [r.group for r in two if r.dataset == str(path)][1:3] == ["FGS 1", "FGS 1.05"]
    assert sum(r.records for r in two if r.dataset == str(path) and r.group != ALL) == 300
    assert [r.group for r in two if r.dataset == str(net["test"])] == [ALL]  # no metadata: overall only


def test_label_disagreeing_with_metadata_is_refused(net, tmp_path):
    x = np.zeros((2, 1, 28, 28), np.uint8)
    with DatumWriter(tmp_path / "bad", metadata_columns=("label", "method")) as writer:
        writer.write(x, [3, 4], {"label": [3, 5], "method": ["FGS", "FGS"]})
    with pytest.raises(ValueError, match="record 00000001 has label 4 but metadata.csv says 5"):
        evaluate(DEPLOY, net["weights"], [tmp_path / "bad"])


def test_user_errors(net, tmp_path):
    with pytest.raises(FileNotFoundError, match="no LMDB at .*missing"):
        evaluate(DEPLOY, net["weights"], [net["test"], tmp_path / "missing"])
    with pytest.raises(FileNotFoundError, match="weights not found"):
        evaluate(DEPLOY, tmp_path / "none.caffemodel", [net["test"]])
    with pytest.raises(ValueError, match="lacks 'force_backward: true'"):
        evaluate(net["net"], net["weights"], [net["test"]])  # the train/test net is no deploy net
    write_datums(tmp_path / "small", np.zeros((3, 1, 10, 10), np.uint8), [0, 1, 2])
    with pytest.raises(ValueError, match=r"images must have shape \(N, 1, 28, 28\)"):
        evaluate(DEPLOY, net["weights"], [tmp_path / "small"])


def test_evaluate_cli_prints_a_table_and_writes_json(net, generated, tmp_path, capsys):
    path = generated[0]
    assert _cli("evaluate", "--model", str(DEPLOY), "--weights", str(net["weights"]), "--data", str(net["test"]),
                str(path), "--json", str(tmp_path / "errors.json")) == 0
    report = json.loads((tmp_path / "errors.json").read_text())
    rows = report["results"]
    assert [(r["dataset"], r["group"]) for r in rows] == [(str(net["test"]), ALL), (str(path), ALL),
                                                          (str(path), "FGS"), (str(path), "HC-D-1"),
                                                          (str(path), "shifted")]
    assert all(r["error_rate"] == r["errors"] / r["records"] for r in rows)
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["dataset", "group", "records", "errors", "error", "%"]
    shifted = rows[-1]
    assert re.search(rf"shifted\s+100\s+{shifted['errors']}\s+{100 * shifted['error_rate']:.3f}", table)


def test_format_table_of_an_empty_dataset():
    text = format_table([ErrorRate("d", ALL, 0, 0)])
    assert text.splitlines()[1].split() == ["d", "all", "0", "0", "nan"]


def test_evaluate_a_torch_net_through_the_same_backend_contract(net, generated, tmp_path, capsys):
    """`hcgen evaluate --framework torch`: examples/torch_lenet.py holding the Caffe net's weights makes the
    same predictions as Caffe (checked image by image on the CaffeNet), so the error table is the same."""
    torch = pytest.importorskip("torch")
    from hcgen.backends.torch import state_dict_from_caffe

    path, images, labels, methods, _ = generated
    caffe_net = CaffeNet(DEPLOY, net["weights"])
    params = caffe_net.net.params
    torch.save(state_dict_from_caffe({n: [b.data for b in params[n]] for n in params}), tmp_path / "lenet.pt")
    torch_net = BackendSpec(f"{REPO / 'examples' / 'torch_lenet.py'}:lenet", tmp_path / "lenet.pt",
                            framework="torch").open()
    assert (torch_net.predict(images)[0] == caffe_net.predict(images)[0]).all()
    assert error_rates(torch_net, [path]) == evaluate(DEPLOY, net["weights"], [path])
    assert _cli("evaluate", "--framework", "torch", "--model", f"{REPO / 'examples' / 'torch_lenet.py'}:lenet",
                "--weights", str(tmp_path / "lenet.pt"), "--data", str(path), "--json", str(tmp_path / "t.json")) == 0
    rows = json.loads((tmp_path / "t.json").read_text())["results"]
    assert [r["errors"] for r in rows] == [r.errors for r in evaluate(DEPLOY, net["weights"], [path])]
    with pytest.raises(ValueError, match="--weights \\(the trained caffemodel\\) is required with --framework caffe"):
        _cli("evaluate", "--model", str(DEPLOY), "--data", str(path))
