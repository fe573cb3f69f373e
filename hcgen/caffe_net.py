"""The only module that imports caffe: a deploy net seen in pixel units.

`CaffeNet` wraps a deploy prototxt + caffemodel. Images go in as float or uint8 batches
(N, C, H, W) of pixels in [0, 255]; the adapter applies the net's preprocessing
(LeNet: ``scale = 1/256``; ImageNet nets: channel order and mean, see `Preprocessing`) and
returns gradients with respect to the *pixels*, so a step ``eps`` along a direction is in
grey levels.

Scores are the penultimate blob ``h(x)`` (the input of the final Softmax: LeNet ``ip2``),
the "features of the penultimate layer" of Eq. 7 in Rozsa et al. (CVPRW 2016). The image
gradient of a feature vector is computed with ``Net.backward_from`` (B_l, Sec. 4.3), which
hcgen adds to pycaffe with patches/0003-pycaffe-backward-from.patch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, NamedTuple

import numpy as np

from hcgen.blas import configure_openblas, describe as describe_blas

os.environ.setdefault("GLOG_minloglevel", "2")  # keep Caffe's INFO logging off stderr
# One OpenBLAS thread for Caffe (numpy's own OpenBLAS is loaded before this line and unaffected):
# measured here, LeNet forward is as fast single-threaded, and spinning BLAS threads collapse under
# load (one worker per core is the right shape). Set OPENBLAS_NUM_THREADS yourself to override.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# A CPU newer than Debian's OpenBLAS gets its generic SSE3 kernels: pick the family the CPU runs (hcgen.blas).
configure_openblas()

import caffe  # noqa: E402
from caffe.proto import caffe_pb2  # noqa: E402
from google.protobuf import text_format  # noqa: E402
from google.protobuf.message import DecodeError  # noqa: E402
from hcgen.backend import check_labels, softmax_loss_seed  # noqa: E402

caffe.set_mode_cpu()


@dataclass(frozen=True)
class Preprocessing:
    """Pixels -> net input: ``net[:, c] = (pixels[:, channel_order[c]] - mean[c]) * scale``.

    LeNet (Caffe's MNIST example): ``scale=1/256`` (0.00390625), no mean, one channel.
    BVLC-GoogLeNet: ``channel_order=(2, 1, 0)`` (RGB pixels -> BGR), ``mean=(104, 117, 123)``,
    ``scale=1``. hcgen's ImageNet presets (`GOOGLENET`, `RESNET152`) take BGR pixels, as hcgen.images
    loads them and as Caffe's Data layer reads LMDBs, so they swap no channels.
    """

    scale: float = 1.0
    mean: tuple[float, ...] = ()
    channel_order: tuple[int, ...] = ()

    def forward(self, pixels: np.ndarray) -> np.ndarray:
        x = np.asarray(pixels, dtype=np.float32)
        if self.channel_order:
            x = x[:, list(self.channel_order)]
        if self.mean:
            x = x - np.asarray(self.mean, dtype=np.float32)[None, :, None, None]
        return x * np.float32(self.scale)

    def inverse(self, net_input: np.ndarray) -> np.ndarray:
        """Exact inverse of `forward` (up to float rounding): net input -> pixels."""
        x = np.asarray(net_input, dtype=np.float64) / self.scale
        if self.mean:
            x = x + np.asarray(self.mean, dtype=np.float64)[None, :, None, None]
        if self.channel_order:
            x = x[:, np.argsort(self.channel_order)]
        return x

    def gradient_to_pixels(self, input_diff: np.ndarray) -> np.ndarray:
        """Chain rule through `forward`: d/d(pixels) = scale * d/d(net input), channels put back."""
        g = np.asarray(input_diff, dtype=np.float64) * self.scale
        if self.channel_order:
            g = g[:, np.argsort(self.channel_order)]
        return g


LENET = Preprocessing(scale=0.00390625)
# ImageNet nets on BGR pixels (the order of cv2.imread, hcgen.images and the LMDBs hcgen writes), 224x224
# centre crops: BVLC-GoogLeNet's train_val mean_value; for ResNet-152, whose published mean is the
# image ResNet_mean.binaryproto, per-channel ImageNet means (see models/resnet152/README.md).
GOOGLENET = Preprocessing(mean=(104.0, 117.0, 123.0))
RESNET152 = Preprocessing(mean=(103.939, 116.779, 123.68))
PRESETS = {"lenet": LENET, "googlenet": GOOGLENET, "resnet152": RESNET152}


def preprocessing_preset(name: str) -> Preprocessing:
    """The `Preprocessing` named `name` in `PRESETS` (lenet, googlenet, resnet152)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preprocessing {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def _read_prototxt(prototxt: str | os.PathLike, param, what: str):
    path = Path(prototxt)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        text_format.Merge(path.read_text(), param)
    except text_format.ParseError as exc:
        raise ValueError(f"{path} is not a valid Caffe {type(param).__name__} prototxt: {exc}") from exc
    return param


def read_net_parameter(prototxt: str | os.PathLike) -> caffe_pb2.NetParameter:
    return _read_prototxt(prototxt, caffe_pb2.NetParameter(), "deploy prototxt")


def penultimate_layer(param: caffe_pb2.NetParameter) -> str:
    """Name of the layer whose top feeds the final Softmax (the paper's penultimate layer)."""
    softmax = [layer for layer in param.layer if layer.type == "Softmax"]
    if not softmax:
        raise ValueError(
            "the prototxt has no Softmax layer, so the penultimate layer cannot be found; "
            "name it with --layer"
        )
    blob = softmax[-1].bottom[0]
    producers = [layer.name for layer in param.layer if blob in layer.top and layer.type != "Softmax"]
    if not producers:
        raise ValueError(f"no layer produces {blob!r}, the input of the final Softmax; name one with --layer")
    return producers[-1]


@dataclass
class CaffeNet:
    """A deploy net (prototxt with an Input layer, ``force_backward: true``) + caffemodel.

    Parameters
    ----------
    deploy, weights : paths to the deploy prototxt and the trained caffemodel.
    preprocessing : pixels -> net input (default: LeNet's scale 1/256).
    layer : the penultimate layer; default: the layer feeding the final Softmax.
    batch_size : images per forward pass.
    """

    deploy: str | os.PathLike
    weights: str | os.PathLike
    preprocessing: Preprocessing = LENET
    layer: str | None = None
    batch_size: int = 256
    net: caffe.Net = field(init=False, repr=False)

    def __post_init__(self) -> None:
        param = read_net_parameter(self.deploy)
        if not param.force_backward:
            raise ValueError(
                f"{self.deploy} lacks 'force_backward: true'; input gradients would be zero"
            )
        if not Path(self.weights).is_file():
            raise FileNotFoundError(f"weights not found: {self.weights} (train a net with `hcgen train`)")
        self.net = caffe.Net(str(self.deploy), caffe.TEST, weights=str(self.weights))
        if len(self.net.inputs) != 1:
            raise ValueError(f"{self.deploy} must have exactly one input blob, has {list(self.net.inputs)}")
        self.input_blob = self.net.inputs[0]
        self.input_shape = tuple(self.net.blobs[self.input_blob].shape[1:])
        self.layer = self.layer or penultimate_layer(param)
        if self.layer not in self.net.top_names:
            raise ValueError(
                f"unknown layer {self.layer!r}; layers of {self.deploy}: {', '.join(self.net.top_names)}"
            )
        tops = self.net.top_names[self.layer]
        if len(tops) != 1:
            raise ValueError(f"layer {self.layer!r} has {len(tops)} top blobs; it needs exactly one")
        self.score_blob = tops[0]
        outputs = [self.net.blobs[name].data for name in self.net.outputs]
        self.num_classes = int(np.prod(outputs[-1].shape[1:]))
        score_size = int(np.prod(self.net.blobs[self.score_blob].shape[1:]))
        if score_size != self.num_classes:
            raise ValueError(
                f"layer {self.layer!r} outputs {score_size} values per image but the net has "
                f"{self.num_classes} classes; choose the layer before the Softmax"
            )

    # -- batching -------------------------------------------------------------------------

    def _check(self, pixels: np.ndarray) -> np.ndarray:
        x = np.asarray(pixels)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"images must have shape (N, {', '.join(map(str, self.input_shape))}), got {x.shape}"
            )
        return x

    def _forward_chunk(self, x: np.ndarray) -> np.ndarray:
        blob = self.net.blobs[self.input_blob]
        if blob.shape[0] != len(x):
            blob.reshape(len(x), *self.input_shape)
            self.net.reshape()
        blob.data[...] = self.preprocessing.forward(x)
        self.net.forward(end=self.layer)
        return self.net.blobs[self.score_blob].data.reshape(len(x), -1).copy()

    def scores(self, pixels: np.ndarray) -> np.ndarray:
        """Penultimate scores h(x), float32 (N, n_classes), for pixel images (N, C, H, W)."""
        x = self._check(pixels)
        out = np.empty((len(x), self.num_classes), dtype=np.float32)
        for start in range(0, len(x), self.batch_size):
            stop = start + self.batch_size
            out[start:stop] = self._forward_chunk(x[start:stop])
        return out

    def predict(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(labels, scores): argmax of the penultimate scores (= argmax of the Softmax)."""
        s = self.scores(pixels)
        return s.argmax(axis=1), s

    # -- gradients ------------------------------------------------------------------------

    def _backward_chunk(self, x: np.ndarray, features_fn) -> np.ndarray:
        """One forward of the chunk, then one B_l per feature set: (K, n, C, H, W) pixel gradients."""
        h = self._forward_chunk(x)
        shape = self.net.blobs[self.score_blob].shape
        return np.stack([
            self.preprocessing.gradient_to_pixels(self.net.backward_from(self.layer, omega.reshape(shape)))
            for omega in features_fn(h)
        ])

    def backward_from(self, pixels: np.ndarray, features: np.ndarray) -> np.ndarray:
        """B_l (Sec. 4.3): image-space gradient of <omega, h(x)> for features omega at the penultimate layer.

        `features` is (N, n_classes), one omega per image (e.g. Eq. 7's omega_hc), or (K, N, n_classes)
        for K feature sets backpropagated after a single forward pass per chunk. Returns float64
        pixel-unit gradients (N, C, H, W), or (K, N, C, H, W).
        """
        x = self._check(pixels)
        omega = np.asarray(features, dtype=np.float32)
        single = omega.ndim == 2
        omega = omega[None] if single else omega
        if omega.ndim != 3 or omega.shape[1:] != (len(x), self.num_classes):
            raise ValueError(
                f"features must have shape ({len(x)}, {self.num_classes}) or (K, {len(x)}, "
                f"{self.num_classes}) for {len(x)} images, got {np.shape(features)}"
            )
        out = np.empty((len(omega),) + x.shape, dtype=np.float64)
        for start in range(0, len(x), self.batch_size):
            stop = start + self.batch_size
            out[:, start:stop] = self._backward_chunk(x[start:stop], lambda h: omega[:, start:stop])
        return out[0] if single else out

    def loss_gradient(self, pixels: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """∇ₓJ of the softmax cross-entropy J(θ, x, y) per image, in pixel units (Eq. 6)."""
        x = self._check(pixels)
        y = check_labels(labels, len(x), self.num_classes)
        out = np.empty(x.shape, dtype=np.float64)
        for start in range(0, len(x), self.batch_size):
            stop = start + self.batch_size
            yy = y[start:stop]
            out[start:stop] = self._backward_chunk(x[start:stop], lambda h: [softmax_loss_seed(h, yy)])[0]
        return out


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
    }


def check_lmdb_data_layer(directory: str | os.PathLike) -> int:
    """Reads a 3-record LMDB written from Python through Caffe's Data layer; returns labels seen."""
    import lmdb

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


# -- training prototxts (for hcgen.pipeline.train, which runs the `caffe train` CLI) ------------


class TrainingPrototxts(NamedTuple):
    """A solver and its train/test net rendered for one `caffe train` run (prototxt text)."""

    solver: str
    net: str
    sources: dict  # {"TRAIN": lmdb, "TEST": lmdb}: the Data layer sources, absolute
    max_iter: int


def read_solver_parameter(prototxt: str | os.PathLike) -> caffe_pb2.SolverParameter:
    return _read_prototxt(prototxt, caffe_pb2.SolverParameter(), "solver")


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
        raise ValueError(f"{solver} must name its train/test net with a single 'net:' field "
                         "(train_net, test_net and inline net_param are not supported)")
    net_path = Path(param.net)
    if not net_path.is_absolute():
        candidates = [Path(solver).parent / net_path, Path.cwd() / net_path]
        found = [p for p in candidates if p.is_file()]
        if not found:
            raise FileNotFoundError(f"net {param.net!r} named by {solver} not found "
                                    f"(looked in {', '.join(str(p.parent) for p in candidates)})")
        net_path = found[0]
    elif not net_path.is_file():
        raise FileNotFoundError(f"net {net_path} named by {solver} not found")
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
        raise ValueError(f"{net_path} has no {' or '.join(missing)}-phase Data layer to read "
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
        raise ValueError(f"{solver} sets no max_iter; give the number of iterations")
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
