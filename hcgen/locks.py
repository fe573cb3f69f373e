"""An exclusive lock per output folder, so that two runs never write into one folder at once.

`folder_lock(folder)` holds ``fcntl.flock`` on ``folder/.hcgen.lock``, which names the holder
(``PID HOST``). The kernel drops a flock when its process dies, so the file a killed run leaves
behind never blocks the next run: whoever locks it next simply takes it over. A second run while
the first is alive fails at once with `FolderInUse` ("... is in use by process PID (host H)").

The lock file is removed on release. A run that opened the file just before it was removed would
lock an inode no longer in the folder, so after locking, the path is checked to still name the
inode that was locked, and opened again if not.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Iterator

LOCK_FILE = ".hcgen.lock"


class FolderInUse(RuntimeError):
    """Another live process holds the folder's lock."""


def _holder(fd: int) -> str:
    """'process PID (host H)' from the lock file (its holder may not have written it yet)."""
    for _ in range(20):
        text = os.pread(fd, 256, 0).decode(errors="replace").split()
        if len(text) >= 2:
            return f"process {text[0]} (host {text[1]})"
        time.sleep(0.05)
    return "another process"


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise PermissionError(f"cannot write in {path.parent} ({exc.strerror}); "
                                  "choose a folder you can write to") from None
        raise


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Create `folder` if needed and hold its exclusive lock for the ``with`` block; yields the folder.

    Raises FolderInUse when a live process holds it, NotADirectoryError when `folder` is a file,
    PermissionError when the folder cannot be written.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file, not a folder; choose another output path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise PermissionError(f"cannot create {folder} ({exc.strerror}); "
                                  "choose a folder you can write to") from None
        if exc.errno == errno.ENOTDIR:
            raise NotADirectoryError(f"{folder}: a parent of it is a file; choose another output path") from None
        raise
    path = folder / LOCK_FILE
    while True:
        fd = _open(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise FolderInUse(f"{folder} is in use by {holder}; wait for that run to finish, "
                              "or use another folder") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file as we opened it: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        yield folder
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)
