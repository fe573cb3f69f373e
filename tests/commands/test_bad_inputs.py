"""The bad-input campaign (issue 14): every case runs the `hcgen` CLI in a subprocess (Caffe could abort
it) and must end with exit code 2, exactly one stderr line ``hcgen CMD: error: ...`` naming the problem,
no traceback, and no file of the fixture folder (inputs and earlier outputs) created or changed.
Generate, merge, pass, train, mix, evaluate, demo, data and table1 each get several."""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hcgen.data.lmdb_io import DatumWriter, write_datums

from tests.conftest import MODELS, SHARED_MNIST
from tests.util.test_locks import read_only

DEPLOY = MODELS / "lenet" / "lenet_deploy.prototxt"
SOLVER = MODELS / "lenet" / "lenet_solver.prototxt"

COLOUR_NET = """name: "colour"
force_backward: true
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 6 dim: 6 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 2 kernel_size: 3 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
  inner_product_param { num_output: 10 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""


def _caffemodel_with(weights: Path, out: Path, change) -> Path:
    from caffe.proto import caffe_pb2

    net = caffe_pb2.NetParameter()
    net.ParseFromString(weights.read_bytes())
    change(net)
    out.write_bytes(net.SerializeToString())
    return out


@pytest.fixture(scope="module")
def w(trained_lenet, mnist_test_slice, tmp_path_factory):
    """The fixture folder: good inputs, earlier outputs, and one bad file per kind."""
    import caffe

    from hcgen.backends.caffe import CaffeNet
    from hcgen.generate.run import GenerateSettings, generate
    from hcgen.data.mix import mix_training_data

    root = tmp_path_factory.mktemp("bad_inputs")
    p = {"root": root, "deploy": DEPLOY, "solver": SOLVER}
    images, labels = mnist_test_slice
    p["weights"] = root / "lenet.caffemodel"
    shutil.copy(trained_lenet, p["weights"])
    write_datums(root / "src", images[:32, None], labels[:32])
    write_datums(root / "train", images[:200, None], labels[:200])
    write_datums(root / "test", images[200:260, None], labels[200:260])

    net = CaffeNet(DEPLOY, p["weights"])

    def settings(weights=p["weights"], **kw):
        base = dict(model=str(DEPLOY), weights=str(weights), source=str(root / "src"), split="test",
                    methods="fgs", scales="", min_pass=-1.0, limit=8, seed=0, batch_size=4)
        return GenerateSettings(**{**base, **kw})

    generate(net, settings(), root / "gen")
    p["gen_args"] = ["--model", str(DEPLOY), "--weights", str(p["weights"]), "--input", str(root / "src"),
                     "--split", "test", "--methods", "fgs", "--scales", "", "--limit", "8", "--seed", "0", "--batch", "4"]
    # a weights file whose content changes after a generation that used it
    p["changing"] = root / "changing.caffemodel"
    shutil.copy(trained_lenet, p["changing"])
    generate(net, settings(weights=p["changing"]), root / "gen_changing")
    _caffemodel_with(trained_lenet, p["changing"], lambda n: n.layer[-2].blobs[1].data.__setitem__(0, 0.5))
    # shards of a 4-batch run: 0/2 finished, 1/2 interrupted after its first batch
    generate(net, settings(limit=16, shard="0/2"), root / "shard0")

    def stop(*_):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate(net, settings(limit=16, shard="1/2"), root / "shard1", progress=stop)
    mix_training_data([root / "gen"], root / "mix", seed=1)

    # bad files
    data = p["weights"].read_bytes()
    (root / "truncated.caffemodel").write_bytes(data[:len(data) // 2])
    _caffemodel_with(trained_lenet, root / "nan.caffemodel", lambda n: n.layer[-2].blobs[0].data.__setitem__(3, float("nan")))
    caffe.set_random_seed(0)
    tiny = caffe.Net(str(_write(root / "tiny.prototxt", caffe_tiny())), caffe.TEST)
    tiny.save(str(root / "other_net.caffemodel"))
    text = DEPLOY.read_text()
    _write(root / "ip1_400.prototxt", text.replace("num_output: 500", "num_output: 400"))
    _write(root / "syntax.prototxt", text.replace('type: "InnerProduct"', 'type: "InnerProduct" {', 1))
    _write(root / "nofb.prototxt", text.replace("force_backward: true", ""))
    _write(root / "colour.prototxt", COLOUR_NET)
    caffe.Net(str(root / "colour.prototxt"), caffe.TEST).save(str(root / "colour.caffemodel"))
    write_datums(root / "src32", np.zeros((4, 1, 32, 32), np.uint8), [1, 2, 3, 4])
    write_datums(root / "labels12", images[:8, None], np.full(8, 12))
    (root / "corrupt").mkdir()
    (root / "corrupt" / "data.mdb").write_bytes(b"\x00garbage" * 4096)
    (root / "truncated_lmdb").mkdir()
    (root / "truncated_lmdb" / "data.mdb").write_bytes((root / "src" / "data.mdb").read_bytes()[:12288])
    DatumWriter(root / "empty_lmdb").close()
    (root / "not_lmdb").mkdir()
    _write(root / "not_lmdb" / "notes.txt", "hello\n")
    (root / "empty_dir").mkdir()
    (root / "images" / "3").mkdir(parents=True)
    _write(root / "images" / "3" / "a.png", "not a png\n")
    _write(root / "not_an_image.png", "text\n")
    _write(root / "afile", "a file, not a folder\n")
    _write(root / "solver_syntax.prototxt", SOLVER.read_text().replace("base_lr:", "base_lr"))
    (root / "ro").mkdir()
    bad_mnist = root / "bad_mnist"
    bad_mnist.mkdir()
    for f in SHARED_MNIST.glob("*-ubyte.gz"):
        shutil.copy(f, bad_mnist / f.name)
    raw = gzip.open(bad_mnist / "t10k-labels-idx1-ubyte.gz").read()
    with gzip.open(bad_mnist / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(raw[:-10])
    return p


def caffe_tiny() -> str:
    from hcgen.backends.caffe_checks import TINY_NET

    return TINY_NET


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _gen(w, *extra, out="new_out", weights=None, model=None):
    args = list(w["gen_args"])
    if weights is not None:
        args[3] = str(weights)
    if model is not None:
        args[1] = str(model)
    return ["generate", *args, *extra, "--out", str(w["root"] / out)]


CASES = {
    # generate: the net and its weights (each would abort Caffe or run a random net)
    "truncated caffemodel": (lambda w: _gen(w, weights=w["root"] / "truncated.caffemodel"),
                             "truncated.caffemodel is not a complete caffemodel (truncated or another format"),
    "weights of another net": (lambda w: _gen(w, weights=w["root"] / "other_net.caffemodel"),
                               "other_net.caffemodel has no weights for layer 'conv1' of"),
    "weights of other shapes": (lambda w: _gen(w, model=w["root"] / "ip1_400.prototxt"),
                                "layer 'ip1' blob 0 has shape [500, 800] but"),
    "prototxt syntax error": (lambda w: _gen(w, model=w["root"] / "syntax.prototxt"),
                              "syntax.prototxt: prototxt syntax error at"),
    "prototxt without force_backward": (lambda w: _gen(w, model=w["root"] / "nofb.prototxt"),
                                        "nofb.prototxt lacks 'force_backward: true'"),
    "NaN weights": (lambda w: _gen(w, weights=w["root"] / "nan.caffemodel"),
                    "nan.caffemodel: layer 'ip2' blob 0 holds NaN or infinite weights"),
    "caffemodel given as prototxt": (lambda w: _gen(w, model=w["weights"]),
                                     "is not a text prototxt (binary data"),
    "--layer unknown": (lambda w: _gen(w, "--layer", "nope"), "unknown layer 'nope'"),
    # generate: the source
    "wrong input shape": (lambda w: _gen(w, "--input", str(w["root"] / "src32")),
                          "src32 holds images of shape (1, 32, 32) but the net takes (1, 28, 28)"),
    "colour net, grey input": (lambda w: _gen(w, model=w["root"] / "colour.prototxt",
                                              weights=w["root"] / "colour.caffemodel"),
                               "holds grey (1 channel) images (1, 28, 28) but the net takes colour (3 channels)"),
    "labels out of range": (lambda w: _gen(w, "--input", str(w["root"] / "labels12")),
                            "labels12: image 0 has label 12, outside the net's 10 classes [0, 10) (8 of 8 read)"),
    "corrupt LMDB input": (lambda w: _gen(w, "--input", str(w["root"] / "corrupt")),
                           "corrupt is not a readable LMDB (MDB_INVALID"),
    "truncated LMDB input": (lambda w: _gen(w, "--input", str(w["root"] / "truncated_lmdb")),
                             "truncated_lmdb/data.mdb is truncated (12288 bytes"),
    "empty LMDB input": (lambda w: _gen(w, "--input", str(w["root"] / "empty_lmdb")), "empty_lmdb holds no images"),
    "non-LMDB folder input": (lambda w: _gen(w, "--input", str(w["root"] / "not_lmdb")),
                              "not_lmdb is neither an LMDB (no data.mdb), a folder of JPEG/PNG images, nor"),
    "empty folder input": (lambda w: _gen(w, "--input", str(w["root"] / "empty_dir")),
                           "empty_dir is neither an LMDB"),
    "folder with a non-image file": (lambda w: _gen(w, "--input", str(w["root"] / "images")),
                                     "cannot decode"),
    # generate: options and outputs
    "--methods garbage": (lambda w: _gen(w, "--methods", "fgs,pgd"), "unknown method 'pgd'"),
    "--scales <= 1": (lambda w: _gen(w, "--scales", "1.05,0.9"), "hard-positive scales must be > 1"),
    "--scales not numbers": (lambda w: _gen(w, "--scales", "big"), "--scales must be numbers like 1.05,1.10"),
    "--shard out of range": (lambda w: _gen(w, "--shard", "2/2"), "--shard must be K/N with 0 <= K < N"),
    "read-only output folder": (lambda w: _gen(w, out="ro"), "cannot write in"),
    "output path is a file": (lambda w: _gen(w, out="afile"), "afile is a file"),
    "not-hcgen output folder": (lambda w: _gen(w, out="not_lmdb"), "not_lmdb is not empty (notes.txt) and holds no"),
    "resume with other methods": (lambda w: _gen(w, "--methods", "fgv", out="gen"),
                                  "holds a generation with other settings (methods)"),
    "resume with another --layer": (lambda w: _gen(w, "--layer", "prob", out="gen"),
                                    'other settings (layer): layer: "ip2" there, "prob" now'),
    "resume with changed weights": (lambda w: _gen(w, weights=w["changing"], out="gen_changing"),
                                    "other settings (weights_sha256)"),
    # merge
    "merge an unfinished shard": (lambda w: ["merge", str(w["root"] / "shard0"), str(w["root"] / "shard1"),
                                             "--out", str(w["root"] / "merged")],
                                  "cannot merge unfinished shards: 1/2 ("),
    "merge a non-generate folder": (lambda w: ["merge", str(w["root"] / "not_lmdb"), "--out", str(w["root"] / "m")],
                                    "not_lmdb is not a `hcgen generate` output (no generate.json)"),
    "merge one shard of two": (lambda w: ["merge", str(w["root"] / "shard0"), "--out", str(w["root"] / "m")],
                               "merge needs each of the shards ['0/2', '1/2'] once, got ['0/2']"),
    "merge into a file": (lambda w: ["merge", str(w["root"] / "shard0"), str(w["root"] / "shard1"), "--out",
                                     str(w["root"] / "afile")], "afile is a file; merge writes an LMDB folder"),
    # pass
    "pass corrupt LMDBs": (lambda w: ["pass", str(w["root"] / "corrupt"), str(w["root"] / "corrupt")],
                           "corrupt is not a readable LMDB"),
    "pass truncated LMDBs": (lambda w: ["pass", str(w["root"] / "truncated_lmdb"), str(w["root"] / "src")],
                             "truncated_lmdb/data.mdb is truncated"),
    "pass a non-image file": (lambda w: ["pass", str(w["root"] / "not_an_image.png"), str(w["root"] / "not_an_image.png")],
                              "OpenCV cannot read this file as an image"),
    # train
    "train solver syntax error": (lambda w: ["train", "--solver", str(w["root"] / "solver_syntax.prototxt"),
                                             "--out", str(w["root"] / "t")], "is not a valid Caffe SolverParameter"),
    "train truncated weights": (lambda w: ["train", "--solver", str(SOLVER), "--weights",
                                           str(w["root"] / "truncated.caffemodel"), "--train", str(w["root"] / "train"),
                                           "--test", str(w["root"] / "test"), "--out", str(w["root"] / "t")],
                                "truncated.caffemodel is not a complete caffemodel"),
    "train NaN weights": (lambda w: ["train", "--solver", str(SOLVER), "--weights", str(w["root"] / "nan.caffemodel"),
                                     "--train", str(w["root"] / "train"), "--test", str(w["root"] / "test"),
                                     "--out", str(w["root"] / "t")], "holds NaN or infinite weights"),
    "train on a truncated LMDB": (lambda w: ["train", "--solver", str(SOLVER), "--train", str(w["root"] / "truncated_lmdb"),
                                             "--test", str(w["root"] / "test"), "--out", str(w["root"] / "t")],
                                  "truncated_lmdb/data.mdb is truncated"),
    "train labels out of range": (lambda w: ["train", "--solver", str(SOLVER), "--train", str(w["root"] / "labels12"),
                                             "--test", str(w["root"] / "test"), "--out", str(w["root"] / "t")],
                                  "labels12 (--train): record 00000000 has label 12, outside the net's 10 classes"),
    "train out is a file": (lambda w: ["train", "--solver", str(SOLVER), "--train", str(w["root"] / "train"),
                                       "--test", str(w["root"] / "test"), "--out", str(w["root"] / "afile")],
                            "afile is a file"),
    # mix
    "mix a corrupt LMDB": (lambda w: ["mix", str(w["root"] / "corrupt"), "--seed", "1", "--out", str(w["root"] / "mx")],
                           "corrupt is not a readable LMDB"),
    "mix filter without metadata": (lambda w: ["mix", str(w["root"] / "src"), "--methods", "FGS", "--seed", "1",
                                               "--out", str(w["root"] / "mx")], "lacks the metadata column(s) method"),
    "mix into another mix": (lambda w: ["mix", str(w["root"] / "gen"), "--seed", "2", "--out", str(w["root"] / "mix")],
                             "mix already holds"),
    "mix into a read-only folder": (lambda w: ["mix", str(w["root"] / "gen"), "--seed", "1", "--out", str(w["root"] / "ro")],
                                    "cannot write in"),
    # evaluate
    "evaluate with weights of another net": (lambda w: ["evaluate", "--model", str(DEPLOY), "--weights",
                                                        str(w["root"] / "other_net.caffemodel"), "--data", str(w["root"] / "src")],
                                             "has no weights for layer 'conv1'"),
    "evaluate labels out of range": (lambda w: ["evaluate", "--model", str(DEPLOY), "--weights", str(w["weights"]),
                                                "--data", str(w["root"] / "labels12")],
                                     "labels12: record 00000000 has label 12, outside the net's 10 classes [0, 10)"),
    "evaluate a non-LMDB folder": (lambda w: ["evaluate", "--model", str(DEPLOY), "--weights", str(w["weights"]),
                                              "--data", str(w["root"] / "not_lmdb")], "no LMDB at"),
    "evaluate --batch-size 0": (lambda w: ["evaluate", "--model", str(DEPLOY), "--weights", str(w["weights"]),
                                           "--data", str(w["root"] / "src"), "--batch-size", "0"],
                                "--batch-size must be positive, got 0"),
    # demo
    "demo with a truncated caffemodel": (lambda w: ["demo", "--weights", str(w["root"] / "truncated.caffemodel"),
                                                    "--out", str(w["root"] / "demo")],
                                         "truncated.caffemodel is not a complete caffemodel"),
    # data
    "data mnist from an empty folder": (lambda w: ["data", "mnist", "--source", str(w["root"] / "empty_dir"),
                                                   "--out", str(w["root"] / "mn")], "lacks the MNIST files"),
    "data mnist truncated labels": (lambda w: ["data", "mnist", "--source", str(w["root"] / "bad_mnist"),
                                               "--out", str(w["root"] / "mn")], "truncated"),
    "data mnist out is a file": (lambda w: ["data", "mnist", "--source", str(SHARED_MNIST), "--out",
                                            str(w["root"] / "afile")], "afile is a file"),
    "data infimnist negative count": (lambda w: ["data", "infimnist", "--count", "-5", "--out", str(w["root"] / "inf")],
                                      "must be non-negative"),
    # table1
    "table1 --shards 0": (lambda w: ["table1", "--profile", "tiny", "--shards", "0", "--work", str(w["root"] / "t1")],
                          "--shards must be a positive integer, got 0"),
    "table1 work is a file": (lambda w: ["table1", "--profile", "tiny", "--work", str(w["root"] / "afile")],
                              "a parent of it is a file"),
}


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, w):
    args, expected = CASES[case]
    argv = args(w)
    before = _snapshot(w["root"])
    ro = w["root"] / "ro"
    with read_only(ro) if str(ro) in argv else contextlib.nullcontext():
        r = subprocess.run([sys.executable, "-m", "hcgen.cli", *argv], capture_output=True, text=True,
                           timeout=600, env={**os.environ, "HCGEN_DEBUG": ""})
    lines = r.stderr.splitlines()
    assert (r.returncode, len(lines)) == (2, 1), r.stderr[-3000:]
    assert lines[0].startswith(f"hcgen {argv[0]}: error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in r.stdout + r.stderr
    after = _snapshot(w["root"])
    assert {k: v for k, v in after.items() if before.get(k) != v} == {}, "a failed run wrote files"
    assert set(before) <= set(after), "a failed run removed files"


def test_the_campaign_is_big_enough():
    assert len(CASES) >= 30
    print(f"{len(CASES)} bad inputs")


def test_merge_refuses_unfinished_shards_then_merges_into_an_existing_folder(w, tmp_path, trained_lenet):
    """The refusal names each unfinished shard and what it lacks; once finished, the shards merge into an
    existing empty --out (it was a FileExistsError traceback) exactly as the unsharded run, and a second
    merge into it does nothing."""
    from hcgen.backends.caffe import CaffeNet
    from hcgen.data.lmdb_io import read_lmdb
    from hcgen.generate.run import GenerateSettings, generate
    from hcgen.generate.shards import merge_shards

    shards = [tmp_path / "s0", tmp_path / "s1"]
    for src, dst in zip(("shard0", "shard1"), shards):
        shutil.copytree(w["root"] / src, dst)
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match=r"^cannot merge unfinished shards: 1/2 \(.*/s1\) lacks 1 of 2 batches; rerun "
                       r"their `hcgen generate --shard` commands to finish$"):
        merge_shards(shards, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []
    net = CaffeNet(DEPLOY, w["weights"])
    settings = dict(model=str(DEPLOY), weights=str(w["weights"]), source=str(w["root"] / "src"), split="test",
                    methods="fgs", scales="", min_pass=-1.0, limit=16, seed=0, batch_size=4)
    generate(net, GenerateSettings(**settings, shard="1/2"), shards[1])  # finishes the interrupted shard
    count = merge_shards(shards, tmp_path / "out")
    generate(net, GenerateSettings(**settings), tmp_path / "whole")
    keys, images, _ = read_lmdb(tmp_path / "out")
    keys0, images0, _ = read_lmdb(tmp_path / "whole")
    assert count == len(keys) == len(keys0) and keys == keys0
    np.testing.assert_array_equal(images, images0)
    for name in ("metadata.csv", "failures.csv", "done.txt", "summary.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert not (tmp_path / "out" / "merge.json").exists()
    before = _snapshot(tmp_path / "out")
    assert merge_shards(shards, tmp_path / "out") == count
    assert _snapshot(tmp_path / "out") == before
    # a merge killed between a chunk's metadata rows and its LMDB commit resumes to the same folder
    merge = [sys.executable, "-m", "hcgen.cli", "merge", *map(str, shards), "--out", str(tmp_path / "again")]
    crash = subprocess.run(merge, capture_output=True, env={**os.environ, "HCGEN_CRASH_AT": "lmdb-metadata-appended:1"})
    assert crash.returncode == -9 and (tmp_path / "again" / "merge.json").exists()
    assert not (tmp_path / "again" / "generate.json").exists()  # not (yet) a finished generation
    subprocess.run(merge, check=True, capture_output=True)
    again = read_lmdb(tmp_path / "again")
    assert again[0] == keys0
    np.testing.assert_array_equal(again[1], images0)
    for name in ("metadata.csv", "failures.csv", "done.txt", "summary.json", "generate.json"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "out" / name).read_bytes(), name
    assert not (tmp_path / "again" / "merge.json").exists()
