"""Unmet-demand signals from agent reports."""

from __future__ import annotations

import math

from rescoin.core.resources import Resource
from rescoin.hosts.agent.protocol import (
    MAJFAULT_HALF_RATE,
    NAN,
    SWAPIN_HALF_RATE,
    AgentReport,
)

# ---------------------------------------------------------------------------
# Unmet-demand signals


def _clip01(x: float) -> float:
    return min(1.0, max(0.0, x)) if math.isfinite(x) else NAN


def _delta(now: float, before: float) -> float:
    """Counter increase; NaN if unknown or if the counter went backwards (guest rebooted)."""
    d = now - before
    return d if math.isfinite(d) and d >= 0 else NAN


def _saturating(rate: float, half: float) -> float:
    return rate / (rate + half) if math.isfinite(rate) and rate >= 0 else NAN


def swap_fault_pressure(swapped_in_pages: float, major_faults: float, seconds: float) -> float:
    """Memory pressure in [0, 1) from swap-in and major-fault counts over ``seconds``; NaN = unknown.

    ``rate / (rate + half_rate)`` for each, the larger of the two. The guest's
    agent counters and the host's balloon statistics go through this one rule.
    """
    if not (math.isfinite(seconds) and seconds > 0):
        return NAN
    known = [x for x in (_saturating(swapped_in_pages / seconds, SWAPIN_HALF_RATE),
                         _saturating(major_faults / seconds, MAJFAULT_HALF_RATE)) if not math.isnan(x)]
    return max(known) if known else NAN


def signals_from(report: AgentReport, prev: AgentReport | None = None) -> dict[Resource, float]:
    """Unmet-demand signals in [0, 1] (NaN = not known) from two consecutive reports.

    - ``Resource.MEMORY``: PSI memory "some" avg10 / 100; without PSI, a
      saturating function of the swap-in and major-fault rates between ``prev``
      and ``report`` (``rate / (rate + half_rate)``, the larger of the two).
    - ``Resource.CPU``: share of the guest's CPU ticks that were stolen between
      ``prev`` and ``report``.
    - ``Resource.DISK``: PSI io "some" avg10 / 100.
    """
    memory = report.psi_memory_some / 100.0
    steal = NAN
    if prev is not None:
        if math.isnan(memory):
            dt = report.ts - prev.ts
            memory = swap_fault_pressure(_delta(report.swap_in, prev.swap_in),
                                         _delta(report.major_faults, prev.major_faults), dt)
        d_total = _delta(report.cpu_total_ticks, prev.cpu_total_ticks)
        d_steal = _delta(report.cpu_steal_ticks, prev.cpu_steal_ticks)
        if d_total > 0 and not math.isnan(d_steal):
            steal = d_steal / d_total
    return {
        Resource.CPU: _clip01(steal),
        Resource.MEMORY: _clip01(memory),
        Resource.DISK: _clip01(report.psi_io_some / 100.0),
    }
