"""MNIST: find or download the four IDX files, verify them, load them, convert them to Caffe LMDBs.

Files are accepted gzipped (``train-images-idx3-ubyte.gz``) or not; the MD5 of the *uncompressed* bytes
must match the standard files. `find_mnist_dir` searches, in order:

1. ``$HCGEN_MNIST_DIR`` (if set it must hold the files);
2. ``../shared/data/mnist`` relative to the current directory;
3. ``../shared/data/mnist`` relative to the repository root (the directory holding ``hcgen/``);
4. the cache ``$XDG_CACHE_HOME/hcgen/mnist`` (default ``~/.cache/hcgen/mnist``);
5. a download from `MIRRORS` into the cache, each file checked before it is kept.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
import urllib.request
import zlib
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from hcgen.data.lmdb_io import DatumWriter, lmdb_count
from hcgen.errors import BadInput, ExternalFailure, NotFound

SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
SIZES = {"train": 60000, "test": 10000}
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
ENV_VAR = "HCGEN_MNIST_DIR"
_REPO_ROOT = Path(__file__).resolve().parents[2]
_FIX = "re-download it, or point --source / $HCGEN_MNIST_DIR at the original MNIST files"


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hcgen" / "mnist"


def _locate(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def missing_files(directory: str | os.PathLike) -> list[str]:
    """The standard MNIST files (by stem) that `directory` lacks, gzipped or not."""
    return [stem for stem in MD5 if _locate(Path(directory), stem) is None]


def search_path(cache_dir: str | os.PathLike | None = None) -> list[Path]:
    """Directories `find_mnist_dir` looks in, after $HCGEN_MNIST_DIR and before downloading."""
    dirs = [Path(os.path.normpath(base / "../shared/data/mnist")) for base in (Path.cwd(), _REPO_ROOT)]
    dirs.append(Path(cache_dir) if cache_dir is not None else default_cache_dir())
    unique: list[Path] = []
    for d in dirs:
        if d.resolve() not in [u.resolve() for u in unique]:
            unique.append(d)
    return unique


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.read()


def download_mnist(cache_dir: str | os.PathLike | None = None, mirrors: Sequence[str] = MIRRORS,
                   opener: Callable[[str], bytes] = _fetch) -> Path:
    """Download the missing MNIST files into `cache_dir`, keeping only files whose checksum matches.

    `opener(url) -> bytes` fetches one URL (default: urllib, which also reads file:// URLs).
    Raises RuntimeError listing every URL tried and why it failed.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    for stem in missing_files(cache):
        for mirror in mirrors:
            url = mirror.rstrip("/") + "/" + stem + ".gz"
            try:
                blob = opener(url)
                _check(url, _gunzip(url, blob), stem)
            except (OSError, ValueError) as exc:
                failures.append(f"{url}: {exc}")
                continue
            fd, tmp = tempfile.mkstemp(dir=cache, prefix=stem + ".", suffix=".part")
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, cache / (stem + ".gz"))
            break
    if missing_files(cache):
        raise ExternalFailure(f"could not download MNIST into {cache}; tried:\n  " + "\n  ".join(failures))
    return cache


def find_mnist_dir(download: bool = True, cache_dir: str | os.PathLike | None = None,
                   mirrors: Sequence[str] = MIRRORS, opener: Callable[[str], bytes] = _fetch) -> Path:
    """The first directory holding the four MNIST files (see the module docstring for the order)."""
    if os.environ.get(ENV_VAR):
        env_dir = Path(os.environ[ENV_VAR])
        missing = missing_files(env_dir)
        if missing:
            raise NotFound(f"${ENV_VAR}={env_dir} lacks {missing} (gzipped or not); fix or unset it")
        return env_dir
    searched = search_path(cache_dir)
    for d in searched:
        if not missing_files(d):
            return d
    where = ", ".join(str(d) for d in searched)
    if not download:
        raise NotFound(f"MNIST files not found in {where}; set ${ENV_VAR} or pass --source")
    try:
        return download_mnist(searched[-1], mirrors, opener)
    except RuntimeError as exc:
        raise NotFound(f"MNIST files not found in {where}, and {exc}\n"
                       f"Copy the four *-ubyte.gz files into one of those directories or set ${ENV_VAR}.")


def _gunzip(name: object, blob: bytes) -> bytes:
    try:
        return gzip.decompress(blob)
    except EOFError as exc:
        raise BadInput(f"{name}: truncated gzip file ({exc}); {_FIX}") from None
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise BadInput(f"{name}: corrupt gzip file ({exc}); {_FIX}") from None


def _check(name: object, raw: bytes, stem: str) -> None:
    """Validate an IDX file's header and length, then the MD5 of the uncompressed bytes."""
    ndim = 3 if "images" in stem else 1
    if len(raw) < 4 + 4 * ndim:
        raise BadInput(f"{name}: truncated: {len(raw)} bytes is shorter than the IDX header; {_FIX}")
    if raw[:4] != bytes([0, 0, 0x08, ndim]):
        raise BadInput(f"{name}: bad magic {raw[:4].hex()} (expected {bytes([0, 0, 8, ndim]).hex()}: "
                       f"unsigned-byte IDX with {ndim} dimensions); is this {stem}? {_FIX}")
    dims = np.frombuffer(raw[4:4 + 4 * ndim], ">u4")
    expected = 4 + 4 * ndim + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "trailing bytes"
        raise BadInput(f"{name}: {what}: {len(raw)} bytes, the header {tuple(int(d) for d in dims)} "
                       f"implies {expected}; {_FIX}")
    digest = hashlib.md5(raw).hexdigest()
    if digest != MD5[stem]:
        raise BadInput(f"{name}: checksum mismatch: MD5 of the uncompressed content is {digest}, "
                       f"expected {MD5[stem]}; {_FIX}")


def read_idx(directory: str | os.PathLike, stem: str) -> np.ndarray:
    """Read and verify one standard MNIST file (`stem` as in `MD5`, gzipped or not) from `directory`."""
    path = _locate(Path(directory), stem)
    if path is None:
        raise NotFound(f"{Path(directory) / stem}[.gz] not found")
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = _gunzip(path, raw)
    _check(path, raw, stem)
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw[4:4 + 4 * ndim], ">u4"))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_mnist(source: str | os.PathLike | None = None, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """MNIST `split` ("train" or "test") as uint8 images (N, 28, 28) and uint8 labels (N,), in file order.

    `source` is a directory holding the files; None searches with `find_mnist_dir`.
    """
    if split not in SPLITS:
        raise BadInput(f"split must be one of {list(SPLITS)}, got {split!r}")
    directory = Path(source) if source is not None else find_mnist_dir()
    missing = [stem for stem in SPLITS[split] if _locate(directory, stem) is None]
    if missing:
        raise NotFound(f"{directory} lacks the MNIST files {missing} (gzipped or not)")
    images, labels = (read_idx(directory, stem) for stem in SPLITS[split])
    if len(images) != len(labels):
        raise BadInput(f"{directory}: {len(images)} {split} images but {len(labels)} labels")
    return images, labels


def convert_mnist(out_dir: str | os.PathLike, source: str | os.PathLike | None = None, force: bool = False,
                  progress: Callable[[int], None] | None = None) -> dict[str, tuple[Path, str]]:
    """Write ``mnist_train_lmdb`` and ``mnist_test_lmdb`` under `out_dir` as Caffe's convert_mnist_data does.

    Records are 1x28x28 uint8 Datums with the label, keys ``%08d`` in file order, 1000 per transaction.
    All four files are verified before anything is written; each LMDB is built in a temporary directory
    beside its target and renamed into place when complete. An existing LMDB with the right record count
    is kept unless `force`. Returns {split: (path, "written" | "kept")}.
    """
    out = Path(out_dir)
    todo = {}
    for split in SPLITS:
        target = out / f"mnist_{split}_lmdb"
        if target.exists() and not force:
            count = lmdb_count(target)
            if count != SIZES[split]:
                raise BadInput(f"{target} exists but holds {count} records, not {SIZES[split]}; "
                               "rerun with --force to rewrite it")
        else:
            todo[split] = target
    data = {split: load_mnist(source, split) for split in todo}
    out.mkdir(parents=True, exist_ok=True)
    result = {split: (out / f"mnist_{split}_lmdb", "kept") for split in SPLITS}
    for split, target in todo.items():
        for stale in out.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale)  # left by a killed run
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=out))
        try:
            images, labels = data[split]
            with DatumWriter(staging / "lmdb") as writer:
                for start in range(0, len(images), 1000):
                    writer.write(images[start:start + 1000, None], labels[start:start + 1000])
                    if progress is not None:
                        progress(len(labels[start:start + 1000]))
            if target.exists():
                target.rename(staging / "old")
            (staging / "lmdb").rename(target)
        finally:
            shutil.rmtree(staging)
        result[split] = (target, "written")
    return result
