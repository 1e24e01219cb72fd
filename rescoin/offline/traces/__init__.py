"""Load public VM traces onto one 5-minute grid.

Three formats are read, chosen by looking at the files' content:

- Bitbrains GWA-T-12: one ``;``-separated CSV per VM (cpu, memory, disk, net);
- PlanetLab as shipped with CloudSim: day folders ``YYYYMMDD`` holding one
  file of 288 CPU-% lines per VM;
- Azure Public Dataset v1 ``vm_cpu_readings``: headerless CSV rows of
  ``timestamp, vm id, min, max, avg cpu %``, with an optional ``vmtable``.

Every loader turns its rows into long-form samples (vm, timestamp, values);
one resampler then averages them into 5-minute cells, interpolates short gaps
and cuts the requested days. Values are in the units of
:mod:`rescoin.core.resources`. Anything unreadable raises :class:`TraceError` with
the file (and line) at fault, never a bare pandas/gzip traceback. Implausible
rows (wrong field count, outlying timestamps, values no VM can have) follow the
rules of :mod:`rescoin.offline.tracecheck`: refused, dropped or clipped, each kind said
once with its file and line (logged, and kept in ``Trace.warnings``).
"""
from __future__ import annotations

import logging
from pathlib import Path

from rescoin.offline.traces.azure import AZURE_CHUNK_ROWS, load_azure
from rescoin.offline.traces.bitbrains import load_bitbrains
from rescoin.offline.traces.files import check_selection, csv_files, existing, sniff_file, visible
from rescoin.offline.traces.grid import CELLS_PER_DAY, EDGE_HOLD, MAX_FILL, MAX_GRID_BYTES, fill_gaps, resample
from rescoin.offline.traces.model import (
    EXPECTED,
    FORMATS,
    PERIOD,
    Progress,
    Samples,
    Trace,
    TraceError,
    stack_windows,
)
from rescoin.offline.traces.planetlab import PLANETLAB_LINES, load_planetlab, planetlab_days
from rescoin.shipped import SAMPLE_TRACE_DIR

__all__ = [
    "AZURE_CHUNK_ROWS", "CELLS_PER_DAY", "EDGE_HOLD", "FORMATS", "MAX_FILL", "MAX_GRID_BYTES", "PERIOD",
    "PLANETLAB_LINES", "Progress", "Samples", "Trace", "TraceError", "detect_format", "fill_gaps", "load_trace",
    "load_windows", "stack_windows",
    "sample_trace_path",
]

log = logging.getLogger("rescoin.offline.traces")


def sample_trace_path() -> Path:
    """Directory of the Bitbrains sample shipped with the package (24 VMs, 7 days)."""
    return SAMPLE_TRACE_DIR


def detect_format(path: str | Path) -> str:
    """Name the trace format of ``path`` from what its files contain."""
    p = existing(path)
    if p.is_file():
        fmt = sniff_file(p)
        if fmt is None:
            raise TraceError(f"{p}: unknown trace format; {EXPECTED}")
        return fmt
    if planetlab_days(p):
        return "planetlab"
    files = csv_files(p)
    if not files:
        if not any(visible(e) for e in p.iterdir()):
            raise TraceError(f"{p}: empty directory; {EXPECTED}")
        raise TraceError(f"{p}: unknown trace format (no .csv or .csv.gz files); {EXPECTED}")
    for f in files[:8]:
        fmt = sniff_file(f)
        if fmt is not None:
            return fmt
    raise TraceError(f"{p}: unknown trace format; {EXPECTED}")


def load_trace(
    path: str | Path,
    *,
    vms: int | None = None,
    vm_offset: int = 0,
    days: float | None = None,
    start_day: float = 0.0,
    progress: Progress | None = None,
) -> Trace:
    """Load ``vms`` VMs (after skipping ``vm_offset``) for ``days`` days from ``start_day``.

    VMs are taken in natural id order (Bitbrains, PlanetLab) or order of first
    appearance (Azure); only the files needed are read.
    """
    check_selection(vms, vm_offset, days, start_day)
    p = existing(path)
    fmt = detect_format(p)
    loader = {"bitbrains": load_bitbrains, "planetlab": load_planetlab, "azure": load_azure}[fmt]
    s = loader(p, vms, vm_offset, days, start_day, progress)
    demand, start, notes = resample(s, days, p)
    n_days = demand.shape[0] * PERIOD / 86400.0
    for w in s.warnings:
        log.warning("%s", w)
    return Trace(
        name=f"{fmt} {s.label} ({len(s.vm_ids)} VMs, {n_days:.1f} days)",
        source_format=fmt,
        vm_ids=s.vm_ids,
        start=start,
        period=PERIOD,
        demand=demand,
        sizes=s.sizes,
        notes=s.notes + notes,
        warnings=list(s.warnings),
    )



def load_windows(path: str | Path, *, windows: int, days: float, vms: int | None = None, vm_offset: int = 0,
                 start_day: float = 0.0) -> Trace:
    """``windows`` consecutive windows of ``days`` days from ``start_day``, stacked as VMs (``stack_windows``)."""
    if windows < 1:
        raise TraceError(f"windows = {windows}: give at least 1")
    return stack_windows([load_trace(path, vms=vms, vm_offset=vm_offset, days=days, start_day=start_day + k * days)
                          for k in range(windows)])
