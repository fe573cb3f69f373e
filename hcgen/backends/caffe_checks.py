"""Check a deploy prototxt and a caffemodel before Caffe sees them.

Caffe reports most bad inputs through glog ``CHECK``s, which abort the whole process (SIGABRT, no
Python exception): a truncated caffemodel ("Check failed: ReadProtoFromBinaryFile"), weights whose
shapes differ from the prototxt's ("Cannot copy param 0 weights from layer 'ip1'; shape mismatch"),
an unknown layer type, a bottom blob no layer produces. And a caffemodel of another net whose layer
names do not match loads "fine": Caffe keeps the random fillers of every layer it finds no weights for.

`check_deploy` parses both files with ``caffe_pb2`` and checks them in Python (syntax, force_backward,
layer types, bottoms, the caffemodel's layers and blob shapes, NaN or infinite weights), then builds
the net in a child process (`probe`), so that whatever Caffe would still abort on kills the child and
becomes a ValueError here. Every error is one line naming the file and the problem.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import lmdb
import numpy as np

from hcgen.backends.blas import describe as describe_blas
from hcgen.backends.pycaffe import DecodeError, caffe, caffe_pb2, text_format
from hcgen.errors import BadInput, NotFound

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


@dataclass(frozen=True)
class DeployInfo:
    """What the checks learned: the input shape (C, H, W) and each parametrized layer's blob shapes."""

    input_shape: tuple
    params: dict  # layer name -> [blob shape, ...] as the prototxt's net declares them


def read_prototxt(path: str | os.PathLike, what: str = "deploy prototxt"):
    """The NetParameter of a text prototxt; one-line ValueError for syntax errors and non-text files."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"{what} not found: {path}")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise BadInput(f"{path} is not a text prototxt (binary data; a caffemodel passed as --model?)") from None
    param = caffe_pb2.NetParameter()
    try:
        text_format.Merge(text, param)
    except text_format.ParseError as exc:
        raise BadInput(f"{path}: prototxt syntax error at {exc}") from None
    return param


def _in_test_phase(layer) -> bool:
    if any(r.HasField("phase") and r.phase != caffe_pb2.TEST for r in layer.include):
        return False
    return not any(r.HasField("phase") and r.phase == caffe_pb2.TEST for r in layer.exclude)


def check_prototxt(path: str | os.PathLike, *, need_backward: bool = True):
    """Parse and check a deploy prototxt (TEST phase); returns its NetParameter."""
    param = read_prototxt(path)
    path = Path(path)
    if need_backward and not param.force_backward:
        raise BadInput(f"{path} lacks 'force_backward: true'; input gradients would be zero (add the line "
                       "at the top of the prototxt)")
    if param.layers:
        raise BadInput(f"{path} uses the legacy V1 'layers' field; upgrade it with Caffe's upgrade_net_proto_text")
    known = set(caffe.layer_type_list())
    blobs = set(param.input)
    names = set()
    layers = [layer for layer in param.layer if _in_test_phase(layer)]
    if not layers:
        raise BadInput(f"{path} defines no layers")
    for layer in layers:
        if layer.type not in known:
            raise BadInput(f"{path}: layer {layer.name!r} has unknown type {layer.type!r} for this Caffe")
        if layer.name in names:
            raise BadInput(f"{path}: two layers are named {layer.name!r}")
        names.add(layer.name)
        for bottom in layer.bottom:
            if bottom not in blobs:
                raise BadInput(f"{path}: layer {layer.name!r} reads bottom {bottom!r}, which no earlier "
                               "layer produces")
        if layer.type == "Input":
            shapes = layer.input_param.shape
            if len(shapes) not in (1, len(layer.top)) or any(not s.dim for s in shapes):
                raise BadInput(f"{path}: Input layer {layer.name!r} needs input_param {{ shape {{ dim: N dim: C "
                               "dim: H dim: W } }")
            if any(d <= 0 for s in shapes for d in s.dim):
                raise BadInput(f"{path}: Input layer {layer.name!r} has a non-positive dimension")
        blobs.update(layer.top)
    inputs = [layer for layer in layers if layer.type == "Input"]
    if len(inputs) + len(param.input) != 1:
        raise BadInput(f"{path} must have exactly one Input layer (the image batch), has "
                       f"{len(inputs) + len(param.input)}")
    return param


def read_caffemodel(path: str | os.PathLike):
    """The NetParameter of a binary caffemodel; ValueError for truncated or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"weights not found: {path} (train a net with `hcgen train`)")
    data = path.read_bytes()
    if data.startswith(_HDF5_MAGIC):
        raise BadInput(f"{path} is an HDF5 caffemodel; hcgen reads binary protobuf caffemodels")
    param = caffe_pb2.NetParameter()
    try:
        param.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise BadInput(f"{path} is not a complete caffemodel (truncated or another format: {exc})") from None
    if not any(layer.blobs for layer in list(param.layer) + list(param.layers)):
        raise BadInput(f"{path} holds no weights (empty, or not a caffemodel)")
    return param


def _blob_shape(blob) -> tuple:
    if blob.HasField("shape"):
        return tuple(blob.shape.dim)
    return tuple(d for d in (blob.num, blob.channels, blob.height, blob.width))


def _same_shape(source: tuple, target: tuple, legacy: bool) -> bool:
    """Caffe's Blob::ShapeEquals: legacy 4-d shapes compare to the target padded with 1s on the left."""
    if legacy:
        return len(target) <= 4 and tuple([1] * (4 - len(target)) + list(target)) == source
    return source == target


def check_weights(net, params: dict, weights: str | os.PathLike, model: str | os.PathLike = "the prototxt") -> None:
    """Check that the caffemodel `net` (a NetParameter read from `weights`) gives every layer in `params`
    (name -> blob shapes) exactly its blobs: what Caffe's CopyTrainedLayersFrom
    CHECKs, plus the layers it would silently leave at their random fillers."""
    path = weights
    source = {layer.name: layer for layer in list(net.layers) + list(net.layer)}
    for name, shapes in params.items():
        if name not in source or not source[name].blobs:
            theirs = ", ".join(n for n, layer in source.items() if layer.blobs)
            raise BadInput(f"{path} has no weights for layer {name!r} of {model} (weights of another net? "
                           f"its layers with weights: {theirs})")
        blobs = source[name].blobs
        if len(blobs) != len(shapes):
            raise BadInput(f"{path}: layer {name!r} has {len(blobs)} weight blobs, {model} needs {len(shapes)} "
                           "(weights of another net?)")
        for i, (blob, shape) in enumerate(zip(blobs, shapes)):
            got = _blob_shape(blob)
            if not _same_shape(got, tuple(shape), not blob.HasField("shape")):
                raise BadInput(f"{path}: layer {name!r} blob {i} has shape {list(got)} but {model} needs "
                               f"{list(shape)} (weights of another net?)")
            values = blob.double_data if len(blob.double_data) else blob.data
            if len(values) != int(np.prod(shape)):
                raise BadInput(f"{path}: layer {name!r} blob {i} holds {len(values)} values, not "
                               f"{int(np.prod(shape))}; the caffemodel is damaged")


def check_finite(net, weights: str | os.PathLike) -> None:
    """Every blob of the caffemodel `net` (read from `weights`) holds finite values."""
    for layer in list(net.layers) + list(net.layer):
        for i, blob in enumerate(layer.blobs):
            values = blob.double_data if len(blob.double_data) else blob.data
            if not np.isfinite(np.asarray(values, dtype=np.float64)).all():
                raise BadInput(f"{weights}: layer {layer.name!r} blob {i} holds NaN or infinite weights "
                               "(a diverged training?)")


def fatal_line(stderr: str) -> str:
    """The glog FATAL / Check failed line of an aborted Caffe, without its 'F1201 12:00:00 ... ] ' prefix."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if line.startswith("F") and "] " in line:
            return line.split("] ", 1)[1]
    for line in lines:
        if "Check failed" in line or "Error" in line:
            return line.strip()
    return lines[-1].strip() if lines else "no message"


def probe(model: str | os.PathLike, weights: Optional[str | os.PathLike] = None) -> tuple[Optional[dict], str]:
    """Build the TEST net of `model`, then load `weights`, in a child process. Returns (info, error):
    info = {"params": {layer: [shape, ...]}, "inputs": {blob: shape}} once the net was built (else None),
    error = Caffe's fatal line if the child failed ("" if it did not)."""
    cmd = [sys.executable, "-c", "from hcgen.backends.caffe_checks import _probe_main; _probe_main()", str(model)]
    cmd += [str(weights)] if weights is not None else []
    env = {**os.environ, "GLOG_minloglevel": "2"}
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=env, timeout=600)
    lines = proc.stdout.splitlines()
    info = json.loads(lines[0]) if lines and lines[0].startswith("{") else None
    ok = proc.returncode == 0 and len(lines) == 1 + (weights is not None)
    return info, "" if ok else fatal_line(proc.stderr)


def _probe_main() -> None:
    model, weights = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
    net = caffe.Net(model, caffe.TEST)
    info = {"params": {name: [list(b.data.shape) for b in blobs] for name, blobs in net.params.items()},
            "inputs": {name: list(net.blobs[name].data.shape) for name in net.inputs}}
    print(json.dumps(info), flush=True)
    if weights is not None:
        net.copy_from(weights)
        print("loaded", flush=True)


def check_deploy(model: str | os.PathLike, weights: str | os.PathLike, *, need_backward: bool = True) -> DeployInfo:
    """Everything `CaffeNet(model, weights)` needs, checked without risking this process (see module doc)."""
    check_prototxt(model, need_backward=need_backward)
    net = read_caffemodel(weights)  # parse errors before the child process
    check_finite(net, weights)
    info, error = probe(model, weights)
    if info is None:
        raise BadInput(f"Caffe cannot build the net of {model}: {error}")
    check_weights(net, info["params"], weights, model)
    if error:
        raise BadInput(f"Caffe cannot load {weights} into {model}: {error}")
    if len(info["inputs"]) != 1:
        raise BadInput(f"{model} must have exactly one input blob (the image batch), has {list(info['inputs'])}")
    (shape,) = info["inputs"].values()
    return DeployInfo(tuple(shape[1:]), info["params"])


# --- `hcgen doctor`: probes of the Caffe this process imported -------------------------------------

TINY_NET = """name: "hcgen-tiny"
force_backward: true
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 1 dim: 6 dim: 6 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 2 kernel_size: 3 weight_filler { type: "gaussian" std: 0.5 }
                      bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "act" type: "TanH" bottom: "conv" top: "act" }
layer { name: "ip" type: "InnerProduct" bottom: "act" top: "ip"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""


def tiny_net(directory: str | os.PathLike, seed: int = 0, force_backward: bool = True) -> caffe.Net:
    """A 6x6 conv-tanh-ip net with random weights (seeded), for checks and tests."""
    path = Path(directory) / ("tiny.prototxt" if force_backward else "tiny_nobackward.prototxt")
    text = TINY_NET if force_backward else TINY_NET.replace("force_backward: true\n", "")
    path.write_text(text)
    caffe.set_random_seed(seed)
    return caffe.Net(str(path), caffe.TEST)


def check_backward_from(directory: str | os.PathLike, h: float = 1e-2) -> float:
    """Max relative error of ``backward_from`` against central differences of <w, ip(x)>."""
    net = tiny_net(directory)
    rng = np.random.default_rng(0)
    x = rng.normal(size=net.blobs["data"].shape)
    w = rng.normal(size=net.blobs["ip"].shape).astype(np.float32)

    def objective(z: np.ndarray) -> np.ndarray:
        net.blobs["data"].data[...] = z
        net.forward(end="ip")
        return (net.blobs["ip"].data.astype(np.float64) * w).sum()

    objective(x)
    analytic = net.backward_from("ip", w).astype(np.float64)
    numeric = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        e = np.zeros_like(x)
        e[idx] = h
        numeric[idx] = (objective(x + e) - objective(x - e)) / (2 * h)
    return float(np.abs(analytic - numeric).max() / np.abs(numeric).max())


def build_info() -> dict:
    """What `hcgen doctor` reports about the Caffe this process imported."""
    native = Path(caffe._caffe.__file__)
    blas = "unknown"
    for line in Path("/proc/self/maps").read_text().splitlines():
        if "blas" in line.rsplit("/", 1)[-1]:
            blas = line.split()[-1]
            break
    return {
        "caffe_python": str(Path(caffe.__file__).parent),
        "caffe_native": str(native.resolve()),
        "caffe_version": caffe.__version__,
        "blas": blas,
        "blas_kernels": describe_blas(),
        "layer_types": len(caffe.layer_type_list()),
        "has_backward_from": hasattr(caffe.Net, "backward_from"),
        # patch 0006: without it CaffeNet still works, computing the weight gradients it never reads
        "skips_weight_gradients": hasattr(caffe.Layer, "set_param_propagate_down"),
    }


def check_lmdb_data_layer(directory: str | os.PathLike) -> int:
    """Reads a 3-record LMDB written from Python through Caffe's Data layer; returns labels seen."""
    db = Path(directory) / "doctor_lmdb"
    with lmdb.open(str(db), map_size=1 << 20) as env, env.begin(write=True) as txn:
        for i in range(3):
            datum = caffe.io.array_to_datum(np.full((1, 2, 2), i, np.uint8), label=i)
            txn.put(b"%08d" % i, datum.SerializeToString())
    proto = Path(directory) / "doctor_data.prototxt"
    proto.write_text(
        'layer { name: "d" type: "Data" top: "data" top: "label" '
        f'data_param {{ source: "{db}" backend: LMDB batch_size: 3 }} }}\n'
    )
    net = caffe.Net(str(proto), caffe.TEST)
    net.forward()
    labels = net.blobs["label"].data.astype(int).tolist()
    if labels != [0, 1, 2] or net.blobs["data"].data[2].max() != 2:
        raise RuntimeError(f"Caffe's Data layer read back {labels} instead of [0, 1, 2]")
    return len(labels)
