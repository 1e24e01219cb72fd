"""Fit's series: history on a (period, VM, resource) grid, its fit/held-back parts, and its replay through
:class:`~rescoin.core.predict.PaddedEWMA` into error sums (the loss in the package docstring)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from rescoin.core.history import History
from rescoin.core.model import Controls, Observation, VMSet
from rescoin.core.predict import PaddedEWMA, PredictorParams
from rescoin.core.resources import N_RES, RESOURCES, HostCapacity, Resource
from rescoin.offline.analysis import HistoryData, HistoryError
from rescoin.shipped import MODELS_DIR

FITTED = ("alpha_up", "alpha_down", "pad_error", "pad_std", "pad_frac")
GRID: dict[str, tuple[float, ...]] = {
    "alpha_up": (0.1, 0.2, 0.3, 0.5, 0.7, 0.85, 1.0),
    "alpha_down": (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0),
    "pad_error": (0.0, 0.5, 1.0, 2.0, 3.0, 5.0),
    "pad_std": (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0),
    "pad_frac": (0.0, 0.02, 0.05, 0.1, 0.2, 0.3),
}
STAGES: tuple[tuple[str, ...], ...] = (("alpha_up", "alpha_down"), ("pad_error", "pad_std"), ("pad_frac",))
PER_VM_DAYS = 2.0  # per-VM parameters only for VMs with at least this much history in the fitted part
#: the defaults that made the shipped models/default.toml (see its header and the README), so that a plain
#: ``rescoin fit HISTORY -o PATH`` gives a model of the shipped quality
DEFAULT_BASE = MODELS_DIR / "hand-tuned.toml"
DEFAULT_UNDER_WEIGHT = "cpu=50,memory=500,disk=50,net=50"
#: periods of history per VM (median over VMs) below which the fit warns that it is not to be trusted: a day of
#: 5-minute periods, the least that shows a daily cycle; below MIN_PERIODS (every VM) there is nothing to fit
WARN_PERIODS = 288
MIN_PERIODS = 3
FIT, HELD = 1, 2  # parts of each series: 0 = not scored


# -- series ----------------------------------------------------------------------------------
@dataclass
class Series:
    """Usage and signal on a regular grid: ``(T, n_vms, N_RES)``, NaN where a VM has no sample."""

    ts: np.ndarray
    uuids: np.ndarray
    names: np.ndarray
    usage: np.ndarray
    signal: np.ndarray
    period: float

    @property
    def shape(self) -> tuple[int, int]:
        return self.usage.shape[0], self.usage.shape[1]


def series_from_history(d: HistoryData) -> Series:
    """Rows of HistoryData onto a (period, VM, resource) grid, periods bucketed by the median step."""
    if d.n == 0:
        raise HistoryError("no usable history rows to fit on")
    res = d.res.astype(np.int64)
    group = res * max(d.n_vms, 1) + d.vm
    dt = np.diff(d.ts)[group[1:] == group[:-1]]
    dt = dt[dt > 0]
    period = float(np.median(dt)) if dt.size else 300.0
    t0 = float(d.ts.min())
    buckets, tidx = np.unique(np.round((d.ts - t0) / period).astype(np.int64), return_inverse=True)
    shape = (buckets.size, d.n_vms, N_RES)
    usage = np.full(shape, np.nan)
    signal = np.full(shape, np.nan)
    usage[tidx, d.vm, res] = d.values["usage"]
    signal[tidx, d.vm, res] = d.values["signal"]
    return Series(ts=t0 + buckets * period, uuids=d.uuids, names=d.names, usage=usage, signal=signal,
                  period=period)


def history_length_problem(s: Series) -> tuple[str, str] | None:
    """("error" | "warning", message) when the history is too short to fit on, else None."""
    per_vm = (~np.isnan(s.usage)).any(axis=2).sum(axis=0)  # periods with a sample, per VM
    longest, median = int(per_vm.max(initial=0)), float(np.median(per_vm)) if per_vm.size else 0.0
    if longest < MIN_PERIODS:
        return "error", (f"only {longest} period{'s' * (longest != 1)} of history per VM: a fit needs at least "
                         f"{MIN_PERIODS} (and {WARN_PERIODS}, a day of 5-minute periods, to be trusted)")
    if median < WARN_PERIODS:
        return "warning", (f"only {median:g} periods of history per VM (median over {per_vm.size} VMs; fewer than "
                           f"{WARN_PERIODS}, a day of 5-minute periods): the fitted model may be worse than the base; "
                           "check it with --check on other history")
    return None


def parts(s: Series, holdout: float) -> np.ndarray:
    """Per period, VM and resource: FIT for the first (1 - holdout) of each VM's samples, HELD after, 0 = none."""
    known = ~np.isnan(s.usage)
    count = known.sum(axis=0)
    fit_n = np.ceil((1.0 - holdout) * count)
    rank = np.cumsum(known, axis=0)
    out = np.where(rank <= fit_n[None], FIT, HELD).astype(np.int8)
    out[~known] = 0
    out[0] = 0  # the first period is never forecast
    return out


# -- replay ----------------------------------------------------------------------------------
@dataclass
class Sums:
    """Error sums of a replay, ``(K, n_vms, N_RES, 3)``: the last axis is the part (0, FIT, HELD)."""

    under: np.ndarray
    over: np.ndarray
    usage: np.ndarray

    def part(self, p: int) -> Sums:
        return Sums(self.under[..., p], self.over[..., p], self.usage[..., p])

    def loss(self, w_under: float, axis=None) -> np.ndarray:
        u, o, x = (a.sum(axis=axis) if axis is not None else a for a in (self.under, self.over, self.usage))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(x > 0, (np.asarray(w_under, dtype=float) * u + o) / x, np.nan)

    def ratio(self, which: str, axis=None) -> np.ndarray:
        a = getattr(self, which)
        a, x = (a.sum(axis=axis), self.usage.sum(axis=axis)) if axis is not None else (a, self.usage)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(x > 0, a / x, np.nan)


def _rows_vmset(n: int) -> VMSet:
    ids = np.array([f"row-{i}" for i in range(n)])
    return VMSet.build(ids, ids, np.ones((n, N_RES)))


def replay(pred: PaddedEWMA, s: Series, part: np.ndarray, k: int = 1,
           tick: Callable[[], None] | None = None) -> Sums:
    """Replay the series through ``pred`` for ``k`` row blocks of all VMs (block b = rows b*V .. b*V+V-1).

    The forecast made after period t is compared with the usage of period t+1.
    """
    T, V = s.shape
    n = k * V
    vms = _rows_vmset(n)
    host = HostCapacity("fit", np.ones(N_RES), 1)
    h = History(window=2)
    controls, age = Controls.defaults(vms), np.zeros(n, dtype=np.intp)  # typed fillers: replay reads neither
    acc = np.zeros((3, k, V * N_RES * 3))  # under, over, usage; (k, V*R*part) with the part last
    col = np.arange(V * N_RES) * 3
    for t in range(T):
        u = np.tile(s.usage[t], (k, 1))
        sig = np.tile(s.signal[t], (k, 1))
        h.push(Observation(ts=s.ts[t], interval=s.period, host=host, vms=vms, usage=u, signal=sig,
                           controls=controls, age=age))
        value = pred.predict(h).value
        if t + 1 < T:
            nxt = s.usage[t + 1].reshape(1, V * N_RES)
            e = nxt - value.reshape(k, V * N_RES)
            ok = ~np.isnan(e)  # both known (a forecast is NaN only before a VM's first sample)
            e[~ok] = 0.0
            pos = np.maximum(e, 0.0)
            idx = col + part[t + 1].reshape(-1)
            acc[0][:, idx] += pos
            acc[1][:, idx] += pos - e
            acc[2][:, idx] += np.where(ok, nxt, 0.0)
        if tick is not None:
            tick()
    shape = (k, V, N_RES, 3)
    return Sums(acc[0].reshape(shape), acc[1].reshape(shape), acc[2].reshape(shape))


def params_for(base: dict[Resource, PredictorParams], values: dict[str, np.ndarray]) -> dict[Resource, PredictorParams]:
    """Per-resource parameters with the fitted ones from ``values[name]`` (each ``(N_RES,)``)."""
    out = {}
    for r in RESOURCES:
        fitted: dict[str, Any] = {n: float(values[n][int(r)]) for n in FITTED}
        out[r] = replace(base[r], **fitted)
    return out
