"""The one sha256 of a file that hcgen records (generation settings, stage keys, reports)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional

__all__ = ["sha256", "file_sha256"]


def sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike | None) -> Optional[str]:
    """`sha256` of `path` if it names a file, else None (no file given, or not found here)."""
    return sha256(path) if path is not None and Path(path).is_file() else None
