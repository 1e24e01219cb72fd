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
from rescoin.core.resources import MEMORY, N_RES, RESOURCES, VIOLATION
from rescoin.core.sharing import water_fill_columns

BREACH_TOL = 1e-3  # relative slack before "less than min(demand, entitlement)" counts ...
#: ... plus an absolute one per resource, the resolution of the controls
#: (cpu.shares are integers: 1/1024 of a core per share; balloons move in pages)
BREACH_ABS = np.array([0.01, 4.0, 1.0, 1.0])
METRICS = ("satisfaction", "violations", "worst_off", "weighted_worst_off", "fairness", "breaches",
           "actuations_per_vm_hour", "reclaimed", "resident", "under_error", "over_error",
           "padded_under_error", "padded_over_error")


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
    under: np.ndarray = field(default_factory=lambda: np.zeros(N_RES))  # raw forecast (before padding)
    over: np.ndarray = field(default_factory=lambda: np.zeros(N_RES))
    forecast_d: np.ndarray = field(default_factory=lambda: np.zeros(N_RES))
    padded_under: np.ndarray = field(default_factory=lambda: np.zeros(N_RES))  # what the policy planned on
    padded_over: np.ndarray = field(default_factory=lambda: np.zeros(N_RES))
    padded_d: np.ndarray = field(default_factory=lambda: np.zeros(N_RES))
    reclaimed_sum: float = 0.0
    resident_sum: float = 0.0  # sum over periods of resident memory / provisioned memory
    resident_periods: int = 0
    swap_mib_periods: float = 0.0  # host swap: MiB swapped out, summed over periods
    swap_periods: int = 0  # periods in which the host had memory swapped out
    swap_peak: float = 0.0
    swap_known: bool = False
    weighted: bool = False  # weights differ: weighted worst-off is reported
    periods: int = 0
    vm_hours: float = 0.0
    actions: dict[str, int] = field(default_factory=dict)
    has_forecast: bool = False
    _index: dict[str, int] = field(default_factory=dict)
    _vm_d: np.ndarray = field(default_factory=lambda: np.zeros((0, N_RES)))
    _vm_g: np.ndarray = field(default_factory=lambda: np.zeros((0, N_RES)))
    _vm_fair: np.ndarray = field(default_factory=lambda: np.zeros((0, N_RES)))
    _rows_for: tuple = (None, None)
    _point: tuple = (None, None)  # (uuids, raw forecast) made last step, for this period

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
            self._vm_fair = np.vstack([self._vm_fair, np.zeros((grow, N_RES))])
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
        self._forecast_errors(step, history, d, has)
        rows = self._rows(obs.vms.uuids)
        self._vm_d[rows] += dz
        self._vm_g[rows] += gz
        weight = obs.vms.weight
        if weight.size and not np.all(weight == weight[0]):
            # the weighted fair share: weighted max-min of capacity over true demand (never above demand)
            self.weighted = True
            cap = np.where(np.isnan(obs.host.capacity), 0.0, obs.host.capacity)
            self._vm_fair[rows] += water_fill_columns(dz, np.broadcast_to(weight[:, None], dz.shape), cap)
        self._memory_facts(step)
        self.periods += 1
        self.vm_hours += obs.n * obs.interval / 3600.0
        for kind, count in step.plan.counts().items():
            self.actions[kind] = self.actions.get(kind, 0) + count

    def _forecast_errors(self, step: Step, history: History, d: np.ndarray, has: np.ndarray) -> None:
        """Raw forecast (the predictor's point, before padding) and padded one, each against demand."""
        obs = step.obs
        uuids, point = self._point
        if point is not None and uuids is not obs.vms.uuids and not np.array_equal(uuids, obs.vms.uuids):
            at = {u: i for i, u in enumerate(uuids.tolist())}
            idx = np.array([at.get(u, -1) for u in obs.vms.uuids.tolist()], dtype=np.intp)
            point = np.where((idx >= 0)[:, None], point[np.maximum(idx, 0)], np.nan)
        self._point = (obs.vms.uuids, None if step.forecast is None else step.forecast.point)
        for fc, (under, over, total) in ((point, (self.under, self.over, self.forecast_d)),
                                         (history.latest("forecast"),
                                          (self.padded_under, self.padded_over, self.padded_d))):
            if fc is None:
                continue
            known = has & ~np.isnan(fc)
            if known.any():  # in place: the arrays are the accumulators
                self.has_forecast = True
                err = np.where(known, d - fc, 0.0)
                under += np.maximum(err, 0.0).sum(axis=0)
                over += np.maximum(-err, 0.0).sum(axis=0)
                total += np.where(known, d, 0.0).sum(axis=0)

    def _memory_facts(self, step: Step) -> None:
        """Reclaimed (balloon targets), resident memory and host swap of this period."""
        obs = step.obs
        size = np.nansum(obs.vms.sizes[:, MEMORY])
        if size > 0:
            balloon = step.plan.controls.balloon
            target = np.where(np.isnan(balloon), obs.vms.sizes[:, MEMORY], balloon)
            self.reclaimed_sum += max(0.0, 1.0 - float(np.nansum(target)) / size)
            if obs.resident is not None:
                self.resident_sum += float(np.nansum(obs.resident)) / size
                self.resident_periods += 1
        if obs.host_swap is not None:
            self.swap_known = True
            swapped = max(float(obs.host_swap), 0.0)
            self.swap_mib_periods += swapped
            self.swap_periods += swapped > 0
            self.swap_peak = max(self.swap_peak, swapped)

    @staticmethod
    def _ratio(a: float, b: float, known: bool) -> float | None:
        return float(a / b) if known and b > 0 else None

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
            vf = self._vm_fair[:, i]
            fair_vm = np.minimum(vg[vf > 0] / vf[vf > 0], 1.0)
            fd, pd, known = self.forecast_d[i], self.padded_d[i], self.has_forecast
            out[r.label] = {
                "satisfaction": float(self.sum_g[i] / self.sum_d[i]),
                "violations": float(self.violations[i] / self.vm_periods[i]),
                "worst_off": float(np.percentile(sat_vm, 5)) if sat_vm.size else None,
                "weighted_worst_off": float(np.percentile(fair_vm, 5)) if self.weighted and fair_vm.size else None,
                "fairness": jain(sat_vm),
                "breaches": float(self.breaches[i] / self.vm_periods[i]),
                "actuations_per_vm_hour": sum(self.actions.get(k, 0) for k in kinds.of_resource(i)) / hours,
                "reclaimed": self.reclaimed_sum / max(self.periods, 1) if i == MEMORY else None,
                "resident": self._ratio(self.resident_sum, self.resident_periods, i == MEMORY),
                "under_error": self._ratio(self.under[i], fd, known),
                "over_error": self._ratio(self.over[i], fd, known),
                "padded_under_error": self._ratio(self.padded_under[i], pd, known),
                "padded_over_error": self._ratio(self.padded_over[i], pd, known),
            }
        out["pin_changes_per_vm_hour"] = self.actions.get("pin", 0) / hours
        out["host_swap"] = {
            "mib_periods": self.swap_mib_periods if self.swap_known else None,
            "share_of_periods": self._ratio(self.swap_periods, self.periods, self.swap_known),
            "peak_mib": self.swap_peak if self.swap_known else None,
        }
        return out
