"""Source images of a generation: one loader for MNIST IDX files, Caffe LMDBs and folders of JPEG/PNG images.

Whatever the source, an image is uint8 (C, H, W), as Caffe's TEST-phase Data layer would feed it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from hcgen.data import images as imageio
from hcgen.data.lmdb_io import datum_array, is_lmdb, read_lmdb, read_raw
from hcgen.data.mnist import load_mnist, missing_files
from hcgen.errors import BadInput, NotFound

__all__ = ["load_source", "load_originals"]


def _as_test_crop(images: np.ndarray) -> np.ndarray:
    """Colour 256x256 Datums (BVLC's ilsvrc12 LMDBs) centre-cropped to 224x224, as Caffe's Data layer does
    in the TEST phase with crop_size: 224; any other shape as it is."""
    if images.shape[-3:] == (3, imageio.RESIZE, imageio.RESIZE):
        return np.ascontiguousarray(imageio.center_crop(images))
    return np.ascontiguousarray(images)


def load_source(source: str | os.PathLike | None, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Source images (N, C, H, W) uint8 and labels: an LMDB of Datums, a folder of JPEG/PNG images, or a
    folder with MNIST IDX files.

    Images of a folder are BGR 224x224 centre crops of a 256x256 resize, labelled by a labels.txt or by
    class subfolders (see `hcgen.data.images`). Colour 256x256 Datums (BVLC's ilsvrc12 LMDBs) are centre-cropped
    to 224x224, as Caffe's Data layer does in the TEST phase with crop_size: 224.
    """
    path = Path(source) if source is not None else None
    if path is not None and is_lmdb(path):
        _, images, labels = read_lmdb(path)
        return _as_test_crop(images), labels.astype(np.int64)
    if path is not None and imageio.is_image_folder(path):
        return imageio.load_image_folder(path)
    if path is not None and path.is_dir() and missing_files(path):
        raise BadInput(f"--input {path} is neither an LMDB (no data.mdb), a folder of JPEG/PNG images, nor a "
                       "folder of MNIST IDX files")
    images, labels = load_mnist(source, split)
    return images[:, None], labels.astype(np.int64)


def load_originals(settings: dict, indices: Sequence[int], source: Optional[str] = None) -> dict[int, np.ndarray]:
    """Source image index -> its (C, H, W) uint8 image, as `load_source` gives it,
    reading only `indices` from LMDBs and image folders. `source` overrides the settings' (moved data)."""
    indices = sorted({int(i) for i in indices})
    src = source if source is not None else settings.get("source")
    path = Path(src) if src is not None else None
    hint = "pass --source with the folder or LMDB the generation read"
    if path is not None and not path.exists():
        raise NotFound(f"the source images of this generation, {path}, are not here; {hint}")
    if path is not None and is_lmdb(path):
        return {i: _as_test_crop(datum_array(raw)) for i, raw in zip(indices, read_raw(path, indices))}
    if path is not None and imageio.is_image_folder(path):
        paths, _ = imageio.list_image_folder(path)
        return {i: imageio.caffe_crop(imageio.read_image(paths[i])) for i in indices}
    try:
        images, _ = load_mnist(src, settings.get("split", "train"))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise NotFound(f"cannot read the MNIST source images of this generation ({exc}); {hint}") from exc
    return {i: images[i][None] for i in indices}
