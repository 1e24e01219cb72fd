"""Reading the history CSV: the forgiving reader of ``rescoin analyze`` and ``rescoin fit``.

Reading is fast and forgiving: the pandas C engine with explicit dtypes, one
pass of numpy over the raw bytes to find rows with the wrong field count, and
a slow path only for files that hold non-numeric numbers. Malformed rows are
skipped and counted, never fatal; a missing file or one that is not a history
CSV (wrong header) is one clear error.
"""
from __future__ import annotations

import csv
import gzip
import io
import os
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rescoin.errors import RescoinError
from rescoin.offline.historycsv.writer import COLUMNS, LABELS, VALUES, expand

NUMERIC = ("ts",) + VALUES
_LABEL_INDEX = {str(label): i for i, label in enumerate(LABELS)}
_DTYPES = {"ts": "float64", "host": "category", "vm_uuid": "category", "vm_name": "category",
           "resource": "category", **{c: "float64" for c in VALUES}}


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


def _read_files(files: list[Path], on_file: Callable[[Path], None] | None) -> list[tuple[_Part, Counter, int]]:
    """Each file parsed in a thread (the C parser releases the GIL), in the order given."""
    def read(f: Path) -> tuple[_Part, Counter, int]:
        out = read_file(f)
        if on_file is not None:
            on_file(f)
        return out

    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1, len(files)))) as pool:
        return list(pool.map(read, files))


def _ids(table: dict[str, int], cats: list[str]) -> np.ndarray:
    """File-local category codes -> global ids; code -1 (missing) -> -1."""
    return np.array([table.setdefault(c, len(table)) for c in cats] + [-1], dtype=np.int64)


@dataclass
class _Merged:
    """The files' rows one after another, with global ids for uuids, names and hosts."""

    cols: dict[str, list[np.ndarray]]
    uuid_id: dict[str, int]
    name_id: dict[str, int]
    host_id: dict[str, int]
    skipped: dict[str, Counter]
    lines: int
    empty: list[str]

    def cat(self, k: str, dtype) -> np.ndarray:
        v = self.cols.pop(k)
        return np.concatenate(v).astype(dtype, copy=False) if v else np.zeros(0, dtype=dtype)


def _merge(files: list[Path], results: list[tuple[_Part, Counter, int]]) -> _Merged:
    m = _Merged({k: [] for k in ("ts", "vm", "res", "host", "name") + VALUES}, {}, {}, {}, {}, 0, [])
    cols = m.cols
    for f, (part, bad, k) in zip(files, results, strict=True):
        m.lines += k
        if bad:
            m.skipped[str(f)] = bad
        if k == 0:
            m.empty.append(str(f))
        cols["ts"].append(part.ts)
        cols["vm"].append(_ids(m.uuid_id, part.uuid_cats)[part.uuid_codes])
        cols["res"].append(part.res)
        cols["host"].append(_ids(m.host_id, part.host_cats)[part.host_codes])
        cols["name"].append(_ids(m.name_id, part.name_cats)[part.name_codes])
        for c in VALUES:
            cols[c].append(part.values[c])
    return m


def _order(ts: np.ndarray, vm: np.ndarray, res: np.ndarray, n_vms: int) -> tuple[np.ndarray, np.ndarray]:
    """Row order by (resource, VM, time), and which sorted rows have a later twin (same VM, resource, time)."""
    # one stable argsort of a packed integer key when time fits in 34 bits
    group = res * max(n_vms, 1) + vm
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
    return order, dup


def load_history(paths: Iterable[str | Path], on_file: Callable[[Path], None] | None = None,
                 files: list[Path] | None = None) -> HistoryData:
    """Read history files (files, globs, directories; .csv or .csv.gz) into one HistoryData."""
    files = expand_paths(paths) if files is None else files
    m = _merge(files, _read_files(files, on_file))
    ts, vm, res = m.cat("ts", float), m.cat("vm", np.int64), m.cat("res", np.int64)
    name = m.cat("name", np.int64)
    # each VM's name: the latest one seen (a VM whose rows have no name keeps its uuid as its name)
    uuids = np.array(list(m.uuid_id), dtype=str)
    names = uuids.astype(object)
    if vm.size:
        named = name >= 0
        names[vm[named]] = np.array(list(m.name_id), dtype=object)[name[named]]
    del name
    order, dup = _order(ts, vm, res, len(m.uuid_id))
    # the same VM, resource and time twice (a file given twice, overlapping copies): keep the last
    if dup.any():
        order = order[~dup]
    ts, vm, res = ts[order], vm[order], res[order].astype(np.int8)
    host = m.cat("host", np.int64)[order]
    values = {c: m.cat(c, float)[order] for c in VALUES}
    return HistoryData(ts=ts, vm=vm, res=res, host=host, values=values, uuids=uuids,
                       names=np.array(names.tolist(), dtype=str) if names.size else np.zeros(0, dtype=str),
                       hosts=list(m.host_id), files=list(files), lines=m.lines, skipped=m.skipped,
                       duplicates=int(dup.sum()), empty=m.empty)


def read_history(paths: Iterable[str | Path]):
    """Every usable row as one pandas DataFrame with the file's columns, as :func:`load_history` reads them
    (malformed rows skipped, sorted by resource, VM and time, each VM under its latest name)."""
    import pandas as pd

    d = load_history(paths)
    hosts = np.array(d.hosts + [""], dtype=object)  # host code -1: a row with no host
    cols = {"ts": d.ts, "host": hosts[d.host], "vm_uuid": d.uuids[d.vm], "vm_name": d.names[d.vm],
            "resource": LABELS[d.res], **d.values}
    return pd.DataFrame({c: cols[c] for c in COLUMNS})
