"""A directory rescoin writes in, checked once: one clear error for a path it cannot use.

Below the operations room so that the history writer (offline work) and the
daemon's paths (``rescoin.ops.paths``, which re-exports these names) share it.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from rescoin.errors import RescoinError


class PathError(RescoinError, ValueError):
    """A path from the configuration or the command line that rescoin cannot use; said in one line."""


def reason(e: OSError) -> str:
    """``Read-only file system`` rather than ``[Errno 30] Read-only file system: '/x'``."""
    return e.strerror or str(e)


def writable_dir(path: str | Path, what: str) -> Path:
    """``path`` as a directory rescoin can write in, created if missing; PathError if it cannot be."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PathError(f"{what} {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PathError(f"{what} {path} cannot be created: {reason(e)}") from None
    try:
        with tempfile.TemporaryFile(dir=path, prefix=".rescoin-probe-"):
            pass  # a real write: as root, permission bits say nothing about EROFS or chattr +i
    except OSError as e:
        raise PathError(f"{what} {path} is not writable: {reason(e)}") from None
    return path


__all__ = ["PathError", "reason", "writable_dir"]
