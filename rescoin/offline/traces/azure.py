"""Azure Public Dataset v1 ``vm_cpu_readings`` (headerless ``timestamp, vm id, min, max, avg cpu %``),
with the optional ``vmtable`` for VM sizes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from rescoin.core.resources import CPU, MEMORY, N_RES
from rescoin.offline.traces.files import (
    clip_negative,
    csv_files,
    iter_csv,
    numeric,
    pick,
    sniff_file,
    stem,
)
from rescoin.offline.traces.model import (
    EXPECTED,
    Progress,
    Samples,
    TraceError,
)

AZURE_CHUNK_ROWS = 1_000_000
_AZURE_OVER_BUCKETS = {">24": 30.0, ">64": 70.0}  # open-ended vmtable buckets


def _azure_files(root: Path) -> tuple[list[Path], Path | None]:
    """Reading files (natural order) and the vmtable beside them, if any."""
    files = [root] if root.is_file() else [f for f in csv_files(root) if sniff_file(f) == "azure"]
    if not files:
        raise TraceError(f"{root}: no vm_cpu_readings files found; {EXPECTED}")
    folder = files[0].parent
    table = next((folder / n for n in ("vmtable.csv", "vmtable.csv.gz") if (folder / n).is_file()), None)
    return files, table


class _FirstSeen:
    """Ids in order of first appearance, up to ``limit`` of them (vectorised per chunk)."""

    def __init__(self, limit: int | None):
        self.limit = limit
        self.index = pd.Index([], dtype=object)

    def update(self, ids: pd.Series) -> None:
        if self.limit is not None and len(self.index) >= self.limit:
            return
        uniq = pd.Index(pd.unique(ids.to_numpy(dtype=object)), dtype=object)
        new = uniq[~uniq.isin(self.index)]
        if self.limit is not None:
            new = new[: self.limit - len(self.index)]
        if len(new):
            self.index = self.index.append(new)

    def positions(self, ids: pd.Series) -> np.ndarray:
        return self.index.get_indexer(ids.to_numpy(dtype=object))


def _read_azure_readings(
    files: list[Path], seen: _FirstSeen, vm_offset: int, progress: Progress | None, total: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Timestamps, VM columns and avg CPU % of the selected VMs; and rows dropped."""
    parts_ts, parts_vm, parts_cpu = [], [], []
    dropped = 0
    for n_file, p in enumerate(files):
        line = 1
        for chunk in iter_csv(p, AZURE_CHUNK_ROWS, header=None, dtype={1: str}):
            if chunk.shape[1] != 5:
                raise TraceError(
                    f"{p}: expected 5 columns (timestamp, vm id, min, max, avg cpu %), "
                    f"found {chunk.shape[1]}"
                )
            ts = numeric(chunk, 0, p, line, "timestamp")
            avg = numeric(chunk, 4, p, line, "avg cpu %")
            short = np.flatnonzero(np.isnan(avg) & chunk.notna().any(axis=1).to_numpy())  # pandas pads short rows
            if short.size:  # ... and refuses long ones: both are errors
                raise TraceError(f"{p}:{line + int(short[0])}: expected 5 fields (timestamp, vm id, min, max, "
                                 "avg cpu %), the last is missing")
            line += len(chunk)
            ids = chunk[1]
            keep = np.isfinite(ts) & ids.notna().to_numpy()
            dropped += int((~keep).sum())
            ids = ids[keep]
            seen.update(ids)
            pos = seen.positions(ids)
            mine = pos >= vm_offset
            parts_ts.append(ts[keep][mine])
            parts_vm.append(pos[mine] - vm_offset)
            parts_cpu.append(avg[keep][mine])
        if progress is not None:
            progress(n_file + 1, total)
    cat = lambda parts, dt: np.concatenate(parts) if parts else np.empty(0, dtype=dt)  # noqa: E731
    return cat(parts_ts, float), cat(parts_vm, np.int64), cat(parts_cpu, float), dropped


def _bucket(values: pd.Series, lines: np.ndarray, p: Path, what: str) -> np.ndarray:
    """vmtable size buckets ('2', '>24', ...) as numbers; ``lines`` are their file lines."""
    s = values.astype(str).str.strip()
    over = s.map(_AZURE_OVER_BUCKETS)
    num = pd.to_numeric(s.where(over.isna()), errors="coerce").fillna(over)
    bad = np.flatnonzero(num.isna().to_numpy())
    if bad.size:
        i = int(bad[0])
        raise TraceError(f"{p}:{lines[i]}: {s.iloc[i]!r} is not a {what} bucket")
    return num.to_numpy(dtype=np.float64)


def _read_vmtable(p: Path, ids: pd.Index) -> tuple[np.ndarray, np.ndarray]:
    """Cores and memory GB of ``ids`` (NaN where the table lacks a VM)."""
    cores = np.full(len(ids), np.nan)
    mem_gb = np.full(len(ids), np.nan)
    line = 1
    for chunk in iter_csv(p, AZURE_CHUNK_ROWS, header=None, dtype=str):
        if chunk.shape[1] != 11:
            raise TraceError(f"{p}: expected 11 columns in the Azure v1 vmtable, found {chunk.shape[1]}")
        pos = ids.get_indexer(chunk[0].to_numpy(dtype=object))
        hit = np.flatnonzero(pos >= 0)
        if hit.size:
            rows = chunk.iloc[hit]
            cores[pos[hit]] = _bucket(rows[9], line + hit, p, "core count")
            mem_gb[pos[hit]] = _bucket(rows[10], line + hit, p, "memory")
        line += len(chunk)
    return cores, mem_gb


def load_azure(
    root: Path,
    vms: int | None,
    vm_offset: int,
    days: float | None,
    start_day: float,
    progress: Progress | None,
) -> Samples:
    files, table = _azure_files(root)
    total = len(files) + (table is not None)
    seen = _FirstSeen(None if vms is None else vm_offset + vms)
    ts, vm, avg, dropped = _read_azure_readings(files, seen, vm_offset, progress, total)
    ids = pick(list(seen.index), vms, vm_offset, root)

    notes = ["CPU-only trace: memory, disk and network demand unknown (NaN)"]
    if dropped:
        notes.append(f"dropped {dropped} rows without timestamp or vm id")
    cores = np.full(len(ids), np.nan)
    mem_gb = np.full(len(ids), np.nan)
    if table is not None:
        cores, mem_gb = _read_vmtable(table, pd.Index(ids, dtype=object))
        if progress is not None:
            progress(total, total)
    unknown = np.isnan(cores)
    if table is None:
        notes.append("no vmtable beside the readings: assumed 1 core per VM")
    elif unknown.any():
        notes.append(f"{int(unknown.sum())} VMs missing from {table.name}: assumed 1 core")
    cores = np.where(unknown, 1.0, cores)

    n_neg = clip_negative(avg)
    n_over = int((avg > 100).sum())
    avg = np.minimum(avg, 100.0)
    if n_over:
        notes.append(f"clipped {n_over} CPU samples above capacity (100 %)")
    if n_neg:
        notes.append(f"clipped {n_neg} negative values to 0")

    values = np.full((ts.size, N_RES), np.nan)
    values[:, CPU] = avg / 100.0 * cores[vm]
    sizes = np.full((len(ids), N_RES), np.nan)
    sizes[:, CPU] = cores
    sizes[:, MEMORY] = mem_gb * 1024.0
    label = files[0].parent.name if len(files) > 1 else stem(files[0])
    return Samples("azure", label, ids, vm, ts, values, sizes, notes, start_day)

