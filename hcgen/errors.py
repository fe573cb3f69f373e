"""What a user can cause and fix: the errors `hcgen` reports in one line (exit 2) instead of a traceback.

Every class is also the built-in exception it refines (`BadInput` is a ValueError, `NotFound` a
FileNotFoundError, ...), so library callers that catch the built-ins keep working. The CLI
(`hcgen.cli`) prints a `UserError` as ``hcgen CMD: error: <message>`` and exits 2; an error of the
environment (an OSError from the system, a damaged LMDB, image or protobuf file) likewise; anything else
is a bug in hcgen: exit 1, and ``--debug`` shows the traceback.
"""
from __future__ import annotations

__all__ = ["UserError", "BadInput", "NotFound", "NotAFolder", "NoPermission", "NoSuchRecord", "FolderInUse",
           "ExternalFailure", "DiskFull"]


class UserError(Exception):
    """Base class: the user's input, options, files or environment caused this; the message says what to do."""


class BadInput(UserError, ValueError):
    """An option, an argument or the content of a file is not what hcgen can use."""


class NotFound(UserError, FileNotFoundError):
    """A file or folder the user named (or hcgen needs) is not there."""


class NotAFolder(UserError, NotADirectoryError):
    """A path that must be a folder is a file."""


class NoPermission(UserError, PermissionError):
    """hcgen may not write where the user asked it to."""


class NoSuchRecord(UserError, KeyError):
    """Records asked for are not in the LMDB."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class FolderInUse(UserError, RuntimeError):
    """Another live process holds the folder's lock."""


class ExternalFailure(UserError, RuntimeError):
    """A program or service hcgen runs failed: `caffe train`, a download."""


class DiskFull(UserError, OSError):
    """The disk (or the LMDB's map) filled up while writing; the same command resumes once there is room."""
