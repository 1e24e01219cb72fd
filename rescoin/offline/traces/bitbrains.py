"""Bitbrains GWA-T-12: one ``;``-separated CSV per VM (cpu, memory, disk, net)."""
from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
import pandas as pd

from rescoin.core.resources import CPU, DISK, MEMORY, N_RES, NET
from rescoin.offline.tracecheck import (
    MAX_THROUGHPUT_KBS,
    MAX_VM_CORES,
    MAX_VM_MEMORY_KB,
    Findings,
    above,
    drop_outlying_timestamps,
    wrong_field_count,
)
from rescoin.offline.traces.files import (
    READ_ERRORS,
    clip_negative,
    csv_error,
    csv_files,
    natural_key,
    numeric,
    pick,
    stem,
)
from rescoin.offline.traces.model import (
    Progress,
    Samples,
    TraceError,
)

# Bitbrains header names, keyed by the role they play here
_BB_COLUMNS = {
    "ts": "Timestamp [ms]",
    "cores": "CPU cores",
    "cap": "CPU capacity provisioned [MHZ]",
    "cpu": "CPU usage [MHZ]",
    "mem_cap": "Memory capacity provisioned [KB]",
    "mem": "Memory usage [KB]",
    "disk_r": "Disk read throughput [KB/s]",
    "disk_w": "Disk write throughput [KB/s]",
    "net_rx": "Network received throughput [KB/s]",
    "net_tx": "Network transmitted throughput [KB/s]",
}


def _bitbrains_files(root: Path) -> tuple[dict[str, Path], str]:
    """Per-VM files by id, and a label (the month folder's name)."""
    if root.is_file():
        return {stem(root): root}, root.parent.name
    groups: dict[Path, list[Path]] = {}
    for f in csv_files(root):
        groups.setdefault(f.parent, []).append(f)
    main = max(groups, key=lambda d: len(groups[d]))
    by_id: dict[str, Path] = {}
    for f in groups[main]:
        vm_id = stem(f)
        if vm_id in by_id:
            raise TraceError(f"{main}: VM {vm_id} appears twice ({by_id[vm_id].name}, {f.name}); keep one")
        by_id[vm_id] = f
    for d, files in groups.items():
        if d != main and len(files) > 1 and {stem(f) for f in files} & by_id.keys():
            raise TraceError(
                f"{root}: several folders hold the same VMs ({main.name}, {d.name}); "
                "point at one month folder"
            )
    return by_id, main.name


def _bitbrains_columns(df: pd.DataFrame, p: Path) -> dict[str, str]:
    """Map our roles to the file's header names; error lists the missing ones."""
    by_lower = {c.strip().lower(): c for c in df.columns}
    cols, missing = {}, []
    for role, name in _BB_COLUMNS.items():
        if name.lower() in by_lower:
            cols[role] = by_lower[name.lower()]
        else:
            missing.append(name)
    if missing:
        raise TraceError(
            f"{p}:1: header lacks column(s) {', '.join(repr(m) for m in missing)}; "
            "is this a Bitbrains GWA-T-12 file?"
        )
    return cols


def _mode_positive(x: np.ndarray) -> float:
    """Most common positive value (smallest on ties), NaN if none."""
    x = x[np.isfinite(x) & (x > 0)]
    if x.size == 0:
        return np.nan
    vals, counts = np.unique(x, return_counts=True)
    return float(vals[np.argmax(counts)])


def _read_bytes(p: Path) -> bytes:
    """The whole (decompressed) file; gzip and I/O errors become TraceErrors naming it."""
    try:
        data = p.read_bytes()
        return gzip.decompress(data) if p.name.lower().endswith(".gz") else data
    except READ_ERRORS as e:
        raise csv_error(p, e) from None


def _read_bitbrains_csv(p: Path) -> pd.DataFrame:
    """A Bitbrains file as read by pandas, after checking every row has as many fields as the header.

    pandas pads a short row with NaN but refuses a long one: both are the same fault (a torn or
    mangled line), so both are an error naming the line.
    """
    data = _read_bytes(p)
    wrong = wrong_field_count(data, b";")
    if wrong is not None:
        line, expected, seen = wrong
        raise TraceError(f"{p}:{line}: expected {expected} fields, saw {seen}; every row needs one value "
                         "per header column")
    try:
        return pd.read_csv(io.BytesIO(data), sep=";", skipinitialspace=True, engine="c", skip_blank_lines=False)
    except READ_ERRORS as e:
        raise csv_error(p, e) from None


def _read_bitbrains_vm(p: Path, counts: dict[str, int], findings: Findings
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One VM file -> (timestamps, values (n, N_RES), sizes (N_RES,), not-running rows (n,))."""
    df = _read_bitbrains_csv(p)
    cols = _bitbrains_columns(df, p)
    raw = {role: numeric(df, c, p, 2, _BB_COLUMNS[role]) for role, c in cols.items()}
    ts = raw.pop("ts")
    drop_outlying_timestamps(ts, p, findings)
    for v in raw.values():
        counts["negative"] += clip_negative(v)
    # values no VM can have are unknown; memory above the VM's provisioned size is that size
    unknown = "treated as unknown"
    raw["cores"][above(findings, p, raw["cores"], MAX_VM_CORES, "cores", "CPU cores", "", unknown)] = np.nan
    for role, what in (("mem_cap", "provisioned memory"), ("mem", "memory usage")):
        raw[role][above(findings, p, raw[role], MAX_VM_MEMORY_KB, role, what, "KB", unknown)] = np.nan
    for role in ("disk_r", "disk_w", "net_rx", "net_tx"):
        name = _BB_COLUMNS[role].split(" [")[0].lower()
        raw[role][above(findings, p, raw[role], MAX_THROUGHPUT_KBS, "throughput", name, "KB/s",
                               unknown)] = np.nan

    cores, cap = raw["cores"], raw["cap"]
    ok = (cores > 0) & (cap > 0)
    # nothing provisioned at all (no cores, no CPU, no memory): the VM was not
    # running, so its zero memory and I/O are no measurement either
    off = ~ok & ~(raw["mem_cap"] > 0) & np.isfinite(ts)
    counts["not_running"] += int(off.sum())
    counts["no_capacity"] += int((~ok & ~off & np.isfinite(ts)).sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        cpu = np.where(ok, raw["cpu"] * cores / cap, np.nan)
    over = cpu > cores
    counts["clipped_cpu"] += int(over.sum())
    cpu = np.where(over, cores, cpu)

    values = np.empty((ts.size, N_RES))
    values[:, CPU] = cpu
    values[:, MEMORY] = raw["mem"] / 1024.0
    values[:, DISK] = raw["disk_r"] + raw["disk_w"]
    values[:, NET] = raw["net_rx"] + raw["net_tx"]
    values[off] = np.nan

    mem_cap = raw["mem_cap"][np.isfinite(raw["mem_cap"]) & (raw["mem_cap"] > 0)]
    sizes = np.full(N_RES, np.nan)
    sizes[CPU] = _mode_positive(cores)
    sizes[MEMORY] = mem_cap.max() / 1024.0 if mem_cap.size else np.nan
    if mem_cap.size:
        over = above(findings, p, raw["mem"], float(mem_cap.max()), "mem_size", "memory usage", "KB",
                     "clipped to it", bound="the VM's provisioned memory,")
        values[over & ~off, MEMORY] = sizes[MEMORY]
    return ts, values, sizes, off


def load_bitbrains(
    root: Path,
    vms: int | None,
    vm_offset: int,
    days: float | None,
    start_day: float,
    progress: Progress | None,
) -> Samples:
    by_id, label = _bitbrains_files(root)
    ids = pick(sorted(by_id, key=natural_key), vms, vm_offset, root)
    counts = {"negative": 0, "no_capacity": 0, "not_running": 0, "clipped_cpu": 0}
    findings = Findings()
    parts_ts, parts_vm, parts_val, parts_off = [], [], [], []
    sizes = np.full((len(ids), N_RES), np.nan)
    for i, vm_id in enumerate(ids):
        ts, values, sizes[i], off = _read_bitbrains_vm(by_id[vm_id], counts, findings)
        parts_off.append(off)
        parts_ts.append(ts)
        parts_vm.append(np.full(ts.size, i, dtype=np.int64))
        parts_val.append(values)
        if progress is not None:
            progress(i + 1, len(ids))
    ts = np.concatenate(parts_ts)
    notes = []
    if np.isfinite(ts).any() and np.nanmedian(ts) > 1e11:  # the header says ms; real files hold seconds
        ts = ts / 1000.0
        notes.append("timestamps looked like milliseconds; divided by 1000")
    if counts["no_capacity"]:
        notes.append(
            f"{counts['no_capacity']} rows (in the files read) with zero CPU cores or capacity: CPU unknown"
        )
    if counts["not_running"]:
        notes.append(
            f"{counts['not_running']} rows (in the files read) with nothing provisioned: the VM was not "
            "running (absent from the simulated host)"
        )
    if counts["clipped_cpu"]:
        notes.append(
            f"clipped {counts['clipped_cpu']} CPU samples (in the files read) above capacity "
            "to the vCPU count"
        )
    if counts["negative"]:
        notes.append(f"clipped {counts['negative']} negative values to 0")
    vm, values = np.concatenate(parts_vm), np.concatenate(parts_val)
    return Samples("bitbrains", label, ids, vm, ts, values, sizes, notes, start_day, np.concatenate(parts_off),
                    findings.messages())

