"""What a trace is once loaded (:class:`Trace`), what a format reader hands the resampler
(:class:`Samples`), the grid constants and :class:`TraceError`."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from rescoin.core.resources import N_RES
from rescoin.errors import RescoinError

PERIOD = 300.0  #: grid step, seconds

Progress = Callable[[int, int], None]

FORMATS = ("bitbrains", "planetlab", "azure")
EXPECTED = (
    "expected Bitbrains GWA-T-12 (;-separated CSV per VM), "
    "PlanetLab (day folders of 288-line files) or Azure v1 vm_cpu_readings"
)


class TraceError(RescoinError, ValueError):
    """A trace that cannot be read; the message names the file (and line) and says what to do."""


@dataclass
class Trace:
    """Per-VM demand on a regular grid, ready to replay on a simulated host."""

    name: str
    source_format: str
    vm_ids: list[str]
    start: float
    period: float
    demand: np.ndarray  # (n_periods, n_vms, N_RES), NaN = not known
    sizes: np.ndarray  # (n_vms, N_RES): vCPUs, memory MiB, NaN for disk/net
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # implausible rows dropped or clipped (also logged)

    def __post_init__(self) -> None:
        if self.demand.ndim != 3 or self.demand.shape[1:] != (len(self.vm_ids), N_RES):
            raise ValueError(
                f"demand shape {self.demand.shape} does not match {len(self.vm_ids)} VMs x {N_RES}"
            )
        if self.sizes.shape != (len(self.vm_ids), N_RES):
            raise ValueError(f"sizes shape {self.sizes.shape} does not match {len(self.vm_ids)} VMs")

    @property
    def n_periods(self) -> int:
        return int(self.demand.shape[0])

    @property
    def n_vms(self) -> int:
        return int(self.demand.shape[1])

    @property
    def days(self) -> float:
        return self.n_periods * self.period / 86400.0


@dataclass
class Samples:
    """What a format loader hands to the common resampler."""

    source_format: str
    label: str
    vm_ids: list[str]
    vm: np.ndarray  # (n,) VM column of each sample
    ts: np.ndarray  # (n,) seconds
    values: np.ndarray  # (n, N_RES)
    sizes: np.ndarray  # (n_vms, N_RES)
    notes: list[str]
    start_day: float = 0.0  # days still to skip once on the grid
    off: np.ndarray | None = None  # (n,) samples saying the VM was not running: no gap filling over them
    warnings: list[str] = field(default_factory=list)  # file:line of implausible values, one per kind




def stack_windows(parts: list[Trace]) -> Trace:
    """Consecutive windows of the same VMs side by side, each window's VMs counted as VMs of their own.

    For a cluster larger than the VMs of a trace's part: a VM's second week
    runs next to the first weeks of the others. Windows a whole number of
    weeks apart keep the weekday and time of day aligned, so the diurnal and
    weekly load of every VM still peaks together. Every window must have
    the same length; a VM of window k is ``ID@wK``.
    """
    if not parts:
        raise ValueError("no window to stack")
    if len({p.n_periods for p in parts}) != 1:
        raise TraceError(f"the windows differ in length ({sorted({p.n_periods for p in parts})} periods): "
                         "the trace ends before the last window; use fewer windows or fewer days")
    first = parts[0]
    if len(parts) == 1:
        return first
    ids = [f"{v}@w{k}" for k, p in enumerate(parts) for v in p.vm_ids]
    return Trace(name=f"{first.name} x {len(parts)} windows", source_format=first.source_format, vm_ids=ids,
                 start=first.start, period=first.period,
                 demand=np.concatenate([p.demand for p in parts], axis=1),
                 sizes=np.concatenate([p.sizes for p in parts], axis=0),
                 notes=list(dict.fromkeys(n for p in parts for n in p.notes)),
                 warnings=list(dict.fromkeys(w for p in parts for w in p.warnings)))
