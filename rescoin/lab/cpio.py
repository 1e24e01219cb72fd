"""The initramfs writer: a newc cpio archive, deterministic byte for byte."""

from __future__ import annotations

import os
import stat
from pathlib import Path


class Cpio:
    """A newc cpio archive (what the kernel unpacks as initramfs), written in
    order, owned by root, with fixed timestamps so equal inputs give equal bytes."""

    MTIME = 1700000000

    def __init__(self, out) -> None:
        self.out = out
        self.ino = 1
        self.dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        fields = (self.ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, self.MTIME, len(data), 0, 0,
                  rdev[0], rdev[1], len(name) + 1, 0)
        self.ino += 1
        head = b"070701" + b"".join(b"%08X" % v for v in fields) + name.encode() + b"\0"
        self.out.write(head + b"\0" * (-len(head) % 4))
        self.out.write(data + b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        name = name.strip("/")
        if not name or name in self.dirs:
            return
        self.dir(os.path.dirname(name))
        self.dirs.add(name)
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        name = name.strip("/")
        self.dir(os.path.dirname(name))
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        name = name.strip("/")
        self.dir(os.path.dirname(name))
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def node(self, name: str, kind: int, major: int, minor: int, mode: int = 0o600) -> None:
        name = name.strip("/")
        self.dir(os.path.dirname(name))
        self._entry(name, kind | mode, rdev=(major, minor))

    def tree(self, root: Path, prefix: str) -> None:
        """Every file, link and directory under ``root``, placed under ``prefix``."""
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel = os.path.relpath(dirpath, root)
            base = prefix if rel == "." else f"{prefix}/{rel}"
            self.dir(base)
            for d in list(dirnames):
                p = Path(dirpath, d)
                if p.is_symlink():
                    dirnames.remove(d)
                    self.symlink(f"{base}/{d}", os.readlink(p))
            for f in sorted(filenames):
                p = Path(dirpath, f)
                if p.is_symlink():
                    self.symlink(f"{base}/{f}", os.readlink(p))
                else:
                    self.file(f"{base}/{f}", p.read_bytes(), p.stat().st_mode & 0o777)

    def close(self) -> None:
        self._entry("TRAILER!!!", 0)

