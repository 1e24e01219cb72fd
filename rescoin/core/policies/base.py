"""The Policy interface and what every policy shares.

A policy is a pure function of a snapshot (forecast, history, capacity,
entitlements) to an ``Allocation``. It never talks to a hypervisor; the
guard turns its allocation into actions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from rescoin.core.arrays import fillnan
from rescoin.core.history import History
from rescoin.core.model import Allocation, Forecast, Observation
from rescoin.core.resources import CPU, N_RES
from rescoin.core.sharing import water_fill_columns


@dataclass(frozen=True)
class PolicyInput:
    obs: Observation
    forecast: Forecast | None  # None for policies that need no forecast
    history: History
    capacity: np.ndarray  # (N_RES,) after the host reserve; NaN = resource not managed
    entitlement: np.ndarray  # (n, N_RES)
    period: float  # seconds between control steps

    @property
    def n(self) -> int:
        return self.obs.n

    def estimate(self) -> np.ndarray:
        """Forecast to plan on; where unknown, the entitlement (a cautious guess)."""
        if self.forecast is None:
            return self.entitlement.copy()
        est = np.where(np.isnan(self.forecast.value), self.entitlement, self.forecast.value)
        # a VM can never use more cores than it has vCPUs, whatever the correction says
        est[:, CPU] = np.minimum(est[:, CPU], fillnan(self.obs.vms.sizes[:, CPU], np.inf))
        return est

    def used(self) -> np.ndarray:
        """Latest observed usage; unknown counts as zero."""
        return fillnan(self.obs.usage, 0.0)


class Policy(Protocol):
    """Its predictor and placement are wired by ``rescoin.core.registry``."""

    name: str
    needs_truth: bool  # only such a policy (the oracle) is shown the true demand; the loop enforces it

    def allocate(self, inp: PolicyInput) -> Allocation: ...


def entitlement(sizes: np.ndarray, weight: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """Configured size times weight, scaled down where the sum exceeds capacity."""
    want = fillnan(sizes, 0.0) * weight[:, None]
    total = want.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(total > capacity, capacity / total, 1.0)
    ent: np.ndarray = want * fillnan(scale, 0.0)
    ent[:, np.isnan(capacity)] = np.nan
    return ent


def managed(capacity: np.ndarray) -> np.ndarray:
    """Resources with a known capacity (a CPU-only trace manages only CPU)."""
    result: np.ndarray = ~np.isnan(capacity)
    return result


def share_leftover(alloc: np.ndarray, capacity: np.ndarray, weight: np.ndarray,
                   limit: np.ndarray | None = None) -> np.ndarray:
    """Hand what is left of each resource to the VMs in proportion to ``weight``.

    With ``limit`` (per VM and resource, NaN = none) no VM is given more than
    it could use (its vCPUs, its maximum memory); the rest goes to the others.
    """
    left = np.maximum(capacity - alloc.sum(axis=0), 0.0)
    if limit is None:
        room = np.full_like(alloc, np.inf)
    else:
        room = np.maximum(np.where(np.isnan(limit), np.inf, limit) - alloc, 0.0)
    w = np.where(weight.sum(axis=0) > 0, weight, 1.0)
    finite = np.where(np.isinf(room), left[None, :] + 1.0, room)  # water_fill needs finite demand
    result: np.ndarray = alloc + water_fill_columns(finite, w, left)
    return result


def top_up(alloc: np.ndarray, capacity: np.ndarray, entitlement: np.ndarray,
           limit: np.ndarray | None = None, share: float = 1.0) -> np.ndarray:
    """Share what is left: first toward each VM's entitlement, then by entitlement.

    Filling toward entitlements first means the memory a VM is given beyond its
    entitlement comes a little from every other VM's, not mostly from the
    smallest users: each keeps close to its entitlement, ready for a jump in demand.
    """
    left = np.maximum(capacity - alloc.sum(axis=0), 0.0)
    below = np.maximum(share * entitlement - alloc, 0.0)
    alloc = alloc + water_fill_columns(below, np.maximum(entitlement, 1e-12), left)
    return share_leftover(alloc, capacity, entitlement, limit)


def fit_to_capacity(alloc: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """Scale columns down where they exceed capacity; never negative."""
    alloc = np.maximum(fillnan(alloc, 0.0), 0.0)
    total = alloc.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(total > capacity, capacity / total, 1.0)
    result: np.ndarray = alloc * fillnan(scale, 0.0)
    return result


def finish(alloc: np.ndarray, capacity: np.ndarray, caps: np.ndarray | None = None) -> Allocation:
    """Common exit: unmanaged resources become NaN (left alone by the guard)."""
    out = alloc.astype(float, copy=True)
    out[:, ~managed(capacity)] = np.nan
    return Allocation(amount=out, caps=np.zeros(N_RES, dtype=bool) if caps is None else caps)


