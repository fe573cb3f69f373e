"""`hcgen generate` on a trained LeNet: directions, exact minimal adversarials, hard positives, LMDB, resume."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from hcgen.core import directions, search
from hcgen.backends.caffe import CaffeNet
from hcgen.data.lmdb_io import METADATA_FILE, MetadataTable, read_lmdb
from hcgen.generate.run import GenerateSettings, compute_directions, generate
from hcgen.core.methods import Method, parse_methods, parse_scales
from hcgen.generate.shards import merge_shards, parse_shard

from tests.conftest import MODELS, SHARED_MNIST

DEPLOY = MODELS / "lenet" / "lenet_deploy.prototxt"


@pytest.fixture(scope="module")
def net(trained_lenet):
    return CaffeNet(DEPLOY, trained_lenet)


@pytest.fixture(scope="module")
def digits(net, mnist_test_slice):
    """40 correctly classified test digits (N, 1, 28, 28) with labels and scores."""
    images, labels = mnist_test_slice
    x, y = images[:60, None], labels[:60].astype(np.int64)
    pred, h = net.predict(x)
    ok = np.flatnonzero(pred == y)[:40]
    return x[ok], y[ok], h[ok].astype(np.float64)


def test_parse_methods_and_scales():
    names = [m.name for m in parse_methods("fgs,fgv,hc-d:1-3,hc-s:2,4")]
    assert names == ["FGS", "FGV", "HC-D-1", "HC-D-2", "HC-D-3", "HC-S-2", "HC-S-4"]
    assert len(parse_methods("fgs,fgv,hc-d:1-9,hc-s:1-9")) == 20
    with pytest.raises(ValueError, match="unknown method 'pgd'"):
        parse_methods("fgs,pgd")
    with pytest.raises(ValueError, match="k starts at 1"):
        parse_methods("hc-d:0-3")
    with pytest.raises(ValueError, match="methods repeat"):
        parse_methods("fgs,fgs")
    assert parse_scales("1.05,1.10") == [1.05, 1.10] and parse_scales("") == []
    with pytest.raises(ValueError, match="scales must be > 1"):
        parse_scales("0.9")
    with pytest.raises(ValueError, match="K/N with 0 <= K < N"):
        parse_shard("2/2")


def test_fgs_is_sign_of_fgv_and_hcs_sign_of_hcd(net, digits):
    x, y, h = digits
    methods = [Method("fgs"), Method("fgv"), Method("hc-d", 2), Method("hc-s", 2)]
    eta, valid = compute_directions(net, x, y, h, methods)
    assert valid.all()
    np.testing.assert_array_equal(eta[:, 0], np.sign(eta[:, 1]))
    np.testing.assert_array_equal(eta[:, 3], np.sign(eta[:, 2]))
    assert np.allclose(np.abs(eta[:, 1]).reshape(len(x), -1).max(1), 1.0)  # max |eta| = 1


def test_hot_cold_direction_moves_towards_hot_class(net, digits):
    """Along HC-D-k, <omega, h> grows to first order (exactly: its derivative is |B_l(omega)|^2 / max),
    and score(hot) - score(y) grows for (almost) every image."""
    x, y, h = digits
    k = 1
    eta, _ = compute_directions(net, x, y, h, [Method("hc-d", k)])
    eta = eta[:, 0]
    omega = directions.omega_hc(h, y, k)
    hot = directions.hot_class(h, y, k)
    t = 0.5  # grey levels on the most-moved pixel
    h_plus = net.scores(x + t * eta).astype(np.float64)
    h_minus = net.scores(x - t * eta).astype(np.float64)
    d_objective = ((h_plus - h_minus) * omega).sum(1) / (2 * t)
    assert (d_objective > 0).all()
    rows = np.arange(len(x))
    d_margin = ((h_plus[rows, hot] - h_plus[rows, y]) - (h_minus[rows, hot] - h_minus[rows, y])) / (2 * t)
    assert (d_margin > 0).mean() >= 0.9


def test_minimal_adversarials_are_exact_on_lenet(net, digits):
    """Every found x_adv is misclassified; the previous distinct integer image on the ray is not."""
    x, y, h = digits
    eta, _ = compute_directions(net, x, y, h, parse_methods("fgs,fgv,hc-d:1-3"))
    res = search.adversarial_search(net.scores, x, eta, y, clean_scores=h)
    assert res.success.mean() > 0.8
    n, d = np.nonzero(res.success)
    adv_pred = net.scores(res.x_adv[n, d]).argmax(1)
    assert (adv_pred != y[n]).all()
    np.testing.assert_array_equal(adv_pred, res.label[n, d])
    prev = search.perturb(x[n], eta[n, d], res.eps_prev[n, d])
    assert (net.scores(prev).argmax(1) == y[n]).all()
    assert (prev != res.x_adv[n, d]).any(axis=(1, 2, 3)).all()
    np.testing.assert_array_equal(search.perturb(x[n], eta[n, d], res.eps[n, d]), res.x_adv[n, d])


def _settings(weights, **kw):
    base = dict(model=str(DEPLOY), weights=str(weights), source=str(SHARED_MNIST), split="test",
                methods="fgs,fgv,hc-d:1-2,hc-s:1", scales="1.05,1.10", min_pass=-1.0, limit=24,
                seed=3, batch_size=8)
    base.update(kw)
    return GenerateSettings(**base)


@pytest.fixture(scope="module")
def generated(net, trained_lenet, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "adv_lmdb"
    summary = generate(net, _settings(trained_lenet), out)
    return out, summary


def test_generated_lmdb_records(net, generated):
    out, summary = generated
    keys, images, labels = read_lmdb(out)
    rows = list(MetadataTable(out / METADATA_FILE).rows())
    assert len(keys) == len(rows) == summary["records"] > 0
    assert [r["key"] for r in rows] == keys
    from hcgen.data.mnist import load_mnist

    src_images, src_labels = load_mnist(SHARED_MNIST, "test")
    src = np.array([int(r["source_index"]) for r in rows])
    np.testing.assert_array_equal(labels, src_labels[src])  # hard positives keep the ORIGINAL label
    np.testing.assert_array_equal(labels, [int(r["label"]) for r in rows])
    pred = net.scores(images).argmax(1)
    np.testing.assert_array_equal(pred, [int(r["pred"]) for r in rows])
    scale = np.array([float(r["scale"]) for r in rows])
    assert set(np.round(scale, 2)) == {1.0, 1.05, 1.1}
    assert (pred[scale == 1.0] != labels[scale == 1.0]).all()  # minimal adversarials are misclassified
    d = images.astype(int) - src_images[src][:, None]
    np.testing.assert_allclose([float(r["linf"]) for r in rows], np.abs(d).reshape(len(d), -1).max(1))
    passes = np.array([float(r["pass"]) for r in rows])
    assert ((passes > 0) & (passes <= 1)).all()
    methods = {r["method"] for r in rows}
    assert methods <= {"FGS", "FGV", "HC-D-1", "HC-D-2", "HC-S-1"} and "HC-D-1" in methods
    assert summary["source_images"] == 24
    assert json.loads((out / "summary.json").read_text())["records"] == len(keys)


def test_min_pass_filters_and_reports(net, trained_lenet, generated, tmp_path):
    out, summary = generated
    rows = list(MetadataTable(out / METADATA_FILE).rows())
    tau = float(np.median([float(r["pass"]) for r in rows]))
    filtered = generate(net, _settings(trained_lenet, min_pass=tau), tmp_path / "f")
    expected = sum(float(r["pass"]) >= tau for r in rows)
    assert filtered["records"] == expected
    with open(tmp_path / "f" / "failures.csv") as f:
        below = [r for r in csv.DictReader(f) if r["status"] == "below_min_pass"]
    assert len(below) == len(rows) - expected


def test_rerun_with_other_settings_is_refused(net, trained_lenet, generated):
    out, _ = generated
    with pytest.raises(ValueError, match="other settings \\(methods\\)"):
        generate(net, _settings(trained_lenet, methods="fgs"), out)


def test_merged_shards_equal_the_unsharded_run_exactly(net, trained_lenet, generated, tmp_path):
    from hcgen.cli import main

    out, _ = generated
    for k in range(2):
        generate(net, _settings(trained_lenet, shard=f"{k}/2"), tmp_path / str(k))
    assert main(["merge", str(tmp_path / "1"), str(tmp_path / "0"), "--out", str(tmp_path / "m")]) == 0
    keys, images, labels = read_lmdb(tmp_path / "m")
    keys0, images0, labels0 = read_lmdb(out)
    assert keys == keys0
    np.testing.assert_array_equal(images, images0)
    np.testing.assert_array_equal(labels, labels0)
    assert list(MetadataTable(tmp_path / "m" / METADATA_FILE).rows()) == list(MetadataTable(out / METADATA_FILE).rows())
    assert (tmp_path / "m" / "failures.csv").read_text() == (out / "failures.csv").read_text()
    assert json.loads((tmp_path / "m" / "summary.json").read_text()) == json.loads((out / "summary.json").read_text())
    generate(net, _settings(trained_lenet), tmp_path / "m")  # accepted as the unsharded run: nothing to do
    assert read_lmdb(tmp_path / "m")[0] == keys0
    with pytest.raises(ValueError, match=r"each of the shards \['0/2', '1/2'\] once, got \['0/2'\]"):
        merge_shards([tmp_path / "0"], tmp_path / "m2")


def test_resume_after_kill(trained_lenet, generated, tmp_path):
    """Kill `hcgen generate` after its first committed batch, rerun: same records as one clean run."""
    out, _ = generated
    target = tmp_path / "killed"
    cmd = [sys.executable, "-m", "hcgen.cli", "generate", "--model", str(DEPLOY), "--weights",
           str(trained_lenet), "--input", str(SHARED_MNIST), "--split", "test", "--methods",
           "fgs,fgv,hc-d:1-2,hc-s:1", "--limit", "24", "--seed", "3", "--batch", "8", "--out", str(target)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (target / "done.txt").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = (target / "done.txt").read_text().split()
    assert 1 <= len(done) < 3, "the kill should land mid-run"
    subprocess.run(cmd, check=True, capture_output=True)
    keys, images, labels = read_lmdb(target)
    keys0, images0, labels0 = read_lmdb(out)
    assert keys == keys0
    np.testing.assert_array_equal(images, images0)
    np.testing.assert_array_equal(labels, labels0)
    rows = [{k: v for k, v in r.items()} for r in MetadataTable(target / METADATA_FILE).rows()]
    rows0 = list(MetadataTable(out / METADATA_FILE).rows())
    assert rows == rows0


def test_cli_errors(tmp_path, trained_lenet, capsys):
    from hcgen.cli import main

    rc = main(["generate", "--model", str(DEPLOY), "--weights", str(tmp_path / "none.caffemodel"),
               "--out", str(tmp_path / "o")])
    assert rc == 2 and "weights not found" in capsys.readouterr().err
    rc = main(["generate", "--model", str(DEPLOY), "--weights", str(trained_lenet), "--methods", "xyz",
               "--out", str(tmp_path / "o")])
    assert rc == 2 and "unknown method 'xyz'" in capsys.readouterr().err


def test_demo_runs_end_to_end(trained_lenet, tmp_path, capsys):
    """`hcgen demo` (the README's main job) with a given net: LMDBs, generation, summary."""
    from hcgen.cli import main

    assert main(["demo", "--weights", str(trained_lenet), "--limit", "6", "--out", str(tmp_path),
                 "--mnist", str(SHARED_MNIST)]) == 0
    out = capsys.readouterr().out
    assert "HC-S-9" in out and "records written" in out and "PASS" in out
    summary = json.loads((tmp_path / "adversarial_lmdb" / "summary.json").read_text())
    assert summary["source_images"] == 6 and summary["records"] > 0
    assert read_lmdb(tmp_path / "mnist" / "mnist_test_lmdb")[1].shape == (10000, 1, 28, 28)
