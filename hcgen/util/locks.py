"""An exclusive lock per output folder, so that two runs never write into one folder at once.

`folder_lock(folder)` holds ``fcntl.flock`` on ``folder/.hcgen.lock``, which names the holder
(``PID HOST``). The kernel drops a flock when its process dies, so the file a killed run leaves
behind never blocks the next run: whoever locks it next simply takes it over. A second run while
the first is alive fails at once with `FolderInUse` ("... is in use by process PID (host H)"), and
`check_not_written` lets a reader refuse a folder that a live run is writing.

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
import threading
import time
from pathlib import Path
from typing import Iterator

from hcgen.errors import FolderInUse, NoPermission, NotAFolder

LOCK_FILE = ".hcgen.lock"
__all__ = ["LOCK_FILE", "FolderInUse", "folder_lock", "check_not_written"]


_held: dict[str, int] = {}  # folder (realpath) -> the thread of this process that holds it


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
            raise NoPermission(f"cannot write in {path.parent} ({exc.strerror}); "
                               "choose a folder you can write to") from None
        raise


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Create `folder` if needed and hold its exclusive lock for the ``with`` block; yields the folder.
    The thread holding it may enter it again (a no-op); any other locker gets FolderInUse.

    Raises FolderInUse when a live process holds it, NotADirectoryError when `folder` is a file,
    PermissionError when the folder cannot be written.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotAFolder(f"{folder} is a file, not a folder; choose another output path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise NoPermission(f"cannot create {folder} ({exc.strerror}); "
                               "choose a folder you can write to") from None
        if exc.errno == errno.ENOTDIR:
            raise NotAFolder(f"{folder}: a parent of it is a file; choose another output path") from None
        raise
    key = os.path.realpath(folder)
    if _held.get(key) == threading.get_ident():  # re-entered by its holder (a command, then the library)
        yield folder
        return
    path = folder / LOCK_FILE
    while True:
        fd = _open(path)
        _flock_or_refuse(fd, fcntl.LOCK_EX, "{folder} is in use by {holder}; wait for that run to finish, or use "
                         "another folder", folder)
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
        _held[key] = threading.get_ident()
        yield folder
    finally:
        _held.pop(key, None)
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def _flock_or_refuse(fd: int, mode: int, message: str, folder) -> None:
    """flock(fd, mode) without waiting; where another process holds the lock, close `fd` and raise
    FolderInUse(`message` with {folder} and {holder}, the pid and host the holder wrote)."""
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise FolderInUse(message.format(folder=folder, holder=holder)) from None


def check_not_written(folder: str | os.PathLike) -> None:
    """Raise FolderInUse if another process holds `folder`'s lock (a run is writing what we would read).

    Read-only: the lock file is only opened if it exists, and a shared lock is taken and dropped at once,
    so this works on read-only media and never blocks another reader."""
    path = Path(folder) / LOCK_FILE
    if os.path.realpath(folder) in _held:
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return  # no lock file: nobody writes it (or we may not even look)
    _flock_or_refuse(fd, fcntl.LOCK_SH, "{folder} is being written by {holder}; wait for that run to finish", folder)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
