"""The metrics of docs/architecture.md ("Metrics"), accumulated step by step over whole arrays.

Counted over every VM and period with demand above zero, per resource.
Satisfaction alone would flatter any policy that sets CPU shares (they are
work-conserving), so worst_off, breaches and actuations are reported beside it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from rescoin.core import kinds
from rescoin.core.arrays import fillnan
from rescoin.core.history import History
from rescoin.core.loop import Step
from rescoin.core.resources import MEMORY, N_RES, RESOURCES

VIOLATION = 0.95  # granted below this share of demand is a violation
BREACH_TOL = 1e-3  # relative slack before "less than min(demand, entitlement)" counts ...
#: ... plus an absolute one per resource, the resolution of the controls
#: (cpu.shares are integers: 1/1024 of a core per share; balloons move in pages)
BREACH_ABS = np.array([0.01, 4.0, 1.0, 1.0])
METRICS = ("satisfaction", "violations", "worst_off", "fairness", "breaches",
           "actuations_per_vm_hour", "reclaimed", "under_error", "over_error")


def jain(x: np.ndarray) -> float:
    """Jain's fairness index: 1 when all equal, 1/n when one gets everything."""
    x = np.asarray(x, dtype=float)
    if x.size == 0 or not np.any(x):
        return math.nan
    return float(x.sum() ** 2 / (x.size * np.square(x).sum()))


@dataclass
class Metrics:
    """Accumulates one policy's run; ``result()`` gives the table row."""

    sum_d: np.ndarray = field(default_factory=lambda: np.zeros(N_RES))
    sum_g: np.ndarray = field(default_factory=lambda: np.zeros(N_RES))
    vm_periods: np.ndarray = field(default_factory=lambda: np.zeros(N_RES))
    violations: np.ndarray = field(default_factory=lambda: np.zeros(N_RES))
    breaches: np.ndarray = field(default_factory=lambda: np.zeros(N_RES))
    under: np.ndarray = field(default_factory=lambda: np.zeros(N_RES))
    over: np.ndarray = field(default_factory=lambda: np.zeros(N_RES))
    forecast_d: np.ndarray = field(default_factory=lambda: np.zeros(N_RES))
    reclaimed_sum: float = 0.0
    periods: int = 0
    vm_hours: float = 0.0
    actions: dict[str, int] = field(default_factory=dict)
    has_forecast: bool = False
    _index: dict[str, int] = field(default_factory=dict)
    _vm_d: np.ndarray = field(default_factory=lambda: np.zeros((0, N_RES)))
    _vm_g: np.ndarray = field(default_factory=lambda: np.zeros((0, N_RES)))
    _rows_for: tuple = (None, None)

    def _rows(self, uuids: np.ndarray) -> np.ndarray:
        if self._rows_for[0] is uuids:
            return self._rows_for[1]
        for u in uuids.tolist():
            if u not in self._index:
                self._index[u] = len(self._index)
        grow = len(self._index) - self._vm_d.shape[0]
        if grow > 0:
            self._vm_d = np.vstack([self._vm_d, np.zeros((grow, N_RES))])
            self._vm_g = np.vstack([self._vm_g, np.zeros((grow, N_RES))])
        rows = np.fromiter((self._index[u] for u in uuids.tolist()), dtype=np.intp, count=uuids.size)
        self._rows_for = (uuids, rows)
        return rows

    def update(self, step: Step, history: History) -> None:
        obs = step.obs
        if obs.truth is None:
            raise ValueError("metrics need true demand: run on a simulated host")
        d = obs.truth
        g = fillnan(obs.usage, 0.0)
        has = d > 0  # NaN compares False: unknown demand is not counted
        dz = np.where(has, d, 0.0)
        gz = np.where(has, g, 0.0)
        self.sum_d += dz.sum(axis=0)
        self.sum_g += gz.sum(axis=0)
        self.vm_periods += has.sum(axis=0)
        self.violations += (has & (g < VIOLATION * d)).sum(axis=0)
        ent = history.latest("entitlement")
        floor = np.minimum(d, ent)
        self.breaches += (has & (g < floor * (1 - BREACH_TOL) - BREACH_ABS)).sum(axis=0)
        fc = history.latest("forecast")
        known = has & ~np.isnan(fc)
        if known.any():
            self.has_forecast = True
            err = np.where(known, d - fc, 0.0)
            self.under += np.maximum(err, 0.0).sum(axis=0)
            self.over += np.maximum(-err, 0.0).sum(axis=0)
            self.forecast_d += np.where(known, d, 0.0).sum(axis=0)
        rows = self._rows(obs.vms.uuids)
        self._vm_d[rows] += dz
        self._vm_g[rows] += gz
        size = np.nansum(obs.vms.sizes[:, MEMORY])
        if size > 0:
            balloon = step.plan.controls.balloon
            target = np.where(np.isnan(balloon), obs.vms.sizes[:, MEMORY], balloon)
            self.reclaimed_sum += max(0.0, 1.0 - float(np.nansum(target)) / size)
        self.periods += 1
        self.vm_hours += obs.n * obs.interval / 3600.0
        for kind, count in step.plan.counts().items():
            self.actions[kind] = self.actions.get(kind, 0) + count

    def result(self) -> dict:
        out: dict = {}
        hours = max(self.vm_hours, 1e-12)
        for r in RESOURCES:
            i = int(r)
            if self.vm_periods[i] == 0:
                out[r.label] = {m: None for m in METRICS}
                continue
            vd, vg = self._vm_d[:, i], self._vm_g[:, i]
            live = vd > 0
            sat_vm = np.minimum(vg[live] / vd[live], 1.0)
            fd = self.forecast_d[i]
            out[r.label] = {
                "satisfaction": float(self.sum_g[i] / self.sum_d[i]),
                "violations": float(self.violations[i] / self.vm_periods[i]),
                "worst_off": float(np.percentile(sat_vm, 5)) if sat_vm.size else None,
                "fairness": jain(sat_vm),
                "breaches": float(self.breaches[i] / self.vm_periods[i]),
                "actuations_per_vm_hour": sum(self.actions.get(k, 0) for k in kinds.of_resource(i)) / hours,
                "reclaimed": self.reclaimed_sum / max(self.periods, 1) if i == MEMORY else None,
                "under_error": float(self.under[i] / fd) if self.has_forecast and fd > 0 else None,
                "over_error": float(self.over[i] / fd) if self.has_forecast and fd > 0 else None,
            }
        out["pin_changes_per_vm_hour"] = self.actions.get("pin", 0) / hours
        return out
