"""The history CSV: one tidy row per VM, resource and period (DESIGN section 5).

Columns: ts, host, vm_uuid, vm_name, resource, usage, forecast, allocation,
entitlement, credit, signal. Each row describes one period: what the VM used,
what was forecast for it, what was in force during it. Files rotate daily
(UTC) and are flushed each period, so a crash loses at most one period;
pandas reads them with no options.
"""
from __future__ import annotations

import glob
import io
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

import numpy as np

from .history import History
from .loop import Step
from .policies.rescoin import credits
from .policies.base import PolicyInput
from .resources import RESOURCES

COLUMNS = ("ts", "host", "vm_uuid", "vm_name", "resource", "usage", "forecast",
           "allocation", "entitlement", "credit", "signal")
HEADER = ",".join(COLUMNS) + "\n"
CREDIT_WINDOW = 10
_LABELS = np.array([r.label for r in RESOURCES])


def _num(x: np.ndarray) -> np.ndarray:
    """Compact text for numbers; empty for missing values."""
    out = np.char.mod("%.6g", np.nan_to_num(x, nan=0.0))
    return np.where(np.isnan(x), "", out)


class HistoryWriter:
    """Appends each period to ``DIR/history-YYYY-MM-DD.csv``."""

    def __init__(self, directory: str | Path, host: str) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = host.replace(",", "_")
        self._day: str | None = None
        self._fh: io.TextIOBase | None = None
        self.rows = 0

    def path_for(self, ts: float) -> Path:
        day = datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d")
        return self.dir / f"history-{day}.csv"

    def _file(self, ts: float) -> io.TextIOBase:
        path = self.path_for(ts)
        if self._fh is None or path.name != self._day:
            self.close()
            new = not path.exists() or path.stat().st_size == 0
            self._fh = open(path, "a", encoding="utf-8", newline="")
            if new:
                self._fh.write(HEADER)
            self._day = path.name
        return self._fh

    def write(self, step: Step, history: History) -> None:
        obs = step.obs
        n = obs.n
        if n == 0:
            return
        cap = obs.host.capacity
        inp = PolicyInput(obs=obs, forecast=None, history=history, capacity=cap,
                          entitlement=step.entitlement, period=obs.interval)
        cols = {
            "usage": history.latest("usage"),
            "forecast": history.latest("forecast"),
            "allocation": history.latest("allocation"),
            "entitlement": history.latest("entitlement"),
            "credit": credits(inp, CREDIT_WINDOW),
            "signal": history.latest("signal"),
        }
        k = len(RESOURCES)
        parts = [
            np.full(n * k, f"{obs.ts:.0f}"),
            np.full(n * k, self.host),
            np.repeat(obs.vms.uuids, k),
            np.repeat(np.char.replace(obs.vms.names.astype(str), ",", "_"), k),
            np.tile(_LABELS, n),
        ] + [_num(np.asarray(v, dtype=float).ravel()) for v in cols.values()]
        lines = parts[0]
        for p in parts[1:]:
            lines = np.char.add(np.char.add(lines, ","), p)
        fh = self._file(obs.ts)
        fh.write("\n".join(lines.tolist()) + "\n")
        fh.flush()
        self.rows += n * k

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "HistoryWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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


def read_history(paths: Iterable[str | Path]):
    """All rows of the given history files as one pandas DataFrame."""
    import pandas as pd

    files = expand(paths)
    if not files:
        raise ValueError("no history files found; pass files, globs or a directory of history-*.csv")
    frames = []
    for f in files:
        if not f.exists():
            raise ValueError(f"{f}: no such history file")
        frames.append(pd.read_csv(f))
    return pd.concat(frames, ignore_index=True)
