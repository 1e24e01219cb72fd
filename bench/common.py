"""Shared helpers for the benchmarks: where the traces are, synthetic scale-up."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from rescoin.offline.traces import Trace, load_trace, sample_trace_path

REPO = Path(__file__).resolve().parent.parent
SHARED_TRACE = Path(os.environ.get("RESCOIN_TRACE", REPO.parent / "shared" / "traces" / "bitbrains_rnd"))


def shared_trace_or_sample() -> Path:
    return SHARED_TRACE if SHARED_TRACE.exists() else sample_trace_path()


def scaled(trace: Trace, n: int, periods: int | None = None) -> Trace:
    """``n`` VMs made by tiling the trace's VMs (each copy its own VM), for scale tests."""
    reps = -(-n // trace.n_vms)
    idx = np.tile(np.arange(trace.n_vms), reps)[:n]
    demand = trace.demand[:periods, idx] if periods else trace.demand[:, idx]
    return Trace(
        name=f"{trace.name} tiled to {n} VMs",
        source_format=trace.source_format,
        vm_ids=[f"{trace.vm_ids[i]}-{k}" for k, i in enumerate(idx)],
        start=trace.start,
        period=trace.period,
        demand=np.ascontiguousarray(demand),
        sizes=trace.sizes[idx].copy(),
        notes=list(trace.notes),
    )


def load(vms: int | None = None, days: float | None = None, **kw) -> Trace:
    return load_trace(shared_trace_or_sample(), vms=vms, days=days, **kw)
