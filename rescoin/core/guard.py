"""The guard: the only place an allocation becomes actions (its rules: README, "How rescoin decides").

Policies propose; the guard enforces what must never happen: balloon targets
below a guest's used memory plus a reserve, below its configured minimum or
an absolute floor, above its maximum; the sum of targets above host memory;
memory moving faster than a step limit (except growth for a starving guest);
changes smaller than a dead-band; reclaiming from a VM that just appeared;
a CPU weight (shares) or a net/disk cap below the VM's entitlement.

Memory figures a host cannot corroborate (``Observation.confirmed`` false: a
guest agent's claim) protect what the VM has but never raise its floor, and
never earn the fast growth of a starving guest. A per-VM memory limit caps
what a policy proposes; the floors, the first-sight rule and the step limit
still apply, and where the floor is above the limit the floor wins.

Two profiles, one class. ``"rescoin"`` is all of the above: rescoin's own
protections. ``"physical"`` is only what a host enforces by itself, so the
peers are measured as their real counterparts behave: balloon targets within
[max(absolute floor, configured minimum), the VM's maximum], their sum within
host memory (what exceeds is scaled down above the floors), shares within the
kernel's 2..262144 and blkio within 10..1000; no entitlement floors, no step
limits, no dead-bands (a value changes when it differs: a balloon by more
than half a MiB, a weight or cap at all after rounding).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from rescoin.core import kinds
from rescoin.core.arrays import fillnan
from rescoin.core.model import Allocation, Controls, Observation, Plan
from rescoin.core.options import opt
from rescoin.core.resources import CPU, DISK, MEMORY, NET

SHARES_MIN, SHARES_MAX = 2.0, 262144.0
BLKIO_MIN, BLKIO_MAX = 10.0, 1000.0


@dataclass(frozen=True)
class GuardConfig:
    mem_floor_mib: float = opt(256.0, "absolute floor of any balloon target", "MiB")
    mem_reserve_mib: float = opt(128.0, "headroom kept above a guest's used memory, at least", "MiB")
    mem_reserve_frac: float = opt(0.10, "... or this share of its used memory")
    mem_step_frac: float = opt(0.10, "largest shrink per period, share of max memory")
    mem_grow_step_frac: float = opt(0.25, "largest growth above the entitlement per period (starving guests exempt)")
    mem_deadband_frac: float = opt(0.05, "skip shrinks smaller than this share of max memory")
    mem_deadband_mib: float = opt(64.0, "... or this many MiB", "MiB")
    mem_grow_deadband_frac: float = opt(0.01, "skip growth smaller than this share of max memory")
    starving_signal: float = opt(0.01, "memory pressure above this means a guest is starving")
    starving_used: float = opt(0.95, "or used memory at this share of its balloon target")
    weight_deadband: float = opt(0.10, "relative change below which shares, blkio weights and caps stay")
    net_min_kibs: float = opt(64.0, "a net cap never goes below this", "KiB/s")

    def check(self) -> None:
        for name, value in self.__dict__.items():
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"guard.{name} = {value!r}: must be a finite number >= 0")
        for name in ("mem_step_frac", "mem_grow_step_frac", "mem_deadband_frac", "mem_grow_deadband_frac",
                     "mem_reserve_frac", "starving_used"):
            if getattr(self, name) > 1:
                raise ValueError(f"guard.{name} = {getattr(self, name)}: must be a fraction in [0, 1]")


def blkio_weights(disk: np.ndarray) -> np.ndarray:
    """blkio weights proportional to the disk allocation, within the kernel's 10..1000.

    The scale is the largest allocation rounded up to a power of two, so it
    moves (and rewrites every weight) only when the largest VM doubles or halves.
    """
    finite = disk[np.isfinite(disk)]
    top = float(finite.max()) if finite.size else np.nan
    if not top > 0:
        return np.full_like(disk, np.nan)
    # the exponent is capped where a float can hold the power (an absurd size would overflow it)
    scale = 2.0 ** min(float(np.ceil(np.log2(top))), 1023.0)
    with np.errstate(over="ignore"):  # a huge negative size divides to -inf, which the clip makes 10
        result: np.ndarray = np.clip(np.round(disk / scale * BLKIO_MAX), BLKIO_MIN, BLKIO_MAX)
    return result


def _relative_change(new: np.ndarray, cur: np.ndarray, band: float) -> np.ndarray:
    """Where a weight or cap should be rewritten: NaN-ness changed, or moved beyond the band."""
    both = ~np.isnan(new) & ~np.isnan(cur)
    with np.errstate(divide="ignore", invalid="ignore"):
        moved = np.abs(new - cur) > band * np.maximum(np.abs(cur), 1e-9)
    result: np.ndarray = np.where(both, moved, np.isnan(new) != np.isnan(cur))
    return result


PROFILES = ("rescoin", "physical")


class Guard:
    def __init__(self, config: GuardConfig | None = None, profile: str = "rescoin") -> None:
        if profile not in PROFILES:
            raise ValueError(f"unknown guard profile {profile!r}; choose from {', '.join(PROFILES)}")
        self.profile = profile
        self.config = config or GuardConfig()
        self.config.check()
        self.warnings: list[str] = []
        self._warned: dict[str, set[str]] = {}  # kind -> keys whose warning was given and still holds

    def _once(self, kind: str, now: dict[str, str]) -> None:
        """Warn for each key of ``kind`` when its condition starts, not every period while it lasts."""
        before = self._warned.get(kind, set())
        self.warnings += [msg for key, msg in now.items() if key not in before]
        self._warned[kind] = set(now)

    @staticmethod
    def _memory_max(obs: Observation) -> np.ndarray:
        """The most memory a VM can hold (its own maximum), even above a per-VM limit."""
        size = obs.vms.sizes[:, MEMORY]
        top = size if obs.vms.balloon_max is None else np.where(np.isnan(obs.vms.balloon_max), size,
                                                                 obs.vms.balloon_max)
        return fillnan(top, np.inf)

    def memory_floor(self, obs: Observation) -> np.ndarray:
        c = self.config
        used = obs.usage[:, MEMORY]
        cur = fillnan(obs.controls.balloon, 0.0)
        reserve = np.maximum(c.mem_reserve_mib, c.mem_reserve_frac * used)
        # unknown usage (no agent, no balloon stats): never reclaim below what the guest has now
        need = np.where(np.isnan(used), cur, used + reserve)
        if obs.confirmed is not None:  # a claim the host cannot back protects, but cannot raise, the floor
            need = np.where(obs.confirmed, need, np.minimum(need, cur))
        floor = np.maximum.reduce([np.full_like(cur, c.mem_floor_mib), obs.vms.min_memory, need])
        result: np.ndarray = np.minimum(floor, self._memory_max(obs))
        return result

    def _balloon(self, want: np.ndarray, obs: Observation, capacity: float, entitled: np.ndarray) -> np.ndarray:
        c = self.config
        size = self._memory_max(obs)
        limit = fillnan(obs.vms.sizes[:, MEMORY], np.inf)  # a per-VM limit, else the same as size
        cur = np.where(np.isnan(obs.controls.balloon), size, obs.controls.balloon)
        want = np.minimum(np.where(np.isnan(want), cur, want), limit)
        floor = self.memory_floor(obs)
        ceiling = np.maximum(limit, floor)  # the floor protects the guest, even above its limit
        self._once("limit", {u: f"VM {name}: its memory limit {lim:.0f} MiB is below its floor {f:.0f} MiB "
                                "(use plus reserve, minimum or absolute floor): keeping the floor"
                             for u, name, lim, f in zip(obs.vms.uuids, obs.vms.names, limit, floor, strict=True)
                             if lim < f - 0.5})
        used = fillnan(obs.usage[:, MEMORY], 0.0)
        sig = fillnan(obs.signal[:, MEMORY], 0.0)
        starving = (sig > c.starving_signal) | (used >= c.starving_used * cur)
        if obs.confirmed is not None:  # an unconfirmed claim of starving gets no fast growth
            starving &= obs.confirmed

        target = np.clip(want, floor, size)
        target = np.where(obs.age == 0, np.maximum(target, np.minimum(cur, size)), target)
        step = c.mem_step_frac * np.where(np.isfinite(size), size, cur)
        target = np.maximum(target, np.minimum(cur - step, size))  # shrink at most one step
        # growth is step-limited only above the entitlement and only for guests not starving
        grow_step = c.mem_grow_step_frac * np.where(np.isfinite(size), size, cur)
        free_up = np.maximum(cur + grow_step, np.maximum(floor, entitled))
        target = np.where(starving, target, np.minimum(target, free_up))
        # dead-band: shrinking is damped hard, growing (harmless to the guest) only lightly
        scale = np.where(np.isfinite(size), size, cur)
        band = np.where(target < cur, np.maximum(c.mem_deadband_mib, c.mem_deadband_frac * scale),
                        np.maximum(c.mem_deadband_mib, c.mem_grow_deadband_frac * scale))
        grow_back = (target > cur) & (cur < entitled * (1.0 - 1e-3))  # growth back to the entitlement always goes
        keep = (np.abs(target - cur) < band) & (cur >= floor) & (cur <= ceiling) & ~grow_back
        held = np.where(keep, np.maximum(cur - target, 0.0), 0.0)  # memory the dead-band keeps in place
        target = np.where(keep, cur, target)

        fits = not np.isfinite(capacity) or target.sum() <= capacity
        if not fits:
            target = self._fit_memory(target, cur, floor, starving, entitled, capacity, held)
            # after fitting, skip what became small changes, as long as host memory still holds
            small = (np.abs(target - cur) < band) & (cur >= floor) & (cur <= ceiling)
            lower = small & (cur <= target) & ~grow_back  # keeping a lower target never breaks the sum
            target = np.where(lower, cur, target)
            higher = small & (cur > target)
            if np.where(higher, cur, target).sum() <= capacity:
                target = np.where(higher, cur, target)
        over = not fits and target.sum() > capacity + 1e-6
        self._once("floors", {"host": f"memory floors need {floor.sum():.0f} MiB but the host has {capacity:.0f} MiB "
                                      "after its reserve: holding memory growth; lower per-VM minimums or run "
                                      "fewer VMs"} if over else {})
        if over:
            target = self._hold_growth(target, cur, capacity)
        return target

    @staticmethod
    def _hold_growth(target: np.ndarray, cur: np.ndarray, capacity: float) -> np.ndarray:
        """Scale growth into what is left of host memory (none left: hold it); shrinking goes on.

        Used when the floors alone exceed host memory: a target that grows would
        push the host past its reserve, so only the room left under it is given.
        """
        base: np.ndarray = np.minimum(target, cur)
        growth = target - base
        room = capacity - base.sum()
        if growth.sum() <= 0 or room <= 0:
            return base
        result: np.ndarray = base + growth * min(1.0, room / growth.sum())
        return result

    def _fit_memory(self, target: np.ndarray, cur: np.ndarray, floor: np.ndarray, starving: np.ndarray,
                    entitled: np.ndarray, capacity: float, held: np.ndarray) -> np.ndarray:
        """Bring the sum of targets down to host memory, in order of harm.

        First memory that only the dead-band kept in place, then what lies
        above each guest's entitlement, then what lies below it: each time
        growth of guests that are not starving, then their spare memory
        (faster than the step limit if a starving guest needs it), then the
        same of starving guests. Floors are never crossed.
        """
        # what is protected: the floor, and up to the entitlement what the guest is given
        keep = np.maximum(floor, np.minimum(target, entitled))

        def pieces(t: np.ndarray) -> list[np.ndarray]:
            """What may be taken, most harmless first, from the targets as they stand now."""
            growth = np.maximum(t - np.maximum(cur, keep), 0.0)
            spare = np.maximum(np.minimum(t, cur) - keep, 0.0)
            growth_in = np.maximum(np.minimum(t, keep) - np.maximum(cur, floor), 0.0)
            spare_in = np.maximum(np.minimum(np.minimum(t, cur), keep) - floor, 0.0)
            out = [np.minimum(held, np.maximum(t - floor, 0.0))]
            for part in (growth, spare, growth_in, spare_in):
                out += [np.where(starving, 0.0, part), np.where(starving, part, 0.0)]
            return out

        for stage in range(9):
            over = target.sum() - capacity
            if over <= 1e-6:
                break
            take = pieces(target)[stage]
            if take.sum() > 0:
                target = target - take * min(1.0, over / take.sum())
        return target

    def plan(self, alloc: Allocation, obs: Observation, capacity: np.ndarray,
             entitlement: np.ndarray | None = None) -> Plan:
        """Turn an allocation into safe control values and the set that changed, one kind at a time."""
        cur = obs.controls
        new = cur.copy()
        changed: dict[str, np.ndarray] = {}
        physical = self.profile == "physical"
        # the physical profile has no entitlement floors and no dead-band on weights and caps
        ent, band = (None, 0.0) if physical else (entitlement, self.config.weight_deadband)
        for kind in kinds.KINDS:
            if kind.deadband == "relative":
                target, source = _TARGETS[kind.name](self.config, alloc, obs, ent)
                proposed = np.where(np.isnan(source), getattr(cur, kind.field), target)
                changed[kind.name] = _relative_change(proposed, getattr(cur, kind.field), band)
                setattr(new, kind.field, np.where(changed[kind.name], proposed, getattr(cur, kind.field)))
            elif kind.name == "balloon":
                changed[kind.name] = self._plan_balloon(new, alloc, obs, float(capacity[MEMORY]), entitlement)
            else:
                changed[kind.name] = _plan_pins(new, alloc)
        return Plan(controls=new, changed=changed, vms=obs.vms)

    def _plan_balloon(self, new: Controls, alloc: Allocation, obs: Observation, capacity: float,
                      entitlement: np.ndarray | None) -> np.ndarray:
        """Set ``new.balloon`` where the target moves by more than half a MiB; return where it does."""
        mem = alloc.amount[:, MEMORY]
        if np.isnan(mem).all():
            return np.zeros(obs.n, dtype=bool)
        cur = obs.controls.balloon
        if self.profile == "physical":
            target = physical_balloon(mem, obs, capacity, self.config.mem_floor_mib, self._memory_max(obs))
        else:
            entitled = np.zeros(obs.n) if entitlement is None else fillnan(entitlement[:, MEMORY], 0.0)
            target = self._balloon(mem, obs, capacity, entitled)
        moved: np.ndarray = np.abs(target - np.where(np.isnan(cur), np.inf, cur)) > 0.5
        new.balloon = np.where(moved, target, cur)
        return moved


def physical_balloon(want: np.ndarray, obs: Observation, capacity: float, floor_mib: float,
                     size: np.ndarray) -> np.ndarray:
    """Balloon targets as a host alone bounds them: [floor, maximum], summing to at most host memory.

    The floor is the absolute one or the VM's configured minimum (never above
    its maximum). Where the targets exceed host memory, the part above each
    floor is scaled down by one factor; floors alone above host memory stay.
    """
    limit = fillnan(obs.vms.sizes[:, MEMORY], np.inf)
    cur = np.where(np.isnan(obs.controls.balloon), size, obs.controls.balloon)
    floor = np.minimum(np.maximum(floor_mib, fillnan(obs.vms.min_memory, 0.0)), size)
    target = np.clip(np.minimum(np.where(np.isnan(want), cur, want), limit), floor, size)
    if np.isfinite(capacity) and target.sum() > capacity:
        above = target - floor
        room = max(capacity - floor.sum(), 0.0)
        target = floor + above * min(1.0, room / max(above.sum(), 1e-12))
    result: np.ndarray = target
    return result


def _plan_pins(new: Controls, alloc: Allocation) -> np.ndarray:
    """Take the allocation's pins (when it has them for these vCPUs); return which moved."""
    cur_pins, cur_width = new.pins, new.pin_width
    if alloc.pins is None or alloc.pins.shape != cur_pins.shape:
        return np.zeros(cur_pins.shape, dtype=bool)
    new.pins = alloc.pins.astype(np.intp)
    new.pin_width = alloc.pin_width
    moved: np.ndarray = (new.pins != cur_pins) | (new.pin_width != cur_width)
    return moved


def _caps(alloc: Allocation) -> np.ndarray:
    """Which resources the allocation caps (none when it says nothing)."""
    return alloc.caps if alloc.caps.size else np.zeros(alloc.amount.shape[1], dtype=bool)


# Each relative kind's target and the source whose NaN means "keep the current value".
_Pair = tuple[np.ndarray, np.ndarray]
Target = Callable[[GuardConfig, Allocation, Observation, "np.ndarray | None"], _Pair]


def _shares(c: GuardConfig, alloc: Allocation, obs: Observation, ent: np.ndarray | None) -> _Pair:
    # shares are relative weights: one below the VM's entitlement would let others'
    # larger weights push it under min(demand, entitlement) when the host is busy
    cpu = alloc.amount[:, CPU]
    weight = cpu if ent is None else np.maximum(cpu, fillnan(ent[:, CPU], 0.0))
    return np.clip(np.round(weight * 1024.0), SHARES_MIN, SHARES_MAX), cpu


def _quota(c: GuardConfig, alloc: Allocation, obs: Observation, ent: np.ndarray | None) -> _Pair:
    cpu = alloc.amount[:, CPU]
    return np.minimum(np.where(_caps(alloc)[CPU], np.maximum(cpu, 0.01), np.nan), obs.vms.vcpus), cpu


def _blkio(c: GuardConfig, alloc: Allocation, obs: Observation, ent: np.ndarray | None) -> _Pair:
    disk = alloc.amount[:, DISK]
    blkio = blkio_weights(disk if ent is None else np.maximum(disk, fillnan(ent[:, DISK], 0.0)))
    return blkio, blkio  # relative weights too: never below the entitlement's


def _diskcap(c: GuardConfig, alloc: Allocation, obs: Observation, ent: np.ndarray | None) -> _Pair:
    disk = alloc.amount[:, DISK]
    floor = 1.0 if ent is None else np.maximum(1.0, fillnan(ent[:, DISK]))
    return np.where(_caps(alloc)[DISK], np.maximum(disk, floor), np.nan), disk


def _netcap(c: GuardConfig, alloc: Allocation, obs: Observation, ent: np.ndarray | None) -> _Pair:
    # a cap throttles hogs; it never holds a VM below its entitlement
    net = alloc.amount[:, NET]
    floor = c.net_min_kibs if ent is None else np.maximum(c.net_min_kibs, fillnan(ent[:, NET]))
    return np.where(_caps(alloc)[NET], np.maximum(net, floor), np.nan), net


_TARGETS: dict[str, Target] = {"shares": _shares, "quota": _quota, "blkio": _blkio, "diskcap": _diskcap,
                               "netcap": _netcap}

__all__ = ["PROFILES", "Guard", "GuardConfig", "Controls", "physical_balloon"]
