"""Caffe Datum LMDBs without caffe: the Datum wire format, batched writers, readers (the metadata sidecar
the writer keeps: `hcgen.data.metadata`).

A Caffe data LMDB maps keys ``%08d`` (``caffe::format_int(i, 8)``) to serialized ``caffe.Datum`` messages::

    message Datum { optional int32 channels = 1; optional int32 height = 2; optional int32 width = 3;
                    optional bytes data = 4; optional int32 label = 5; repeated float float_data = 6;
                    optional bool encoded = 7 [default = false]; }

`encode_datums` writes what ``caffe_pb2.Datum.SerializeToString()`` gives after ``set_channels``,
``set_height``, ``set_width``, ``set_data``, ``set_label`` (tools/convert_mnist_data.cpp): the five fields in
field-number order, each present even when 0 (proto2 serializes every field that was set).

Records are appended with contiguous keys, one LMDB transaction per batch, so a crash loses at most the
batch in flight and `DatumWriter` resumes at `lmdb_count`. The optional sidecar ``metadata.csv`` inside
the LMDB directory (Caffe ignores it) has one row per key: rows are appended and fsynced *before* the
batch's transaction commits, and reopening truncates rows beyond the LMDB count, so the two agree after
any crash.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Iterator, Mapping, NamedTuple, Sequence

import lmdb
import numpy as np

from hcgen.data.metadata import METADATA_FILE, MetadataTable  # the sidecar DatumWriter keeps
from hcgen.errors import BadInput, NoSuchRecord, NotFound
from hcgen.util.fileio import crash_point
from hcgen.util.locks import check_not_written

KEY_DIGITS = 8
DATA_FILE = "data.mdb"
DATA_FILES = (DATA_FILE, "lock.mdb")  # what LMDB itself keeps in an LMDB folder
_MAX_KEYS = 10**KEY_DIGITS  # beyond this '%08d' keys stop sorting in index order


def key_for(index: int) -> str:
    """The Caffe key of record `index`: ``'%08d' % index``."""
    return "%0*d" % (KEY_DIGITS, index)


# --- Datum wire format -------------------------------------------------------------------------------

def _varint(value: int) -> bytes:
    if value < 0:  # int32 fields are sign-extended to 64 bits on the wire (10 bytes)
        value += 1 << 64
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise BadInput("truncated Datum: varint runs past the end of the record")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _int32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


class Datum(NamedTuple):
    channels: int = 0
    height: int = 0
    width: int = 0
    data: bytes = b""
    label: int = 0
    float_data: tuple[float, ...] = ()
    encoded: bool = False


def encode_datums(images: np.ndarray, labels: Sequence[int] | np.ndarray) -> list[bytes]:
    """Serialize uint8 `images` (N, C, H, W) with `labels` (N,) as Caffe Datums, byte-identical to caffe_pb2."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise BadInput(f"images must be uint8 (N, C, H, W), got {images.dtype} {images.shape}")
    labels = np.asarray(labels)
    if labels.shape != images.shape[:1] or labels.dtype.kind not in "iu":
        raise BadInput(f"labels must be integers of shape ({images.shape[0]},), got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < -(2**31) or labels.max() >= 2**31):
        raise BadInput("labels must fit Datum.label (int32)")
    n, c, h, w = images.shape
    head = b"".join([b"\x08", _varint(c), b"\x10", _varint(h), b"\x18", _varint(w), b"\x22", _varint(c * h * w)])
    flat = np.ascontiguousarray(images).reshape(n, -1)
    return [b"".join((head, row.tobytes(), b"\x28", _varint(int(lab)))) for row, lab in zip(flat, labels)]


def decode_datum(buf: bytes) -> Datum:
    """Parse one serialized Datum (any field order; unknown fields skipped)."""
    fields: dict[str, object] = {}
    floats: list[float] = []
    pos, end = 0, len(buf)
    while pos < end:
        tag, pos = _read_varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
            if number in (1, 2, 3, 5):
                fields[("channels", "height", "width", None, "label")[number - 1]] = _int32(value)
            elif number == 7:
                fields["encoded"] = bool(value)
        elif wire == 2:
            length, pos = _read_varint(buf, pos)
            if pos + length > end:
                raise BadInput("truncated Datum: length-delimited field runs past the end of the record")
            if number == 4:
                fields["data"] = bytes(buf[pos:pos + length])
            elif number == 6:  # packed floats
                floats.extend(struct.unpack(f"<{length // 4}f", buf[pos:pos + length]))
            pos += length
        elif wire == 5:
            if number == 6:
                floats.append(struct.unpack_from("<f", buf, pos)[0])
            pos += 4
        elif wire == 1:
            pos += 8
        else:
            raise BadInput(f"not a Datum: unsupported wire type {wire} for field {number}")
    if pos != end:
        raise BadInput("truncated Datum: fixed-width field runs past the end of the record")
    return Datum(float_data=tuple(floats), **fields)


def datum_array(buf: bytes, where: str = "a Datum") -> np.ndarray:
    """The uint8 (C, H, W) image of one serialized raw Datum (ValueError for an encoded or float Datum)."""
    d = decode_datum(buf)
    if d.encoded or len(d.data) != d.channels * d.height * d.width:
        raise BadInput(f"{where} is not a raw uint8 Datum")
    return np.frombuffer(d.data, np.uint8).reshape(d.channels, d.height, d.width)


def _decode_batch(keys: list[str], values: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    datums = [decode_datum(v) for v in values]
    for key, d in zip(keys, datums):
        if d.encoded:
            raise BadInput(f"Datum {key} holds an encoded image (convert_imageset --encoded); "
                           "only raw uint8 data is read")
    shapes = {(d.channels, d.height, d.width) for d in datums}
    if len(shapes) > 1:
        raise BadInput(f"Datums of different shapes {sorted(shapes)} around key {keys[0]}")
    shape = shapes.pop() if shapes else (0, 0, 0)
    for key, d in zip(keys, datums):
        if len(d.data) != shape[0] * shape[1] * shape[2]:
            kind = "float_data (only uint8 data is read)" if d.float_data else f"{len(d.data)} data bytes"
            raise BadInput(f"Datum {key} has {kind}, expected {int(np.prod(shape))} uint8 for shape {shape}")
    images = np.frombuffer(b"".join(d.data for d in datums), np.uint8).reshape((len(datums),) + shape)
    return images, np.array([d.label for d in datums], np.int64)


# --- reading -----------------------------------------------------------------------------------------

def _reason(exc: lmdb.Error, path: str | os.PathLike) -> str:
    """py-lmdb's message without the path it repeats ('mdb_env_open: PATH: MDB_INVALID: ...')."""
    return str(exc).split(f"{path}: ", 1)[-1]


def is_lmdb(path: str | os.PathLike) -> bool:
    """`path` is an LMDB folder (it holds a data.mdb)."""
    return (Path(path) / DATA_FILE).is_file()


def require_lmdb(path: str | os.PathLike, role: str, option: str) -> None:
    """FileNotFoundError naming `role` and the `option` to fix it unless `path` is an LMDB; ValueError if damaged."""
    if not is_lmdb(path):
        raise NotFound(f"{role} LMDB not found: {path} (no {DATA_FILE}); pass {option} or build it "
                       "with `hcgen data mnist` / `hcgen mix`")
    lmdb_count(path)  # a damaged or truncated LMDB: a ValueError here, not a crash of a reader such as caffe


def open_readonly(path: str | os.PathLike) -> lmdb.Environment:
    """The LMDB at `path` opened read-only, refused while a run writes it or when data.mdb is truncated."""
    if not is_lmdb(path):
        raise NotFound(f"no LMDB at {path} (expected {Path(path) / DATA_FILE})")
    # lock=False: readers may sit on read-only media; do not read an LMDB while another process writes it
    # (an hcgen run writing it holds its folder lock: refused here).
    check_not_written(path)
    try:
        env = lmdb.open(str(path), readonly=True, lock=False, readahead=False)
    except lmdb.Error as exc:
        raise BadInput(f"{path} is not a readable LMDB ({_reason(exc, path)})") from None
    _check_size(env, Path(path))
    return env


def _check_size(env: lmdb.Environment, path: Path) -> None:
    """A data.mdb cut short (a partial copy, a full disk) would crash this process with SIGBUS on the
    first read past its end: LMDB maps the file and trusts the page numbers of its meta page."""
    needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    size = (path / DATA_FILE).stat().st_size
    if size < needed:
        env.close()
        raise BadInput(f"{path}/data.mdb is truncated ({size} bytes, its pages need {needed}); "
                       "copy or rebuild the LMDB")


def contiguous_count(env: lmdb.Environment, path: Path) -> int:
    """Record count, checking that the keys are exactly '%08d' % i for i < count."""
    count = env.stat()["entries"]
    if count:
        with env.begin() as txn, txn.cursor() as cur:
            first = cur.key() if cur.first() else b""
            last = cur.key() if cur.last() else b""
        if first != key_for(0).encode() or last != key_for(count - 1).encode():
            raise BadInput(f"{path}: keys run {first!r}..{last!r} for {count} records, not contiguous "
                           "'%08d' keys (as hcgen and convert_mnist_data write them)")
    return count


def lmdb_count(path: str | os.PathLike) -> int:
    """Number of records in the LMDB at `path` (0 if it does not exist): the index of the next key."""
    if not is_lmdb(path):
        return 0
    with open_readonly(path) as env:
        return env.stat()["entries"]


def iter_lmdb(path: str | os.PathLike, batch_size: int = 1024) -> Iterator[tuple[list[str], np.ndarray, np.ndarray]]:
    """Stream (keys, uint8 images (n, C, H, W), int64 labels (n,)) in key order, `batch_size` records at a time."""
    with open_readonly(path) as env, env.begin(buffers=False) as txn:
        keys: list[str] = []
        values: list[bytes] = []
        for key, value in txn.cursor():
            keys.append(key.decode())
            values.append(value)
            if len(keys) == batch_size:
                yield (keys, *_decode_batch(keys, values))
                keys, values = [], []
        if keys:
            yield (keys, *_decode_batch(keys, values))


def read_lmdb(path: str | os.PathLike) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Read a whole Datum LMDB: (keys, uint8 images (N, C, H, W), int64 labels (N,))."""
    keys: list[str] = []
    images, labels = [], []
    for k, x, y in iter_lmdb(path, batch_size=8192):
        keys += k
        images.append(x)
        labels.append(y)
    if not keys:
        return [], np.zeros((0, 0, 0, 0), np.uint8), np.zeros(0, np.int64)
    return keys, np.concatenate(images), np.concatenate(labels)


def read_raw(path: str | os.PathLike, indices: Sequence[int]) -> list[bytes]:
    """The serialized Datums at key indices `indices` (random access)."""
    with open_readonly(path) as env, env.begin() as txn:
        values = [txn.get(key_for(i).encode()) for i in indices]
    missing = [i for i, v in zip(indices, values) if v is None]
    if missing:
        raise NoSuchRecord(f"{path} has no records {[key_for(i) for i in missing[:5]]}")
    return values


# --- writing -----------------------------------------------------------------------------------------

class DatumWriter:
    """Append Datum batches to the LMDB at `path` (created if missing), each batch in one transaction.

    Reopening an existing LMDB continues after its last key (``count``), so a producer that restarts at
    ``writer.count`` neither loses nor duplicates records. With `metadata_columns`, every batch also
    appends rows to ``<path>/metadata.csv``; ``missing_metadata`` lists key indices found without a row
    when the writer opened. The map grows automatically (doubling on MDB_MAP_FULL).
    """

    def __init__(self, path: str | os.PathLike, metadata_columns: Sequence[str] | None = None,
                 map_size: int = 1 << 28):
        self.path = Path(path)
        try:
            self._env = lmdb.open(str(self.path), map_size=map_size, meminit=False)
        except lmdb.Error as exc:
            raise BadInput(f"cannot open {self.path} as an LMDB to write ({_reason(exc, self.path)})") from None
        _check_size(self._env, self.path)
        try:
            self.count = contiguous_count(self._env, self.path)
        except ValueError:
            self._env.close()
            raise
        table_path = self.path / METADATA_FILE
        self.metadata: MetadataTable | None = None
        self.missing_metadata = np.zeros(0, np.int64)
        if metadata_columns is not None or table_path.exists():
            if metadata_columns is None:
                self._env.close()
                raise BadInput(f"{self.path} has a metadata table; pass metadata_columns to append to it")
            self.metadata = MetadataTable(table_path, metadata_columns)
            self.missing_metadata = self.metadata.reconcile(self.count)

    @property
    def next_key(self) -> str:
        return key_for(self.count)

    def write(self, images: np.ndarray, labels: Sequence[int] | np.ndarray,
              metadata: Mapping[str, Sequence[object]] | None = None) -> range:
        """Append uint8 `images` (N, C, H, W) and `labels`; returns the key indices written."""
        return self.write_raw(encode_datums(images, labels), metadata)

    def write_raw(self, values: Sequence[bytes], metadata: Mapping[str, Sequence[object]] | None = None) -> range:
        """Append already serialized Datums atomically (one transaction), with their metadata rows."""
        written = range(self.count, self.count + len(values))
        if written.stop > _MAX_KEYS:
            raise BadInput(f"more than {_MAX_KEYS} records do not fit 8-digit keys")
        if (metadata is None) != (self.metadata is None):
            raise BadInput("pass metadata exactly when the writer has metadata_columns")
        keys = [key_for(i) for i in written]
        if self.metadata is not None:
            self.metadata.append(keys, metadata)  # first: rows past the LMDB count are dropped on reopen
            crash_point("lmdb-metadata-appended")
        try:
            self._put_batch([k.encode() for k in keys], values)
        except BaseException:
            if self.metadata is not None:
                self.metadata.reconcile(self.count)
            raise
        self.count = written.stop
        return written

    def _put_batch(self, keys: list[bytes], values: Sequence[bytes]) -> None:
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    consumed, added = txn.cursor().putmulti(zip(keys, values), append=True)
                if added != len(keys):
                    raise RuntimeError(f"{self.path}: LMDB stored {added} of {len(keys)} records")
                return
            except lmdb.MapFullError:
                self._env.set_mapsize(2 * self._env.info()["map_size"])

    def close(self) -> None:
        self._env.close()

    def __enter__(self) -> "DatumWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_datums(path: str | os.PathLike, images: np.ndarray, labels: Sequence[int] | np.ndarray,
                 batch_size: int = 1000) -> int:
    """Write (or append) uint8 `images` (N, C, H, W) with `labels` to the LMDB at `path`; returns the new count."""
    with DatumWriter(path) as writer:
        for start in range(0, len(images), batch_size):
            writer.write(images[start:start + batch_size], labels[start:start + batch_size])
        return writer.count
