"""All policies on slices of the shared Bitbrains trace at several overcommit factors.

The first slice (VMs 1-100, days 0-7) is the one rescoin was tuned on; the
others (other VMs, other days) were held out. For each slice and factor it
prints a compact table and one JSON line with the full metrics, then checks
the issue's judgement (memory vs oracle and peers, cpu vs oracle and peers,
breaches, actuations) and prints PASS/FAIL per check.
"""
from __future__ import annotations

import argparse
import json

from common import load

from rescoin.core.registry import POLICIES
from rescoin.offline.simulate import SimSettings, simulate

SLICES = {  # name: (vm_offset, vms, start_day, days)
    "tuned: VMs 1-100, days 0-7": (0, 100, 0, 7),
    "held out: VMs 101-200, days 14-21": (100, 100, 14, 7),
    "held out: VMs 201-300, days 21-28": (200, 100, 21, 7),
}


def judge(res: dict) -> dict[str, bool]:
    p = res["policies"]
    peers = [k for k in p if k not in ("rescoin", "oracle")]
    me, orc = p["rescoin"], p["oracle"]
    m, c = me["memory"], me["cpu"]
    checks = {}
    if m["satisfaction"] is not None:
        checks["mem satisfaction >= 0.97 oracle"] = m["satisfaction"] >= 0.97 * orc["memory"]["satisfaction"]
        checks["mem satisfaction > every peer"] = all(m["satisfaction"] > p[k]["memory"]["satisfaction"] for k in peers)
        if "static" in p:
            checks["mem violations <= static / 2"] = m["violations"] <= p["static"]["memory"]["violations"] / 2
        checks["mem worst_off >= every peer"] = all(m["worst_off"] >= p[k]["memory"]["worst_off"] for k in peers)
        checks["balloon changes <= 4 per VM-hour"] = m["actuations_per_vm_hour"] <= 4
    checks["cpu satisfaction >= 0.99 oracle"] = c["satisfaction"] >= 0.99 * orc["cpu"]["satisfaction"]
    checks["cpu: no peer above by > 0.005"] = all(
        p[k]["cpu"]["satisfaction"] <= c["satisfaction"] + 0.005 for k in peers)
    checks["cpu worst_off within 0.01 of every peer"] = all(
        c["worst_off"] >= p[k]["cpu"]["worst_off"] - 0.01 for k in peers)
    checks["zero breaches"] = all((me[r]["breaches"] or 0) == 0 for r in ("cpu", "memory", "disk", "net"))
    checks["pin changes <= 2 per VM-hour"] = me["pin_changes_per_vm_hour"] <= 2
    return checks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--overcommit", default="1.5,2,3")
    ap.add_argument("--slices", default="all", help="'all' or a comma list of slice numbers (0-based)")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--model", default=None, help="predictor model TOML (default models/default.toml)")
    args = ap.parse_args()
    names = list(SLICES)
    chosen = names if args.slices == "all" else [names[int(i)] for i in args.slices.split(",")]
    failures = 0
    for label in chosen:
        off, vms, start, days = SLICES[label]
        trace = load(vms=vms, vm_offset=off, days=days, start_day=start)
        for oc in (float(x) for x in args.overcommit.split(",")):
            res = simulate(trace, args.policies.split(","), SimSettings(overcommit=oc, model=args.model))
            print(f"\n== {label}, overcommit {oc}")
            print(f"{'policy':14s} {'cpu sat':>8s} {'cpu w-o':>8s} {'mem sat':>8s} {'mem w-o':>8s} {'mem viol':>8s} "
                  f"{'breach':>7s} {'bal/VMh':>8s} {'pin/VMh':>8s}")
            for name, r in res["policies"].items():
                br = max((r[k]["breaches"] or 0) for k in ("cpu", "memory", "disk", "net"))
                print(f"{name:14s} {r['cpu']['satisfaction']:8.4f} {r['cpu']['worst_off']:8.4f} "
                      f"{r['memory']['satisfaction']:8.4f} {r['memory']['worst_off']:8.4f} "
                      f"{r['memory']['violations']:8.4f} {br:7.4f} {r['memory']['actuations_per_vm_hour']:8.2f} "
                      f"{r['pin_changes_per_vm_hour']:8.3f}")
            if "rescoin" in res["policies"] and "oracle" in res["policies"]:
                for check, ok in judge(res).items():
                    failures += not ok
                    print(f"  {'PASS' if ok else 'FAIL'}  {check}")
            print(json.dumps({"slice": label, "overcommit": oc, **res}), flush=True)
    print(f"\n{failures} failed checks")


if __name__ == "__main__":
    main()
