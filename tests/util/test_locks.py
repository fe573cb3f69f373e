"""Folder locks, atomic writes, the CLI's one error path, the exec shim that replaces preexec_fn, and
Dask worker settings kept out of the driver (issue 14). No Caffe net needed."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hcgen.util import fileio
from hcgen.util.locks import LOCK_FILE, FolderInUse, folder_lock

HOLD = textwrap.dedent("""
    import sys, time
    from hcgen.util.locks import folder_lock
    with folder_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(600)
""")


def _holder(folder: Path) -> subprocess.Popen:
    """A process holding the lock of `folder` (returns once it holds it)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "locked\n"
    return proc


def test_second_locker_is_told_who_holds_the_folder(tmp_path):
    proc = _holder(tmp_path / "out")
    try:
        assert (tmp_path / "out" / LOCK_FILE).read_text() == f"{proc.pid} {socket.gethostname()}\n"
        with pytest.raises(FolderInUse, match=rf"out is in use by process {proc.pid} \(host "
                           rf"{socket.gethostname()}\); wait for that run to finish, or use another folder"):
            with folder_lock(tmp_path / "out"):
                pass
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_holder_never_blocks(tmp_path):
    """SIGKILL leaves the lock file (with the dead PID) behind; the next run takes it over."""
    proc = _holder(tmp_path / "out")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "out" / LOCK_FILE).read_text().split()[0] == str(proc.pid)  # stale file
    with folder_lock(tmp_path / "out") as folder:
        assert (folder / LOCK_FILE).read_text().split()[0] == str(os.getpid())
    assert not (tmp_path / "out" / LOCK_FILE).exists()  # released: removed
    with folder_lock(tmp_path / "out"):  # and again
        pass


def test_lock_errors_name_the_problem(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="file is a file, not a folder"):
        with folder_lock(tmp_path / "file"):
            pass
    with pytest.raises(NotADirectoryError, match="a parent of it is a file"):
        with folder_lock(tmp_path / "file" / "sub"):
            pass


def test_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    with read_only(ro):
        with pytest.raises(PermissionError, match=r"cannot write in .*ro \(.*\); choose a folder you can write to"):
            with folder_lock(ro):
                pass
        with pytest.raises(PermissionError, match=r"cannot create .*ro/new"):
            with folder_lock(ro / "new"):
                pass


class read_only:
    """A folder nobody can write, root included: chmod 555, and chattr +i when root (skips the test where
    root may not set it, e.g. in a container without CAP_LINUX_IMMUTABLE)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.immutable = False

    def __enter__(self):
        os.chmod(self.folder, 0o555)
        if os.geteuid() == 0:
            try:
                done = subprocess.run(["chattr", "+i", str(self.folder)], capture_output=True).returncode == 0
            except FileNotFoundError:
                done = False
            if not done:
                os.chmod(self.folder, 0o755)
                pytest.skip("root cannot make a folder read-only here (no chattr +i)")
            self.immutable = True
        return self.folder

    def __exit__(self, *exc):
        if self.immutable:
            subprocess.run(["chattr", "-i", str(self.folder)], check=True)
        os.chmod(self.folder, 0o755)


def test_atomic_write_replaces_or_keeps(tmp_path, monkeypatch):
    target = tmp_path / "settings.json"
    fileio.atomic_write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~fileio._UMASK)

    def crash(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="No space left"):
        fileio.atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 1}  # the old content, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["settings.json"]  # no temporary file left


def _hcgen(*args, env=None):
    return subprocess.run([sys.executable, "-m", "hcgen.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_cli_errors_are_one_line_and_debug_shows_the_traceback(tmp_path):
    bad = tmp_path / "bad_lmdb"
    bad.mkdir()
    (bad / "data.mdb").write_bytes(b"not an lmdb" * 100)
    args = ["pass", str(bad), str(bad)]
    r = _hcgen(*args)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [f"hcgen pass: error: {bad} is not a readable LMDB "
                                     "(MDB_INVALID: File is not an LMDB file)"]
    for debug in (_hcgen(*args, "--debug"), _hcgen("--debug", *args), _hcgen(*args, env={"HCGEN_DEBUG": "1"})):
        assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
        assert debug.stderr.splitlines()[-1].startswith("hcgen.errors.BadInput: ")


def test_cli_error_classes(monkeypatch, capsys):
    """hcgen's user errors, OSErrors (no '[Errno 13]') and lmdb errors are user errors (exit 2, one line);
    anything else, a bare KeyError, RuntimeError or ValueError included, is a bug (exit 1)."""
    import lmdb

    from hcgen import cli, errors
    from hcgen.commands import pass_cmd

    for exc, line in ((errors.NoSuchRecord("/x has no records ['00000007']"), "/x has no records ['00000007']"),
                      (PermissionError(13, "Permission denied", "/ro/x"), "/ro/x: Permission denied"),
                      (lmdb.CorruptedError("mdb_get: MDB_CORRUPTED"), "mdb_get: MDB_CORRUPTED"),
                      (errors.ExternalFailure("caffe train exited with 1:\nCheck failed"),
                       "caffe train exited with 1: Check failed"),
                      (errors.BadInput("--limit must be positive, got 0"), "--limit must be positive, got 0"),
                      (errors.DiskFull("disk full: cannot write /out"), "disk full: cannot write /out")):
        def boom(args, exc=exc):
            raise exc

        monkeypatch.setattr(pass_cmd, "add_parser", _parser_with(boom))
        assert cli.main(["pass", "a", "b"]) == 2
        assert capsys.readouterr().err == f"hcgen pass: error: {line}\n"

    for exc in (TypeError("unsupported operand"), KeyError("k"), RuntimeError("oops"), ValueError("bad")):
        def bug(args, exc=exc):
            raise exc

        monkeypatch.setattr(pass_cmd, "add_parser", _parser_with(bug))
        assert cli.main(["pass", "a", "b"]) == 1
        text = str(exc.args[0]) if isinstance(exc, KeyError) else str(exc)
        assert capsys.readouterr().err == (f"hcgen pass: error: internal error ({type(exc).__name__}: {text}); "
                                           "rerun with --debug for the traceback and report it\n")
        with pytest.raises(type(exc)):  # --debug: the traceback (the exception itself)
            cli.main(["--debug", "pass", "a", "b"])


def _parser_with(func):
    def add_parser(subparsers):
        p = subparsers.add_parser("pass")
        p.add_argument("a")
        p.add_argument("b")
        p.set_defaults(func=func)
    return add_parser


SPAWNER = textwrap.dedent("""
    import subprocess, sys, time
    from hcgen.training.caffe_train import die_with_parent
    child = subprocess.Popen(die_with_parent(["sleep", "600"]))
    print(child.pid, flush=True)
    time.sleep(600)
""")


def test_child_dies_with_its_parent_without_preexec_fn(tmp_path):
    """train's exec shim (no preexec_fn): SIGKILL the parent and its `caffe`-like child is terminated."""
    import inspect

    from hcgen.training import caffe_train as train

    assert "preexec_fn" not in inspect.getsource(train.train) + inspect.getsource(train._run_caffe_train)
    parent = subprocess.Popen([sys.executable, "-c", SPAWNER], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    deadline = time.time() + 30
    while Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[0] != b"sleep" and time.time() < deadline:
        time.sleep(0.05)  # the shim has exec'd sleep
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    while _alive(child) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the child outlived its killed parent"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


WORKER_ENV_CHECK = textwrap.dedent("""
    import os, json
    from distributed import Client
    from hcgen.stages.dask_runner import local_cluster
    if __name__ == "__main__":
        cluster = local_cluster(1)
        with Client(cluster) as client:
            worker = client.submit(lambda: os.environ.get("HCGEN_THREADS")).result()
        cluster.close()
        print(json.dumps({"worker": worker, "driver": os.environ.get("HCGEN_THREADS")}))
""")


def test_dask_worker_env_reaches_the_workers_not_the_driver(tmp_path):
    script = tmp_path / "check.py"
    script.write_text(WORKER_ENV_CHECK)
    env = {k: v for k, v in os.environ.items() if k != "HCGEN_THREADS"}
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert json.loads(r.stdout.splitlines()[-1]) == {"worker": "1", "driver": None}, r.stderr[-2000:]


def test_readers_refuse_an_lmdb_a_live_run_writes(tmp_path):
    """Reading an LMDB while a run appends to it would mix old and new records: refused, naming the writer;
    a stale lock file (killed writer) and a lock held by this very process do not stop reading."""
    from hcgen.data.lmdb_io import lmdb_count, write_datums

    import numpy as np

    write_datums(tmp_path / "db", np.zeros((3, 1, 2, 2), np.uint8), [0, 1, 2])
    proc = _holder(tmp_path / "db")
    try:
        with pytest.raises(FolderInUse, match=rf"db is being written by process {proc.pid} \(host "
                           rf"{socket.gethostname()}\); wait for that run to finish"):
            lmdb_count(tmp_path / "db")
    finally:
        proc.kill()
        proc.wait()
    assert (tmp_path / "db" / LOCK_FILE).exists() and lmdb_count(tmp_path / "db") == 3  # stale: readable
    with folder_lock(tmp_path / "db"):
        assert lmdb_count(tmp_path / "db") == 3  # our own lock


def test_the_holder_thread_may_reenter_other_threads_may_not(tmp_path):
    """A command locks --out, then the library it calls locks it again: fine in that thread only."""
    import threading

    with folder_lock(tmp_path / "out"):
        with folder_lock(tmp_path / "out"):
            pass
        assert (tmp_path / "out" / LOCK_FILE).exists()  # the inner exit did not release it
        errors = []

        def other():
            try:
                with folder_lock(tmp_path / "out"):
                    pass
            except FolderInUse as exc:
                errors.append(str(exc))

        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        assert errors == [f"{tmp_path / 'out'} is in use by process {os.getpid()} (host {socket.gethostname()}); "
                          "wait for that run to finish, or use another folder"]
    assert not (tmp_path / "out" / LOCK_FILE).exists()
