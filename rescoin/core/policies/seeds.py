"""The two seed prototypes' memory coordinators, bug-fixed.

Both react to what a guest has available now (balloon target minus used);
neither predicts. Their vCPU balancers are in ``rescoin.core.placement``. They set
no CPU shares, disk weights or net caps: those stay at the hypervisor default.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rescoin.core.arrays import fillnan
from rescoin.core.model import Allocation
from rescoin.core.policies.base import PolicyInput, managed
from rescoin.core.resources import MEMORY, N_RES


def _memory_view(inp: PolicyInput) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    cur = fillnan(inp.obs.controls.balloon, 0.0)
    used = inp.used()[:, MEMORY]
    size = fillnan(inp.obs.vms.sizes[:, MEMORY], 0.0)
    host_free = float(inp.capacity[MEMORY] - cur.sum())
    return cur, used, size, host_free


def _blind(inp: PolicyInput) -> np.ndarray:
    """Guests whose used memory or balloon is unknown: the seeds read both, so they leave these alone.

    (Unknown used memory counted as zero would reclaim from them; rescoin's guard hid that.)
    """
    result: np.ndarray = np.isnan(inp.obs.usage[:, MEMORY]) | np.isnan(inp.obs.controls.balloon)
    return result


def _feed(target: np.ndarray, who: np.ndarray, amount: np.ndarray, size: np.ndarray, free: float) -> np.ndarray:
    """Give ``amount`` to the guests in ``who`` in order, up to their maximum, while the host has it."""
    grant = np.minimum(amount, np.maximum(size[who] - target[who], 0.0))
    before = np.cumsum(grant) - grant
    grant = np.clip(free - before, 0.0, grant)
    target = target.copy()
    target[who] += grant
    return target


@dataclass
class VmBalancerPolicy:
    """vm-balancer: reclaim half of what is usable above 256 MiB; feed guests under 128 MiB."""

    name: str = "vm-balancer"
    needs_truth: bool = False
    keep: float = 256.0
    starving: float = 128.0
    feed_per_second: float = 128.0  # the seed fed 128 MiB per second of its period

    def allocate(self, inp: PolicyInput) -> Allocation:
        alloc = np.full((inp.n, N_RES), np.nan)
        if managed(inp.capacity)[MEMORY]:
            cur, used, size, free = _memory_view(inp)
            usable = cur - used
            target = np.where(usable > self.keep, cur - (usable - self.keep) / 2.0, cur)
            free += float((cur - target).sum())
            hungry = np.flatnonzero(usable < self.starving)
            hungry = hungry[np.argsort(usable[hungry], kind="stable")]
            amount = np.full(hungry.size, self.feed_per_second * inp.period)
            alloc[:, MEMORY] = np.where(_blind(inp), np.nan, _feed(target, hungry, amount, size, free))
        return Allocation(amount=alloc, caps=np.zeros(N_RES, dtype=bool))


@dataclass
class KvmSchedulingPolicy:
    """kvmScheduling: starved (< 150 MiB available) guests take half of wasteful (> 300 MiB) ones'.

    With none wasteful a starved guest gets 300 MiB from the host; with none
    starved, wasteful guests return everything above 300 MiB to the host.
    """

    name: str = "kvmscheduling"
    needs_truth: bool = False
    starved_below: float = 150.0
    wasteful_above: float = 300.0

    def allocate(self, inp: PolicyInput) -> Allocation:
        alloc = np.full((inp.n, N_RES), np.nan)
        if managed(inp.capacity)[MEMORY]:
            cur, used, size, free = _memory_view(inp)
            avail = cur - used
            target = cur.copy()
            starved = np.flatnonzero(avail < self.starved_below)
            starved = starved[np.argsort(avail[starved], kind="stable")]
            wasteful = np.flatnonzero(avail > self.wasteful_above)
            wasteful = wasteful[np.argsort(-avail[wasteful], kind="stable")]
            if starved.size == 0:
                target[wasteful] -= avail[wasteful] - self.wasteful_above
            else:
                pairs = min(starved.size, wasteful.size)
                give = avail[wasteful[:pairs]] / 2.0
                target[wasteful[:pairs]] -= give
                target = _feed(target, starved[:pairs], give, size, np.inf)
                rest = starved[pairs:]
                target = _feed(target, rest, np.full(rest.size, self.wasteful_above), size, free)
            alloc[:, MEMORY] = np.where(_blind(inp), np.nan, target)
        return Allocation(amount=alloc, caps=np.zeros(N_RES, dtype=bool))
