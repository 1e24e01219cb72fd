"""Shared helpers for the unit tests.

Everything is exposed through the session-scoped ``kit`` fixture (a plain
namespace of functions), so hypothesis tests can use it without tripping the
function-scoped-fixture health check.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from rescoin.core.history import History
from rescoin.core.model import Controls, Observation, VMSet
from rescoin.core.policies import PolicyInput, entitlement
from rescoin.core.predict import make_predictor
from rescoin.core.resources import CPU, MEMORY, N_RES, HostCapacity
from rescoin.offline.traces import Trace


def make_trace(demand, sizes, name: str = "syn", start: float = 0.0, period: float = 300.0) -> Trace:
    """A Trace from arrays.

    ``demand`` is ``(periods, vms, N_RES)``, or ``(periods, vms)`` for a CPU-only
    trace (other resources NaN). ``sizes`` is ``(vms, N_RES)`` or ``(vms,)`` (vCPUs
    only, the rest NaN).
    """
    demand = np.asarray(demand, dtype=float)
    if demand.ndim == 2:
        full = np.full(demand.shape + (N_RES,), np.nan)
        full[:, :, CPU] = demand
        demand = full
    sizes = np.asarray(sizes, dtype=float)
    if sizes.ndim == 1:
        full = np.full((sizes.shape[0], N_RES), np.nan)
        full[:, CPU] = sizes
        sizes = full
    n = demand.shape[1]
    return Trace(name, "synthetic", [f"v{i}" for i in range(n)], float(start), float(period),
                 demand, sizes, [])


def make_vms(n: int, sizes=None, uuids=None, min_memory=None, weight=None) -> VMSet:
    if uuids is None:
        uuids = [f"uuid-{i}" for i in range(n)]
    if sizes is None:
        sizes = np.tile([2.0, 2048.0, 1000.0, 1000.0], (n, 1))
    return VMSet.build(uuids, [f"name-{u}" for u in uuids], np.asarray(sizes, dtype=float).reshape(n, N_RES),
                       min_memory=min_memory, weight=weight)


def make_obs(vms: VMSet, usage, capacity, *, signal=None, pcpus=None, controls=None, age=None,
             ts: float = 0.0, interval: float = 300.0, truth=None, truth_next=None) -> Observation:
    n = vms.n
    capacity = np.asarray(capacity, dtype=float)
    if pcpus is None:
        pcpus = max(1, int(round(np.nan_to_num(capacity[CPU], nan=1.0))))
    usage = np.asarray(usage, dtype=float).reshape(n, N_RES)
    signal = np.zeros((n, N_RES)) if signal is None else np.asarray(signal, dtype=float).reshape(n, N_RES)
    return Observation(
        ts=ts,
        interval=interval,
        host=HostCapacity("test-host", capacity, pcpus),
        vms=vms,
        usage=usage,
        signal=signal,
        controls=Controls.defaults(vms) if controls is None else controls,
        age=np.full(n, 5, dtype=np.intp) if age is None else np.asarray(age, dtype=np.intp),
        truth=truth,
        truth_next=truth_next,
    )


def make_input(vms: VMSet, usages, capacity, *, signals=None, predictor="default", truth_next=None,
               balloon=None, pcpus=None, period: float = 300.0, history: History | None = None,
               pins=None, pin_width: int = 1) -> PolicyInput:
    """Push ``usages`` (one ``(n, N_RES)`` array per period) through a real History
    the way the control loop does, and return the PolicyInput of the last period."""
    capacity = np.asarray(capacity, dtype=float)
    pred = make_predictor(predictor) if isinstance(predictor, str) else predictor
    h = history if history is not None else History(window=20)
    inp = None
    for t, u in enumerate(usages):
        ctl = Controls.defaults(vms)
        if balloon is not None:
            ctl.balloon = np.asarray(balloon, dtype=float).copy()
        if pins is not None:
            ctl.pins = np.asarray(pins, dtype=np.intp).copy()
            ctl.pin_width = pin_width
        sig = None if signals is None else signals[t]
        last = t == len(usages) - 1
        obs = make_obs(vms, u, capacity, signal=sig, pcpus=pcpus, controls=ctl, ts=t * period,
                       interval=period, truth=np.asarray(u, dtype=float),
                       truth_next=truth_next if last and truth_next is not None else np.asarray(u, dtype=float))
        h.push(obs)
        ent = entitlement(vms.sizes, vms.weight, capacity)
        fc = pred.predict(h) if pred is not None else None
        inp = PolicyInput(obs=obs, forecast=fc, history=h, capacity=capacity, entitlement=ent, period=period)
        if not last:
            h.decide(forecast=fc.value if fc is not None else np.full_like(ent, np.nan),
                     allocation=ent, entitlement=ent)
    return inp


@pytest.fixture(scope="session")
def kit() -> SimpleNamespace:
    return SimpleNamespace(trace=make_trace, vms=make_vms, obs=make_obs, input=make_input,
                           CPU=CPU, MEMORY=MEMORY, N_RES=N_RES)
