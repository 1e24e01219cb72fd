"""rescoin: fair shares with multi-resource credits ("resource coins").

A VM that leaves its entitlement unused earns coins; one that uses more than
its share spends them. Under contention every VM first gets
``min(forecast, entitlement)`` (the sharing incentive), and the excess goes to
the VMs that want more, weighted by their entitlement plus what they saved
(``credits="saved"``, the default: per resource, the mean entitlement left
unused over the credit window, as Karma credits donated share). What nobody
asked for is shared in proportion to entitlement, so the host is never left idle.

The ResCoin prototype's weighting, by positive combined coins alone
(``credits="coins"``), gives a VM without coins none of the excess; on the
tuning part at CPU 6:1 (weights 1,2,4) it had more CPU violations and a lower
weighted worst-off than no credits at all, where "saved" had the highest
weighted worst-off of the three on every contended slice.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from rescoin.core.arrays import fillnan
from rescoin.core.model import Allocation
from rescoin.core.policies.base import PolicyInput, finish, fit_to_capacity, managed, top_up
from rescoin.core.resources import DISK, N_RES, NET
from rescoin.core.sharing import water_fill_columns

CREDIT_MODES = ("saved", "coins", "off")


def credits(inp: PolicyInput, k: int) -> np.ndarray:
    """Per VM and resource: sum over the last k periods of (entitlement - usage) / capacity.

    A VM that migrated here brought its ledger (mean unused entitlement per period
    on its source): it stands in for the periods of the window this host has not
    seen yet, so the credits travel with the VM and fade into its own history here.
    """
    h = inp.history
    ent = h.last("entitlement", k)
    used = h.last("usage", k)
    with np.errstate(invalid="ignore", divide="ignore"):
        unused = np.nansum(ent - used, axis=0)
        carried = h.carried()
        if carried is not None and carried.any():
            unseen = np.maximum(k - np.minimum(h.age, k), 0)
            unused = unused + carried * unseen[:, None]
        ac = unused / inp.capacity
    return np.where(np.isfinite(ac), ac, 0.0)


def ledger(ac: np.ndarray, capacity: np.ndarray, k: int) -> np.ndarray:
    """What travels with a VM: its credits as mean unused entitlement per period, in resource units."""
    out: np.ndarray = ac * fillnan(capacity, 0.0) / k
    return out


def combined_credit(ac: np.ndarray, norm: float) -> np.ndarray:
    """One signed number per VM: the p-norm of earned coins minus that of spent ones."""
    pos = np.linalg.norm(np.maximum(ac, 0.0), ord=norm, axis=1)
    neg = np.linalg.norm(np.maximum(-ac, 0.0), ord=norm, axis=1)
    result: np.ndarray = pos - neg
    return result


@dataclass
class RescoinPolicy:
    name: str = "rescoin"
    needs_truth: bool = False
    window: int = 10  # k: credit window in periods
    norm: float = 1.0  # how resources combine into one credit
    keep_entitled: float = 1.0  # what is left goes first toward this share of each VM's entitlement
    cap_disk: bool = False  # optionally cap disk throughput too (setBlockIoTune), under contention
    cap_net: bool = True  # net is scheduled as a capped resource ...
    cap_above: float = 0.8  # ... once forecast net demand passes this share of the link ...
    starved: float = 0.05  # ... and some VM below its entitlement shows this much unmet demand
    credits: str = "saved"  # how the excess is weighted: "saved", "coins" (the prototype's) or "off" (entitlement)

    def __post_init__(self) -> None:
        if self.credits not in CREDIT_MODES:
            raise ValueError(f"credits must be one of {', '.join(CREDIT_MODES)}, got {self.credits!r}")

    def allocate(self, inp: PolicyInput) -> Allocation:
        cap = inp.capacity
        tc = fillnan(inp.entitlement, 0.0)
        est = np.maximum(fillnan(inp.estimate(), 0.0), 0.0)
        base = np.minimum(est, tc)
        excess = est - base
        ac = credits(inp, self.window)
        combined = combined_credit(ac, self.norm)
        if self.credits == "saved":
            weight = tc + np.maximum(ac, 0.0) * fillnan(cap, 0.0) / self.window
        elif self.credits == "coins":
            weight = np.broadcast_to(np.maximum(combined, 0.0)[:, None], est.shape).copy()
        else:
            weight = tc.copy()
        # with no coins anywhere, weight the excess by entitlement instead
        no_coins = weight.sum(axis=0) <= 0
        weight[:, no_coins] = tc[:, no_coins]
        room = np.maximum(fillnan(cap, 0.0) - base.sum(axis=0), 0.0)
        extra = water_fill_columns(excess, weight, room)
        alloc = top_up(base + extra, fillnan(cap, 0.0), tc, inp.obs.vms.sizes, self.keep_entitled)
        # Caps are not work-conserving: a capped VM cannot burst into bandwidth others
        # leave idle. So cap only when the link is forecast to be contended *and* some
        # VM is seen short while below its entitlement, i.e. someone needs protecting.
        contended = est.sum(axis=0) > self.cap_above * fillnan(cap, 0.0)
        caps = np.zeros(N_RES, dtype=bool)
        caps[NET] = self.cap_net and contended[NET] and self.starved_below_entitlement(inp, NET)
        caps[DISK] = self.cap_disk and contended[DISK] and self.starved_below_entitlement(inp, DISK)
        caps &= managed(cap)
        return replace(finish(alloc, cap, caps), diagnostics={"credit": ac, "combined_credit": combined,
                                                              "ledger": ledger(ac, cap, self.window)})

    def starved_below_entitlement(self, inp: PolicyInput, r: int) -> bool:
        """Does any VM using less than its entitlement of ``r`` show unmet demand?"""
        signal = fillnan(inp.obs.signal[:, r], 0.0)
        below = inp.used()[:, r] < 0.95 * fillnan(inp.entitlement[:, r], 0.0)
        return bool(np.any((signal > self.starved) & below))


@dataclass
class RescoinPaperPolicy:
    """The ResCoin prototype's formula as published, with only its crashes fixed.

    No contention: allocate the forecast. Contention: ``min(est, tc) + wr * C_e``
    with ``wr = ac / sum(ac)`` per resource. The fixes: negative credit weights
    count as zero, an all-zero credit vector falls back to equal weights, and
    the sum is scaled to capacity.
    """

    name: str = "rescoin-paper"
    needs_truth: bool = False
    window: int = 10

    def allocate(self, inp: PolicyInput) -> Allocation:
        cap = fillnan(inp.capacity, 0.0)
        tc = fillnan(inp.entitlement, 0.0)
        est = np.maximum(fillnan(inp.estimate(), 0.0), 0.0)
        contention = (est.sum(axis=0) > cap) | (est > tc).any(axis=0)
        raw = credits(inp, self.window)
        ac = np.maximum(raw, 0.0)
        total = ac.sum(axis=0)
        n = max(inp.n, 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            wr = np.where(total > 0, ac / total, 1.0 / n)
        base = np.minimum(est, tc)
        c_e = np.maximum(cap - base.sum(axis=0), 0.0)
        alloc = np.where(contention, base + wr * c_e, est)
        out = finish(fit_to_capacity(alloc, cap), inp.capacity)
        # the paper weighs each resource by its own credit; the combined one is reported with norm 1
        return replace(out, diagnostics={"credit": raw, "combined_credit": combined_credit(raw, 1.0)})
