"""One ``rescoin`` balancer round on 100 hosts and 5,000 VMs (target < 1 s)."""
from __future__ import annotations

import time

import numpy as np

from rescoin.cluster.balancers import build
from rescoin.cluster.model import ClusterState, HostInfo, Rules, VmInfo


def state(hosts: int = 100, vms: int = 5000, seed: int = 0) -> ClusterState:
    rng = np.random.default_rng(seed)
    hs = tuple(HostInfo(f"h{i}", 64.0, 262144.0, contention=float(i % 10 == 0)) for i in range(hosts))
    mem = rng.choice([2048.0, 4096.0, 8192.0, 16384.0], vms)
    used = mem * rng.uniform(0.3, 1.0, vms)
    at = rng.integers(0, hosts, vms)
    hot = at % 10 == 0
    used[hot] *= 1.3
    vs = tuple(VmInfo(f"u{i}", f"vm{i}", f"h{at[i]}", 4, float(mem[i]), cpu_used=1.0, mem_used=float(used[i]),
                      mem_forecast=float(used[i]), mem_unserved=float(hot[i]) * 100.0, dirty_mib_s=20.0)
               for i in range(vms))
    return ClusterState(now=1e6, hosts=hs, vms=vs)


def main() -> None:
    s = state()
    b = build("rescoin", hold=1, max_in_flight=10)
    t0 = time.perf_counter()
    moves = b.plan(s, Rules())
    dt = time.perf_counter() - t0
    print(f"rescoin round: 100 hosts, 5000 VMs, {len(moves)} moves in {dt:.3f} s")


if __name__ == "__main__":
    main()
