"""Train and fine-tune with the stock `caffe train` CLI (Sec. 5.2).

`train` copies a solver and its net into an output directory (``solver.prototxt``, ``net.prototxt``)
with the snapshot prefix, random seed, iterations and Data-layer sources filled in, runs
``caffe train`` on them, streams its log into ``train.log`` and reports progress to a callback.
Fine-tuning is the same run with ``weights`` (``caffe train --weights``; the sdist's tool parsed the
flag but loaded nothing until patches/0004-caffe-train-weights.patch); the paper fine-tunes its LeNets
for 20,000 iterations and trains the base nets for 10,000.

Runs are idempotent: a directory whose final snapshot exists is reported, not retrained; one with
snapshots from an interrupted run resumes from the latest complete ``.solverstate``
(``caffe train --snapshot``). On resume Caffe restores the weights, momentum and iteration but its
Data layer starts again at the first key of the LMDB.
Caffe's Data layer never shuffles: the paper's random orderings are `hcgen.data.mix`'s shuffled copies.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from hcgen.backends.base import check_class_labels
from hcgen.data.lmdb_io import iter_lmdb, require_lmdb
from hcgen.errors import BadInput, ExternalFailure, NotFound
from hcgen.util.fileio import atomic_write
from hcgen.util.locks import folder_lock

LOG_FILE = "train.log"
SOLVER_FILE = "solver.prototxt"
NET_FILE = "net.prototxt"

_ITERATION = re.compile(r"\] Iteration (\d+), loss = (\S+)")
_TESTING = re.compile(r"\] Iteration (\d+), Testing net")
_TEST_OUTPUT = re.compile(r"\]\s+Test net output #\d+: (\S+) = (\S+)")


def caffe_executable() -> str:
    """The `caffe` CLI beside this interpreter (the venv's bin/caffe), else the one on PATH."""
    beside = Path(sys.executable).with_name("caffe")
    return str(beside) if beside.exists() else (shutil.which("caffe") or "caffe")


@dataclass(frozen=True)
class TrainProgress:
    """One event of a running `caffe train`: a displayed training loss, or the outputs of a test pass.

    `it_per_s` is the rate since the previous displayed loss (wall clock, tests included).
    """

    iteration: int
    max_iter: int
    loss: float | None = None
    it_per_s: float | None = None
    test: Mapping[str, float] = field(default_factory=dict)


@dataclass
class TrainResult:
    status: str  # "trained", "resumed" or "skipped" (the final snapshot already existed)
    caffemodel: Path
    solverstate: Path
    log: Path
    seed: int
    max_iter: int
    start_iter: int  # iteration the run started from (0, a snapshot's, or max_iter when skipped)
    losses: list[tuple[int, float]]  # (iteration, smoothed loss) as displayed (skipped: all of train.log)
    tests: list[tuple[int, dict[str, float]]]  # (iteration, test outputs), likewise
    seconds: float  # wall time of `caffe train`, 0 when skipped

    @property
    def it_per_s(self) -> float:
        done = self.max_iter - self.start_iter
        return done / self.seconds if self.seconds > 0 else 0.0


class _LogParser:
    """Turns `caffe train` GLOG lines into TrainProgress events (losses as displayed, test outputs)."""

    def __init__(self, max_iter: int, progress: Callable[[TrainProgress], None] | None):
        self.max_iter, self.progress = max_iter, progress
        self.losses: list[tuple[int, float]] = []
        self.tests: list[tuple[int, dict[str, float]]] = []
        self._testing = False  # inside a block of "Test net output" lines
        self._last: tuple[int, float] | None = None  # (iteration, time) of the last displayed loss

    def feed(self, line: str) -> None:
        m = _TEST_OUTPUT.search(line)
        if m and self._testing:
            self.tests[-1][1][m.group(1)] = float(m.group(2))
            return
        self.flush()
        m = _TESTING.search(line)
        if m:
            self.tests.append((int(m.group(1)), {}))
            self._testing = True
            return
        m = _ITERATION.search(line)
        if m:
            it, loss, now = int(m.group(1)), float(m.group(2)), time.monotonic()
            rate = None
            if self._last is not None and now > self._last[1] and it > self._last[0]:
                rate = (it - self._last[0]) / (now - self._last[1])
            self._last = (it, now)
            self.losses.append((it, loss))
            self._emit(TrainProgress(it, self.max_iter, loss=loss, it_per_s=rate))

    def flush(self) -> None:
        """Report a finished test pass (its output lines end at the first other line)."""
        if self._testing and self.tests[-1][1]:
            self._testing = False
            self._emit(TrainProgress(self.tests[-1][0], self.max_iter, test=dict(self.tests[-1][1])))

    def _emit(self, event: TrainProgress) -> None:
        if self.progress is not None:
            self.progress(event)


def _snapshots(prefix: Path) -> list[tuple[int, Path]]:
    """(iteration, .solverstate) of the snapshots with `prefix`, newest first."""
    found = []
    for path in prefix.parent.glob(prefix.name + "_iter_*.solverstate"):
        m = re.fullmatch(re.escape(prefix.name) + r"_iter_(\d+)\.solverstate", path.name)
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found, reverse=True)


def _complete_snapshot(prefix: Path, solvers) -> tuple[int, Path] | None:
    """The newest snapshot whose solver state parses and whose caffemodel exists (written first)."""
    for it, state in _snapshots(prefix):
        model = state.with_suffix(".caffemodel")
        if model.is_file() and solvers.solver_state_iteration(state) == it:
            return it, state
    return None


# Run in the child instead of `preexec_fn` (unsafe in a threaded parent such as a Dask worker or the PASS
# thread pool): SIGTERM the child when the thread that started it dies (Linux prctl PR_SET_PDEATHSIG), so
# a killed Dask worker or pipeline does not leave caffe training on (Caffe's snapshots make the rerun
# resume); then exec the real command. argv: parent pid, command...
_DIE_WITH_PARENT = """import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass  # no prctl here: the child outlives a killed parent
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)  # the parent died before prctl
try:
    os.execvp(sys.argv[2], sys.argv[2:])
except OSError as exc:
    sys.stderr.write(f"cannot run {sys.argv[2]}: {exc.strerror}\\n")
    sys.exit(127)
"""


def die_with_parent(cmd: Sequence[str]) -> list[str]:
    """`cmd` wrapped so that it is terminated when the calling thread's process dies (see above)."""
    return [sys.executable, "-S", "-c", _DIE_WITH_PARENT, str(os.getpid()), *cmd]


def _last_error(lines: Sequence[str]) -> str:
    """The line of a failed caffe's log that says why (glog FATAL / Check failed), without its prefix."""
    from hcgen.backends.caffe_checks import fatal_line  # pycaffe: loaded only when used

    return fatal_line("".join(lines))


def _loss_classes(net_text: str) -> int | None:
    """The class count of the net's SoftmaxWithLoss: num_output of the InnerProduct feeding it (None
    when the net is shaped otherwise)."""
    from hcgen.backends.pycaffe import caffe_pb2, text_format  # pycaffe only where a net is read

    net = text_format.Parse(net_text, caffe_pb2.NetParameter())
    for loss in (layer for layer in net.layer if layer.type == "SoftmaxWithLoss"):
        producers = [layer for layer in net.layer if loss.bottom[0] in layer.top and layer.type == "InnerProduct"]
        if producers:
            return int(producers[-1].inner_product_param.num_output)
    return None


def _check_labels(path: str, classes: int | None, option: str) -> None:
    """Every label of the LMDB is a class of the net: Caffe's SoftmaxWithLoss only DCHECKs it, so a
    release build would read past its probabilities and train on garbage."""
    if classes is None:
        return
    for keys, _, labels in iter_lmdb(path, batch_size=4096):
        check_class_labels(labels, classes, f"{path} ({option})", keys)


def train(solver: str | os.PathLike, out: str | os.PathLike, *, weights: str | os.PathLike | None = None,
          seed: int | None = None, train_lmdb: str | os.PathLike | None = None,
          test_lmdb: str | os.PathLike | None = None, iterations: int | None = None,
          snapshot_every: int | None = None, test_every: int | None = None, test: bool = True,
          blas_threads: int | None = 1,
          progress: Callable[[TrainProgress], None] | None = None,
          executable: str | None = None) -> TrainResult:
    """Train (or, with `weights`, fine-tune) the net of `solver` with ``caffe train``; results in `out`.

    `seed` becomes the solver's ``random_seed``; None reuses the seed of an earlier run in `out`, or
    draws a fresh one (reported in the result). `iterations`, `snapshot_every` and `test_every`
    override ``max_iter``, ``snapshot`` and ``test_interval``. The test phases only report: the weights
    are the same whatever `test_every` is (tested); `test=False` runs no test phase at all (not even at
    the start and the end; Table 1 evaluates every net afterwards). `blas_threads` sets OPENBLAS_NUM_THREADS for the subprocess (None: inherit).
    Raises FileNotFoundError for a missing solver, net, weights or LMDB, ValueError when `out` holds
    snapshots of a run with other settings, and RuntimeError (with Caffe's error line) when
    ``caffe train`` fails.
    """
    from hcgen.training import solver as solvers  # pycaffe: `hcgen doctor` imports caffe_executable without it

    out = Path(out).absolute()
    solver_path = Path(solver).absolute()
    if not solver_path.is_file():
        raise NotFound(f"solver not found: {solver}")
    weights_path = Path(weights).absolute() if weights is not None else None
    if weights_path is not None and not weights_path.is_file():
        raise NotFound(f"weights not found: {weights} (the base net's .caffemodel to fine-tune)")
    if weights_path is not None:
        from hcgen.backends.caffe_checks import check_finite, read_caffemodel  # pycaffe: loaded only when used

        check_finite(read_caffemodel(weights_path), weights)  # truncated, foreign or diverged weights
    for name, value in (("iterations", iterations), ("snapshot_every", snapshot_every), ("test_every", test_every)):
        if value is not None and value <= 0:
            raise BadInput(f"{name} must be positive, got {value}")
    if seed is None and (out / SOLVER_FILE).is_file():
        seed = solvers.solver_random_seed(out / SOLVER_FILE)
    if seed is None or seed < 0:
        seed = secrets.randbelow(2**31)
    reference = solvers.read_solver_parameter(solver_path)
    prefix = out / (Path(reference.snapshot_prefix).name or "net")
    test_initialization = None
    if not test:  # an interval past the last iteration and no test before the first: no test phase
        test_every = (iterations or reference.max_iter) + 1
        test_initialization = False
    rendered = solvers.render_training(
        solver_path, out / NET_FILE, str(prefix), seed, iterations, snapshot_every,
        {"TRAIN": train_lmdb, "TEST": test_lmdb}, test_every, test_initialization)
    for phase, option in (("TRAIN", "--train"), ("TEST", "--test")):
        if phase in rendered.sources and (phase == "TRAIN" or reference.test_iter):  # no test_iter, no test net
            require_lmdb(rendered.sources[phase], "training" if phase == "TRAIN" else "test", option)
            _check_labels(rendered.sources[phase], _loss_classes(rendered.net), option)
    tested = reference.test_iter and {"TRAIN", "TEST"} <= set(rendered.sources)
    if tested and Path(rendered.sources["TEST"]).resolve() == Path(rendered.sources["TRAIN"]).resolve():
        raise BadInput(f"the training and test LMDB are both {rendered.sources['TRAIN']}: this Caffe hangs "
                       "opening one LMDB twice; pass another --test (a copy will do)")
    header = (f"# written by hcgen train from {solver_path}; "
              f"{f'fine-tuning {weights_path}' if weights_path else 'random initialization'}\n")
    solver_text = header + rendered.solver

    with folder_lock(out):  # one run per folder: a second one fails at once
        return _run_caffe_train(out, solver_text, rendered, prefix, weights_path, seed, blas_threads,
                                progress, executable, solvers)


def _run_caffe_train(out, solver_text, rendered, prefix, weights_path, seed, blas_threads, progress, executable,
                     solvers) -> TrainResult:
    log = out / LOG_FILE
    old = (out / SOLVER_FILE).read_text() if (out / SOLVER_FILE).is_file() else None
    old_net = (out / NET_FILE).read_text() if (out / NET_FILE).is_file() else None
    if old not in (None, solver_text) or old_net not in (None, rendered.net):
        if _snapshots(prefix):
            raise BadInput(f"{out} holds snapshots of a run with different settings (see {out / SOLVER_FILE}); "
                           "use another output directory or delete it")
    atomic_write(out / SOLVER_FILE, solver_text)
    atomic_write(out / NET_FILE, rendered.net)

    latest = _complete_snapshot(prefix, solvers)
    if latest is not None and latest[0] >= rendered.max_iter:
        parser = _LogParser(rendered.max_iter, None)
        for line in log.read_text(errors="replace").splitlines() if log.is_file() else ():
            parser.feed(line)
        return TrainResult("skipped", latest[1].with_suffix(".caffemodel"), latest[1], log, seed,
                           rendered.max_iter, rendered.max_iter, parser.losses, parser.tests, 0.0)

    resumed = latest is not None
    cmd = [executable or caffe_executable(), "train", f"--solver={out / SOLVER_FILE}"]
    if shutil.which(cmd[0]) is None:
        raise ExternalFailure(f"cannot run {cmd[0]} (not found or not executable); install Caffe with `make caffe`")
    if latest is not None:
        cmd.append(f"--snapshot={latest[1]}")
    elif weights_path is not None:
        cmd.append(f"--weights={weights_path}")  # needs patches/0004 (this fork dropped CopyLayers)
    env = {**os.environ, "GLOG_minloglevel": "0", "GLOG_logtostderr": "1"}
    if blas_threads is not None:
        env["OPENBLAS_NUM_THREADS"] = str(blas_threads)
    parser = _LogParser(rendered.max_iter, progress)
    tail: deque[str] = deque(maxlen=30)
    started = time.monotonic()
    with open(log, "a", buffering=1) as log_file:  # line-buffered: `tail -f train.log` follows it
        log_file.write(f"==== hcgen train {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(cmd)}\n")
        log_file.flush()
        try:
            proc = subprocess.Popen(die_with_parent(cmd), cwd=out, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1)
        except OSError as exc:
            raise ExternalFailure(f"cannot run {cmd[0]} ({exc}); install Caffe with `make caffe`") from exc
        try:
            for line in proc.stdout:
                log_file.write(line)
                tail.append(line)
                parser.feed(line)
            proc.wait()
        except BaseException:
            # Ctrl-C: caffe's SIGINT handler snapshots and stops; wait for it so the snapshot is whole.
            proc.send_signal(signal.SIGINT)
            log_file.write(proc.stdout.read())
            proc.wait()
            raise
        finally:
            proc.stdout.close()
    parser.flush()
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        rc = proc.returncode
        how = f"was killed by signal {-rc}" if rc < 0 else f"exited with {rc}"
        raise ExternalFailure(f"caffe train {how}: {_last_error(tail)} (the whole log: {log})")
    final = _complete_snapshot(prefix, solvers)
    if final is None:
        raise ExternalFailure(f"caffe train left no snapshot in {out}: {_last_error(tail)} (the whole log: {log})")
    if final[0] < rendered.max_iter:
        raise ExternalFailure(f"caffe train stopped early (interrupted?) and saved {final[1]}; "
                              "rerun the same command to resume")
    return TrainResult("resumed" if resumed else "trained", final[1].with_suffix(".caffemodel"),
                       final[1], log, seed, rendered.max_iter, latest[0] if latest else 0,
                       parser.losses, parser.tests, seconds)
