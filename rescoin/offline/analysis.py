"""Offline analysis of history CSV files: ``rescoin analyze HISTORY...`` (DESIGN sections 5 and 10).

History holds what a host showed, never true demand: ``usage`` is granted
usage and ``signal`` is unmet-demand pressure (the share of demand not granted
on the simulated host; steal, PSI or I/O wait on a real one). The metrics of
DESIGN section 10 need demand, so this module reports honest history-based
equivalents, per resource, and says which is which (see ``DEFINITIONS``).

Reading is fast and forgiving: the pandas C engine with explicit dtypes, one
pass of numpy over the raw bytes to find rows with the wrong field count, and
a slow path only for files that hold non-numeric numbers. Malformed rows are
skipped and counted, never fatal; a missing file or one that is not a history
CSV (wrong header) is one clear error.
"""
from __future__ import annotations

import argparse
import base64
import csv
import gzip
import html
import io
import json
import math
import os
import sys
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from rescoin.cli.argtypes import number
from rescoin.core.resources import MEMORY, N_RES, RESOURCES, UNITS
from rescoin.errors import RescoinError
from rescoin.offline.evaluate import BREACH_ABS, BREACH_TOL, VIOLATION, jain
from rescoin.offline.historycsv import COLUMNS, expand

#: unmet-demand signal above this counts as "pressure" (PredictorParams.threshold's default)
PRESSURE = 0.01
#: a signal above this means granted < VIOLATION x demand, if the signal is the unmet share of demand
VIOLATION_SIGNAL = 1.0 - VIOLATION
#: estimated demand = usage / (1 - signal), with the signal capped here (a VM that got nothing)
SIGNAL_CAP = 0.99
#: an allocation change smaller than this share of the previous value is not counted
ALLOC_CHANGE_REL = 0.01
DEFAULT_PERIOD = 300.0

VALUES = ("usage", "forecast", "allocation", "entitlement", "credit", "signal")
NUMERIC = ("ts",) + VALUES
LABELS = tuple(r.label for r in RESOURCES)
_LABEL_INDEX = {label: i for i, label in enumerate(LABELS)}
_DTYPES = {"ts": "float64", "host": "category", "vm_uuid": "category", "vm_name": "category",
           "resource": "category", **{c: "float64" for c in VALUES}}

#: per-resource metrics, in table order, with what each one means
DEFINITIONS: dict[str, str] = {
    "vm_periods": "rows (VM-periods) of this resource",
    "mean_usage": "mean granted usage per VM-period (resource unit)",
    "mean_allocation": "mean allocation (the policy's decision) per VM-period",
    "mean_entitlement": "mean entitlement per VM-period",
    "used_of_allocation": "sum usage / sum allocation",
    "pressure": f"share of VM-periods with the unmet-demand signal on (> {PRESSURE})",
    "satisfaction_proxy": "1 - pressure: share of VM-periods with no sign of unmet demand",
    "satisfaction_est": "sum usage / sum estimated demand, demand = usage / (1 - signal) (exact on the "
                        "simulated host, where signal is the unmet share of demand; an estimate on real hosts)",
    "violations_est": f"share of VM-periods with usage > 0 and signal > {VIOLATION_SIGNAL:g} "
                      f"(granted < {VIOLATION:g} x estimated demand)",
    "worst_off_est": "5th percentile over VMs of each VM's own satisfaction_est",
    "fairness_est": "Jain's index over VMs of each VM's own satisfaction_est",
    "breaches_est": "share of VM-periods granted less than min(estimated demand, entitlement)",
    "jain_use_entitlement": "Jain's index over VMs of mean(usage) / mean(entitlement) "
                            "(equal use of entitlements; lowered by idle VMs too, not only by unfairness)",
    "under_error": "sum of positive (usage - forecast) / sum of usage, where both are known and usage > 0 "
                   "(understates under-estimation of demand: usage is capped by what was granted)",
    "over_error": "sum of positive (forecast - usage) / sum of usage",
    "allocation_changes_per_vm_hour": f"changes of the recorded allocation by more than {ALLOC_CHANGE_REL:.0%} "
                                      "(or between unset and set) per VM-hour; the guard's dead-bands skip "
                                      "small ones, so applied actuations are usually fewer",
    "reclaimed_est": "memory: mean over periods of 1 - sum allocation / sum entitlement (history holds no "
                     "configured sizes, so this is relative to entitlement)",
    "mean_credit": "mean credit (sum over the last 10 periods of entitlement - usage, / host capacity)",
}
RES_METRICS = tuple(DEFINITIONS)
VM_COLUMNS = ("uuid", "name", "cpu_use", "cpu_alloc", "memory_use", "memory_alloc",
              "pressure", "cpu_pressure", "memory_pressure", "credit")


class HistoryError(RescoinError, ValueError):
    """A history input that cannot be used at all (missing file, not a history CSV); one line."""


# -- reading ---------------------------------------------------------------------------------
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


# -- metrics ---------------------------------------------------------------------------------
def _div(a: float, b: float) -> float | None:
    return float(a / b) if b > 0 and np.isfinite(a) and np.isfinite(b) else None


def _clean(x):
    """JSON-safe: NaN and infinities become None, numpy scalars plain numbers."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


@dataclass
class Analysis:
    """The numbers of one analysis, and the arrays the plots need."""

    result: dict
    data: HistoryData
    period: float
    tvals: np.ndarray  # (T,) period start times
    tidx: np.ndarray  # (n,) time index of each row
    series: dict[str, np.ndarray]  # name -> (T, N_RES)
    top: dict[int, list[int]]  # resource -> VM indices to plot
    table_vms: list[int]  # VM rows of the per-VM table


def _period(d: HistoryData, same: np.ndarray) -> float:
    if d.n < 2:
        return DEFAULT_PERIOD
    dt = np.diff(d.ts)[same]
    dt = dt[dt > 0]
    return float(np.median(dt)) if dt.size else DEFAULT_PERIOD


def _groupby_sum(key: np.ndarray, size: int, weights: np.ndarray | None = None) -> np.ndarray:
    return np.bincount(key, weights=weights, minlength=size)[:size] if key.size else np.zeros(size)


def analyze(d: HistoryData, top_vms: int = 20, plot_vms: int = 3) -> Analysis:
    """Per-resource metrics, a per-VM table and the time series of the report."""
    n, nv = d.n, d.n_vms
    res = d.res.astype(np.int64)
    vm = d.vm
    u, fc = d.values["usage"], d.values["forecast"]
    alloc, ent = d.values["allocation"], d.values["entitlement"]
    credit, sig = d.values["credit"], d.values["signal"]
    group = res * max(nv, 1) + vm
    same = group[1:] == group[:-1] if n > 1 else np.zeros(0, dtype=bool)
    period = _period(d, same)

    # time buckets of one period (hosts need not sample at the same instant)
    if n:
        t0 = float(d.ts.min())
        b = np.round((d.ts - t0) / period).astype(np.int64)
        buckets = np.unique(b)
        tidx = np.searchsorted(buckets, b)
        tvals = t0 + buckets * period
    else:
        tidx, tvals = np.zeros(0, dtype=np.int64), np.zeros(0)
    nt = int(tvals.size)
    tkey = tidx * N_RES + res

    u_known = np.isfinite(u)
    has = u_known & (u > 0)  # "demand above zero", as far as history shows
    s_known = np.isfinite(sig)
    pressed = s_known & (sig > PRESSURE)
    s0 = np.clip(np.where(s_known, sig, 0.0), 0.0, SIGNAL_CAP)
    dhat = np.where(has, u / (1.0 - s0), 0.0)
    uh = np.where(has, u, 0.0)
    ent_ok = np.isfinite(ent)
    breach = has & ent_ok & (u < np.minimum(dhat, np.where(ent_ok, ent, 0.0)) * (1 - BREACH_TOL)
                             - BREACH_ABS[res])
    violated = has & (s0 > VIOLATION_SIGNAL)
    fc_ok = has & np.isfinite(fc)
    err = np.where(fc_ok, u - np.where(fc_ok, fc, 0.0), 0.0)
    both = u_known & np.isfinite(alloc)

    # allocation changes (counted at the later row of each consecutive pair of one VM and resource)
    changed = np.zeros(n, dtype=bool)
    if n > 1:
        a0, a1 = alloc[:-1], alloc[1:]
        nan0, nan1 = np.isnan(a0), np.isnan(a1)
        with np.errstate(invalid="ignore"):
            moved = np.abs(a1 - a0) > ALLOC_CHANGE_REL * np.maximum(np.abs(a0), 1e-9)
        changed[1:] = same & ((nan0 != nan1) | (~nan0 & ~nan1 & moved))

    def by_res(w=None, mask=None) -> np.ndarray:
        if mask is not None:
            return _groupby_sum(res[mask], N_RES, None if w is None else w[mask])
        return _groupby_sum(res, N_RES, w)

    rows = by_res()
    nu = by_res(mask=u_known)
    sum_u = by_res(np.where(u_known, u, 0.0))
    nalloc = by_res(mask=np.isfinite(alloc))
    sum_alloc = by_res(np.where(np.isfinite(alloc), alloc, 0.0))
    nent = by_res(mask=ent_ok)
    sum_ent = by_res(np.where(ent_ok, ent, 0.0))
    n_sig = by_res(mask=s_known)
    n_press = by_res(mask=pressed)
    n_has = by_res(mask=has)
    sum_uh = by_res(uh)
    sum_dhat = by_res(dhat)
    n_viol = by_res(mask=violated)
    n_breach = by_res(mask=breach)
    under = by_res(np.maximum(err, 0.0))
    over = by_res(np.maximum(-err, 0.0))
    sum_u_fc = by_res(np.where(fc_ok, u, 0.0))
    n_changes = by_res(mask=changed)
    c_ok = np.isfinite(credit)
    n_credit = by_res(mask=c_ok)
    sum_credit = by_res(np.where(c_ok, credit, 0.0))
    used_alloc_u = by_res(np.where(both, u, 0.0))
    used_alloc_a = by_res(np.where(both, alloc, 0.0))

    # per VM and resource
    size = max(nv, 1) * N_RES
    vkey = vm * N_RES + res

    def by_vm(w=None, mask=None) -> np.ndarray:
        if mask is not None:
            out = _groupby_sum(vkey[mask], size, None if w is None else w[mask])
        else:
            out = _groupby_sum(vkey, size, w)
        return out.reshape(max(nv, 1), N_RES)[:nv]

    v_nu = by_vm(mask=u_known)
    v_u = by_vm(np.where(u_known, u, 0.0))
    v_nalloc = by_vm(mask=np.isfinite(alloc))
    v_alloc = by_vm(np.where(np.isfinite(alloc), alloc, 0.0))
    v_nent = by_vm(mask=ent_ok)
    v_ent = by_vm(np.where(ent_ok, ent, 0.0))
    v_uh = by_vm(uh)
    v_dhat = by_vm(dhat)
    v_nsig = by_vm(mask=s_known)
    v_press = by_vm(mask=pressed)
    with np.errstate(invalid="ignore", divide="ignore"):
        v_sat = np.where(v_dhat > 0, np.minimum(v_uh / v_dhat, 1.0), np.nan)
        v_mean_u = np.where(v_nu > 0, v_u / v_nu, np.nan)
        v_mean_a = np.where(v_nalloc > 0, v_alloc / v_nalloc, np.nan)
        v_mean_e = np.where(v_nent > 0, v_ent / v_nent, np.nan)
        v_pressure = np.where(v_nsig > 0, v_press / v_nsig, np.nan)
    # the latest credit of each VM and resource: last row of each group
    last_credit = np.full((nv, N_RES), np.nan)
    if n:
        ends = np.r_[np.flatnonzero(~same), n - 1]
        last_credit[vm[ends], res[ends]] = credit[ends]
    combined = np.where(np.isnan(last_credit), 0.0, last_credit).sum(axis=1)

    # per time and resource
    tsize = max(nt, 1) * N_RES

    def by_t(w=None, mask=None) -> np.ndarray:
        if mask is not None:
            out = _groupby_sum(tkey[mask], tsize, None if w is None else w[mask])
        else:
            out = _groupby_sum(tkey, tsize, w)
        return out.reshape(max(nt, 1), N_RES)[:nt]

    x_ok = u_known & ent_ok & (np.where(ent_ok, ent, 0.0) > 0)
    x = np.where(x_ok, u / np.where(x_ok, ent, 1.0), 0.0)
    t_n, t_s1, t_s2 = by_t(mask=x_ok), by_t(x), by_t(x * x)
    with np.errstate(invalid="ignore", divide="ignore"):
        series = {
            "jain_use_entitlement": np.where(t_s2 > 0, t_s1 ** 2 / (t_n * t_s2), np.nan),
            "satisfaction_est": np.where(by_t(dhat) > 0, by_t(uh) / by_t(dhat), np.nan),
            "pressure": np.where(by_t(mask=s_known) > 0, by_t(mask=pressed) / by_t(mask=s_known), np.nan),
            "changes": by_t(mask=changed),
            "mean_credit": np.where(by_t(mask=c_ok) > 0, by_t(np.where(c_ok, credit, 0.0)) / by_t(mask=c_ok),
                                    np.nan),
        }
        t_alloc = by_t(np.where(both & ent_ok, alloc, 0.0))
        t_ent = by_t(np.where(both & ent_ok, ent, 0.0))
        reclaimed_t = np.where(t_ent > 0, np.maximum(0.0, 1.0 - t_alloc / t_ent), np.nan)[:, MEMORY]

    hours = rows * period / 3600.0
    resources: dict[str, dict] = {}
    for r in RESOURCES:
        i = int(r)
        if rows[i] == 0:
            resources[r.label] = {m: (0 if m == "vm_periods" else None) for m in RES_METRICS}
            continue
        sat = v_sat[:, i]
        sat = sat[np.isfinite(sat)]
        ratio = np.where(v_mean_e[:, i] > 0, v_mean_u[:, i] / v_mean_e[:, i], np.nan)
        ratio = ratio[np.isfinite(ratio)]
        pressure = _div(n_press[i], n_sig[i])
        resources[r.label] = {
            "vm_periods": int(rows[i]),
            "mean_usage": _div(sum_u[i], nu[i]),
            "mean_allocation": _div(sum_alloc[i], nalloc[i]),
            "mean_entitlement": _div(sum_ent[i], nent[i]),
            "used_of_allocation": _div(used_alloc_u[i], used_alloc_a[i]),
            "pressure": pressure,
            "satisfaction_proxy": None if pressure is None else 1.0 - pressure,
            "satisfaction_est": _div(sum_uh[i], sum_dhat[i]),
            "violations_est": _div(n_viol[i], n_has[i]),
            "worst_off_est": float(np.percentile(sat, 5)) if sat.size else None,
            "fairness_est": jain(sat) if sat.size else None,
            "breaches_est": _div(n_breach[i], n_has[i]),
            "jain_use_entitlement": jain(ratio) if ratio.size else None,
            "under_error": _div(under[i], sum_u_fc[i]),
            "over_error": _div(over[i], sum_u_fc[i]),
            "allocation_changes_per_vm_hour": _div(n_changes[i], hours[i]),
            "reclaimed_est": (float(np.nanmean(reclaimed_t)) if i == MEMORY and np.isfinite(reclaimed_t).any()
                              else None),
            "mean_credit": _div(sum_credit[i], n_credit[i]),
        }

    # per VM: pressure on any resource, over the periods the VM was seen with a signal
    if n:
        vt = vm * max(nt, 1) + tidx
        if nv * max(nt, 1) <= 50_000_000:  # dense: count (VM, period) cells with any resource on
            cells = nv * max(nt, 1)
            pk = np.flatnonzero(np.bincount(vt[pressed], minlength=cells))
            kk = np.flatnonzero(np.bincount(vt[s_known], minlength=cells))
        else:
            pk, kk = np.unique(vt[pressed]), np.unique(vt[s_known])
        p_any = np.bincount(pk // max(nt, 1), minlength=nv)[:nv].astype(float)
        k_any = np.bincount(kk // max(nt, 1), minlength=nv)[:nv].astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            vm_pressure = np.where(k_any > 0, p_any / k_any, np.nan)
    else:
        vm_pressure = np.zeros(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        busy = np.nanmax(np.where(v_mean_e > 0, v_mean_u / v_mean_e, np.nan), axis=1) if nv else np.zeros(0)
    order = np.lexsort((-np.nan_to_num(busy, nan=-1.0), -np.nan_to_num(vm_pressure, nan=-1.0))) if nv else []
    table_vms = [int(i) for i in order[: max(top_vms, 0)]]
    vm_table = [{
        "uuid": str(d.uuids[i]), "name": str(d.names[i]),
        "cpu_use": v_mean_u[i, 0], "cpu_alloc": v_mean_a[i, 0],
        "memory_use": v_mean_u[i, MEMORY], "memory_alloc": v_mean_a[i, MEMORY],
        "pressure": vm_pressure[i], "cpu_pressure": v_pressure[i, 0], "memory_pressure": v_pressure[i, MEMORY],
        "credit": combined[i],
    } for i in table_vms]

    top: dict[int, list[int]] = {}
    for r in range(N_RES):
        seen = np.flatnonzero(v_nu[:, r] > 0)
        if not seen.size:
            continue
        with np.errstate(invalid="ignore", divide="ignore"):
            b = np.where(v_mean_e[seen, r] > 0, v_mean_u[seen, r] / v_mean_e[seen, r], v_mean_u[seen, r])
        o = np.lexsort((-np.nan_to_num(b, nan=-1.0), -np.nan_to_num(v_pressure[seen, r], nan=-1.0)))
        top[r] = [int(seen[j]) for j in o[:plot_vms]]

    def iso(t: float) -> str:
        return datetime.fromtimestamp(t, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")

    result = {
        "files": len(d.files),
        "rows": d.n,
        "lines": d.lines,
        "skipped_rows": d.skipped_rows,
        "skipped": {f: dict(c) for f, c in d.skipped.items()},
        "duplicates": d.duplicates,
        "empty_files": d.empty,
        "hosts": d.hosts,
        "vms": nv,
        "periods": nt,
        "period_seconds": period,
        "start": iso(float(tvals[0])) if nt else None,
        "end": iso(float(tvals[-1])) if nt else None,
        "resources": resources,
        "vm_table": vm_table,
    }
    return Analysis(result=_clean(result), data=d, period=period, tvals=tvals, tidx=tidx, series=series,
                    top=top, table_vms=table_vms)


# -- output ------------------------------------------------------------------------------------
def _fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, int):
        return str(v)
    return f"{v:.{digits}f}" if abs(v) < 10 else f"{v:,.1f}"


def _mib(v) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.0f}"


def summary_line(result: dict) -> str:
    return (f"{result['rows']:,} rows from {result['files']} file{'s' * (result['files'] != 1)}: "
            f"{result['vms']} VMs on {len(result['hosts'])} host{'s' * (len(result['hosts']) != 1)}, "
            f"{result['periods']} periods of {result['period_seconds']:g} s, "
            f"{result['start'] or '-'} .. {result['end'] or '-'}")


def tables(result: dict, width: int | None = None) -> list:
    """Rich tables that fit ``width``: metrics (a row per metric, a column per resource), then the VMs.

    A resource with no usage in the history (memory, disk, net of a CPU-only
    trace) gets no column; a table too wide is split (``view.fit_tables``).
    """
    from rescoin.view import COMPACT, Col, fit_tables

    live = [r for r in RESOURCES if result["resources"][r.label].get("mean_usage") is not None] or list(RESOURCES)
    cols = [Col("metric", "left")] + [Col(f"{r.label}\n{UNITS[r]}") for r in live]
    rows = [[name] + [_fmt(result["resources"][r.label][name]) for r in live] for name in RES_METRICS]
    out = fit_tables("per resource (history-based; see `rescoin analyze --help` for definitions)", cols, rows,
                     width, **COMPACT)
    mem = MEMORY in live
    vcols = [Col("VM", "left"), Col("cpu use\ncores"), Col("cpu alloc\ncores")]
    vcols += [Col("mem use\nMiB"), Col("mem alloc\nMiB")] if mem else []
    vcols += [Col("pressure"), Col("cpu\npress.")] + ([Col("mem\npress.")] if mem else []) + [Col("credit")]
    vrows = []
    for row in result["vm_table"]:
        mem_cells = [_mib(row["memory_use"]), _mib(row["memory_alloc"])] if mem else []
        vrows.append([row["name"], _fmt(row["cpu_use"], 3), _fmt(row["cpu_alloc"], 3), *mem_cells,
                      _fmt(row["pressure"], 3), _fmt(row["cpu_pressure"], 3),
                      *([_fmt(row["memory_pressure"], 3)] if mem else []),
                      "-" if row["credit"] is None else f"{row['credit']:+.3f}"])
    out += fit_tables(f"top {len(result['vm_table'])} VMs by pressure (means over the run; credit: latest, "
                      "summed over resources)", vcols, vrows, width, **COMPACT)
    return out


# -- report --------------------------------------------------------------------------------------
def _dates(t: np.ndarray):
    return np.array(t, dtype="datetime64[s]").astype(object) if t.size else t


def _vm_series(d: HistoryData, r: int, v: int) -> slice:
    key = d.res.astype(np.int64) * max(d.n_vms, 1) + d.vm
    k = r * max(d.n_vms, 1) + v
    return slice(int(np.searchsorted(key, k, "left")), int(np.searchsorted(key, k, "right")))


def write_report(a: Analysis, out: str | Path) -> list[Path]:
    """PNG plots and a self-contained report.html (PNGs embedded as data URIs); returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    d = a.data
    pngs: list[tuple[Path, str]] = []

    def save(fig, name: str, caption: str) -> None:
        path = out / name
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        pngs.append((path, caption))

    def timeaxis(ax) -> None:
        loc = mdates.AutoDateLocator(minticks=3, maxticks=8)
        ax.xaxis.set_major_locator(loc)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(loc))
        ax.grid(alpha=0.3)

    # usage vs forecast vs allocation, top VMs per resource
    for r, vms in a.top.items():
        label = RESOURCES[r].label
        fig, axes = plt.subplots(len(vms), 1, figsize=(11, 2.6 * len(vms)), squeeze=False, sharex=True)
        for ax, v in zip(axes[:, 0], vms):
            s = _vm_series(d, r, v)
            t = _dates(d.ts[s])
            ax.plot(t, d.values["usage"][s], lw=0.9, label="usage", color="tab:blue")
            ax.plot(t, d.values["forecast"][s], lw=0.9, label="forecast", color="tab:orange")
            ax.plot(t, d.values["allocation"][s], lw=1.1, label="allocation", color="tab:green")
            ax.plot(t, d.values["entitlement"][s], lw=0.8, ls="--", label="entitlement", color="grey")
            sig = d.values["signal"][s]
            if np.nanmax(np.r_[sig, 0.0]) > PRESSURE:
                on = np.where(sig > PRESSURE, d.values["usage"][s], np.nan)
                ax.plot(t, on, ".", ms=2, color="tab:red", label="pressure on")
            ax.set_title(f"{d.names[v]}  ({label}, {UNITS[RESOURCES[r]]})", fontsize=9, loc="left")
            ax.set_ylim(bottom=0)
            timeaxis(ax)
        axes[0, 0].legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8)
        fig.suptitle(f"{label}: usage, forecast and allocation of the {len(vms)} most pressured VMs", fontsize=11)
        save(fig, f"usage-{label}.png", f"{label}: usage vs forecast vs allocation, top {len(vms)} VMs")

    t = _dates(a.tvals)
    present = [r for r in range(N_RES) if np.isfinite(a.series["jain_use_entitlement"][:, r]).any()
               or np.isfinite(a.series["satisfaction_est"][:, r]).any()]
    if t.size and present:
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
        for r in present:
            ax1.plot(t, a.series["jain_use_entitlement"][:, r], lw=0.9, label=RESOURCES[r].label)
            ax2.plot(t, a.series["satisfaction_est"][:, r], lw=0.9, label=RESOURCES[r].label)
        ax1.set_title("Jain's index over VMs of usage / entitlement, per period", fontsize=10, loc="left")
        ax2.set_title("satisfaction estimate per period (sum usage / sum estimated demand)", fontsize=10, loc="left")
        for ax in (ax1, ax2):
            ax.set_ylim(0, 1.05)
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0))
            timeaxis(ax)
        save(fig, "fairness.png", "fairness over time")

    if t.size:
        fig, axes = plt.subplots(N_RES, 1, figsize=(11, 2.3 * N_RES), sharex=True)
        show = a.table_vms[:5]
        for r, ax in enumerate(axes):
            for v in show:
                s = _vm_series(d, r, v)
                if s.stop > s.start:
                    ax.plot(_dates(d.ts[s]), d.values["credit"][s], lw=0.8, label=str(d.names[v]))
            ax.plot(t, a.series["mean_credit"][:, r], lw=1.6, color="black", label="mean over VMs")
            ax.axhline(0, color="grey", lw=0.6)
            ax.set_title(f"{RESOURCES[r].label} credit (share of host capacity)", fontsize=9, loc="left")
            timeaxis(ax)
        axes[0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0))
        fig.suptitle("credits over time: the top VMs of the per-VM table and the mean", fontsize=11)
        save(fig, "credits.png", "credits over time")

        changes = a.series["changes"]
        x, per = t, "period"
        if a.tvals.size > 600:  # hourly sums stay readable over weeks
            hour = np.floor((a.tvals - a.tvals[0]) / 3600.0).astype(np.int64)
            hours, inv = np.unique(hour, return_inverse=True)
            changes = np.stack([np.bincount(inv, weights=changes[:, r], minlength=hours.size)
                                for r in range(N_RES)], axis=1)
            x, per = _dates(a.tvals[0] + hours * 3600.0), "hour"
        fig, ax = plt.subplots(figsize=(11, 3.5))
        for r in range(N_RES):
            ax.plot(x, changes[:, r], lw=0.9, label=RESOURCES[r].label, drawstyle="steps-post")
        ax.set_title(f"allocation changes (> {ALLOC_CHANGE_REL:.0%}) per {per}, all VMs", fontsize=10, loc="left")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0))
        timeaxis(ax)
        save(fig, "actions.png", f"allocation changes per {per}")

    (out / "report.html").write_text(_html(a.result, pngs), encoding="utf-8")
    return [p for p, _ in pngs] + [out / "report.html"]


def _html(result: dict, pngs: list[tuple[Path, str]]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(r.label)} ({e(UNITS[r])})</th>" for r in RESOURCES)
    body = "".join(
        f"<tr><td title='{e(DEFINITIONS[m])}'>{e(m)}</td>"
        + "".join(f"<td>{e(_fmt(result['resources'][r.label][m]))}</td>" for r in RESOURCES) + "</tr>"
        for m in RES_METRICS)
    cols = ("VM", "uuid", "cpu use", "cpu alloc", "mem use MiB", "mem alloc MiB", "pressure", "cpu press.",
            "mem press.", "credit")
    vm_rows = "".join(
        "<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in (
            row["name"], row["uuid"], _fmt(row["cpu_use"], 3), _fmt(row["cpu_alloc"], 3),
            _mib(row["memory_use"]), _mib(row["memory_alloc"]), _fmt(row["pressure"], 3),
            _fmt(row["cpu_pressure"], 3), _fmt(row["memory_pressure"], 3), _fmt(row["credit"], 3))) + "</tr>"
        for row in result["vm_table"])
    defs = "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in DEFINITIONS.items())
    imgs = "".join(
        f"<figure><img alt='{e(cap)}' src='data:image/png;base64,"
        f"{base64.b64encode(p.read_bytes()).decode('ascii')}'><figcaption>{e(cap)} ({e(p.name)})</figcaption></figure>"
        for p, cap in pngs)
    skipped = ""
    if result["skipped_rows"]:
        skipped = f"<p class='warn'>skipped {result['skipped_rows']} malformed rows: " + e(
            "; ".join(f"{f}: " + ", ".join(f"{k} {n}" for k, n in c.items()) for f, c in result["skipped"].items())
        ) + "</p>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>rescoin history report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 90%; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
th {{ background: #f0f0f0; }}
img {{ max-width: 100%; }}
.warn {{ color: #a40; }}
dt {{ font-weight: bold; margin-top: .4em; }}
</style></head><body>
<h1>rescoin history report</h1>
<p>{e(summary_line(result))}.</p>
<p>History holds granted usage and the unmet-demand signal, never true demand: every metric below is
computed from what the host showed (definitions at the end).</p>
{skipped}
<h2>Per resource</h2>
<table><tr><th>metric</th>{head}</tr>{body}</table>
<h2>Top VMs by pressure</h2>
<table><tr>{''.join(f'<th>{e(c)}</th>' for c in cols)}</tr>{vm_rows}</table>
<h2>Plots</h2>
{imgs}
<h2>Definitions</h2>
<dl>{defs}</dl>
</body></html>
"""


# -- command -------------------------------------------------------------------------------------
_count = number(int, 0)


def load_with_progress(paths: Iterable[str | Path], console=None) -> HistoryData:
    """load_history with a rich progress bar over files on ``console`` (stderr by default)."""
    from rich.console import Console

    from rescoin.view import progress

    console = console or Console(stderr=True)
    files = expand_paths(paths)
    with progress(console, transient=True) as bar:
        task = bar.add_task("reading history", total=len(files))
        return load_history(files=files, paths=(), on_file=lambda _f: bar.advance(task))


def cmd_analyze(args: argparse.Namespace) -> int:
    from rich.console import Console

    from rescoin.errors import UserError

    err = Console(stderr=True)
    try:
        data = load_with_progress(args.history, err)
    except HistoryError as e:
        raise UserError(str(e)) from None
    msg = data.skipped_message()
    if msg:
        err.print(msg, markup=False, highlight=False, soft_wrap=True)
    if data.duplicates:
        err.print(f"dropped {data.duplicates} duplicate rows (same VM, resource and time)", highlight=False,
                  soft_wrap=True)
    if data.n == 0:
        err.print("no usable history rows: every file was empty or malformed", highlight=False)
    a = analyze(data, top_vms=args.vms)
    if args.report:
        try:
            files = write_report(a, args.report)
        except OSError as e:
            raise UserError(f"{args.report}: cannot write the report: {e}") from None
        err.print(f"report: {files[-1]} and {len(files) - 1} PNG files", highlight=False, soft_wrap=True)
    if args.format == "json":
        print(json.dumps(a.result, indent=1, allow_nan=False))
    else:
        out = Console()  # a pipe or a file gets 80 columns; the tables are built to fit
        out.print(summary_line(a.result), highlight=False)
        for t in tables(a.result):
            out.print(t)
    return 0


def _epilog() -> str:
    import textwrap

    lines = ["metrics (history has no true demand: usage is granted usage, signal is unmet-demand pressure):"]
    for k, v in DEFINITIONS.items():
        lines += textwrap.wrap(f"{k}: {v}", 96, initial_indent="  ", subsequent_indent="      ")
    return "\n".join(lines)


def add_analyze_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``analyze`` to an argparse sub-parser set; ``func`` takes the args and returns an exit code."""
    p = subparsers.add_parser(
        "analyze", help="offline analysis of history CSV files: tables, plots, HTML report",
        description="Read history CSV files (files, globs or directories; .csv or .csv.gz), print per-resource\n"
                    "metrics and the most pressured VMs. Malformed rows are skipped and counted.",
        epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("history", nargs="+", metavar="HISTORY", help="history CSV files, globs or directories")
    p.add_argument("--format", choices=("table", "json"), default="table", help="output format (default table)")
    p.add_argument("--report", metavar="DIR", default=None,
                   help="write PNG plots and a self-contained report.html into DIR")
    p.add_argument("--vms", type=_count, default=20, metavar="N", help="rows in the per-VM table (default 20)")
    p.set_defaults(func=cmd_analyze)
    return p


def run_standalone(add_parser: Callable, argv: list[str] | None = None) -> int:
    """``python -m rescoin.<module>``: one sub-command, errors as ``rescoin: error: ...`` and exit 2."""
    from rescoin.cli import dispatch

    parser = argparse.ArgumentParser(prog="rescoin")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_parser(sub)
    return dispatch(parser.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    """``python -m rescoin.offline.analysis HISTORY...`` (the same as ``rescoin analyze``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_standalone(add_analyze_parser, ["analyze"] + argv)


if __name__ == "__main__":
    sys.exit(main())
