"""The metrics of ``rescoin analyze``: history-based equivalents of the simulator's (docs/architecture.md).

History holds what a host showed, never true demand: ``usage`` is granted
usage and ``signal`` is unmet-demand pressure (the share of demand not granted
on the simulated host; steal, PSI or I/O wait on a real one). The simulator's metrics
need demand, so this module reports history-based
equivalents, per resource, and says which is which (see ``DEFINITIONS``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from rescoin.core.resources import MEMORY, N_RES, RESOURCES
from rescoin.offline.evaluate import BREACH_ABS, BREACH_TOL, VIOLATION, jain
from rescoin.offline.historycsv import HistoryData

#: unmet-demand signal above this counts as "pressure" (PredictorParams.threshold's default)
PRESSURE = 0.01
#: a signal above this means granted < VIOLATION x demand, if the signal is the unmet share of demand
VIOLATION_SIGNAL = 1.0 - VIOLATION
#: estimated demand = usage / (1 - signal), with the signal capped here (a VM that got nothing)
SIGNAL_CAP = 0.99
#: an allocation change smaller than this share of the previous value is not counted
ALLOC_CHANGE_REL = 0.01
DEFAULT_PERIOD = 300.0


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



@dataclass
class _Rows:
    """Every row's inputs and the per-row facts the metrics count, in HistoryData order."""

    n: int
    nv: int
    res: np.ndarray
    vm: np.ndarray
    u: np.ndarray
    fc: np.ndarray
    alloc: np.ndarray
    ent: np.ndarray
    credit: np.ndarray
    same: np.ndarray  # (n-1,): row i+1 continues row i's VM and resource
    period: float
    tidx: np.ndarray
    tvals: np.ndarray
    u_known: np.ndarray
    has: np.ndarray  # "demand above zero", as far as history shows
    s_known: np.ndarray
    pressed: np.ndarray
    s0: np.ndarray
    dhat: np.ndarray
    uh: np.ndarray
    ent_ok: np.ndarray
    both: np.ndarray
    changed: np.ndarray
    c_ok: np.ndarray

    @property
    def nt(self) -> int:
        return int(self.tvals.size)


def _buckets(d: HistoryData, period: float) -> tuple[np.ndarray, np.ndarray]:
    """Time buckets of one period (hosts need not sample at the same instant): row index, bucket starts."""
    if not d.n:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    t0 = float(d.ts.min())
    b = np.round((d.ts - t0) / period).astype(np.int64)
    buckets = np.unique(b)
    return np.searchsorted(buckets, b), t0 + buckets * period


def _changes(alloc: np.ndarray, same: np.ndarray) -> np.ndarray:
    """Allocation changes, counted at the later row of each consecutive pair of one VM and resource."""
    n = alloc.size
    changed = np.zeros(n, dtype=bool)
    if n > 1:
        a0, a1 = alloc[:-1], alloc[1:]
        nan0, nan1 = np.isnan(a0), np.isnan(a1)
        with np.errstate(invalid="ignore"):
            moved = np.abs(a1 - a0) > ALLOC_CHANGE_REL * np.maximum(np.abs(a0), 1e-9)
        changed[1:] = same & ((nan0 != nan1) | (~nan0 & ~nan1 & moved))
    return changed


def _rows(d: HistoryData) -> _Rows:
    n, nv = d.n, d.n_vms
    res = d.res.astype(np.int64)
    u, sig, alloc = d.values["usage"], d.values["signal"], d.values["allocation"]
    group = res * max(nv, 1) + d.vm
    same = group[1:] == group[:-1] if n > 1 else np.zeros(0, dtype=bool)
    period = _period(d, same)
    tidx, tvals = _buckets(d, period)
    u_known = np.isfinite(u)
    has = u_known & (u > 0)
    s_known = np.isfinite(sig)
    s0 = np.clip(np.where(s_known, sig, 0.0), 0.0, SIGNAL_CAP)
    return _Rows(
        n=n, nv=nv, res=res, vm=d.vm, u=u, fc=d.values["forecast"], alloc=alloc, ent=d.values["entitlement"],
        credit=d.values["credit"], same=same, period=period, tidx=tidx, tvals=tvals, u_known=u_known, has=has,
        s_known=s_known, pressed=s_known & (sig > PRESSURE), s0=s0, dhat=np.where(has, u / (1.0 - s0), 0.0),
        uh=np.where(has, u, 0.0), ent_ok=np.isfinite(d.values["entitlement"]),
        both=u_known & np.isfinite(alloc), changed=_changes(alloc, same), c_ok=np.isfinite(d.values["credit"]))


def _grouped(key: np.ndarray, groups: int, rows: int):
    """``sums(w, mask)``: the sum of ``w`` (or the count) per key, masked rows only, as (rows, N_RES)."""
    size = max(groups, 1) * N_RES

    def sums(w=None, mask=None) -> np.ndarray:
        if mask is not None:
            out = _groupby_sum(key[mask], size, None if w is None else w[mask])
        else:
            out = _groupby_sum(key, size, w)
        return out.reshape(max(groups, 1), N_RES)[:rows]

    return sums


def _resource_sums(r: _Rows) -> dict[str, np.ndarray]:
    """The per-resource sums and counts behind the metrics table."""
    by_res = _grouped(r.res, 1, 1)
    ent0 = np.where(r.ent_ok, r.ent, 0.0)
    breach = r.has & r.ent_ok & (r.u < np.minimum(r.dhat, ent0) * (1 - BREACH_TOL) - BREACH_ABS[r.res])
    fc_ok = r.has & np.isfinite(r.fc)
    err = np.where(fc_ok, r.u - np.where(fc_ok, r.fc, 0.0), 0.0)
    alloc_ok = np.isfinite(r.alloc)
    out = {
        "rows": by_res(), "nu": by_res(mask=r.u_known), "sum_u": by_res(np.where(r.u_known, r.u, 0.0)),
        "nalloc": by_res(mask=alloc_ok), "sum_alloc": by_res(np.where(alloc_ok, r.alloc, 0.0)),
        "nent": by_res(mask=r.ent_ok), "sum_ent": by_res(ent0),
        "n_sig": by_res(mask=r.s_known), "n_press": by_res(mask=r.pressed), "n_has": by_res(mask=r.has),
        "sum_uh": by_res(r.uh), "sum_dhat": by_res(r.dhat),
        "n_viol": by_res(mask=r.has & (r.s0 > VIOLATION_SIGNAL)), "n_breach": by_res(mask=breach),
        "under": by_res(np.maximum(err, 0.0)), "over": by_res(np.maximum(-err, 0.0)),
        "sum_u_fc": by_res(np.where(fc_ok, r.u, 0.0)), "n_changes": by_res(mask=r.changed),
        "n_credit": by_res(mask=r.c_ok), "sum_credit": by_res(np.where(r.c_ok, r.credit, 0.0)),
        "used_alloc_u": by_res(np.where(r.both, r.u, 0.0)), "used_alloc_a": by_res(np.where(r.both, r.alloc, 0.0)),
    }
    return {k: v[0] for k, v in out.items()}


@dataclass
class _PerVM:
    """Per VM and resource (nv, N_RES): means over the rows where each value is known."""

    nu: np.ndarray
    sat: np.ndarray
    mean_u: np.ndarray
    mean_a: np.ndarray
    mean_e: np.ndarray
    pressure: np.ndarray
    credit: np.ndarray  # (nv,): the latest credit of each resource, summed


def _per_vm(r: _Rows) -> _PerVM:
    by_vm = _grouped(r.vm * N_RES + r.res, r.nv, r.nv)
    v_nu = by_vm(mask=r.u_known)
    v_u = by_vm(np.where(r.u_known, r.u, 0.0))
    v_nalloc = by_vm(mask=np.isfinite(r.alloc))
    v_alloc = by_vm(np.where(np.isfinite(r.alloc), r.alloc, 0.0))
    v_nent = by_vm(mask=r.ent_ok)
    v_ent = by_vm(np.where(r.ent_ok, r.ent, 0.0))
    v_uh, v_dhat = by_vm(r.uh), by_vm(r.dhat)
    v_nsig, v_press = by_vm(mask=r.s_known), by_vm(mask=r.pressed)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = _PerVM(
            nu=v_nu, sat=np.where(v_dhat > 0, np.minimum(v_uh / v_dhat, 1.0), np.nan),
            mean_u=np.where(v_nu > 0, v_u / v_nu, np.nan), mean_a=np.where(v_nalloc > 0, v_alloc / v_nalloc, np.nan),
            mean_e=np.where(v_nent > 0, v_ent / v_nent, np.nan),
            pressure=np.where(v_nsig > 0, v_press / v_nsig, np.nan), credit=np.zeros(0))
    # the latest credit of each VM and resource: last row of each group
    last_credit = np.full((r.nv, N_RES), np.nan)
    if r.n:
        ends = np.r_[np.flatnonzero(~r.same), r.n - 1]
        last_credit[r.vm[ends], r.res[ends]] = r.credit[ends]
    out.credit = np.where(np.isnan(last_credit), 0.0, last_credit).sum(axis=1)
    return out


def _time_series(r: _Rows) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per period and resource: the series the report plots, and memory's reclaimed share per period."""
    by_t = _grouped(r.tidx * N_RES + r.res, r.nt, r.nt)
    x_ok = r.u_known & r.ent_ok & (np.where(r.ent_ok, r.ent, 0.0) > 0)
    x = np.where(x_ok, r.u / np.where(x_ok, r.ent, 1.0), 0.0)
    t_n, t_s1, t_s2 = by_t(mask=x_ok), by_t(x), by_t(x * x)
    with np.errstate(invalid="ignore", divide="ignore"):
        series = {
            "jain_use_entitlement": np.where(t_s2 > 0, t_s1 ** 2 / (t_n * t_s2), np.nan),
            "satisfaction_est": np.where(by_t(r.dhat) > 0, by_t(r.uh) / by_t(r.dhat), np.nan),
            "pressure": np.where(by_t(mask=r.s_known) > 0, by_t(mask=r.pressed) / by_t(mask=r.s_known), np.nan),
            "changes": by_t(mask=r.changed),
            "mean_credit": np.where(by_t(mask=r.c_ok) > 0,
                                    by_t(np.where(r.c_ok, r.credit, 0.0)) / by_t(mask=r.c_ok), np.nan),
        }
        t_alloc = by_t(np.where(r.both & r.ent_ok, r.alloc, 0.0))
        t_ent = by_t(np.where(r.both & r.ent_ok, r.ent, 0.0))
        reclaimed_t = np.where(t_ent > 0, np.maximum(0.0, 1.0 - t_alloc / t_ent), np.nan)[:, MEMORY]
    return series, reclaimed_t


def _resource_table(s: dict[str, np.ndarray], v: _PerVM, reclaimed_t: np.ndarray, period: float) -> dict[str, dict]:
    """The per-resource metrics, DEFINITIONS' keys in order, None where a metric has no data."""
    hours = s["rows"] * period / 3600.0
    resources: dict[str, dict] = {}
    for r in RESOURCES:
        i = int(r)
        if s["rows"][i] == 0:
            resources[r.label] = {m: (0 if m == "vm_periods" else None) for m in RES_METRICS}
            continue
        sat = v.sat[:, i]
        sat = sat[np.isfinite(sat)]
        ratio = np.where(v.mean_e[:, i] > 0, v.mean_u[:, i] / v.mean_e[:, i], np.nan)
        ratio = ratio[np.isfinite(ratio)]
        pressure = _div(s["n_press"][i], s["n_sig"][i])
        resources[r.label] = {
            "vm_periods": int(s["rows"][i]),
            "mean_usage": _div(s["sum_u"][i], s["nu"][i]),
            "mean_allocation": _div(s["sum_alloc"][i], s["nalloc"][i]),
            "mean_entitlement": _div(s["sum_ent"][i], s["nent"][i]),
            "used_of_allocation": _div(s["used_alloc_u"][i], s["used_alloc_a"][i]),
            "pressure": pressure,
            "satisfaction_proxy": None if pressure is None else 1.0 - pressure,
            "satisfaction_est": _div(s["sum_uh"][i], s["sum_dhat"][i]),
            "violations_est": _div(s["n_viol"][i], s["n_has"][i]),
            "worst_off_est": float(np.percentile(sat, 5)) if sat.size else None,
            "fairness_est": jain(sat) if sat.size else None,
            "breaches_est": _div(s["n_breach"][i], s["n_has"][i]),
            "jain_use_entitlement": jain(ratio) if ratio.size else None,
            "under_error": _div(s["under"][i], s["sum_u_fc"][i]),
            "over_error": _div(s["over"][i], s["sum_u_fc"][i]),
            "allocation_changes_per_vm_hour": _div(s["n_changes"][i], hours[i]),
            "reclaimed_est": (float(np.nanmean(reclaimed_t)) if i == MEMORY and np.isfinite(reclaimed_t).any()
                              else None),
            "mean_credit": _div(s["sum_credit"][i], s["n_credit"][i]),
        }
    return resources


def _vm_pressure(r: _Rows) -> np.ndarray:
    """Per VM: pressure on any resource, over the periods the VM was seen with a signal."""
    if not r.n:
        return np.zeros(0)
    nv, nt = r.nv, max(r.nt, 1)
    vt = r.vm * nt + r.tidx
    if nv * nt <= 50_000_000:  # dense: count (VM, period) cells with any resource on
        cells = nv * nt
        pk = np.flatnonzero(np.bincount(vt[r.pressed], minlength=cells))
        kk = np.flatnonzero(np.bincount(vt[r.s_known], minlength=cells))
    else:
        pk, kk = np.unique(vt[r.pressed]), np.unique(vt[r.s_known])
    p_any = np.bincount(pk // nt, minlength=nv)[:nv].astype(float)
    k_any = np.bincount(kk // nt, minlength=nv)[:nv].astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(k_any > 0, p_any / k_any, np.nan)


def _vm_table(d: HistoryData, v: _PerVM, vm_pressure: np.ndarray, top_vms: int) -> tuple[list[int], list[dict]]:
    """The VMs of the per-VM table (most pressured, then busiest first) and their rows."""
    nv = d.n_vms
    with np.errstate(invalid="ignore", divide="ignore"):
        busy = np.nanmax(np.where(v.mean_e > 0, v.mean_u / v.mean_e, np.nan), axis=1) if nv else np.zeros(0)
    order: np.ndarray | list[int] = (np.lexsort((-np.nan_to_num(busy, nan=-1.0), -np.nan_to_num(vm_pressure, nan=-1.0)))
                                     if nv else [])
    table_vms = [int(i) for i in order[: max(top_vms, 0)]]
    vm_table = [{
        "uuid": str(d.uuids[i]), "name": str(d.names[i]),
        "cpu_use": v.mean_u[i, 0], "cpu_alloc": v.mean_a[i, 0],
        "memory_use": v.mean_u[i, MEMORY], "memory_alloc": v.mean_a[i, MEMORY],
        "pressure": vm_pressure[i], "cpu_pressure": v.pressure[i, 0], "memory_pressure": v.pressure[i, MEMORY],
        "credit": v.credit[i],
    } for i in table_vms]
    return table_vms, vm_table


def _top(v: _PerVM, plot_vms: int) -> dict[int, list[int]]:
    """Per resource, the VMs to plot: most pressured, then busiest."""
    top: dict[int, list[int]] = {}
    for r in range(N_RES):
        seen = np.flatnonzero(v.nu[:, r] > 0)
        if not seen.size:
            continue
        with np.errstate(invalid="ignore", divide="ignore"):
            b = np.where(v.mean_e[seen, r] > 0, v.mean_u[seen, r] / v.mean_e[seen, r], v.mean_u[seen, r])
        o = np.lexsort((-np.nan_to_num(b, nan=-1.0), -np.nan_to_num(v.pressure[seen, r], nan=-1.0)))
        top[r] = [int(seen[j]) for j in o[:plot_vms]]
    return top


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def analyze(d: HistoryData, top_vms: int = 20, plot_vms: int = 3) -> Analysis:
    """Per-resource metrics, a per-VM table and the time series of the report."""
    r = _rows(d)
    v = _per_vm(r)
    series, reclaimed_t = _time_series(r)
    table_vms, vm_table = _vm_table(d, v, _vm_pressure(r), top_vms)
    nt, tvals = r.nt, r.tvals
    result = {
        "files": len(d.files),
        "rows": d.n,
        "lines": d.lines,
        "skipped_rows": d.skipped_rows,
        "skipped": {f: dict(c) for f, c in d.skipped.items()},
        "duplicates": d.duplicates,
        "empty_files": d.empty,
        "hosts": d.hosts,
        "vms": r.nv,
        "periods": nt,
        "period_seconds": r.period,
        "start": _iso(float(tvals[0])) if nt else None,
        "end": _iso(float(tvals[-1])) if nt else None,
        "resources": _resource_table(_resource_sums(r), v, reclaimed_t, r.period),
        "vm_table": vm_table,
    }
    return Analysis(result=_clean(result), data=d, period=r.period, tvals=tvals, tidx=r.tidx, series=series,
                    top=_top(v, plot_vms), table_vms=table_vms)
