"""Kill anywhere, and two runs on one folder (issue 14): `hcgen generate`, `hcgen mix` and a tiny
`hcgen table1` are SIGKILLed at seeded moments spread over their runs and at the crash points between
the steps of a commit (``HCGEN_CRASH_AT``, `hcgen.util.fileio.crash_point`), rerun until done, and must end
with exactly the outputs of an uninterrupted run. A second run on a folder in use exits 2 at once."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hcgen.data.lmdb_io import METADATA_FILE, lmdb_count, read_lmdb, write_datums
from hcgen.util.locks import LOCK_FILE

from tests.conftest import MODELS, SHARED_MNIST

DEPLOY = MODELS / "lenet" / "lenet_deploy.prototxt"
HCGEN = [sys.executable, "-m", "hcgen.cli"]
BATCHES = 24  # --limit 48 --batch 2


@pytest.fixture(scope="module")
def gen(trained_lenet, mnist_test_slice, tmp_path_factory):
    """The generate command for a folder, and its uninterrupted output."""
    root = tmp_path_factory.mktemp("kill")
    images, labels = mnist_test_slice
    write_datums(root / "src", images[:64, None], labels[:64])

    def cmd(out: Path) -> list[str]:
        return HCGEN + ["generate", "--model", str(DEPLOY), "--weights", str(trained_lenet), "--input",
                        str(root / "src"), "--split", "test", "--methods", "fgs,fgv,hc-d:1-5,hc-s:1-3",
                        "--scales", "1.05", "--limit", "48", "--batch", "2", "--out", str(out)]

    subprocess.run(cmd(root / "ref"), check=True, capture_output=True, timeout=600)
    assert len(_done(root / "ref")) == BATCHES
    return root, cmd


def _done(out: Path) -> list[str]:
    path = out / "done.txt"
    return [line for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")] if path.exists() else []


def _wait(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, "the run ended before the kill point"
        assert time.time() < deadline, "the kill point never came"
        time.sleep(0.005)


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


def assert_same_generation(out: Path, ref: Path) -> None:
    keys, images, labels = read_lmdb(out)
    keys0, images0, labels0 = read_lmdb(ref)
    assert keys == keys0 and len(keys) > 0
    np.testing.assert_array_equal(images, images0)
    np.testing.assert_array_equal(labels, labels0)
    for name in (METADATA_FILE, "failures.csv", "done.txt", "summary.json"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    assert not (out / LOCK_FILE).exists()


def _last_record_batch(out: Path) -> int:
    rows = (out / METADATA_FILE).read_text().splitlines()
    return int(rows[-1].split(",")[2]) if len(rows) > 1 else -1


def test_generate_killed_anywhere_resumes_to_the_same_records(gen):
    """4 crash points inside a batch's commit, then 5 SIGKILLs at seeded moments (after a seeded number
    of committed batches, plus a seeded delay within the next batch); then a rerun finishes it."""
    root, cmd = gen
    out = root / "killed"
    env = dict(os.environ)
    # a crash between the steps of a commit; each check shows the kill landed in that window
    run = subprocess.run(cmd(out), capture_output=True, env={**env, "HCGEN_CRASH_AT": "generate-failures-written:2"})
    assert run.returncode == -signal.SIGKILL
    assert len(_done(out)) == 1 and _last_record_batch(out) == 0  # batch 1: failures written, records not
    run = subprocess.run(cmd(out), capture_output=True, env={**env, "HCGEN_CRASH_AT": "lmdb-metadata-appended:2"})
    assert run.returncode == -signal.SIGKILL
    rows = len((out / METADATA_FILE).read_text().splitlines()) - 1
    assert rows > lmdb_count(out)  # metadata rows of a batch whose LMDB transaction never committed
    before = len(_done(out))
    run = subprocess.run(cmd(out), capture_output=True, env={**env, "HCGEN_CRASH_AT": "generate-batch-committed:2"})
    assert run.returncode == -signal.SIGKILL
    assert len(_done(out)) == before + 1  # the run's 2nd batch committed, not yet in done.txt
    crashed = len(_done(out))

    rng = np.random.default_rng(14)
    targets = np.sort(rng.choice(np.arange(crashed + 2, BATCHES - 1), size=5, replace=False))
    landed = []
    for target in targets:
        proc = subprocess.Popen(cmd(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait(lambda: len(_done(out)) >= target, proc)
        time.sleep(rng.uniform(0, 0.05))
        _kill(proc)
        landed.append(len(_done(out)))
    assert all(n < BATCHES for n in landed), landed  # every kill landed mid-run
    run = subprocess.run(cmd(out), capture_output=True, env={**env, "HCGEN_CRASH_AT": "generate-before-summary:1"})
    assert run.returncode == -signal.SIGKILL and len(_done(out)) == BATCHES and not (out / "summary.json").exists()

    subprocess.run(cmd(out), check=True, capture_output=True, timeout=600)
    assert_same_generation(out, root / "ref")


def test_generate_on_a_full_disk_says_so_and_resumes(gen):
    """A full disk at each step of a batch's commit (ENOSPC raised at the crash points) ends the run with
    one line naming the folder and saying that the same command resumes (exit 2); the reruns end with
    exactly the uninterrupted run's output."""
    root, cmd = gen
    out = root / "full"
    for point in ("generate-failures-written:2", "lmdb-metadata-appended:3", "generate-batch-committed:2"):
        run = subprocess.run(cmd(out), capture_output=True, text=True, timeout=600,
                             env={**os.environ, "HCGEN_CRASH_AT": f"{point}:enospc"})
        assert run.returncode == 2, run.stderr
        line = run.stderr.splitlines()[-1]
        assert line.startswith(f"hcgen generate: error: disk full: cannot write {out.absolute()} "
                               "(No space left on device; ") and "Traceback" not in run.stderr
        assert line.endswith("free some space on that disk and rerun the same command: it resumes after the "
                             "last committed batch")
        assert 0 < len(_done(out)) < BATCHES and not (out / LOCK_FILE).exists()
    subprocess.run(cmd(out), check=True, capture_output=True, timeout=600)
    assert_same_generation(out, root / "ref")


def test_disk_full_is_told_from_other_write_errors(tmp_path, monkeypatch):
    """ENOSPC, EDQUOT and MDB_MAP_FULL are a full disk; an I/O error only while the disk has no room left."""
    import errno

    import lmdb

    from hcgen.util import fileio

    assert fileio.is_disk_full(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    assert fileio.is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"), tmp_path)
    assert fileio.is_disk_full(lmdb.MapFullError("mdb_put: MDB_MAP_FULL: Environment mapsize limit reached"), tmp_path)
    assert not fileio.is_disk_full(OSError(errno.EACCES, "Permission denied"), tmp_path)
    io_error = lmdb.Error("mdb_txn_commit: Input/output error")
    assert not fileio.is_disk_full(io_error, tmp_path)  # this disk has room: a real I/O error
    monkeypatch.setattr(fileio, "free_bytes", lambda folder: 4096)
    assert fileio.is_disk_full(io_error, tmp_path)


def test_two_generate_runs_on_one_out(gen):
    """The second exits 2 at once with the lock message (the first is stopped meanwhile, so that it
    cannot finish first); the output is a single run's."""
    root, cmd = gen
    out = root / "twice"
    first = subprocess.Popen(cmd(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait(lambda: (out / LOCK_FILE).is_file() and (out / LOCK_FILE).read_text().startswith(f"{first.pid} "), first)
    first.send_signal(signal.SIGSTOP)  # holds the lock however fast it would finish
    try:
        second = subprocess.run(cmd(out), capture_output=True, text=True, timeout=600)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2
    assert second.stderr.splitlines() == [f"hcgen generate: error: {out} is in use by process {first.pid} "
                                          f"(host {socket.gethostname()}); wait for that run to finish, or use "
                                          "another folder"]
    assert first.wait(timeout=600) == 0
    assert_same_generation(out, root / "ref")


def _rows(out: Path) -> int:
    path = out / METADATA_FILE
    return path.read_bytes().count(b"\n") - 1 if path.exists() else 0


def test_mix_killed_anywhere_resumes_to_the_same_lmdb(gen, tmp_path):
    """A crash between a chunk's metadata rows and its LMDB commit, then 5 SIGKILLs at seeded moments
    (a seeded number of rows past what is committed: inside or just after the next chunk)."""
    root, _ = gen
    rng = np.random.default_rng(3)
    write_datums(tmp_path / "many", rng.integers(0, 256, (44000, 1, 28, 28), dtype=np.uint8),
                 rng.integers(0, 10, 44000))

    def cmd(out: Path) -> list[str]:
        return HCGEN + ["mix", str(root / "ref"), "--with-mnist", str(tmp_path / "many"), "--seed", "5",
                        "--out", str(out)]

    subprocess.run(cmd(tmp_path / "ref"), check=True, capture_output=True, timeout=600)
    total = lmdb_count(tmp_path / "ref")
    out = tmp_path / "killed"
    run = subprocess.run(cmd(out), capture_output=True, env={**os.environ, "HCGEN_CRASH_AT": "lmdb-metadata-appended:2"})
    assert run.returncode == -signal.SIGKILL
    assert _rows(out) > lmdb_count(out) == 4096  # the 2nd chunk's rows, its records never committed
    landed = []
    for _ in range(5):
        target = lmdb_count(out) + 1 + int(rng.integers(0, 4096))
        proc = subprocess.Popen(cmd(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait(lambda: _rows(out) >= target, proc)
        time.sleep(rng.uniform(0, 0.01))
        _kill(proc)
        landed.append(lmdb_count(out))
    assert landed == sorted(landed) and landed[-1] < total, landed  # each kill mid-run, further on
    subprocess.run(cmd(out), check=True, capture_output=True, timeout=600)
    keys, images, labels = read_lmdb(out)
    keys0, images0, labels0 = read_lmdb(tmp_path / "ref")
    assert keys == keys0 and len(keys) == 44000 + lmdb_count(root / "ref")
    np.testing.assert_array_equal(images, images0)
    np.testing.assert_array_equal(labels, labels0)
    assert (out / METADATA_FILE).read_bytes() == (tmp_path / "ref" / METADATA_FILE).read_bytes()


def _caffe_running(work: Path) -> list[str]:
    """Command lines of the live `caffe train` processes on `work` (from /proc: no procps needed)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            line = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            alive = cmdline.with_name("stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if alive and f"caffe train --solver={work}" in line:
            found.append(line)
    return found


def _lmdb_digest(path: Path) -> str:
    import hashlib

    import lmdb

    digest = hashlib.sha256()
    with lmdb.open(str(path), readonly=True, lock=False) as env, env.begin() as txn:
        for key, value in txn.cursor():
            digest.update(key + b"\0" + value)
    return digest.hexdigest()


def _weights(caffemodel: Path) -> list:
    """The learned blobs of a caffemodel (its net definition names the work folder's LMDBs)."""
    from caffe.proto import caffe_pb2

    net = caffe_pb2.NetParameter()
    net.ParseFromString(caffemodel.read_bytes())
    return [(layer.name, [np.asarray(b.data, np.float32).tobytes() for b in layer.blobs]) for layer in net.layer]


def _stage_outputs(work: Path) -> dict[str, object]:
    """What each stage produced, comparable across work folders: LMDB records, learned weights, error
    rates and metadata (with the work folder's path taken out)."""
    found: dict[str, object] = {}
    for stage in sorted(p for p in work.iterdir() if p.is_dir()):
        for lmdb in sorted(p.parent for p in stage.rglob("data.mdb")):
            found[str(lmdb.relative_to(work))] = _lmdb_digest(lmdb)
        for model in stage.glob("*.caffemodel"):
            found[str(model.relative_to(work))] = _weights(model)
        for name in ("errors.json", "lmdb/failures.csv", "lmdb/metadata.csv"):
            if (stage / name).is_file():
                found[f"{stage.name}/{name}"] = (stage / name).read_text().replace(str(work), "WORK")
    return found


def test_table1_lock_and_kill_mid_stage(tmp_path):
    """A second `hcgen table1` on a work folder in use exits 2; a run killed mid-generation and again
    mid-fine-tune (no caffe left running) and rerun ends with the uninterrupted run's table and stages
    (the two runs go side by side, in two work folders)."""
    def cmd(name: str) -> list[str]:
        return HCGEN + ["table1", "--profile", "tiny", "--work", str(tmp_path / name), "--results",
                        str(tmp_path / f"{name}-results"), "--mnist", str(SHARED_MNIST)]

    work = tmp_path / "ref" / "tiny"
    first = subprocess.Popen(cmd("ref"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs = [first]
    try:
        _wait(lambda: (work / LOCK_FILE).is_file() and (work / LOCK_FILE).read_text().startswith(f"{first.pid} "), first)
        second = subprocess.run(cmd("ref"), capture_output=True, text=True, timeout=600)
        assert second.returncode == 2
        assert second.stderr.splitlines() == [f"hcgen table1: error: {work} is in use by process {first.pid} "
                                              f"(host {socket.gethostname()}); wait for that run to finish, or use "
                                              "another folder"]

        killed = tmp_path / "killed" / "tiny"  # killed and rerun while the reference run goes on
        proc = subprocess.Popen(cmd("killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(proc)
        _wait(lambda: any(len(_done(p.parent)) >= 1 for p in killed.glob("gen-train1-*/lmdb/done.txt")), proc)
        _kill(proc)  # mid-generation: some batches committed
        proc = subprocess.Popen(cmd("killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(proc)
        _wait(lambda: any(killed.glob("ft-*/train.log")) and bool(_caffe_running(killed)), proc)
        _kill(proc)  # mid-fine-tune: caffe train is running
        deadline = time.time() + 60
        while _caffe_running(killed) and time.time() < deadline:
            time.sleep(0.1)
        assert not _caffe_running(killed), "caffe train outlived the killed hcgen table1"
        assert subprocess.run(cmd("killed"), capture_output=True, timeout=900).returncode == 0
        assert first.wait(timeout=900) == 0
    finally:
        for p in procs:  # a failed assertion leaves none running
            if p.poll() is None:
                p.kill()
                p.wait()

    for name in ("table1.json", "table1.md"):
        assert (tmp_path / "killed-results" / name).read_text() == (tmp_path / "ref-results" / name).read_text()
    ref_outputs, outputs = _stage_outputs(work), _stage_outputs(killed)
    assert sorted(outputs) == sorted(ref_outputs)
    assert [k for k in outputs if outputs[k] != ref_outputs[k]] == []
    assert json.loads((tmp_path / "killed-results" / "table1.json").read_text())["profile"] == "tiny"
    assert not (killed / LOCK_FILE).exists()


def test_resume_recovers_from_partial_sidecars(gen, tmp_path):
    """What a crash of an older hcgen (sidecars written in place) or a power loss can leave: an empty
    generate.json, metadata.csv and failures.csv, a done.txt line cut short, an empty mix.json. The
    same commands resume and end with the uninterrupted outputs."""
    root, cmd = gen
    out = tmp_path / "partial"
    out.mkdir()
    for name in ("generate.json", METADATA_FILE, "failures.csv"):
        (out / name).write_text("")
    (out / "done.txt").write_text("1")  # "12\n" cut short: batch 1 is not done
    subprocess.run(cmd(out), check=True, capture_output=True, timeout=600)
    assert_same_generation(out, root / "ref")
    assert (out / "generate.json").read_bytes() == (root / "ref" / "generate.json").read_bytes()

    mix = tmp_path / "mix"
    mix.mkdir()
    (mix / "mix.json").write_text("")
    run = HCGEN + ["mix", str(root / "ref"), "--seed", "5", "--out"]
    subprocess.run(run + [str(mix)], check=True, capture_output=True, timeout=600)
    subprocess.run(run + [str(tmp_path / "mix_ref")], check=True, capture_output=True, timeout=600)
    assert read_lmdb(mix)[0] == read_lmdb(tmp_path / "mix_ref")[0]
    assert (mix / METADATA_FILE).read_bytes() == (tmp_path / "mix_ref" / METADATA_FILE).read_bytes()
    assert json.loads((mix / "mix.json").read_text())["seed"] == 5
