"""Writing the history CSV: one tidy row per VM, resource and period (README, "History CSV").

Columns: ts, host, vm_uuid, vm_name, resource, usage, forecast, allocation,
entitlement, credit, signal. Each row describes one period: what the VM used,
what was forecast for it, what was in force during it. Files rotate daily
(UTC) and are flushed each period, so a crash loses at most one period;
pandas reads them with no options: a row cut short by a crash or a full disk
is removed when the file is opened again. A write that fails (disk full,
read-only directory) is said once and retried every period; the daemon goes on.
"""
from __future__ import annotations

import contextlib
import glob
import io
import logging
import os
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from rescoin.core.history import History
from rescoin.core.loop import Step
from rescoin.core.resources import RESOURCES
from rescoin.pathcheck import reason, writable_dir

COLUMNS = ("ts", "host", "vm_uuid", "vm_name", "resource", "usage", "forecast",
           "allocation", "entitlement", "credit", "signal")
HEADER = ",".join(COLUMNS) + "\n"
LABELS = np.array([r.label for r in RESOURCES])
VALUES = ("usage", "forecast", "allocation", "entitlement", "credit", "signal")

log = logging.getLogger("rescoin.core.history")


def _num(x: np.ndarray) -> np.ndarray:
    """Compact text for numbers; empty for missing values."""
    out = np.char.mod("%.6g", np.nan_to_num(x, nan=0.0))
    return np.where(np.isnan(x), "", out)


class HistoryWriter:
    """Appends each period to ``DIR/history-YYYY-MM-DD.csv``."""

    def __init__(self, directory: str | Path, host: str) -> None:
        self.dir = writable_dir(directory, "history directory")  # PathError, at start, if it cannot be used
        self.host = host.replace(",", "_")
        self._day: str | None = None
        self._fh: io.TextIOBase | None = None
        self.rows = 0
        self.failing: str | None = None  # why the last write failed, until one succeeds
        self._undo: tuple[Path, int] | None = None  # (file, size) before the write in progress

    def path_for(self, ts: float) -> Path:
        day = datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%d")
        return self.dir / f"history-{day}.csv"

    def _file(self, ts: float) -> io.TextIOBase:
        path = self.path_for(ts)
        if self._fh is None or path.name != self._day:
            self.close()
            new = not path.exists() or repair_tail(path) == 0
            # the file stays open across periods (one a day): close() and _discard() end it
            self._fh = open(path, "a", encoding="utf-8", newline="")  # noqa: SIM115
            if new:
                self._fh.write(HEADER)
            self._day = path.name
        return self._fh

    def try_write(self, step: Step, history: History) -> bool:
        """``write``, but a failure is logged once (and its end once) instead of raised."""
        try:
            self.write(step, history)
        except OSError as e:
            self._discard()
            if self._undo is not None:  # rows of this period that did reach the disk: a period is all or nothing
                with contextlib.suppress(OSError):  # the next open cuts a torn row at least
                    os.truncate(*self._undo)
            if self.failing is None:
                log.warning("history is not being written to %s: %s; retrying every period", self.dir, reason(e))
            self.failing = reason(e)
            return False
        if self.failing is not None:
            log.warning("history writing resumed in %s (it had failed: %s)", self.dir, self.failing)
            self.failing = None
        return True

    def _discard(self) -> None:
        """Drop the open file after a failed write; the next write reopens (and repairs) it."""
        fh, self._fh, self._day = self._fh, None, None
        if fh is not None:
            with contextlib.suppress(OSError):  # the unwritten rows of the failed period are lost, nothing else
                fh.close()

    def write(self, step: Step, history: History) -> None:
        obs = step.obs
        n = obs.n
        if n == 0:
            return
        cols = {
            "usage": history.latest("usage"),
            "forecast": history.latest("forecast"),
            "allocation": history.latest("allocation"),
            "entitlement": history.latest("entitlement"),
            "credit": history.latest("credit"),  # the policy's own (NaN, written empty, for drf, mom, ...)
            "signal": history.latest("signal"),
        }
        k = len(RESOURCES)
        parts = [
            np.full(n * k, f"{obs.ts:.0f}"),
            np.full(n * k, self.host),
            np.repeat(obs.vms.uuids, k),
            np.repeat(np.char.replace(obs.vms.names.astype(str), ",", "_"), k),
            np.tile(LABELS, n),
        ] + [_num(np.asarray(v, dtype=float).ravel()) for v in cols.values()]
        lines = parts[0]
        for p in parts[1:]:
            lines = np.char.add(np.char.add(lines, ","), p)
        self._undo = None
        fh = self._file(obs.ts)
        self._undo = (self.path_for(obs.ts), os.fstat(fh.fileno()).st_size)  # everything before is flushed
        fh.write("\n".join(lines.tolist()) + "\n")
        fh.flush()
        self._undo = None
        self.rows += n * k

    def close(self) -> None:
        """Close the file; never raises (a full disk at exit must not stop the state save)."""
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError as e:
                log.warning("history file in %s could not be closed cleanly: %s", self.dir, reason(e))
            self._fh = None
            self._day = None

    def __enter__(self) -> HistoryWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def repair_tail(path: Path) -> int:
    """Cut a last row that has no newline (a write cut short); returns the size left."""
    with open(path, "rb+") as fh:
        size = fh.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return size
        keep = size
        while keep > 0:  # back to the last newline, a block at a time
            start = max(0, keep - 65536)
            fh.seek(start)
            nl = fh.read(keep - start).rfind(b"\n")
            if nl >= 0:
                keep = start + nl + 1
                break
            keep = start
        fh.truncate(keep)
    log.warning("%s ended in a partial row (%d bytes, a write cut short): removed it", path, size - keep)
    return keep


def expand(paths: Iterable[str | Path]) -> list[Path]:
    """Files named, globs expanded, directories searched for history-*.csv(.gz)."""
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out += sorted(p.glob("history-*.csv")) + sorted(p.glob("history-*.csv.gz"))
        elif any(ch in str(p) for ch in "*?["):
            out += sorted(Path(x) for x in glob.glob(str(p)))
        else:
            out.append(p)
    return out


