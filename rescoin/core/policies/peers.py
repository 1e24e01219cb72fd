"""The peers rescoin is measured against: static, DRF, oVirt MoM and the oracle.

Each is a faithful, bug-fixed model of what it stands for, run through the
same guard and host as rescoin.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rescoin.core.arrays import fillnan
from rescoin.core.model import Allocation
from rescoin.core.policies.base import PolicyInput, finish, managed, share_leftover
from rescoin.core.resources import CPU, MEMORY, N_RES
from rescoin.core.sharing import water_fill_columns


@dataclass
class StaticPolicy:
    """A host without rescoin: every VM gets its entitlement, never changed."""

    name: str = "static"
    needs_truth: bool = False

    def allocate(self, inp: PolicyInput) -> Allocation:
        return finish(fillnan(inp.entitlement, 0.0), inp.capacity)


def drf_fill(demand: np.ndarray, weight: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """Weighted Dominant Resource Fairness by progressive filling, capped at demand.

    Every VM gets the same fraction ``t_i`` of its whole demand vector; the
    weighted dominant shares ``t_i * D_i / w_i`` rise together until a resource
    runs out (its users freeze) or a VM's demand is met.
    """
    n, k = demand.shape
    d = np.maximum(fillnan(demand, 0.0), 0.0)
    cap = fillnan(capacity, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(cap > 0, d / cap, np.where(d > 0, np.inf, 0.0))
    dom = share.max(axis=1)  # dominant share of each VM's full demand
    blocked = np.isinf(dom)  # needs a resource the host has none of: gets nothing
    dom = np.where(blocked, 0.0, dom)
    d = np.where(blocked[:, None], 0.0, d)
    w = np.maximum(weight, 1e-12)
    t = np.zeros(n)
    active = dom > 0
    t[~active] = 1.0
    for _ in range(k + n + 1):
        if not active.any():
            break
        used = (t[:, None] * d).sum(axis=0)
        left = np.maximum(cap - used, 0.0)
        # growth rate of each resource per unit rise of the level lambda
        rate = (np.where(active, w / np.where(dom > 0, dom, 1.0), 0.0)[:, None] * d).sum(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            step_res = np.where(rate > 0, left / rate, np.inf)
        # level rise that completes some active VM's demand
        step_vm = np.where(active, (1.0 - t) * dom / w, np.inf).min()
        step = min(step_res.min(), step_vm)
        t = np.where(active, np.minimum(1.0, t + step * w / np.where(dom > 0, dom, 1.0)), t)
        saturated = step_res <= step * (1 + 1e-9)
        frozen = (t >= 1.0 - 1e-12) | ((d[:, saturated] > 0).any(axis=1) if saturated.any() else False)
        active &= ~frozen
    return t[:, None] * d


@dataclass
class DRFPolicy:
    """Weighted DRF on the forecasts; weights are the VMs' configured weights."""

    name: str = "drf"
    needs_truth: bool = False

    def allocate(self, inp: PolicyInput) -> Allocation:
        cap = inp.capacity
        live = managed(cap)
        alloc = np.zeros_like(inp.entitlement)
        alloc[:, live] = drf_fill(inp.estimate()[:, live], inp.obs.vms.weight, cap[live])
        return finish(alloc, cap)


@dataclass
class MomPolicy:
    """oVirt MoM's default balloon rules, CPU by equal shares.

    Host free memory under 20%: shrink each guest by at most 5% toward its
    used memory plus a 20% free reserve; otherwise grow each by 5%. Changes
    under 0.25% are skipped. Disk and net are left at the hypervisor default.
    """

    name: str = "mom"
    needs_truth: bool = False
    pressure_threshold: float = 0.20
    guest_free: float = 0.20
    max_change: float = 0.05
    min_change: float = 0.0025

    def allocate(self, inp: PolicyInput) -> Allocation:
        cap = inp.capacity
        alloc = np.full((inp.n, N_RES), np.nan)
        if managed(cap)[CPU]:
            alloc[:, CPU] = cap[CPU] / max(inp.n, 1)
        if managed(cap)[MEMORY]:
            cur = fillnan(inp.obs.controls.balloon, 0.0)
            size = fillnan(inp.obs.vms.sizes[:, MEMORY], 0.0)
            used = inp.used()[:, MEMORY]
            host_free = 1.0 - cur.sum() / cap[MEMORY] if cap[MEMORY] > 0 else 0.0
            if host_free < self.pressure_threshold:
                floor = used / (1.0 - self.guest_free)
                target = np.maximum(floor, cur * (1.0 - self.max_change))
                target = np.minimum(target, cur)  # shrinking never grows a guest
            else:
                target = np.minimum(size, cur * (1.0 + self.max_change))
            small = np.abs(target - cur) < self.min_change * cur
            alloc[:, MEMORY] = np.where(small, cur, target)
        return Allocation(amount=alloc, caps=np.zeros(N_RES, dtype=bool))


@dataclass
class OraclePolicy:
    """Knows this period's true demand; weighted max-min by entitlement.

    The upper limit: nothing can grant more with the same capacity. What no
    VM demands is shared by entitlement so targets set ahead never bind.
    """

    name: str = "oracle"
    needs_truth: bool = True

    def allocate(self, inp: PolicyInput) -> Allocation:
        truth = inp.obs.truth_next if inp.obs.truth_next is not None else inp.obs.truth
        if truth is None:
            raise ValueError("the oracle policy needs a simulated host (it reads true demand)")
        cap = fillnan(inp.capacity, 0.0)
        tc = fillnan(inp.entitlement, 0.0)
        demand = np.maximum(fillnan(truth, 0.0), 0.0)
        fair = water_fill_columns(demand, tc, cap)
        return finish(share_leftover(fair, cap, tc, inp.obs.vms.sizes), inp.capacity)
