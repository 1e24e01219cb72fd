"""The history CSV: one tidy row per VM, resource and period (DESIGN section 5).

Columns: ts, host, vm_uuid, vm_name, resource, usage, forecast, allocation,
entitlement, credit, signal. Each row describes one period: what the VM used,
what was forecast for it, what was in force during it. Files rotate daily
(UTC) and are flushed each period, so a crash loses at most one period;
pandas reads them with no options: a row cut short by a crash or a full disk
is removed when the file is opened again. A write that fails (disk full,
read-only directory) is said once and retried every period; the daemon goes on.

Reading (:func:`load_history`) is fast and forgiving: the pandas C engine with
explicit dtypes, one pass of numpy over the raw bytes to find rows with the
wrong field count, and a slow path only for files that hold non-numeric
numbers. Malformed rows are skipped and counted, never fatal; a missing file or
one that is not a history CSV (wrong header) is one clear error.
"""
from __future__ import annotations

import csv
import glob
import gzip
import io
import logging
import os
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from rescoin.core.history import History
from rescoin.core.loop import Step
from rescoin.core.resources import RESOURCES
from rescoin.errors import RescoinError
from rescoin.ops.paths import reason, writable_dir

COLUMNS = ("ts", "host", "vm_uuid", "vm_name", "resource", "usage", "forecast",
           "allocation", "entitlement", "credit", "signal")
HEADER = ",".join(COLUMNS) + "\n"
_LABELS = np.array([r.label for r in RESOURCES])
VALUES = ("usage", "forecast", "allocation", "entitlement", "credit", "signal")
NUMERIC = ("ts",) + VALUES
_LABEL_INDEX = {str(label): i for i, label in enumerate(_LABELS)}
_DTYPES = {"ts": "float64", "host": "category", "vm_uuid": "category", "vm_name": "category",
           "resource": "category", **{c: "float64" for c in VALUES}}

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
            self._fh = open(path, "a", encoding="utf-8", newline="")
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
                try:
                    os.truncate(*self._undo)
                except OSError:
                    pass  # the next open cuts a torn row at least
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
            try:
                fh.close()
            except OSError:
                pass  # the unwritten rows of the failed period are lost, nothing else

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
            np.tile(_LABELS, n),
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


# -- reading: the forgiving reader of analyze and fit ---------------------------------------------------
# (writer and reader stay in this one module, over 500 lines by a little: the issue asks for the history
# file's writer, its reader and their shared column contract in one place)
class HistoryError(RescoinError, ValueError):
    """A history input that cannot be used at all (missing file, not a history CSV); one line."""


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Files, globs and directories (history-*.csv(.gz), else any *.csv(.gz)), each file once."""
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = expand([p]) or sorted(p.glob("*.csv")) + sorted(p.glob("*.csv.gz"))
            if not found:
                raise HistoryError(f"{p}: no history CSV files (*.csv, *.csv.gz) in this directory")
        elif any(ch in str(p) for ch in "*?["):
            found = expand([p])
            if not found:
                raise HistoryError(f"{p}: no files match this pattern")
        else:
            found = [p]
        out += found
    seen: set[Path] = set()
    unique = []
    for f in out:
        key = f.resolve() if f.exists() else f
        if key not in seen:
            seen.add(key)
            unique.append(f)
    if not unique:
        raise HistoryError("no history files given; pass files, globs or a directory of history-*.csv")
    return unique


def _raw_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            gz = fh.read(2) == b"\x1f\x8b"
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as fh:
            return fh.read()
    except FileNotFoundError:
        raise HistoryError(f"{path}: no such history file") from None
    except IsADirectoryError:
        raise HistoryError(f"{path}: is a directory with no history files") from None
    except (OSError, EOFError, zlib.error) as e:
        raise HistoryError(f"{path}: cannot read: {e}") from None


def _check_header(path: Path, raw: bytes) -> int:
    """Offset of the first data line; raises HistoryError if the header is not the history header."""
    end = raw.find(b"\n")
    end = len(raw) if end < 0 else end
    header = raw[:end].rstrip(b"\r")
    if header.startswith(b"\xef\xbb\xbf"):
        header = header[3:]
    if header.decode("utf-8", "replace").split(",") != list(COLUMNS):
        shown = header[:60].decode("utf-8", "replace")
        raise HistoryError(f"{path}: not a rescoin history CSV: expected the header "
                           f"'{','.join(COLUMNS)}', found '{shown}'")
    return end + 1


def _bad_field_lines(raw: bytes) -> tuple[np.ndarray, int]:
    """Physical line numbers (0 = header) with the wrong number of fields, and the number of data lines."""
    a = np.frombuffer(raw, dtype=np.uint8)
    nl = np.flatnonzero(a == 10)
    ends = nl if (nl.size and nl[-1] == a.size - 1) or a.size == 0 else np.r_[nl, a.size]
    starts = np.r_[0, ends[:-1] + 1]
    commas = np.flatnonzero(a == 44)
    fields = np.searchsorted(commas, ends) - np.searchsorted(commas, starts) + 1
    length = ends - starts
    if length.size:  # "\r\n" line ends: a line holding only "\r" is blank
        cr = a[np.maximum(ends - 1, 0)] == 13
        length = length - (cr & (length > 0))
    blank = length == 0
    bad = np.flatnonzero(~blank & (fields != len(COLUMNS)))
    bad = bad[bad > 0]
    return bad, int((~blank[1:]).sum())


def _frame(raw: bytes, skip: np.ndarray, numeric: bool):
    import pandas as pd

    return pd.read_csv(
        io.BytesIO(raw), engine="c", header=0, quoting=csv.QUOTE_NONE,
        dtype=_DTYPES if numeric else "object",
        keep_default_na=False, na_values=[""], skiprows=set(skip.tolist()) if skip.size else None,
        on_bad_lines="skip", encoding_errors="replace", low_memory=False,
    )


@dataclass
class _Part:
    """One file's usable rows, with file-local string codes."""

    ts: np.ndarray
    values: dict[str, np.ndarray]
    res: np.ndarray
    uuid_codes: np.ndarray
    uuid_cats: list[str]
    name_codes: np.ndarray
    name_cats: list[str]
    host_codes: np.ndarray
    host_cats: list[str]


def _codes(series) -> tuple[np.ndarray, list[str]]:
    if str(series.dtype) != "category":
        series = series.astype("category")
    return np.asarray(series.cat.codes, dtype=np.int64), [str(c) for c in series.cat.categories]


def read_file(path: str | Path) -> tuple[_Part, Counter, int]:
    """One history file: its usable rows, the malformed rows by reason, and its data lines."""
    import pandas as pd

    path = Path(path)
    raw = _raw_bytes(path)
    if not raw.strip():  # created, then the writer died before its first flush: nothing to read
        none = np.zeros(0, dtype=np.int64)
        return _Part(np.zeros(0), {c: np.zeros(0) for c in VALUES}, none, none, [], none, [], none, []), Counter(), 0
    _check_header(path, raw)
    bad_lines, lines = _bad_field_lines(raw)
    skipped: Counter = Counter()
    if bad_lines.size:
        skipped["wrong field count"] += int(bad_lines.size)
    bad_number = None
    try:
        df = _frame(raw, bad_lines, numeric=True)
        nums = {c: df[c].to_numpy(dtype=float) for c in NUMERIC}
    except ValueError:  # a non-numeric number somewhere: the slow path, column by column
        df = _frame(raw, bad_lines, numeric=False)
        nums, bad_number = {}, np.zeros(len(df), dtype=bool)
        for c in NUMERIC:
            text = df[c]
            num = pd.to_numeric(text, errors="coerce").to_numpy(dtype=float)
            bad_number |= text.notna().to_numpy() & np.isnan(num)
            nums[c] = num
    n = len(df)
    if bad_number is None:
        bad_number = np.zeros(n, dtype=bool)
    for c in NUMERIC:
        bad_number |= np.isinf(nums[c])
    res_codes, res_cats = _codes(df["resource"])
    lookup = np.array([_LABEL_INDEX.get(c.strip().lower(), -1) for c in res_cats] + [-1], dtype=np.int64)
    res = lookup[res_codes]
    uuid_codes, uuid_cats = _codes(df["vm_uuid"])
    name_codes, name_cats = _codes(df["vm_name"])
    host_codes, host_cats = _codes(df["host"])
    reasons = (
        ("non-numeric value", bad_number),
        ("missing ts", np.isnan(nums["ts"])),
        ("missing vm_uuid", uuid_codes < 0),
        ("unknown resource", res < 0),
    )
    drop = np.zeros(n, dtype=bool)
    for reason, mask in reasons:
        new = mask & ~drop
        if new.any():
            skipped[reason] += int(new.sum())
            drop |= new
    # rows pandas itself dropped (should not happen: the field count was checked) count too
    lost = lines - int(bad_lines.size) - n
    if lost > 0:
        skipped["unreadable"] += lost
    keep = ~drop
    part = _Part(
        ts=nums["ts"][keep], values={c: nums[c][keep] for c in VALUES}, res=res[keep],
        uuid_codes=uuid_codes[keep], uuid_cats=uuid_cats, name_codes=name_codes[keep], name_cats=name_cats,
        host_codes=host_codes[keep], host_cats=host_cats,
    )
    return part, skipped, lines


@dataclass
class HistoryData:
    """Every usable row, sorted by (resource, VM, time), as numpy arrays."""

    ts: np.ndarray
    vm: np.ndarray  # index into uuids
    res: np.ndarray  # Resource column index
    host: np.ndarray  # index into hosts
    values: dict[str, np.ndarray]  # usage, forecast, allocation, entitlement, credit, signal
    uuids: np.ndarray  # (n_vms,) str
    names: np.ndarray  # (n_vms,) str: the latest name seen for each VM
    hosts: list[str]
    files: list[Path]
    lines: int = 0  # data lines in the files
    skipped: dict[str, Counter] = field(default_factory=dict)  # file -> reason -> rows
    duplicates: int = 0  # rows dropped because another had the same VM, resource and time
    empty: list[str] = field(default_factory=list)  # files with no data rows

    @property
    def n(self) -> int:
        return int(self.ts.size)

    @property
    def n_vms(self) -> int:
        return int(self.uuids.size)

    @property
    def skipped_rows(self) -> int:
        return sum(sum(c.values()) for c in self.skipped.values())

    def skipped_message(self, limit: int = 5) -> str | None:
        if not self.skipped:
            return None
        files = list(self.skipped.items())
        parts = []
        for f, c in files[:limit]:
            why = ", ".join(f"{reason} {k}" for reason, k in c.most_common())
            parts.append(f"{f}: {sum(c.values())} ({why})")
        more = f"; and {len(files) - limit} more files" if len(files) > limit else ""
        rows = self.skipped_rows
        return (f"skipped {rows} malformed row{'s' * (rows != 1)} in {len(files)} "
                f"file{'s' * (len(files) != 1)}: " + "; ".join(parts) + more)


def load_history(paths: Iterable[str | Path], on_file: Callable[[Path], None] | None = None,
                 files: list[Path] | None = None) -> HistoryData:
    """Read history files (files, globs, directories; .csv or .csv.gz) into one HistoryData."""
    files = expand_paths(paths) if files is None else files
    uuid_id: dict[str, int] = {}
    host_id: dict[str, int] = {}
    name_id: dict[str, int] = {}
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("ts", "vm", "res", "host", "name") + VALUES}
    skipped: dict[str, Counter] = {}
    lines = 0
    empty = []

    def ids(table: dict[str, int], cats: list[str]) -> np.ndarray:
        # file-local category codes -> global ids; code -1 (missing) -> -1
        return np.array([table.setdefault(c, len(table)) for c in cats] + [-1], dtype=np.int64)

    # files are parsed in threads (the C parser releases the GIL), then merged in the order given
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1, len(files)))) as pool:
        def read(f: Path):
            out = read_file(f)
            if on_file is not None:
                on_file(f)
            return out

        results = list(pool.map(read, files))
    for f, (part, bad, k) in zip(files, results):
        lines += k
        if bad:
            skipped[str(f)] = bad
        if k == 0:
            empty.append(str(f))
        cols["ts"].append(part.ts)
        cols["vm"].append(ids(uuid_id, part.uuid_cats)[part.uuid_codes])
        cols["res"].append(part.res)
        cols["host"].append(ids(host_id, part.host_cats)[part.host_codes])
        cols["name"].append(ids(name_id, part.name_cats)[part.name_codes])
        for c in VALUES:
            cols[c].append(part.values[c])
    del results

    def cat(k: str, dtype) -> np.ndarray:
        v = cols.pop(k)
        return np.concatenate(v).astype(dtype, copy=False) if v else np.zeros(0, dtype=dtype)

    ts, vm, res = cat("ts", float), cat("vm", np.int64), cat("res", np.int64)
    name = cat("name", np.int64)
    # each VM's name: the latest one seen (a VM whose rows have no name keeps its uuid as its name)
    uuids = np.array(list(uuid_id), dtype=str)
    names = uuids.astype(object)
    if vm.size:
        named = name >= 0
        names[vm[named]] = np.array(list(name_id), dtype=object)[name[named]]
    del name
    # sort by (resource, VM, time): one stable argsort of a packed integer key when time fits in 34 bits
    group = res * max(len(uuid_id), 1) + vm
    secs = np.round(ts).astype(np.int64) if ts.size else np.zeros(0, dtype=np.int64)
    span = int(secs.max() - secs.min()) if ts.size else 0
    if ts.size and span < 2 ** 34 and int(group.max()) < 2 ** 28:
        key = (group << 34) | (secs - secs.min())
        order = np.argsort(key, kind="stable")
        key = key[order]
        dup = np.zeros(ts.size, dtype=bool)
        dup[:-1] = key[1:] == key[:-1]
        del key
    else:
        order = np.lexsort((secs, group))
        g, t = group[order], secs[order]
        dup = np.zeros(ts.size, dtype=bool)
        if ts.size > 1:
            dup[:-1] = (g[1:] == g[:-1]) & (t[1:] == t[:-1])
    # the same VM, resource and time twice (a file given twice, overlapping copies): keep the last
    if dup.any():
        order = order[~dup]
    ts, vm, res = ts[order], vm[order], res[order].astype(np.int8)
    host = cat("host", np.int64)[order]
    values = {c: cat(c, float)[order] for c in VALUES}
    return HistoryData(ts=ts, vm=vm, res=res, host=host, values=values, uuids=uuids,
                       names=np.array(names.tolist(), dtype=str) if names.size else np.zeros(0, dtype=str),
                       hosts=list(host_id), files=list(files), lines=lines, skipped=skipped,
                       duplicates=int(dup.sum()), empty=empty)


def read_history(paths: Iterable[str | Path]):
    """Every usable row as one pandas DataFrame with the file's columns, as :func:`load_history` reads them
    (malformed rows skipped, sorted by resource, VM and time, each VM under its latest name)."""
    import pandas as pd

    d = load_history(paths)
    hosts = np.array(d.hosts + [""], dtype=object)  # host code -1: a row with no host
    cols = {"ts": d.ts, "host": hosts[d.host], "vm_uuid": d.uuids[d.vm], "vm_name": d.names[d.vm],
            "resource": _LABELS[d.res], **d.values}
    return pd.DataFrame({c: cols[c] for c in COLUMNS})
