"""Paths the daemon writes to: one clear error for a path it cannot use, and one lock per path.

The rule behind every function here: rescoin never renames, overwrites or
changes the mode of a path it did not create. A path it cannot use is a
``PathError`` (from ``rescoin.pathcheck``, shared with the history writer; ``rescoin run``
prints it as one line and exits non-zero). A lock is rescoin's own small file holding the pid of
the daemon that uses the path; ``flock`` makes a lock left by a dead daemon
free again, so only a running daemon blocks a second one.
"""
from __future__ import annotations

import errno
import fcntl
import os
import re
from pathlib import Path

from rescoin.pathcheck import PathError, reason, writable_dir

__all__ = ["PathError", "PathLock", "reason", "writable_dir"]

_LOCK_TEXT = re.compile(rb"(rescoin pid \d+\n)?")


class PathLock:
    """An exclusive lock on ``LOCKFILE`` for whatever ``target`` names (state file, history, socket)."""

    def __init__(self, lockfile: str | Path, target: str | Path) -> None:
        self.path = Path(lockfile)
        self.target = Path(target)
        self._fd: int | None = None

    def acquire(self) -> PathLock:
        """Take the lock or raise PathError naming the daemon that holds it."""
        for _ in range(5):  # a daemon releasing its lock unlinks the file: lock the new one
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise PathError(f"cannot create the lock file {self.path} for {self.target}: {reason(e)}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                text = os.pread(fd, 64, 0).decode(errors="replace").strip()
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise PathError(f"cannot lock {self.path}: {reason(e)}") from None
                holder = text.removeprefix("rescoin ") or "unknown pid"
                raise PathError(f"{self.target} is in use by another rescoin daemon ({holder}); "
                                "stop it first or give this one other paths") from None
            if not self._still_at_path(fd):
                os.close(fd)
                continue
            if not _LOCK_TEXT.fullmatch(os.pread(fd, 64, 0)):
                os.close(fd)
                raise PathError(f"{self.path} exists and is not a rescoin lock file; "
                                "rescoin will not overwrite it (move it away or give other paths)")
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"rescoin pid {os.getpid()}\n".encode(), 0)
            self._fd = fd
            return self
        raise PathError(f"cannot lock {self.path}: it keeps changing")

    def _still_at_path(self, fd: int) -> bool:
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def release(self) -> None:
        """Remove the lock file (it is ours while we hold it), then unlock."""
        if self._fd is None:
            return
        try:
            if self._still_at_path(self._fd):
                self.path.unlink()
        except OSError:
            pass  # a read-only directory by now: the stale file does not block the next start
        os.close(self._fd)
        self._fd = None
