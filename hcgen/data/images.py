"""Folders of JPEG/PNG images -> Caffe-style 224x224 centre crops (BGR uint8) with labels, for ImageNet nets.

Conventions (those of the BVLC ImageNet models; Rozsa et al. 2016, Sec. 5.3 use "only the center crop"):

* Decoding: ``cv2.imread(path, IMREAD_COLOR)``, so pixels are **BGR** uint8 (grey images are repeated
  over three channels, alpha is dropped), as Caffe's ``ReadImageToDatum`` / ``convert_imageset`` store
  them and as its Data layer feeds them to the net. Arrays are Caffe's (N, 3, H, W).
* Resize (``mode="warp"``, the default): to 256x256 ignoring the aspect ratio, with bilinear
  interpolation (``cv2.resize``, INTER_LINEAR) -- what ``convert_imageset --resize_height=256
  --resize_width=256`` does to build BVLC's ilsvrc12 LMDBs. ``mode="shorter"`` instead scales the
  shorter side to 256 and keeps the aspect ratio (the ResNet papers' test-time resize).
* Crop: the centre 224x224 at offsets ``((H - 224) // 2, (W - 224) // 2)`` -- what Caffe's
  DataTransformer does in the TEST phase with ``crop_size: 224`` (16, 16 for a 256x256 image).

Labels of a folder (one of two layouts):

* ``labels.txt`` in the folder: one image per line, ``relative/path label`` -- the list format of Caffe's
  ``convert_imageset`` (e.g. BVLC's ilsvrc12 ``val.txt``); the images are taken in the file's order.
* otherwise one subfolder per class: class ``i`` is the i-th subfolder name in sorted order, or, when a
  ``synsets.txt`` is present, the line of the file whose first word is the subfolder name (Caffe's
  ``data/ilsvrc12/synsets.txt`` / ``synset_words.txt`` give the ILSVRC-2012 label indices of WordNet-id
  folders such as ``n01440764``). Images are taken in sorted order within each subfolder.
"""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from hcgen.errors import BadInput, NotFound

RESIZE = 256
CROP = 224
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
LABELS_FILE = "labels.txt"
SYNSETS_FILE = "synsets.txt"
MODES = ("warp", "shorter")


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def is_image_folder(path: str | os.PathLike) -> bool:
    """True if `path` is a folder with a labels.txt, or JPEG/PNG files in it or in its subfolders."""
    folder = Path(path)
    if not folder.is_dir():
        return False
    if (folder / LABELS_FILE).is_file():
        return True
    return any(_is_image(p) for p in folder.iterdir()) or any(
        _is_image(p) for sub in folder.iterdir() if sub.is_dir() for p in sub.iterdir())


def list_image_folder(path: str | os.PathLike) -> tuple[list[Path], np.ndarray]:
    """(image paths, int64 labels) of a folder in one of the two layouts of the module docstring."""
    folder = Path(path)
    if not folder.is_dir():
        raise NotFound(f"image folder not found: {folder}")
    listing = folder / LABELS_FILE
    if listing.is_file():
        paths, labels = [], []
        for number, line in enumerate(listing.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.rsplit(None, 1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit() or int(parts[1]) < 0:
                raise BadInput(f"{listing}:{number}: expected 'relative/path label' with an integer label "
                               f">= 0, got {line!r}")
            paths.append(folder / parts[0])
            labels.append(int(parts[1]))
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise NotFound(f"{listing} lists {len(missing)} missing image(s), e.g. {missing[0]}")
        if not paths:
            raise BadInput(f"{listing} lists no images")
        return paths, np.array(labels, dtype=np.int64)

    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and any(_is_image(f) for f in p.iterdir()))
    if not classes:
        loose = any(_is_image(p) for p in folder.iterdir())
        raise BadInput(
            f"{folder} has {'images but ' if loose else ''}no labels: add {LABELS_FILE} (lines 'relative/path "
            "label', the list format of Caffe's convert_imageset) or put the JPEG/PNG images in one subfolder "
            "per class")
    synsets = folder / SYNSETS_FILE
    if synsets.is_file():
        order = [line.split()[0] for line in synsets.read_text().splitlines() if line.strip()]
        index = {name: i for i, name in enumerate(order)}
        unknown = [c for c in classes if c not in index]
        if unknown:
            raise BadInput(f"subfolders {unknown[:5]} of {folder} are not listed in {synsets}")
    else:
        index = {name: i for i, name in enumerate(classes)}
    paths, labels = [], []
    for name in classes:
        files = sorted(p for p in (folder / name).iterdir() if _is_image(p))
        paths += files
        labels += [index[name]] * len(files)
    return paths, np.array(labels, dtype=np.int64)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """A JPEG/PNG file as BGR uint8 (H, W, 3)."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise BadInput(f"cannot decode {path} as an image (JPEG or PNG expected)")
    return image


def center_crop(images: np.ndarray, size: int = CROP) -> np.ndarray:
    """Centre crop of a batch (N, C, H, W) at Caffe's TEST-phase offsets ((H - size) // 2, (W - size) // 2)."""
    h, w = images.shape[-2:]
    if h < size or w < size:
        raise BadInput(f"images of {h}x{w} pixels are smaller than the {size}x{size} crop")
    top, left = (h - size) // 2, (w - size) // 2
    return images[..., top:top + size, left:left + size]


def caffe_crop(image: np.ndarray, mode: str = "warp", resize: int = RESIZE, crop: int = CROP) -> np.ndarray:
    """One BGR image (H, W, 3) -> the (3, crop, crop) uint8 centre crop after the resize of `mode`."""
    if mode not in MODES:
        raise BadInput(f"unknown resize mode {mode!r}; use one of {', '.join(MODES)}")
    if resize < crop:
        raise BadInput(f"resize ({resize}) must be at least the crop ({crop})")
    h, w = image.shape[:2]
    if mode == "warp":
        size = (resize, resize)
    else:
        ratio = resize / min(h, w)
        size = (max(resize, round(w * ratio)), max(resize, round(h * ratio)))
    if size != (w, h):
        image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(center_crop(image.transpose(2, 0, 1), crop))


def load_image_folder(path: str | os.PathLike, mode: str = "warp", resize: int = RESIZE,
                      crop: int = CROP) -> tuple[np.ndarray, np.ndarray]:
    """BGR uint8 centre crops (N, 3, crop, crop) and int64 labels (N,) of an image folder.

    Memory: 150 KB per 224x224 image (the paper's 15 images x 1,000 classes take 2.3 GB).
    """
    paths, labels = list_image_folder(path)
    images = np.empty((len(paths), 3, crop, crop), dtype=np.uint8)
    for i, p in enumerate(paths):
        images[i] = caffe_crop(read_image(p), mode, resize, crop)
    return images, labels
