"""Onto the 5-minute grid: average samples into cells, interpolate short gaps, cut the asked days."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from rescoin.core.resources import N_RES
from rescoin.offline.tracecheck import (
    MAX_SPAN_DAYS,
)
from rescoin.offline.traces.model import (
    PERIOD,
    Samples,
    TraceError,
)

CELLS_PER_DAY = int(86400 / PERIOD)
MAX_FILL = 12  #: gaps of up to this many cells are interpolated (one hour)
EDGE_HOLD = 1  #: empty cells at a series' ends held at the nearest value (grid rounding)
MAX_GRID_BYTES = 4 << 30  #: refuse to build a demand array larger than this


def resample(
    s: Samples, days: float | None, where: Path
) -> tuple[np.ndarray, float, list[str]]:
    """Average samples into 5-minute cells, interpolate short gaps, keep the asked days.

    Only the kept window plus a margin of MAX_FILL + 1 cells is built: gaps
    that touch the window are still filled from their true neighbours, and a
    week of a month-long trace costs a week of work.
    """
    n_vms = len(s.vm_ids)
    ok = np.isfinite(s.ts)
    ts, vm, values = s.ts[ok], s.vm[ok], s.values[ok]
    off = np.zeros(ts.size, dtype=bool) if s.off is None else s.off[ok]
    if ts.size == 0:
        raise TraceError(f"{where}: the selected VMs have no samples")
    start = float(np.floor(ts.min() / PERIOD) * PERIOD)
    cell = np.rint((ts - start) / PERIOD).astype(np.int64)
    notes: list[str] = []
    first, last = _window(int(cell.max()) + 1, days, s.start_day, where, notes)
    lo = max(0, first - MAX_FILL - 1)
    hi = last + MAX_FILL + 1
    keep = (cell >= lo) & (cell < hi)
    cell, vm, values, off = cell[keep] - lo, vm[keep], values[keep], off[keep]
    n_cells = int(cell.max()) + 1 if cell.size else 0
    if n_cells * n_vms * N_RES * 8 > MAX_GRID_BYTES:
        raise TraceError(
            f"{where}: {n_vms} VMs x {n_cells} periods is too large to hold; pass --vms or --days to load less"
        )

    flat = cell * n_vms + vm
    size = n_cells * n_vms
    demand = np.empty((size, N_RES))
    for r in range(N_RES):
        known = np.isfinite(values[:, r])
        total = np.bincount(flat, weights=np.where(known, values[:, r], 0.0), minlength=size)
        count = np.bincount(flat, weights=known, minlength=size)
        with np.errstate(invalid="ignore", divide="ignore"):
            demand[:, r] = np.where(count > 0, total / count, np.nan)
    shared = flat.size - np.count_nonzero(np.bincount(flat, minlength=size))
    if shared:
        notes.append(f"averaged {shared} samples that shared a 5-minute cell with another")

    # a cell where the VM said "not running" and nothing else is no gap: it stays empty
    stopped = np.bincount(flat[off], minlength=size) > 0
    running = np.bincount(flat[~off], minlength=size) > 0
    demand, filled = fill_gaps(demand.reshape(n_cells, n_vms, N_RES))
    demand = np.ascontiguousarray(demand)  # so that the reshape below is a view
    demand.reshape(size, N_RES)[stopped & ~running] = np.nan
    notes += filled
    out = np.full((last - first, n_vms, N_RES), np.nan)
    got = demand[first - lo : last - lo]
    out[: got.shape[0]] = got
    return out, start + first * PERIOD, notes


def _window(
    n_periods: int, days: float | None, start_day: float, where: Path, notes: list[str]
) -> tuple[int, int]:
    """Grid cells [first, last) holding ``days`` days from ``start_day``."""
    first = int(round(start_day * CELLS_PER_DAY))
    if first >= n_periods:
        raise TraceError(
            f"{where}: --start-day {start_day:g} is beyond the end of the trace "
            f"({n_periods * PERIOD / 86400:.2f} days); choose a smaller --start-day"
        )
    want = None if days is None else int(round(days * CELLS_PER_DAY))
    last = n_periods if want is None else min(n_periods, first + want)
    if last - first > MAX_SPAN_DAYS * CELLS_PER_DAY:
        raise TraceError(
            f"{where}: {(last - first) / CELLS_PER_DAY:.0f} days to replay, more than the {MAX_SPAN_DAYS} "
            "rescoin replays at once; pass --days (and --start-day) to replay part of the trace"
        )
    if want is not None and last - first < want:
        notes.append(f"asked for {days:g} days but only {(last - first) * PERIOD / 86400:.2f} remain")
    return first, max(last, first + 1)


def fill_gaps(demand: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Interpolate interior gaps of up to MAX_FILL cells per VM and resource.

    Longer gaps stay NaN (the VM may have been off). At a series' ends, a run
    of at most EDGE_HOLD empty cells takes the nearest value: flooring the grid
    start can leave the first cell empty for every VM. Works on runs of
    missing cells, so the cost follows the number of gaps, not the grid size.
    """
    T = demand.shape[0]
    if T == 0:
        return demand, []
    a = np.ascontiguousarray(demand.reshape(T, -1).T)  # one row per (VM, resource) series
    padded = np.zeros((a.shape[0], T + 2), dtype=np.int8)
    padded[:, 1:-1] = np.isnan(a)
    edges = np.diff(padded, axis=1)
    row, t0 = np.nonzero(edges == 1)  # each missing run is row[i], cells [t0[i], t1[i])
    _, t1 = np.nonzero(edges == -1)
    length = t1 - t0
    has_prev, has_next = t0 > 0, t1 < T
    interior = has_prev & has_next
    short = interior & (length <= MAX_FILL)
    lead = ~has_prev & has_next & (length <= EDGE_HOLD)
    trail = has_prev & ~has_next & (length <= EDGE_HOLD)

    fill = short | lead | trail
    n = length[fill]
    run = np.repeat(np.flatnonzero(fill), n)  # run of each filled cell
    t = t0[run] + (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n))
    r = row[run]
    v_prev = a[r, np.maximum(t0[run] - 1, 0)]
    v_next = a[r, np.minimum(t1[run], T - 1)]
    w = (t - t0[run] + 1) / (length[run] + 1)
    a[r, t] = np.where(lead[run], v_next, np.where(trail[run], v_prev, v_prev + (v_next - v_prev) * w))

    notes = []
    if short.any():
        notes.append(
            f"filled {int(short.sum())} gaps ({int(length[short].sum())} cells, per VM and resource) "
            "by linear interpolation"
        )
    long_gaps = interior & ~short
    if long_gaps.any():
        notes.append(
            f"left {int(long_gaps.sum())} gaps longer than {MAX_FILL} cells as NaN "
            f"({int(length[long_gaps].sum())} cells, per VM and resource)"
        )
    if lead.any() or trail.any():
        held = int(length[lead].sum() + length[trail].sum())
        notes.append(f"held {held} empty cells at series ends at the nearest value")
    return a.T.reshape(demand.shape), notes

