"""Simulated VM-periods per second, per policy (the whole loop plus metrics).

Prints one JSON line per policy: {"policy": p, "vms": n, "periods": t, "vm_periods_per_s": f}, the
median of --repeat runs (a 2-core machine's timings vary by 15% from run to run; all runs are printed too).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from common import load

from rescoin.core.registry import POLICIES
from rescoin.offline.simulate import SimSettings, run_policy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--vms", type=int, default=350)
    p.add_argument("--days", type=float, default=7)
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--repeat", type=int, default=3, help="runs per policy; the median is reported")
    args = p.parse_args()
    trace = load(vms=args.vms, days=args.days)
    warm = load(vms=args.vms, days=0.5)  # an untimed first pass: imports, caches, allocator
    for name in args.policies.split(","):
        run_policy(warm, name, SimSettings())
        runs = []
        for _ in range(max(1, args.repeat)):
            t = time.perf_counter()
            run_policy(trace, name, SimSettings())
            runs.append(time.perf_counter() - t)
        dt = statistics.median(runs)
        vp = trace.n_vms * trace.n_periods
        print(json.dumps({"policy": name, "vms": trace.n_vms, "periods": trace.n_periods,
                          "seconds": round(dt, 2), "vm_periods_per_s": round(vp / dt),
                          "runs_s": [round(r, 2) for r in runs]}), flush=True)


if __name__ == "__main__":
    main()
