"""The simulated host's memory model: guest footprints, balloon reclaim and host swap.

The rules (docs/simulator.md has them with their reasons) apply to every policy
alike; the one exemption is the oracle's (no reclaim latency), since it is the
upper bound. Per VM and period:

- working set W: the trace's memory demand; limit L: the balloon target, else the size;
- footprint F (resident on the host): a VM running when the replay starts has run for
  long before it (``warm_start``): the host's RAM is full of guest pages, each VM's
  footprint its working set plus a share of the room left, in proportion to its gap
  to L (none beyond L); a VM that appears later is freshly booted: F = min(W, L). F
  grows by ``io_growth`` MiB per MiB of the VM's disk I/O (page cache) plus
  ``idle_growth`` of the gap to L per hour, never above L; freed pages are kept
  (F never falls because W falls) and F is never below min(W, L);
- a balloon target below F takes back at most ``reclaim_mib_s`` per second;
  below W the guest swaps itself: W - min(W, F) is unmet;
- host swap: when the footprints sum to more than host memory, the excess is
  swapped out in proportion to footprint (the host's LRU sees guest RAM as QEMU
  anonymous memory and cannot tell a guest's cache from its working set), so a
  VM loses that share of its working set too: that memory is unmet and its CPU
  progress is slowed by ``swap_penalty`` times the share of its working set not
  resident.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from rescoin.core.options import opt

SWAP_EPS_MIB = 1.0


@dataclass(frozen=True)
class MemoryModel:
    """How a guest's host footprint grows and shrinks, and what host swap costs (one set for every policy)."""

    io_growth: float = opt(0.95, "footprint growth per MiB of disk I/O (page cache), MiB/MiB; measured "
                                 "0.93-0.97 on a lab guest (bench/footprint.py)", low=0.0)
    idle_growth: float = opt(0.0, "footprint growth per hour, share of the gap to the memory limit; "
                                  "measured 0 on an idle lab guest", low=0.0)
    reclaim_mib_s: float = opt(100.0, "most a balloon takes back per second per VM; measured 100 (325 at "
                                      "its fastest) on a lab guest", "MiB/s", low=0.0)
    swap_penalty: float = opt(1.0, "CPU progress lost per share of the working set not resident", low=0.0)
    warm_start: bool = opt(True, "VMs running at the start have filled host memory (False: they start at "
                                 "their working set)")
    enabled: bool = opt(True, "False: the footprint is the working set (no growth, no reclaim latency, no swap)")

    @staticmethod
    def preset(name: str) -> MemoryModel:
        """A named setting of the sensitivity sweep: ``off``, ``default`` or ``fast``."""
        try:
            return PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown memory model {name!r}; choose from {', '.join(PRESETS)}") from None

    def with_options(self, **values: Any) -> MemoryModel:
        known = {f.name for f in fields(self)}
        bad = sorted(set(values) - known)
        if bad:
            raise ValueError(f"unknown memory model option(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")
        return replace(self, **values)


PRESETS: dict[str, MemoryModel] = {
    # growth off: a footprint is the peak of the working set since the last reclaim, from a cold start
    "off": MemoryModel(io_growth=0.0, idle_growth=0.0, warm_start=False),
    "default": MemoryModel(),
    # an assumption, not a measurement: every MiB of I/O lands on new pages and an idle guest's
    # background activity closes 2% of the gap to its limit per hour
    "fast": MemoryModel(io_growth=1.0, idle_growth=0.02),
}


@dataclass
class MemoryOutcome:
    """One period of the memory model, for the present VMs."""

    granted: np.ndarray  # (n,) MiB of the working set resident and usable
    cpu_factor: np.ndarray  # (n,) share of its CPU demand a VM can use (1 = not slowed by host swap)
    resident: np.ndarray  # (n,) MiB resident on the host (footprint minus what the host swapped out)
    host_swap: float  # MiB the host has swapped out


class Footprints:
    """Each VM's host footprint across periods (rows of the simulated host's full VM list)."""

    def __init__(self, n: int, model: MemoryModel, exempt: bool = False) -> None:
        self.model = model
        self.exempt = exempt
        self.f = np.full(n, np.nan)  # NaN: not running (a VM seen anew starts from its working set)
        self.started = False  # the first period is the replay's start: its VMs start warm

    def reset(self, rows: np.ndarray) -> None:
        self.f[rows] = np.nan

    def step(self, rows: np.ndarray, work: np.ndarray, limit: np.ndarray, io_mib: np.ndarray,
             period: float, host_mib: float, copying: tuple[float, float] = (0.0, 0.0)) -> MemoryOutcome:
        """Move the footprints of ``rows`` one period on and say what each VM gets.

        ``copying``: (MiB, share of the period) of memory the host also holds for part of
        the period (a live migration's copy on both hosts); swap is charged for that
        share with host memory less the MiB, for the rest without.
        """
        m = self.model
        w = np.maximum(np.nan_to_num(work, nan=0.0), 0.0)
        held = np.minimum(w, limit)
        prev = self.f[rows]
        fresh = np.isnan(prev)
        start = warm(held, limit, host_mib) if not self.started and m.warm_start else held
        self.started = True
        prev = np.where(fresh, start, prev)
        grow = m.io_growth * np.nan_to_num(io_mib, nan=0.0) + m.idle_growth * np.maximum(limit - prev, 0.0) * (
            period / 3600.0)
        grow[fresh] = 0.0  # a footprint first seen is where it stands: it grows from the next period
        up = np.minimum(limit, np.maximum(prev + grow, held))
        down = limit if self.exempt else np.maximum(limit, prev - m.reclaim_mib_s * period)
        f = np.where(prev > limit, down, up)
        self.f[rows] = f
        ws = np.minimum(w, f)  # the working set the guest holds; the rest it swaps itself
        mib, share = copying
        share = min(max(share, 0.0), 1.0) if mib > 0 else 0.0
        excess, lost = _swapped(f, host_mib)
        if share > 0:  # while the copy runs the host is that much smaller: time-weight both states
            ex2, lost2 = _swapped(f, host_mib - mib)
            excess, lost = (1 - share) * excess + share * ex2, (1 - share) * lost + share * lost2
        with np.errstate(divide="ignore", invalid="ignore"):
            ws_lost = np.where(f > 0, lost * ws / f, 0.0)
            slowed = np.where(w > 0, m.swap_penalty * ws_lost / w, 0.0)
        return MemoryOutcome(granted=ws - ws_lost, cpu_factor=np.clip(1.0 - slowed, 0.0, 1.0),
                             resident=f - lost, host_swap=excess)


def _swapped(f: np.ndarray, host_mib: float) -> tuple[float, np.ndarray]:
    """MiB the host swaps out, and each footprint's loss (in proportion to footprint)."""
    total = float(f.sum())
    excess = max(total - host_mib, 0.0) if np.isfinite(host_mib) else 0.0
    excess = excess if excess > SWAP_EPS_MIB else 0.0  # sums of floats: under a MiB over is rounding
    if excess <= 0:
        return 0.0, np.zeros_like(f)
    with np.errstate(divide="ignore", invalid="ignore"):
        return excess, np.where(f > 0, excess * f / total, 0.0)


def warm(held: np.ndarray, limit: np.ndarray, host_mib: float) -> np.ndarray:
    """Footprints of a host that has run for long: the room its working sets leave, shared by gap to the limit."""
    room = host_mib - float(held.sum()) if np.isfinite(host_mib) else 0.0
    gap = np.maximum(limit - held, 0.0)
    if room <= 0 or gap.sum() <= 0:
        return held
    result: np.ndarray = held + gap * min(1.0, room / float(gap.sum()))
    return result
