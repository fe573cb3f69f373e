"""Do two commits of hcgen write the same outputs? `hcgen demo` and `hcgen table1 --profile tiny`, byte for byte.

    python benchmarks/compare_outputs.py BEFORE AFTER [--demo-iterations 200 --demo-limit 20]

Each commit is checked out into a temporary clone of this repository and run with this interpreter
(its venv: the same Caffe, numpy, OpenCV) and ``PYTHONPATH`` at the clone, so only hcgen's code differs.
Both runs read the same MNIST files (``--mnist``). Then every file the runs wrote is compared byte for
byte, except for what cannot be the same between two runs, each for a stated reason:

- the path of the clone and of the output folder, wherever a file records it (generate.json,
  solver.prototxt, mix.json, reports, ...): replaced by ``<REPO>`` and ``<OUT>`` before comparing; in a
  caffemodel or solverstate (protobuf: Caffe stores the net with its Data layers' absolute LMDB paths,
  and the snapshot's path) the same replacement is made in every string field of the parsed message;
- the sha256 of a caffemodel, wherever it is recorded (generate.json, the gallery): it hashes those
  paths too, so it is replaced by ``<sha256 of RELATIVE/PATH>`` (the caffemodels themselves are compared);
- ``train.log``: Caffe's log, every line of which begins with a wall-clock timestamp and a thread id;
- the stage markers' ``started``, ``seconds``, ``host`` and ``pid`` (`.stage.json`) and
  ``stage_times.json``: when and where a stage ran, and for how long;
- ``lock.mdb``: LMDB's reader table (process ids), not data;
- the report pages' durations (`report.html` of a Table 1 work folder is not written by these commands).

A data.mdb that differs in its bytes is compared record by record as well, and the verdict says which.
Exit status 0 when everything compared is identical, 1 otherwise (the differing files are listed).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MNIST = REPO.parent / "shared" / "data" / "mnist"
SKIP_NAMES = {"train.log", "lock.mdb", "stage_times.json"}
MARKER_VOLATILE = ("started", "seconds", "host", "pid")


def run_commit(commit: str, root: Path, args: argparse.Namespace) -> dict[str, float]:
    """Clone `commit` into root/repo and run the two commands into root/out; returns their seconds."""
    clone = root / "repo"
    subprocess.run(["git", "clone", "-q", "--no-checkout", str(REPO), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "checkout", "-q", commit], check=True)
    env = {**os.environ, "PYTHONPATH": str(clone), "OMP_NUM_THREADS": "1", "HCGEN_THREADS": "1"}
    where = subprocess.run([sys.executable, "-c", "import hcgen; print(hcgen.__file__)"], cwd=clone, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    if not where.startswith(str(clone)):
        raise SystemExit(f"{commit}: hcgen imported from {where}, not from the clone {clone}")
    out = root / "out"
    hcgen = [sys.executable, "-m", "hcgen.cli"]
    commands = {
        "demo": hcgen + ["demo", "--out", str(out / "demo"), "--iterations", str(args.demo_iterations),
                         "--limit", str(args.demo_limit), "--mnist", str(args.mnist)],
        "table1": hcgen + ["table1", "--profile", "tiny", "--work", str(out / "work"), "--results",
                           str(out / "results"), "--mnist", str(args.mnist)],
    }
    seconds = {}
    for name, cmd in commands.items():
        t0 = time.perf_counter()
        with open(root / f"{name}.log", "w") as log:
            subprocess.run(cmd, cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
        seconds[name] = round(time.perf_counter() - t0, 1)
    return seconds


def _replace_paths(data: bytes, root: Path) -> bytes:
    for text, token in ((str(root / "repo"), b"<REPO>"), (str(root / "out"), b"<OUT>")):
        data = data.replace(text.encode(), token)
    return data


def _proto_paths(message, root: Path) -> None:
    """Replace the paths in every string field of a protobuf message, recursively."""
    for field, value in message.ListFields():
        if field.type == field.TYPE_MESSAGE:
            for item in (value if field.label == field.LABEL_REPEATED else [value]):
                _proto_paths(item, root)
        elif field.type == field.TYPE_STRING:
            if field.label == field.LABEL_REPEATED:
                value[:] = [_replace_paths(v.encode(), root).decode() for v in value]
            else:
                setattr(message, field.name, _replace_paths(value.encode(), root).decode())


_CAFFEMODEL_SHA: dict[Path, dict[bytes, bytes]] = {}


def _caffemodel_digests(root: Path) -> dict[bytes, bytes]:
    """sha256 hex of each caffemodel the side wrote -> a token naming it by its relative path."""
    if root not in _CAFFEMODEL_SHA:
        _CAFFEMODEL_SHA[root] = {hashlib.sha256(p.read_bytes()).hexdigest().encode():
                                 f"<sha256 of {p.relative_to(root / 'out')}>".encode()
                                 for p in (root / "out").rglob("*.caffemodel")}
    return _CAFFEMODEL_SHA[root]


def normalized(path: Path, root: Path) -> bytes:
    """The file's bytes with the clone's and the output's paths replaced, volatile marker fields dropped."""
    data = path.read_bytes()
    if path.name == ".stage.json":
        marker = json.loads(data)
        return json.dumps({k: v for k, v in marker.items() if k not in MARKER_VOLATILE}, sort_keys=True).encode()
    if path.suffix in (".caffemodel", ".solverstate"):
        from caffe.proto import caffe_pb2  # pycaffe: only for these two protobuf files

        message = caffe_pb2.NetParameter() if path.suffix == ".caffemodel" else caffe_pb2.SolverState()
        message.ParseFromString(data)
        _proto_paths(message, root)
        return message.SerializeToString()
    for digest, token in _caffemodel_digests(root).items():
        data = data.replace(digest, token)
    return _replace_paths(data, root)


def same_records(a: Path, b: Path) -> bool:
    """Record by record: the keys and the Datum bytes of two LMDBs."""
    import lmdb

    def records(path: Path) -> list:
        with lmdb.open(str(path), readonly=True, lock=False) as env, env.begin() as txn:
            return list(txn.cursor())

    return records(a) == records(b)


def compare(before: Path, after: Path) -> tuple[int, list[str], list[str]]:
    """(files identical, files that differ, notes)."""
    files = sorted({p.relative_to(before / "out") for p in (before / "out").rglob("*") if p.is_file()}
                   | {p.relative_to(after / "out") for p in (after / "out").rglob("*") if p.is_file()})
    same, differ, notes = 0, [], []
    for rel in files:
        if rel.name in SKIP_NAMES or re.fullmatch(r"\.?.*\.tmp", rel.name):
            continue
        a, b = before / "out" / rel, after / "out" / rel
        if not a.exists() or not b.exists():
            differ.append(f"{rel}: only in {'the new' if not a.exists() else 'the old'} commit's output")
        elif normalized(a, before) == normalized(b, after):
            same += 1
        elif rel.name == "data.mdb" and same_records(a.parent, b.parent):
            same += 1
            notes.append(f"{rel}: bytes differ, records identical")
        else:
            differ.append(str(rel))
    return same, differ, notes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("before", help="commit (or branch) of the reference")
    parser.add_argument("after", help="commit (or branch) to compare with it")
    parser.add_argument("--mnist", default=str(MNIST), help=f"folder of the MNIST IDX files (default {MNIST})")
    parser.add_argument("--demo-iterations", type=int, default=200, help="hcgen demo --iterations (default 200)")
    parser.add_argument("--demo-limit", type=int, default=20, help="hcgen demo --limit (default 20)")
    parser.add_argument("--keep", default=None, help="run in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hcgen-compare-") as tmp:
        base = Path(args.keep) if args.keep else Path(tmp)
        sides = {"old": args.before, "new": args.after}  # equal lengths: paths inside protobufs keep their sizes
        for side in sides:
            (base / side).mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(max_workers=2) as pool:  # side by side: the same load on both
            futures = {side: pool.submit(run_commit, commit, base / side, args) for side, commit in sides.items()}
            times = {side: f.result() for side, f in futures.items()}
        same, differ, notes = compare(base / "old", base / "new")
    print(f"compared {args.before} and {args.after}: {same} files identical, {len(differ)} differ "
          f"(run times, seconds: {times})")
    for line in notes + [f"DIFFERS: {d}" for d in differ]:
        print(f"  {line}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
