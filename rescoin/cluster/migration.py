"""Live migration cost: pre-copy duration, downtime and source CPU overhead.

Pre-copy sends memory M at link bandwidth B, then re-sends what was dirtied
meanwhile: with dirty rate D and r = D/B < 1 the total is M/B * (1 - r^k)/(1 - r)
over k rounds (capped at ``ROUNDS``); if r >= 1, QEMU's auto-converge throttles
the guest and the copy ends after ``ROUNDS`` rounds' worth. Plus a fixed setup.
Calibrated on DESIGN 13b: idle 256 MiB guest 2.1-2.8 s, busy 2.6-3.6 s (setup ~2 s
dominates on small guests), downtime 60-310 ms.
"""
from __future__ import annotations

from rescoin.cluster.model import VmInfo

SETUP_S = 2.0
ROUNDS = 5
DOWNTIME_S = 0.06  # stop-and-copy floor
DOWNTIME_PER_DIRTY_S = 0.25  # extra downtime per unit of r (a busy guest's last round is larger)
SOURCE_CPU = 0.5  # cores the source spends on the copy while it runs
#: dirty rate from activity: MiB/s dirtied per core of CPU use, and per KiB/s of disk I/O
DIRTY_PER_CORE = 20.0
DIRTY_PER_DISK_KIBS = 1.0 / 1024.0


def dirty_rate(cpu_cores: float, disk_kibs: float) -> float:
    """MiB/s of pages dirtied, estimated from CPU and disk activity."""
    return DIRTY_PER_CORE * max(cpu_cores, 0.0) + DIRTY_PER_DISK_KIBS * max(disk_kibs, 0.0)


def copy_factor(dirty_mib_s: float, link_mib_s: float) -> float:
    """How many times the memory is sent in total (1 = idle guest)."""
    r = min(dirty_mib_s / link_mib_s, 1.0)
    if r >= 1.0:
        return float(ROUNDS)
    return (1 - r ** ROUNDS) / (1 - r)


def duration_s(vm: VmInfo, link_mib_s: float) -> float:
    """Seconds from start to switch-over for the VM's resident memory."""
    mib = max(vm.mem_used, 1.0)
    return SETUP_S + mib / link_mib_s * copy_factor(vm.dirty_mib_s, link_mib_s)


def downtime_s(vm: VmInfo, link_mib_s: float) -> float:
    """Stop-and-copy pause: the VM gets no service for it."""
    return DOWNTIME_S + DOWNTIME_PER_DIRTY_S * min(vm.dirty_mib_s / link_mib_s, 1.0)
