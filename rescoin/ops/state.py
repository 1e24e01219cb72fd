"""The daemon's state file: what it holds, how it is checked on load, saved and locked.

A state file is an ``.npz`` whose first array is ``format`` (``rescoin-state``,
version): the name of the first zip member is the magic that tells rescoin's
own file from anything else at the path, even when the rest is damaged. Then
come the history snapshot (with credits), the VMs' original settings (JSON)
and the VMs whose restore failed at the last exit (JSON).

- A path that is not rescoin's (a directory, a config file, ...) is refused
  with a ``PathError``; rescoin never renames or overwrites it.
- Rescoin's own file that is damaged or does not fit (ring lengths, shapes,
  types of the originals) is kept under a new unique name, and the daemon
  starts fresh, saying so in one line.
- Saving is atomic (temp file, fsync, rename); temp files a ``kill -9`` left
  behind are removed on start, under the lock, so a running daemon's are safe.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rescoin.core.history import History
from rescoin.ops.paths import PathError, PathLock, reason

log = logging.getLogger("rescoin.ops.state")

FORMAT = ("rescoin-state", "1")
_MAGIC = b"PK\x03\x04"
#: the first zip member's name in rescoin's files: "format" now, "meta" before the format array existed
_FIRST_MEMBERS = (b"format.npy", b"meta.npy")


@dataclass
class Saved:
    """What a state file gives back to the daemon."""

    history: History
    originals: dict[str, dict] = field(default_factory=dict)  # by UUID: settings found at first sight
    unrestored: set[str] = field(default_factory=set)  # UUIDs whose restore failed at the last exit


class StateFile:
    """One state file: checked, locked and cleaned up at start, then saved every period."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).resolve()
        self.lock = PathLock(self.path.with_name(self.path.name + ".lock"), self.path)

    def open(self) -> StateFile:
        """Refuse a path that is not rescoin's; take the lock; remove stale temp files."""
        check_path(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PathError(f"state file {self.path}: cannot create its directory: {reason(e)}") from None
        self.lock.acquire()
        try:
            remove_stale_temps(self.path)
        except OSError as e:
            log.warning("could not remove stale temp files next to %s: %s", self.path, reason(e))
        return self

    def load(self, window: int) -> Saved:
        return load_state(self.path, window)

    def save(self, history: History, originals: dict[str, dict], unrestored: set[str]) -> None:
        save_state(self.path, history, originals, unrestored)

    def close(self) -> None:
        self.lock.release()


def is_rescoin_state(path: Path) -> bool:
    """True when the file starts like rescoin's npz (even a damaged one); reads 64 bytes."""
    with open(path, "rb") as fh:
        head = fh.read(64)
    if len(head) < 30 or not head.startswith(_MAGIC):
        return False
    n = int.from_bytes(head[26:28], "little")
    return head[30:30 + n] in _FIRST_MEMBERS


def check_path(path: Path) -> None:
    """PathError unless ``path`` is missing or a regular file of rescoin's."""
    if path.is_dir():
        raise PathError(f"state file {path} is a directory; give a file path such as {path / 'state.npz'}")
    if not path.exists():
        if path.parent.exists() and not path.parent.is_dir():
            raise PathError(f"state file {path}: {path.parent} is not a directory")
        return
    if not path.is_file():
        raise PathError(f"state file {path} is not a regular file; rescoin will not touch it")
    try:
        ours = is_rescoin_state(path)
    except OSError as e:
        raise PathError(f"state file {path} cannot be read: {reason(e)}") from None
    if not ours:
        raise PathError(f"{path} is not a rescoin state file; rescoin will not overwrite it "
                        "(give another --state or daemon.state_file)")


def keep_broken(path: Path) -> Path:
    """Move rescoin's damaged state file to a new name that never replaces an older one."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    for n in range(1, 10000):
        kept = path.with_name(f"{path.name}.broken-{stamp}-{n}")
        try:
            os.link(path, kept)  # fails if ``kept`` exists: nothing is ever replaced
        except FileExistsError:
            continue
        path.unlink()
        return kept
    raise OSError(f"no free name for a copy of {path}")


_TEMP = r"\.[a-z0-9_]{8}\.tmp"  # tempfile.mkstemp(prefix=NAME + ".", suffix=".tmp")


def remove_stale_temps(path: Path) -> int:
    """Delete ``NAME.xxxxxxxx.tmp`` files next to the state file: a save cut short by kill -9."""
    pattern = re.compile(re.escape(path.name) + _TEMP)
    removed = 0
    for p in path.parent.glob(path.name + ".*.tmp"):
        if pattern.fullmatch(p.name) and p.is_file() and not p.is_symlink():
            p.unlink()
            removed += 1
    if removed:
        log.info("removed %d stale temp file(s) of an interrupted save next to %s", removed, path)
    return removed


# -- the VMs' original settings ----------------------------------------------------------------------
def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return (_is_int(x) or isinstance(x, float)) and math.isfinite(x)


def _caps(x: Any) -> bool:
    """{device: {libvirt parameter: integer}}"""
    return isinstance(x, dict) and all(isinstance(d, str) and isinstance(p, dict) and
                                       all(isinstance(k, str) and _is_int(v) and v >= 0 for k, v in p.items())
                                       for d, p in x.items())


#: field -> (required, check); hosts.libvirt.discovery.adopt writes them, LibvirtHost.restore reads them
ORIGINAL_FIELDS = {
    "shares": (True, lambda x: x is None or _is_num(x)),
    "quota": (True, lambda x: x is None or _is_num(x)),
    "balloon": (True, lambda x: _is_num(x) and x >= 0),
    "blkio": (True, lambda x: x is None or _is_num(x)),
    "pins": (True, lambda x: isinstance(x, list) and all(
        isinstance(m, list) and all(isinstance(b, bool) for b in m) for m in x)),
    "soft_limit_kib": (False, lambda x: x is None or (_is_int(x) and x >= 0)),
    "netcaps": (False, _caps),
    "diskcaps": (False, _caps),
}


def check_originals(originals: Any) -> dict[str, dict]:
    """The originals as saved, or ValueError naming the first VM and field that do not fit."""
    if not isinstance(originals, dict):
        raise ValueError("originals are not a mapping of VM UUIDs")
    for uuid, o in originals.items():
        if not isinstance(o, dict):
            raise ValueError(f"originals of VM {uuid} are not a mapping")
        for name, (required, ok) in ORIGINAL_FIELDS.items():
            if name not in o:
                if required:
                    raise ValueError(f"originals of VM {uuid} have no {name!r}")
            elif not ok(o[name]):
                raise ValueError(f"originals of VM {uuid}: {name!r} is {o[name]!r}")
    return originals


# -- load and save -----------------------------------------------------------------------------------
def load_state(path: str | Path, window: int) -> Saved:
    """History, originals and unrestored VMs; a missing file, or a damaged one of rescoin's, starts fresh."""
    path = Path(path)
    if not path.exists():
        return Saved(History(window))
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        fmt = tuple(str(x) for x in np.atleast_1d(arrays.pop("format", np.array(FORMAT))))
        if fmt != FORMAT:
            raise ValueError(f"format {' '.join(fmt)}, this rescoin reads {' '.join(FORMAT)}")
        originals = check_originals(json.loads(str(arrays.pop("originals", "{}"))))
        unrestored = json.loads(str(arrays.pop("unrestored", "[]")))
        if not isinstance(unrestored, list) or not all(isinstance(u, str) for u in unrestored):
            raise ValueError("the list of VMs left unrestored is not a list of UUIDs")
        history = History.restore(arrays, window=window)
    except Exception as e:  # noqa: BLE001 - anything wrong inside rescoin's own file: keep it, start fresh
        try:
            kept = f"kept it as {keep_broken(path)}"
        except OSError as err:
            raise PathError(f"state file {path} is damaged ({e}) and cannot be moved aside: {reason(err)}") from None
        log.warning("state file %s is damaged or does not fit (%s); %s and starting fresh", path, e, kept)
        return Saved(History(window))
    log.info("resumed from %s: %d periods of history for %d VMs", path, history.t, history.n)
    return Saved(history, originals, set(unrestored))


def save_state(path: str | Path, history: History, originals: dict[str, dict], unrestored: set[str]) -> None:
    """Write the format, history (with credits), originals and unrestored VMs atomically."""
    path = Path(path)
    arrays: dict[str, Any] = {"format": np.array(FORMAT)}  # first: its member name is the file's magic
    arrays.update(history.snapshot())
    arrays["originals"] = np.array(json.dumps(originals, default=_json_default))
    arrays["unrestored"] = np.array(json.dumps(sorted(unrestored)))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dirfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    if isinstance(x, tuple):
        return list(x)
    raise TypeError(type(x))
