"""The peers rescoin is measured against: none, static, DRF, oVirt MoM and the oracle.

Each is a faithful, bug-fixed model of what it stands for, run on the same
host as rescoin but with only the host's physical limits (the guard's
``"physical"`` profile; ``"<peer>+guard"`` runs one with rescoin's guard).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from rescoin.core.arrays import fillnan
from rescoin.core.guard import GuardConfig
from rescoin.core.model import Allocation
from rescoin.core.policies.base import PolicyInput, finish, managed, share_leftover
from rescoin.core.resources import CPU, MEMORY, N_RES, VIOLATION


@dataclass
class NonePolicy:
    """A host without any manager: nothing is set (libvirt defaults stay: shares 1024,
    balloon at maximum, blkio 500, no caps, no pins)."""

    name: str = "none"
    needs_truth: bool = False

    def allocate(self, inp: PolicyInput) -> Allocation:
        return Allocation(amount=np.full((inp.n, N_RES), np.nan), caps=np.zeros(N_RES, dtype=bool))


@dataclass
class StaticPolicy:
    """Fixed CPU shares and balloon targets: each VM's entitlement at first sight, never changed.

    What an operator writes once into each domain's XML. A VM seen for the
    first time (``age`` 0: also one that left and came back) is given its
    entitlement, but no more than the host memory the fixed targets of the
    others leave, so no target has to move (unless what is left is below the
    host's absolute floor: then the guard scales every target into host
    memory). Disk and net stay at the hypervisor defaults.
    """

    name: str = "static"
    needs_truth: bool = False
    fixed: dict[str, np.ndarray] = field(default_factory=dict)  # uuid -> (cpu, memory) fixed at first sight

    def allocate(self, inp: PolicyInput) -> Allocation:
        uuids = inp.obs.vms.uuids.tolist()
        ent = fillnan(inp.entitlement, 0.0)
        new = np.array([inp.obs.age[i] == 0 or u not in self.fixed for i, u in enumerate(uuids)], dtype=bool)
        old = np.array([self.fixed[u] if not new[i] else (0.0, 0.0) for i, u in enumerate(uuids)]).reshape(-1, 2)
        mem = ent[:, MEMORY].copy()
        if new.any() and np.isfinite(inp.capacity[MEMORY]):
            left = inp.capacity[MEMORY] - old[~new, 1].sum()
            want = mem[new]
            mem[new] = np.clip(left - (np.cumsum(want) - want), 0.0, want)  # newcomers in order, while it fits
        for i in np.flatnonzero(new):
            self.fixed[uuids[i]] = np.array([ent[i, CPU], mem[i]])
        values = np.array([self.fixed[u] for u in uuids]).reshape(-1, 2)
        alloc = np.full((inp.n, N_RES), np.nan)
        alloc[:, CPU], alloc[:, MEMORY] = values[:, 0], values[:, 1]
        return finish(alloc, inp.capacity)


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
            # MoM balloons only guests whose memory stats it reads (rescoin's guard used to hide this)
            blind = np.isnan(inp.obs.usage[:, MEMORY]) | np.isnan(inp.obs.controls.balloon)
            alloc[:, MEMORY] = np.where(blind, np.nan, np.where(small, cur, target))
        return Allocation(amount=alloc, caps=np.zeros(N_RES, dtype=bool))


def max_min_ratio(demand: np.ndarray, floor: np.ndarray, capacity: np.ndarray, got: np.ndarray | None = None,
                  wanted: np.ndarray | None = None, iters: int = 60) -> np.ndarray:
    """Per column: raise the lowest satisfaction ratio first, with floors, capped at demand.

    g_i = clip(mu * (wanted_i + d_i) - got_i, floor_i, d_i) for the largest mu
    whose sum fits capacity: with ``got``/``wanted`` (what each VM was granted
    and demanded so far) the ratio raised is the cumulative one the metrics
    score per VM; without them, this period's g/d. Floors above capacity are scaled into it.
    Bisection on mu, vectorised over VMs and columns.
    """
    d = np.maximum(demand, 0.0)
    f = np.minimum(np.maximum(floor, 0.0), d)
    g0 = np.zeros_like(d) if got is None else got
    w = d + (0.0 if wanted is None else wanted)
    cap = np.asarray(capacity, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):  # floors above capacity: scaled into it
        f = f * np.where(f.sum(axis=0) > cap, cap / f.sum(axis=0), 1.0)
    fits_all = d.sum(axis=0) <= cap
    lo, hi = np.zeros(d.shape[1]), np.ones(d.shape[1])
    for _ in range(iters):
        mid = (lo + hi) / 2.0
        ok = np.clip(mid * w - g0, f, d).sum(axis=0) <= cap
        lo, hi = np.where(ok, mid, lo), np.where(ok, hi, mid)
    g = np.where(fits_all, d, np.clip(lo * w - g0, f, d))
    # hand out what bisection left (a sliver) to the VMs still below demand, by shortfall
    left = np.maximum(capacity - g.sum(axis=0), 0.0) * ~fits_all
    short = np.maximum(d - g, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(short.sum(axis=0) > 0, np.minimum(1.0, left / short.sum(axis=0)), 0.0)
    result: np.ndarray = g + short * scale
    return result


def _worst_off_floor(ratio: np.ndarray, w: np.ndarray, g0: np.ndarray, f: np.ndarray,
                     fair: np.ndarray) -> np.ndarray:
    """The least grant per VM that keeps the 5th percentile of cumulative ratios at its max-min value.

    ``np.percentile`` interpolates between the order statistics at ranks
    lo = floor(0.05 (n - 1)) and lo + 1: the VM at rank lo keeps its max-min
    grant, every VM above it keeps a ratio of at least min(its own, the
    rank lo + 1 ratio), and the lo VMs below it (under the percentile, which
    does not see them) keep only their floor ``f``. Never above ``fair``.
    """
    keep = np.where(np.isnan(ratio), f, fair)
    idx = np.flatnonzero(~np.isnan(ratio))
    if idx.size < 2:
        return keep
    order = idx[np.argsort(ratio[idx], kind="stable")]
    lo = int(np.floor(0.05 * (idx.size - 1)))
    level = ratio[order[lo + 1]]
    above = order[lo + 1:]
    keep[above] = np.clip(np.minimum(ratio[above], level) * w[above] - g0[above], f[above], fair[above])
    keep[order[:lo]] = f[order[:lo]]
    return keep


def threshold_first(demand: np.ndarray, floor: np.ndarray, capacity: np.ndarray,
                    got: np.ndarray | None = None, wanted: np.ndarray | None = None,
                    fair: np.ndarray | None = None) -> np.ndarray:
    """Raise floors so that as many VMs as fit reach ``VIOLATION`` x demand, without lowering the worst-off.

    Where demand exceeds capacity, max-min alone spreads the shortfall over
    every VM and puts each one below the violation line: more violations
    than a policy that lets a few VMs fall short (``none`` beat the old
    oracle there). Worst-off is the 5th percentile ``t`` of cumulative ratios
    (got + grant) / (wanted + demand), so only ratios under ``t`` matter to
    it: each VM first keeps what holds its ratio at ``t`` (never more than
    its max-min grant, so it fits), which keeps the percentile at ``t`` or
    above; what that frees goes to the VMs nearest the line first (smallest
    extra need), the most VMs any allocation above those floors can bring
    there. The caller fills the rest by max-min on these floors. ``fair``:
    the max-min allocation on ``floor``, if the caller has it already.
    """
    d = np.maximum(demand, 0.0)
    f = np.minimum(np.maximum(floor, 0.0), d)
    cap = np.asarray(capacity, dtype=float)
    g0 = np.zeros_like(d) if got is None else got
    w = d + (0.0 if wanted is None else wanted)
    fair = max_min_ratio(d, f, cap, got, wanted) if fair is None else fair
    has = w > 0
    ws = np.where(has, w, 1.0)
    ratio = np.where(has, (g0 + fair) / ws, np.nan)
    out: np.ndarray = fair.copy()
    for r in range(d.shape[1]):
        if d[:, r].sum() <= cap[r] or not has[:, r].any() or not np.isfinite(cap[r]):
            continue
        keep = _worst_off_floor(ratio[:, r], ws[:, r], g0[:, r], f[:, r], fair[:, r])
        out[:, r] = _violation_prefix(keep, d[:, r], float(cap[r]) - keep.sum())
    return out


def _violation_prefix(keep: np.ndarray, d: np.ndarray, left: float) -> np.ndarray:
    """Bring the VMs nearest the violation line there first (smallest extra need), as many as ``left`` allows."""
    need = np.maximum(VIOLATION * d - keep, 0.0) * (1.0 + 1e-9)
    short = np.flatnonzero(need > 0.0)
    order = short[np.argsort(need[short], kind="stable")]
    fits = order[np.cumsum(need[order]) <= left]  # smallest first: the longest prefix that fits
    out = keep.copy()
    out[fits] += need[fits]
    return out


def _sacrifice_keep(w: np.ndarray, g0: np.ndarray, d: np.ndarray, f: np.ndarray, cap: float,
                    iters: int = 40) -> np.ndarray:
    """Floors that hold every VM but ``lo`` at the highest cumulative ratio t that fits (one resource).

    The 5th percentile does not see the lo = floor(0.05 (n - 1)) lowest VMs, so
    the shortfall is best put on lo VMs, the ones already below t first (they
    cannot reach it this period), then the dearest to hold; they keep only
    their floor. Concentrating it keeps the other VMs whole over the run, as
    a host with equal shares does by letting the same few big VMs fall short.
    """
    valid = w > 0
    n = int(valid.sum())
    lo_n = int(np.floor(0.05 * (n - 1))) if n > 1 else 0
    ws = np.where(valid, w, 1.0)
    reach = np.where(valid, (g0 + d) / ws, np.inf)

    def keep_at(t: float) -> np.ndarray | None:
        cost = np.where(valid, np.clip(t * ws - g0, f, d), 0.0)
        forced = reach < t - 1e-12
        extra = lo_n - int(forced.sum())
        if extra < 0:
            return None
        spare = np.where(valid & ~forced, cost - f, -np.inf)
        out = np.where(forced, f, cost)
        if extra > 0:
            pick = np.argpartition(-spare, extra - 1)[:extra]
            pick = pick[np.isfinite(spare[pick])]
            out[pick] = f[pick]
        return out if out.sum() <= cap else None

    lo, hi = 0.0, 1.0
    best = keep_at(0.0)
    if best is None:
        return f.copy()
    top = keep_at(1.0)
    if top is not None:
        return top
    for _ in range(iters):
        mid = (lo + hi) / 2.0
        got = keep_at(mid)
        if got is None:
            hi = mid
        else:
            lo, best = mid, got
    return best


def sacrifice_first(demand: np.ndarray, floor: np.ndarray, capacity: np.ndarray,
                    got: np.ndarray | None = None, wanted: np.ndarray | None = None) -> np.ndarray:
    """Floors per resource: ``_sacrifice_keep``, then the violation line for as many VMs as fit."""
    d = np.maximum(demand, 0.0)
    f = np.minimum(np.maximum(floor, 0.0), d)
    cap = np.asarray(capacity, dtype=float)
    g0 = np.zeros_like(d) if got is None else got
    w = d + (0.0 if wanted is None else wanted)
    out: np.ndarray = f.copy()
    for r in range(d.shape[1]):
        if d[:, r].sum() <= cap[r] or not (w[:, r] > 0).any() or not np.isfinite(cap[r]):
            continue
        keep = _sacrifice_keep(w[:, r], g0[:, r], d[:, r], f[:, r], float(cap[r]))
        out[:, r] = _violation_prefix(keep, d[:, r], float(cap[r]) - keep.sum())
    return out


#: a rise of the 5th percentile worth one more violation this period (one VM-period of the run's)
PCT_GAIN = 1e-5


def _score(x: np.ndarray, d: np.ndarray, got: np.ndarray, w: np.ndarray) -> tuple[float, int]:
    """One resource: 5th percentile of cumulative ratios after grant ``x``, and violations this period."""
    valid = w > 0
    ratio = (got[valid] + x[valid]) / w[valid]
    return float(np.percentile(ratio, 5)), int((x < VIOLATION * d - 1e-9).sum())


def _better(a: np.ndarray, b: np.ndarray, d: np.ndarray, got: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Per resource, ``b`` where it has at least ``a``'s 5th-percentile cumulative ratio and no more
    violations this period (or a percentile higher by ``PCT_GAIN`` for one more violation), else ``a``:
    the two scores the metrics keep, judged on what is known now."""
    w = d + wanted
    out = a.copy()
    for r in range(d.shape[1]):
        if not (w[:, r] > 0).any():
            continue
        pa, va = _score(a[:, r], d[:, r], got[:, r], w[:, r])
        pb, vb = _score(b[:, r], d[:, r], got[:, r], w[:, r])
        if (pb >= pa - 1e-12 and vb <= va) or (pb > pa + PCT_GAIN and vb <= va + 1):
            out[:, r] = b[:, r]
    return out


@dataclass
class OraclePolicy:
    """Knows the true demand of the period its allocation applies to; the upper bound.

    Per resource, what the metrics score: every VM first gets min(demand,
    entitlement) (no sharing-incentive breach). Then two candidates: one
    spreads the shortfall (as many VMs as fit reach the violation line while
    the worst-off so far holds, ``threshold_first``), one concentrates it on
    the few VMs the 5th percentile does not see (``sacrifice_first``, as an
    equal-shares host does by letting the same big VMs fall short); in each
    the rest of capacity raises the lowest ratio granted/demand first (each
    VM's ratio over the run so far, as worst-off scores it), capped at
    demand. The second is taken where it scores at least as well on this
    period's percentile and violations (``_better``). What no VM demands is
    shared by entitlement up to each VM's size (so memory targets never
    bind, and sum to at most host memory). It runs with the physical guard
    and no reclaim latency; under CPU contention its allocation is also the
    quota, so the host grants it exactly (shares are whole numbers).
    """

    name: str = "oracle"
    needs_truth: bool = True
    mem_floor_mib: float = GuardConfig.mem_floor_mib  # the guard's absolute floor of any balloon target
    _totals: dict[str, np.ndarray] = field(default_factory=dict)  # uuid -> (granted, demanded) so far

    def _so_far(self, inp: PolicyInput) -> tuple[np.ndarray, np.ndarray]:
        """Add this period's grants and true demand to each VM's totals; return (granted, demanded)."""
        obs = inp.obs
        uuids = obs.vms.uuids.tolist()
        d = np.maximum(fillnan(obs.truth, 0.0), 0.0) if obs.truth is not None else np.zeros((obs.n, N_RES))
        g = np.minimum(fillnan(obs.usage, 0.0), d)
        for i, u in enumerate(uuids):
            if obs.age[i] == 0 or u not in self._totals:  # a VM that comes back is new
                self._totals[u] = np.zeros((2, N_RES))
            self._totals[u] += (g[i], d[i])
        both = np.array([self._totals[u] for u in uuids]).reshape(obs.n, 2, N_RES)
        return both[:, 0], both[:, 1]

    def allocate(self, inp: PolicyInput) -> Allocation:
        truth = inp.obs.truth_next if inp.obs.truth_next is not None else inp.obs.truth
        if truth is None:
            raise ValueError("the oracle policy needs a simulated host (it reads true demand)")
        cap = fillnan(inp.capacity, 0.0)
        tc = fillnan(inp.entitlement, 0.0)
        limit = fillnan(inp.obs.vms.sizes, np.inf)
        demand = np.minimum(np.maximum(fillnan(truth, 0.0), 0.0), limit)
        floor = np.minimum(demand, tc)
        # a balloon target never goes below the host's floor: plan memory with it, not be cut by it
        low = np.minimum(np.maximum(self.mem_floor_mib, fillnan(inp.obs.vms.min_memory, 0.0)),
                         limit[:, MEMORY])
        floor[:, MEMORY] = np.maximum(floor[:, MEMORY], low)
        demand[:, MEMORY] = np.maximum(demand[:, MEMORY], low)
        got, wanted = self._so_far(inp)
        fair = max_min_ratio(demand, floor, cap, got, wanted)
        spread = max_min_ratio(demand, threshold_first(demand, floor, cap, got, wanted, fair), cap, got, wanted)
        held = max_min_ratio(demand, sacrifice_first(demand, floor, cap, got, wanted), cap, got, wanted)
        fair = _better(spread, held, demand, got, wanted)
        # under CPU contention the grants are also caps: shares are whole numbers (1024 a core), and
        # a VM of 0.01 cores rounded to 10 of them would be granted a little off its grant
        caps = np.zeros(N_RES, dtype=bool)
        caps[CPU] = bool(demand[:, CPU].sum() > cap[CPU] > 0)
        return finish(share_leftover(fair, cap, tc, inp.obs.vms.sizes), inp.capacity, caps)
