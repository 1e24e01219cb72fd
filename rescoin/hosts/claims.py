"""Agent data is a claim: cross-check it with what the host measures.

A guest agent runs inside the guest, so what it says is the guest's word. A
lying or broken one (starving, MemAvailable near zero, high PSI, while idle)
would otherwise grow its balloon to the maximum and push honest guests to
their floors. The host measures some of the same things itself: libvirt's
balloon statistics (the guest's MemTotal as ``available``, MemAvailable as
``usable``, ``unused``, the ``swap_in`` and ``major_fault`` counters) and the
QEMU process's resident memory (``rss``). So, before the data reaches the
control loop:

- claimed used memory is capped at what the host sees the guest using, plus
  a margin for the balloon statistics' lag;
- a memory-pressure claim counts only as far as the host's own swap-in and
  major-fault counters show pressure, or in full when the balloon statistics
  show the guest nearly out of memory (a guest without swap stalls in reclaim
  with few major faults);
- what the host cannot check is passed on as *unconfirmed*; the guard then
  bounds how fast it can move the VM's allocation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from rescoin.hosts.agent import swap_fault_pressure

NAN = float("nan")
#: headroom over the host's view of used memory a claim may have (the balloon statistics lag a little)
USED_MARGIN_MIB = 32.0
USED_MARGIN_FRAC = 0.05
#: the balloon statistics back any pressure claim when the guest uses this share of its memory
NEARLY_FULL = 0.9
#: a discounted memory-pressure claim is worth a log line from this much on
NOTE_SIGNAL = 0.1


def _kib_to_mib(stats: dict, key: str) -> float:
    value = stats.get(key)
    return float(value) / 1024.0 if isinstance(value, (int, float)) and value >= 0 else NAN


@dataclass(frozen=True)
class HostMemory:
    """One VM's memory as the host measures it; NaN = not measured this period."""

    used_mib: float  # balloon statistics: available - usable (else - unused)
    total_mib: float  # balloon statistics: available (the guest's MemTotal)
    rss_mib: float  # resident memory of the QEMU process
    swap_in_kib: float  # cumulative, from the balloon statistics
    major_faults: float  # cumulative

    @staticmethod
    def from_stats(stats: dict) -> HostMemory:
        """From one VM's record of ``getAllDomainStats`` (values in KiB)."""
        avail = _kib_to_mib(stats, "balloon.available")
        usable = _kib_to_mib(stats, "balloon.usable")
        free = usable if not math.isnan(usable) else _kib_to_mib(stats, "balloon.unused")
        fault = stats.get("balloon.major_fault")
        return HostMemory(
            used_mib=max(avail - free, 0.0) if not (math.isnan(avail) or math.isnan(free)) else NAN,
            total_mib=avail,
            rss_mib=_kib_to_mib(stats, "balloon.rss"),
            swap_in_kib=_kib_to_mib(stats, "balloon.swap_in") * 1024.0,
            major_faults=float(fault) if isinstance(fault, (int, float)) and fault >= 0 else NAN,
        )

    def pressure_since(self, before: HostMemory | None, seconds: float) -> float:
        """Memory pressure the host's counters show since ``before``; NaN = cannot tell."""
        if before is None:
            return NAN
        swap = self.swap_in_kib - before.swap_in_kib
        fault = self.major_faults - before.major_faults
        if swap < 0 or fault < 0:  # a counter went backwards (guest rebooted): nothing to tell this period
            return NAN
        return swap_fault_pressure(swap / 4.0, fault, seconds)  # swap-in in 4 KiB pages


@dataclass(frozen=True)
class Checked:
    """An agent's claim after the cross-check."""

    used_mib: float
    signal: float  # memory pressure in [0, 1]
    confirmed: bool  # the host's own measurements back both figures
    note: str = ""  # what was discounted, for the log (empty: nothing)


def cross_check(used_mib: float, signal: float, now: HostMemory, before: HostMemory | None,
                seconds: float) -> Checked:
    """The agent's used memory and memory signal, bounded by what the host measures."""
    notes = []
    seen = min((x for x in (now.used_mib, now.rss_mib) if not math.isnan(x)), default=NAN)
    if not math.isnan(seen) and used_mib > seen + USED_MARGIN_MIB + USED_MARGIN_FRAC * seen:
        capped = seen + USED_MARGIN_MIB + USED_MARGIN_FRAC * seen
        notes.append(f"claims {used_mib:.0f} MiB used, the host sees {seen:.0f} MiB: counting {capped:.0f}")
        used_mib = capped
    # only the balloon statistics see what the guest uses; rss only bounds it from above
    used_ok = math.isnan(used_mib) or not math.isnan(now.used_mib)

    host = now.pressure_since(before, seconds)
    if now.used_mib >= NEARLY_FULL * now.total_mib:
        host = max(host, signal) if not math.isnan(host) else signal
    if signal > 0 and host < signal:
        if signal - host >= NOTE_SIGNAL:
            notes.append(f"claims memory pressure {signal:.2f}, the host's swap-in and major faults show {host:.2f}")
        signal = host
    signal_ok = not signal > 0 or not math.isnan(host)
    return Checked(used_mib, signal, used_ok and signal_ok, "; ".join(notes))


__all__ = ["Checked", "HostMemory", "cross_check"]
