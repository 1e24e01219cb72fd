"""Median wall time of one control step (observe -> apply) for 10 .. 5,000 VMs.

Prints one JSON line per size: {"vms": n, "step_ms_median": f, ...}. The host
is the simulated one, so the step includes SimHost's sharing model; the
"decide_ms_median" figure is the step without the host's observe and apply.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
from common import load, scaled

from rescoin.offline.simulate import SimSettings, build_loop


def measure(trace, steps: int, warmup: int = 20) -> dict:
    loop = build_loop(trace, "rescoin", SimSettings())
    host = loop.host
    times, host_times = [], []
    observe, apply = host.observe, host.apply

    def timed(fn):
        def wrap(*a):
            t = time.perf_counter()
            out = fn(*a)
            host_times[-1] += time.perf_counter() - t
            return out
        return wrap

    host.observe, host.apply = timed(observe), timed(apply)
    for i in range(warmup + steps):
        host_times.append(0.0)
        t = time.perf_counter()
        if loop.step() is None:
            break
        dt = time.perf_counter() - t
        if i >= warmup:
            times.append(dt)
        else:
            host_times.pop()
    host_times = host_times[-len(times):]
    step = np.array(times) * 1e3
    decide = step - np.array(host_times) * 1e3
    return {"vms": trace.n_vms, "step_ms_median": round(float(np.median(step)), 3),
            "step_ms_p95": round(float(np.percentile(step, 95)), 3),
            "decide_ms_median": round(float(np.median(decide)), 3), "steps": len(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", default="10,100,1000,5000")
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args()
    base = load(vms=100, days=2)
    for n in (int(s) for s in args.sizes.split(",")):
        print(json.dumps(measure(scaled(base, n), args.steps)), flush=True)


if __name__ == "__main__":
    main()
