"""Solver and net prototxts rendered for one `caffe train` run, and what a run left (solver states)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, NamedTuple

from hcgen.backends.caffe import read_net_parameter, read_prototxt_into
from hcgen.backends.pycaffe import DecodeError, caffe_pb2, text_format
from hcgen.errors import BadInput, NotFound

__all__ = ["TrainingPrototxts", "read_solver_parameter", "render_training", "solver_random_seed",
           "solver_state_iteration"]


class TrainingPrototxts(NamedTuple):
    """A solver and its train/test net rendered for one `caffe train` run (prototxt text)."""

    solver: str
    net: str
    sources: dict  # {"TRAIN": lmdb, "TEST": lmdb}: the Data layer sources, absolute
    max_iter: int


def read_solver_parameter(prototxt: str | os.PathLike) -> caffe_pb2.SolverParameter:
    return read_prototxt_into(prototxt, caffe_pb2.SolverParameter(), "solver")


def render_training(solver: str | os.PathLike, net_copy: str | os.PathLike, snapshot_prefix: str,
                    random_seed: int, max_iter: int | None = None, snapshot: int | None = None,
                    sources: Mapping[str, str | os.PathLike] | None = None,
                    test_interval: int | None = None,
                    test_initialization: bool | None = None) -> TrainingPrototxts:
    """Render `solver` and the net it names for a run whose net file will be `net_copy`.

    The solver's relative ``net`` is looked up beside the solver, then in the current directory. Sets
    ``net``, ``snapshot_prefix``, ``random_seed``, ``snapshot_after_train: true``, binary snapshots,
    and `max_iter` / `snapshot` / `test_interval` when given. `sources` maps a phase ("TRAIN" / "TEST") to the LMDB its
    Data layer reads; sources not replaced are made absolute relative to the current directory, as
    Caffe resolves them.
    """
    param = read_solver_parameter(solver)
    if not param.net or param.HasField("net_param") or param.train_net or param.test_net:
        raise BadInput(f"{solver} must name its train/test net with a single 'net:' field "
                       "(train_net, test_net and inline net_param are not supported)")
    net_path = Path(param.net)
    if not net_path.is_absolute():
        candidates = [Path(solver).parent / net_path, Path.cwd() / net_path]
        found = [p for p in candidates if p.is_file()]
        if not found:
            raise NotFound(f"net {param.net!r} named by {solver} not found "
                           f"(looked in {', '.join(str(p.parent) for p in candidates)})")
        net_path = found[0]
    elif not net_path.is_file():
        raise NotFound(f"net {net_path} named by {solver} not found")
    net = read_net_parameter(net_path)
    wanted = {phase: Path(src).absolute() for phase, src in (sources or {}).items() if src is not None}
    effective: dict[str, str] = {}
    for layer in net.layer:
        if layer.type != "Data":
            continue
        phases = {rule.phase for rule in layer.include if rule.HasField("phase")} or {caffe_pb2.TRAIN,
                                                                                      caffe_pb2.TEST}
        for phase in sorted(phases):
            name = caffe_pb2.Phase.Name(phase)
            if name in wanted:
                layer.data_param.source = str(wanted[name])
            elif not Path(layer.data_param.source).is_absolute():
                layer.data_param.source = str(Path(layer.data_param.source).absolute())
            effective[name] = layer.data_param.source
    missing = sorted(set(wanted) - set(effective))
    if missing:
        raise BadInput(f"{net_path} has no {' or '.join(missing)}-phase Data layer to read "
                       f"{', '.join(str(wanted[m]) for m in missing)} from")
    param.net = str(Path(net_copy).absolute())
    param.snapshot_prefix = snapshot_prefix
    param.random_seed = random_seed
    param.snapshot_after_train = True
    param.snapshot_format = caffe_pb2.SolverParameter.BINARYPROTO
    if max_iter is not None:
        param.max_iter = max_iter
    if snapshot is not None:
        param.snapshot = snapshot
    if test_interval is not None:
        param.test_interval = test_interval
    if test_initialization is not None:
        param.test_initialization = test_initialization
    if param.max_iter <= 0:
        raise BadInput(f"{solver} sets no max_iter; give the number of iterations")
    return TrainingPrototxts(text_format.MessageToString(param), text_format.MessageToString(net),
                             effective, param.max_iter)


def solver_random_seed(prototxt: str | os.PathLike) -> int:
    """The ``random_seed`` of a solver prototxt (-1 when unset: Caffe then seeds from the clock)."""
    return int(read_solver_parameter(prototxt).random_seed)


def solver_state_iteration(path: str | os.PathLike) -> int | None:
    """The iteration a ``.solverstate`` was written at, or None if the file is unreadable (e.g. cut short)."""
    state = caffe_pb2.SolverState()
    try:
        state.ParseFromString(Path(path).read_bytes())
    except (OSError, DecodeError):
        return None
    return int(state.iter) if state.HasField("iter") and state.history else None
