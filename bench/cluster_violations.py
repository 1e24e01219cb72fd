"""Where the cluster's memory violations happen: on hosts that swap, or on hosts with room?

    python bench/cluster_violations.py --trace DIR [--start-day 15 --days 3
        --vms 168 --windows 1 --vm-offset 175 --memory 2.5 --cpu 1.5 --hosts 8]

The VMs stay where the initial placement put them (no balancer round).
A violation on a host that does not swap, with the VM's own balloon target
below 95% of its demand, is the host loop's balloon lagging the VM: no
placement changes it, so a balancer cannot remove it. Prints the counts.
"""
from __future__ import annotations

import argparse

import numpy as np

from rescoin.cluster.balancers import build
from rescoin.cluster.sim import ClusterSettings, ClusterSim
from rescoin.core.resources import MEMORY, VIOLATION
from rescoin.offline.simulate import SimSettings
from rescoin.offline.traces import load_windows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", required=True)
    ap.add_argument("--start-day", type=float, default=15.0)
    ap.add_argument("--days", type=float, default=3.0)
    ap.add_argument("--vms", type=int, default=168)
    ap.add_argument("--windows", type=int, default=1)
    ap.add_argument("--vm-offset", type=int, default=175)
    ap.add_argument("--memory", type=float, default=2.5)
    ap.add_argument("--cpu", type=float, default=1.5)
    ap.add_argument("--hosts", type=int, default=8)
    a = ap.parse_args()
    tr = load_windows(a.trace, windows=a.windows, days=a.days, vms=a.vms, vm_offset=a.vm_offset,
                      start_day=a.start_day)
    sim = ClusterSim(tr, build("none"), ClusterSettings(hosts=(1.0,) * a.hosts),
                     SimSettings(overcommit={"memory": a.memory, "cpu": a.cpu}))
    on_swap = off_swap = swapping = own_target = 0
    for _ in range(sim.periods):
        for loop in sim.loops:  # no balancer rounds: where the violations fall with the VMs left where they are
            st = loop.step()
            if st is None or not st.obs.n or st.obs.truth is None:
                continue
            o = st.obs
            d, g = np.nan_to_num(o.truth[:, MEMORY]), np.nan_to_num(o.usage[:, MEMORY])
            v = (d > 0) & (g < VIOLATION * d)
            sw = o.host_swap is not None and float(o.host_swap) > 0
            swapping += sw
            on_swap, off_swap = on_swap + int(v.sum()) * sw, off_swap + int(v.sum()) * (not sw)
            own_target += int((v & (np.nan_to_num(o.controls.balloon, nan=np.inf) < VIOLATION * d)).sum())
    print(f"{tr.n_vms} VMs on {a.hosts} hosts, {sim.periods} periods, memory {a.memory:g}, cpu {a.cpu:g}")
    print(f"memory violations on swapping hosts: {on_swap}; on hosts not swapping: {off_swap}")
    print(f"host-periods swapping: {swapping}; violations with the VM's balloon target < 95% of demand: "
          f"{own_target}")


if __name__ == "__main__":
    main()
