"""How long `rescoin analyze` takes on a month of history for 100 VMs.

Generates the history with the real thing: a synthetic demand trace (daily
cycles, noise, bursts) replayed on the simulated host by the production
control loop, written by the real ``HistoryWriter`` into a temp directory
(100 VMs x 4 resources x 8640 five-minute periods = 3.46 million rows). Then
times ``rescoin analyze DIR --format json`` in a fresh process (so imports
count too) and prints one JSON line: {"rows": n, "seconds": s, ...}.

    .venv/bin/python bench/analyze.py [--vms 100] [--days 30] [--keep DIR] [--report]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from rescoin.core.loop import ControlLoop, run_daemon
from rescoin.core.policies import make_policy
from rescoin.core.resources import N_RES
from rescoin.hosts.sim import SimHost
from rescoin.offline.historycsv import HistoryWriter
from rescoin.offline.traces import Trace

PERIOD = 300.0


def synthetic_trace(vms: int, days: float, seed: int = 1) -> Trace:
    """Per-VM demand with a daily cycle, noise and bursts, for every resource."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(days * 86400 / PERIOD))
    day = 2 * np.pi * (t * PERIOD % 86400) / 86400
    vcpus = rng.choice([1, 2, 4, 8], size=vms, p=[0.3, 0.35, 0.25, 0.1]).astype(float)
    mem = rng.choice([1024, 2048, 4096, 8192, 16384], size=vms).astype(float)
    phase = rng.uniform(0, 2 * np.pi, vms)
    cycle = 0.5 + 0.5 * np.sin(day[:, None] + phase[None])  # (T, vms)
    demand = np.empty((t.size, vms, N_RES))
    burst = rng.random((t.size, vms)) < 0.01
    cpu_level = rng.uniform(0.05, 0.7, vms) * vcpus
    demand[:, :, 0] = cpu_level * (0.4 + 0.8 * cycle) * rng.lognormal(0, 0.25, (t.size, vms))
    demand[:, :, 0] += burst * vcpus * rng.uniform(0.3, 1.0, (t.size, vms))
    walk = np.cumsum(rng.normal(0, 0.01, (t.size, vms)), axis=0)
    demand[:, :, 1] = mem * np.clip(rng.uniform(0.2, 0.7, vms) + 0.15 * cycle + walk, 0.05, 1.2)
    for r, scale in ((2, 2000.0), (3, 1500.0)):
        level = rng.lognormal(np.log(scale / 10), 1.0, vms)
        demand[:, :, r] = level * (0.3 + cycle) * rng.lognormal(0, 0.6, (t.size, vms))
        demand[:, :, r] += burst * level * rng.uniform(2, 20, (t.size, vms))
    sizes = np.column_stack([vcpus, mem, np.full(vms, np.nan), np.full(vms, np.nan)])
    return Trace("bench-synthetic", "synthetic", [f"syn{i:03d}" for i in range(vms)], 1375315200.0, PERIOD,
                 demand, sizes, [])


def make_history(out: Path, vms: int, days: float, policy: str) -> int:
    """The production loop on a simulated host, history written by HistoryWriter; returns rows written."""
    trace = synthetic_trace(vms, days)
    host = SimHost(trace, overcommit=1.5, name="bench-host")
    loop = ControlLoop(host, make_policy(policy), period=PERIOD)
    with HistoryWriter(out, "bench-host") as writer:
        run_daemon(loop, PERIOD, threading.Event(), lambda step: writer.write(step, loop.history), speed=0)
        return writer.rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vms", type=int, default=100)
    p.add_argument("--days", type=float, default=30.0)
    p.add_argument("--policy", default="rescoin", help="policy that makes the history (default rescoin)")
    p.add_argument("--keep", metavar="DIR", help="write (or reuse) the history here instead of a temp dir")
    p.add_argument("--report", action="store_true", help="time `analyze --report` (plots and HTML) too")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="rescoin-bench-") as tmp:
        hist = Path(args.keep) if args.keep else Path(tmp) / "history"
        t0 = time.perf_counter()
        if hist.exists() and any(hist.glob("history-*.csv*")):
            made, gen = None, 0.0
        else:
            made = make_history(hist, args.vms, args.days, args.policy)
            gen = time.perf_counter() - t0
        cmd = [sys.executable, "-m", "rescoin", "analyze", str(hist), "--format", "json"]
        runs = {"analyze": cmd}
        if args.report:
            runs["analyze --report"] = cmd + ["--report", str(Path(tmp) / "report")]
        out = {}
        for label, c in runs.items():
            t = time.perf_counter()
            proc = subprocess.run(c, capture_output=True, text=True, check=True)
            out[label] = round(time.perf_counter() - t, 2)
            doc = json.loads(proc.stdout)
        size = sum(f.stat().st_size for f in hist.glob("history-*.csv*"))
        print(json.dumps({"rows": doc["rows"], "seconds": out["analyze"],
                          **({"seconds_with_report": out["analyze --report"]} if args.report else {}),
                          "vms": doc["vms"], "periods": doc["periods"], "files": doc["files"],
                          "megabytes": round(size / 1e6, 1), "generated_rows": made,
                          "generate_seconds": round(gen, 1)}), flush=True)


if __name__ == "__main__":
    main()
