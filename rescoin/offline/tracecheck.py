"""What a trace row may hold: field counts, timestamps that fit the file, values a VM can have.

A public trace is large and was not made for rescoin: one corrupt row (a
timestamp of 1, a memory value of 1e30 KB) must not turn a month into 43
years or a VM's memory demand into something no host has. The loaders in
:mod:`rescoin.offline.traces` use these checks; each problem is said once, with the
file and line of its first occurrence and how many rows had it.

The rules (documented here, applied to every policy alike):

- A row with more or fewer fields than the header is an error naming the
  file and line, whichever way it is wrong (a torn last line included).
- Timestamps: a few rows (at most 1% of a file's rows) lying further from the
  file's main run of samples than OUTLIER_STEPS median steps *and* than that
  run is long are dropped, with one warning. Such rows are typing or
  clock errors (1970, year 3000), not a VM that ran again.
- A trace longer than MAX_SPAN_DAYS is refused unless ``--days`` cuts it.
- Memory above the VM's provisioned size is clipped to that size. A value no
  VM can have (memory above MAX_VM_MEMORY_KB, disk or network throughput above
  MAX_THROUGHPUT_KBS, more than MAX_VM_CORES cores) is treated as unknown:
  short runs of unknown cells are interpolated like any gap.
"""
from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np

MAX_SPAN_DAYS = 366  #: longest trace replayed at once; longer ones need --days
OUTLIER_STEPS = 1000  #: an outlying timestamp is more than this many median steps from the file's main run
OUTLIER_SHARE = 0.01  #: ... and belongs to a group of at most this share of the file's rows
MAX_VM_MEMORY_KB = float(64 << 30)  #: 64 TiB: more than any VM has
MAX_VM_CORES = 4096.0  #: KVM's own vCPU limit
MAX_THROUGHPUT_KBS = 1e8  #: ~100 GB/s, ~800 Gbit/s: beyond any one VM's disk or NIC


class Findings:
    """Problems found while loading, by kind: the first file and line, and how many rows in how many files."""

    def __init__(self) -> None:
        self._first: dict[str, str] = {}
        self._rows: dict[str, int] = {}
        self._files: dict[str, int] = {}

    def add(self, kind: str, p: Path, lines: np.ndarray, what: str) -> None:
        """``lines`` (file line numbers) had problem ``kind``; ``what`` describes the first of them."""
        if len(lines) == 0:
            return
        self._first.setdefault(kind, f"{p}:{int(lines[0])}: {what}")
        self._rows[kind] = self._rows.get(kind, 0) + len(lines)
        self._files[kind] = self._files.get(kind, 0) + 1

    def messages(self) -> list[str]:
        out = []
        for kind, first in self._first.items():
            n, files = self._rows[kind], self._files[kind]
            more = f" ({n} such rows in {files} file{'s' * (files > 1)})" if n > 1 else ""
            out.append(first + more)
        return out


def field_counts(data: bytes, sep: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Per non-blank line of ``data``: its line number (1-based) and its number of fields."""
    buf = np.frombuffer(data, dtype=np.uint8)
    newline = np.flatnonzero(buf == ord("\n"))
    starts = np.concatenate(([0], newline + 1))
    ends = np.concatenate((newline, [buf.size]))
    seps = np.flatnonzero(buf == ord(sep))
    count = np.searchsorted(seps, ends) - np.searchsorted(seps, starts) + 1
    solid = np.flatnonzero(~np.isin(buf, np.frombuffer(b" \t\r\n", dtype=np.uint8)))
    blank = np.searchsorted(solid, ends) == np.searchsorted(solid, starts)
    keep = ~blank
    return np.flatnonzero(keep) + 1, count[keep]


def wrong_field_count(data: bytes, sep: bytes) -> tuple[int, int, int] | None:
    """(line, expected, seen) of the first line whose field count differs from the header's, else None."""
    lines, count = field_counts(data, sep)
    if count.size == 0:
        return None
    bad = np.flatnonzero(count != count[0])
    if bad.size == 0:
        return None
    i = int(bad[0])
    return int(lines[i]), int(count[0]), int(count[i])


def outlying_timestamps(ts: np.ndarray) -> np.ndarray:
    """Mask of rows whose timestamp lies far outside the file's main run of samples (see the module rules)."""
    out = np.zeros(ts.size, dtype=bool)
    known = np.flatnonzero(np.isfinite(ts))
    if known.size < 2:
        return out
    order = known[np.argsort(ts[known], kind="stable")]
    t = ts[order]
    d = np.diff(t)
    steps = d[d > 0]
    if steps.size == 0:
        return out
    step = float(np.quantile(steps, 0.5, method="lower"))
    group = np.concatenate(([0], np.cumsum(d > OUTLIER_STEPS * step)))
    sizes = np.bincount(group)
    if sizes.size == 1:
        return out
    main = int(np.argmax(sizes))
    first = np.searchsorted(group, np.arange(sizes.size))  # index in t of each group's first sample
    last = first + sizes - 1
    main_lo, main_hi = t[first[main]], t[last[main]]
    distance = np.where(np.arange(sizes.size) < main, main_lo - t[last], t[first] - main_hi)
    far = distance > max(OUTLIER_STEPS * step, main_hi - main_lo)
    small = sizes <= max(1.0, OUTLIER_SHARE * known.size)
    drop = far & small
    drop[main] = False
    out[order[drop[group]]] = True
    return out


def above(findings: Findings, p: Path, values: np.ndarray, limit: float, kind: str, what: str,
          unit: str, action: str, bound: str = "the plausible maximum") -> np.ndarray:
    """Mask of ``values`` (row i of a one-header-line file is line i + 2) above ``limit``, as one finding."""
    bad = values > limit
    rows = np.flatnonzero(bad)
    if rows.size:
        u = f" {unit}" if unit else ""
        findings.add(kind, p, rows + 2,
                     f"{what} {_show(values[rows[0]])}{u} is above {bound} {_show(limit)}{u}; {action}")
    return bad


def _show(v: float) -> str:
    return f"{v:,.0f}" if abs(v) < 1e15 else f"{v:.3g}"


def drop_outlying_timestamps(ts: np.ndarray, p: Path, findings: Findings) -> None:
    """Set timestamps far outside the file's main run (tracecheck rules) to NaN: their rows are dropped."""
    far = outlying_timestamps(ts)
    rows = np.flatnonzero(far)
    if rows.size:
        rest = ts[np.isfinite(ts) & ~far]
        findings.add("timestamp", p, rows + 2,
                     f"timestamp {ts[rows[0]]:.15g} ({show_time(ts[rows[0]])}) lies far outside the file's other rows "
                     f"({show_time(rest.min())} .. {show_time(rest.max())}); row dropped")
        ts[far] = np.nan


def show_time(t: float) -> str:
    """A trace timestamp (seconds, or milliseconds when it looks like them) as a UTC date, or 'out of range'."""
    seconds = t / 1000.0 if abs(t) > 1e11 else t
    try:
        return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%d %H:%M UTC")
    except (OverflowError, OSError, ValueError):
        return "a date out of range"
