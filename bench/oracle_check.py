"""Does any policy beat the oracle? Every row of a ``rescoin sweep``/``density --out`` JSON file.

    python bench/oracle_check.py runs.json

Compares each policy's run with the oracle's on the same slice, factor and
memory model: satisfaction and worst-off (higher is better), violations and
breaches (lower is better), for CPU and memory. Prints how many comparisons
were made and, for each (policy, resource, metric) where the oracle was
beaten, how often and by how much at most.
"""
from __future__ import annotations

import argparse
import collections
import json

METRICS = (("satisfaction", True), ("worst_off", True), ("violations", False), ("breaches", False))


def key(r: dict) -> tuple:
    return r["vm_offset"], r["start_day"], r["memory_model"], r["factor"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", help="a rescoin sweep or density --out FILE.json")
    with open(ap.parse_args().runs) as f:
        rows = json.load(f)
    oracle = {key(r): r for r in rows if r["policy"] == "oracle" and r.get("error") is None}
    beaten: collections.Counter = collections.Counter()
    largest: dict[tuple, tuple[float, tuple]] = {}
    n = 0
    for r in rows:
        if r["policy"] == "oracle" or r.get("error") or key(r) not in oracle:
            continue
        o = oracle[key(r)]
        for res in ("cpu", "memory"):
            for metric, higher in METRICS:
                a, b = r.get(f"{res}.{metric}"), o.get(f"{res}.{metric}")
                if a is None or b is None:
                    continue
                n += 1
                gap = (a - b) if higher else (b - a)
                if gap > 1e-9:
                    k = (r["policy"], res, metric)
                    beaten[k] += 1
                    largest[k] = max(largest.get(k, (0.0, ())), (gap, key(r)))
    print(json.dumps({"oracle_runs": len(oracle), "comparisons": n, "beaten": [
        {"policy": p, "resource": res, "metric": m, "times": c, "largest_margin": largest[(p, res, m)][0],
         "at": dict(zip(("vm_offset", "start_day", "memory_model", "factor"), largest[(p, res, m)][1], strict=True))}
        for (p, res, m), c in sorted(beaten.items())]}, indent=1))


if __name__ == "__main__":
    main()
