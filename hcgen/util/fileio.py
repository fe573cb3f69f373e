"""Atomic file writes (a temporary file beside the target, fsynced, renamed over it), full disks, fault injection.

A reader (or a resume after a crash) sees either the old content or the new one, never a partial file.
"""
from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path

_UMASK = os.umask(0)  # read once at import (os.umask is process-wide: not from threads later)
os.umask(_UMASK)


def atomic_write(path: str | os.PathLike, data: str | bytes, *, fsync: bool = True) -> None:
    """Replace `path` with `data` atomically (temporary file in the same folder + ``os.replace``).

    With `fsync` the data reaches the disk before the rename, and the rename before return, so after
    a power loss `path` holds the old or the new content.
    """
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the mode open() would
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if fsync:
        _fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, value, *, indent: int = 1) -> None:
    """`value` as JSON (with a final newline) into `path`, atomically."""
    atomic_write(path, json.dumps(value, indent=indent) + "\n")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_passes: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Fault injection for the kill tests: with ``HCGEN_CRASH_AT=NAME:N`` in the environment, the N-th
    pass through `crash_point(NAME)` SIGKILLs this process (a crash between two steps of a commit);
    with ``NAME:N:enospc`` it raises the OSError of a full disk there instead."""
    spec = os.environ.get("HCGEN_CRASH_AT")
    if not spec:
        return
    _passes[name] = _passes.get(name, 0) + 1
    point, enospc = spec.removesuffix(":enospc"), spec.endswith(":enospc")
    if point == f"{name}:{_passes[name]}":
        if enospc:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"{name} (simulated)")
        os.kill(os.getpid(), 9)


_FULL = ("No space left on device", "Disk quota exceeded", "MDB_MAP_FULL")


def is_disk_full(exc: BaseException, folder: str | os.PathLike, room: int = 1 << 20) -> bool:
    """Whether `exc`, raised while writing into `folder`, means its disk is full: ENOSPC or EDQUOT, or an
    I/O error (LMDB's "mdb_txn_commit: Input/output error") while less than `room` bytes are free there."""
    if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(s in str(exc) for s in _FULL):
        return True
    if getattr(exc, "errno", None) != errno.EIO and "Input/output error" not in str(exc):
        return False
    return free_bytes(folder) < room


def free_bytes(folder: str | os.PathLike) -> int:
    """Bytes an unprivileged writer may still use on the file system of `folder`."""
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize
