"""Simulated VM-periods per second, per policy (the whole loop plus metrics).

Prints one JSON line per policy: {"policy": p, "vms": n, "periods": t, "vm_periods_per_s": f}.
"""
from __future__ import annotations

import argparse
import json
import time

from common import load
from rescoin.policies import POLICIES
from rescoin.simulate import SimSettings, run_policy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--vms", type=int, default=350)
    p.add_argument("--days", type=float, default=7)
    p.add_argument("--policies", default=",".join(POLICIES))
    args = p.parse_args()
    trace = load(vms=args.vms, days=args.days)
    for name in args.policies.split(","):
        t = time.perf_counter()
        run_policy(trace, name, SimSettings())
        dt = time.perf_counter() - t
        vp = trace.n_vms * trace.n_periods
        print(json.dumps({"policy": name, "vms": trace.n_vms, "periods": trace.n_periods,
                          "seconds": round(dt, 2), "vm_periods_per_s": round(vp / dt)}), flush=True)


if __name__ == "__main__":
    main()
