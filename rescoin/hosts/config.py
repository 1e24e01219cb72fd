"""``[host]``: what libvirt cannot tell rescoin (reserves, bandwidths) and how actions reach the VMs.

One dataclass, read from the file by ``rescoin.ops.config`` and handed to the
host as it is; it lives here so that hosts never import the operations room.
"""
from __future__ import annotations

from dataclasses import dataclass

from rescoin.core.options import opt

MAX_MIB = float(2 ** 26)  # 64 TiB: more memory than any one host has; larger values are typos
MAX_CORES = 8192.0  # Linux's largest CPU count
MAX_KIBS = 1e9  # ~1 TB/s: more bandwidth than any one disk or link


@dataclass(frozen=True)
class HostConfig:
    reserve_mib: float = opt(1024.0, "host memory kept back from the guests", "MiB", low=0.0, high=MAX_MIB)
    reserve_cores: float = opt(0.0, "host CPU kept back from the guests", "cores", low=0.0, high=MAX_CORES)
    memory_mib: float = opt(0.0, "memory the guests may share; 0 = host memory minus the reserve", "MiB", low=0.0,
                            high=MAX_MIB)
    disk_kibs: float = opt(204800.0, "disk bandwidth shared by blkio weights", "KiB/s", low=1.0, high=MAX_KIBS)
    net_kibs: float = opt(125000.0, "link bandwidth shared by interface caps", "KiB/s", low=1.0, high=MAX_KIBS)
    actuator: str = opt("libvirt", "how CPU, blkio and pins are applied", choices=("libvirt", "cgroup"))
    memtune_soft_limit: bool = opt(False, "also set each VM's memtune soft limit to its balloon target")
    stats_period: int = opt(2, "balloon statistics period set on each VM", "s", low=0, high=3600)
