"""From one bulk-stats record per VM to the loop's rates, and from the kept state to Controls.

Counters become rates over the measured interval (a counter that went back
means the VM restarted: NaN for that period); vCPU delay is the CPU signal
the host itself sees (steal); memory use is the host's balloon statistics.
"""
from __future__ import annotations

import numpy as np

from rescoin.core.model import Controls
from rescoin.core.resources import CPU, MEMORY
from rescoin.hosts.claims import HostMemory
from rescoin.hosts.libvirt.discovery import VMState

STATS_FLAGS = ("STATE", "CPU_TOTAL", "VCPU", "BALLOON", "BLOCK", "INTERFACE")


def _sum(stats: dict, prefix: str, suffixes: tuple[str, ...]) -> float | None:
    if not any(k.startswith(prefix) for k in stats):
        return None
    return sum(v for k, v in stats.items() if k.startswith(prefix) and k.endswith(suffixes))


def counters(stats: dict) -> dict[str, float | None]:
    """The cumulative counters rescoin reads of one VM's record (None = not reported)."""
    return {
        "cpu": stats.get("cpu.time"),
        "delay": sum(v for k, v in stats.items() if k.startswith("vcpu.") and k.endswith(".delay")) or None,
        "disk": _sum(stats, "block.", (".rd.bytes", ".wr.bytes")),
        "net": _sum(stats, "net.", (".rx.bytes", ".tx.bytes")),
    }


def rates(state: VMState, stats: dict, interval: float) -> tuple[list[float], list[float]]:
    """Usage and unmet-demand signals from counter deltas over the measured interval; updates ``state``."""
    cur = counters(stats)
    prev, state.last = state.last, {k: v for k, v in cur.items() if v is not None}

    def rate(key: str, scale: float) -> float:
        a, b = prev.get(key), cur.get(key)
        if a is None or b is None or not interval > 0 or b < a:  # b < a: VM restarted, counter reset
            return np.nan
        return (b - a) / interval / scale

    cpu = rate("cpu", 1e9)
    delay = rate("delay", 1e9)
    u = [cpu, np.nan, rate("disk", 1024.0), rate("net", 1024.0)]
    s = [np.nan, np.nan, np.nan, np.nan]
    if np.isfinite(delay):
        # share of wall time the vCPUs were runnable but not running: steal seen from the host
        s[CPU] = min(1.0, delay / max(state.vcpus, 1))
    state.mem_before, state.mem = state.mem, HostMemory.from_stats(stats)
    u[MEMORY] = state.mem.used_mib
    cur_b = stats.get("balloon.current")
    if cur_b is not None:
        state.controls["balloon"] = cur_b / 1024.0
    return u, s


def controls(rows: list[VMState]) -> Controls:
    """The controls the VMs have now, as the loop sees them."""
    n = len(rows)

    def col(kind: str) -> np.ndarray:
        return np.array([r.controls[kind] for r in rows], dtype=float).reshape(n)

    return Controls(
        shares=col("shares"), quota=col("quota"), balloon=col("balloon"), blkio=col("blkio"),
        netcap=col("netcap"), diskcap=col("diskcap"),
        pins=np.array([p for r in rows for p in (r.controls["pins"] + [-1] * r.vcpus)[: r.vcpus]], dtype=np.intp),
        pin_width=int(rows[0].controls.get("pin_width", 1)) if rows else 1,
    )
