"""An InfiMNIST-style baseline: random small affine transforms plus elastic deformation of MNIST digits.

This is NOT InfiMNIST (Loosli, Canu, Bottou 2007): its precomputed deformation fields are not available
here. Each output image is one MNIST training image resampled once (bilinear, zero outside the image,
rounded to integer pixels) at

    source(p) = c + A (p - c) + t + alpha * (G_sigma * U(p))

where c is the image centre, A = s R(theta) [[1, h], [0, 1]] with theta, s, h, t drawn uniformly from the
ranges in `Deformation`, and U is a per-pixel displacement field uniform in [-1, 1] smoothed by a Gaussian
of std sigma with zero padding (Simard, Steinkraus, Platt, ICDAR 2003, Sec. 2.1; alpha=34, sigma=4 are
their MNIST values). Output record i deforms training image i mod 60000 and keeps its label. Randomness
is drawn per block of `BLOCK` records from ``numpy.random.default_rng([seed, block])``, so record i depends
only on (seed, i, parameters): a resumed or extended run writes exactly what one uninterrupted run would.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from scipy import ndimage

from hcgen.data.lmdb_io import DatumWriter
from hcgen.data.mnist import MD5, load_mnist
from hcgen.errors import BadInput

GENERATOR = "infimnist-style (not InfiMNIST)"
BLOCK = 1024  # records per random stream and per LMDB transaction; BLOCK * (H + 2) must stay < 32767
PARAMS_FILE = "infimnist.json"
METADATA_COLUMNS = ("source_index", "generator", "seed", "rotation_deg", "scale", "shear", "tx", "ty")


@dataclasses.dataclass(frozen=True)
class Deformation:
    alpha: float = 34.0  # elastic displacement scale, pixels (Simard et al. 2003)
    sigma: float = 4.0  # std of the Gaussian smoothing the displacement field, pixels
    max_rotation_deg: float = 7.5  # theta ~ U(-max, max)
    max_scale: float = 0.1  # s ~ U(1 - max, 1 + max)
    max_shear: float = 0.1  # h ~ U(-max, max)
    max_translation: float = 1.0  # t ~ U(-max, max)^2, pixels


def deform(images: np.ndarray, rng: np.random.Generator, params: Deformation = Deformation()
           ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Deform uint8 `images` (N, H, W), N <= BLOCK; returns uint8 images and the per-image affine draws."""
    n, h, w = images.shape
    if images.dtype != np.uint8 or n > BLOCK:
        raise BadInput(f"deform takes at most {BLOCK} uint8 images (N, H, W), got {images.dtype} {images.shape}")
    u = rng.uniform(-1.0, 1.0, (n, 5))
    theta = np.deg2rad(params.max_rotation_deg * u[:, 0])
    scale = 1.0 + params.max_scale * u[:, 1]
    shear = params.max_shear * u[:, 2]
    tx, ty = params.max_translation * u[:, 3], params.max_translation * u[:, 4]
    cos, sin = np.cos(theta) * scale, np.sin(theta) * scale
    # A = s R(theta) [[1, h], [0, 1]] acting on (x, y)
    a11, a12, a21, a22 = cos, cos * shear - sin, sin, sin * shear + cos

    # alpha * G_sigma * U with U = 2V - 1, V ~ U[0, 1): the smoothing is linear, so G(2V - 1) = 2 GV - G1
    gy = ndimage.gaussian_filter1d(np.eye(h), params.sigma, axis=0, mode="constant").astype(np.float32)
    gx = ndimage.gaussian_filter1d(np.eye(w), params.sigma, axis=0, mode="constant").astype(np.float32)
    field = gy @ rng.random((2, n, h, w), dtype=np.float32) @ gx.T  # separable Gaussian, zero padding
    field *= 2 * params.alpha
    field -= params.alpha * (gy @ np.ones((h, w), np.float32) @ gx.T)

    # source = c + A (p - c) + t + displacement, in 1-pixel-framed tile coordinates (see below)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32) - np.array([(h - 1) / 2, (w - 1) / 2], np.float32)[:, None, None]
    a11, a12, a21, a22, tx1, ty1 = (c.astype(np.float32)[:, None, None]
                                    for c in (a11, a12, a21, a22, tx + (w + 1) / 2, ty + (h + 1) / 2))
    map_x, map_y = field
    map_x += a11 * x
    map_x += a12 * y
    map_x += tx1
    map_y += a21 * x
    map_y += a22 * y
    map_y += ty1

    # One remap over all images stacked vertically, each with a 1-pixel zero frame: clipping coordinates
    # into its own framed tile reproduces BORDER_CONSTANT=0 per image.
    tiles = np.zeros((n, h + 2, w + 2), np.uint8)
    tiles[:, 1:-1, 1:-1] = images
    np.clip(map_x, 0, w + 1, out=map_x)
    np.clip(map_y, 0, h + 1, out=map_y)
    map_y += (np.arange(n, dtype=np.float32) * (h + 2))[:, None, None]
    out = cv2.remap(tiles.reshape(n * (h + 2), w + 2), map_x.reshape(n * h, w), map_y.reshape(n * h, w),
                    cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    draws = {"rotation_deg": np.rad2deg(theta), "scale": scale, "shear": shear, "tx": tx, "ty": ty}
    return out.reshape(n, h, w), draws


def generate(images: np.ndarray, labels: np.ndarray, seed: int, start: int, stop: int,
             params: Deformation = Deformation()) -> tuple[np.ndarray, np.ndarray, dict[str, list]]:
    """Records [start, stop): uint8 images (n, H, W), labels (n,), metadata columns (`METADATA_COLUMNS`)."""
    if not 0 <= start <= stop:
        raise BadInput(f"need 0 <= start <= stop, got {start}, {stop}")
    outs, labs, meta = [], [], {c: [] for c in METADATA_COLUMNS}
    for block in range(start // BLOCK, -(-stop // BLOCK)):
        index = np.arange(block * BLOCK, (block + 1) * BLOCK)
        keep = (index >= start) & (index < stop)
        source = index % len(images)
        out, draws = deform(images[source], np.random.default_rng([seed, block]), params)
        outs.append(out[keep])
        labs.append(labels[source[keep]])
        meta["source_index"] += source[keep].tolist()
        for name, values in draws.items():
            meta[name] += np.round(values[keep], 4).tolist()
    n = stop - start
    meta["generator"] = [GENERATOR] * n
    meta["seed"] = [seed] * n
    if not outs:
        return np.zeros((0,) + images.shape[1:], np.uint8), np.zeros(0, labels.dtype), meta
    return np.concatenate(outs), np.concatenate(labs), meta


def write_infimnist(out: str | os.PathLike, count: int, seed: int = 0, source: str | os.PathLike | None = None,
                    params: Deformation = Deformation(), progress: Callable[[int], None] | None = None
                    ) -> tuple[int, int]:
    """Write (or resume) `count` InfiMNIST-style records to the Datum LMDB `out`, with a metadata table.

    Streams one `BLOCK` per transaction. `out/infimnist.json` records the settings; rerunning with the
    same settings continues after the last complete block (a larger `count` extends the set).
    `progress(n)` is called with the records already present, then with each batch written. Returns
    (records present before, records present after).
    """
    if seed < 0 or count < 0:
        raise BadInput(f"seed and count must be non-negative, got seed={seed}, count={count}")
    settings = {"generator": GENERATOR, "seed": seed, "block": BLOCK,
                "source": f"MNIST train-images md5 {MD5['train-images-idx3-ubyte']}", **dataclasses.asdict(params)}
    with DatumWriter(out, metadata_columns=METADATA_COLUMNS) as writer:
        params_path = Path(out) / PARAMS_FILE
        if params_path.exists():
            found = json.loads(params_path.read_text())
            if found != settings:
                raise BadInput(f"{out} was generated with {found}, not {settings}; "
                               "use another --out or the same settings to resume")
        elif writer.count:
            raise BadInput(f"{out} holds {writer.count} records but no {PARAMS_FILE}; use another --out")
        else:
            tmp = params_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(settings, indent=1) + "\n")
            os.replace(tmp, params_path)
        before = writer.count
        if progress is not None and before:
            progress(min(before, count))
        if before >= count:
            return before, before
        images, labels = load_mnist(source, "train")
        start = before
        while start < count:
            stop = min(count, (start // BLOCK + 1) * BLOCK)
            x, y, meta = generate(images, labels, seed, start, stop, params)
            writer.write(x[:, None], y, meta)
            if progress is not None:
                progress(stop - start)
            start = stop
        return before, writer.count
