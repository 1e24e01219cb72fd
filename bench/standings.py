"""Standings with their spread over slices, from a ``rescoin sweep`` file.

    rescoin sweep --trace ../shared/traces/bitbrains_rnd --resource memory --hold cpu=4 \\
        --factors 1.5,2,3 --slices 175:15,250:15,175:22,250:22,212:18 --vms 100 --days 7 --out sweep.json
    python bench/standings.py sweep.json [--metrics memory.violations,memory.worst_off,...] [--markdown]

For each factor and policy it prints min / median / max over the slices of each
metric, and which policy is ahead: on the median and not behind on the worst slice
(the README's rule). Runs that failed are listed, never counted.
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict

DEFAULT = ("memory.violations", "memory.worst_off", "cpu.violations", "cpu.worst_off", "memory.resident",
           "host_swap.share_of_periods", "memory.actuations_per_vm_hour")
HIGHER_IS_BETTER = ("satisfaction", "worst_off", "fairness")


def spread(values: list[float]) -> tuple[float, float, float]:
    return min(values), statistics.median(values), max(values)


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.0e}" if v != 0 and abs(v) < 5e-4 else f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", help="a rescoin sweep --out FILE.json")
    ap.add_argument("--metrics", default=",".join(DEFAULT))
    ap.add_argument("--markdown", action="store_true", help="markdown tables (for the README)")
    args = ap.parse_args()
    with open(args.sweep) as f:
        rows = json.load(f)
    metrics = [m for m in args.metrics.split(",") if m]
    cells: dict = defaultdict(lambda: defaultdict(list))  # (model, factor) -> (policy, metric) -> values
    for r in rows:
        if r.get("error"):
            print(f"failed, not counted: {r['policy']} slice {r['vm_offset']}:{r['start_day']} x{r['factor']}: "
                  f"{r['error']}")
            continue
        for m in metrics:
            if r.get(m) is not None:
                cells[(r["memory_model"], r["factor"])][(r["policy"], m)].append(float(r[m]))
    for (model, factor), by in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        policies = list(dict.fromkeys(p for p, _ in by))
        slices = max(len(v) for v in by.values())
        print(f"\nfactor {factor:g}, memory model {model}: min / median / max over {slices} slices")
        head = ["policy"] + [m.replace("memory.", "mem ").replace("host_swap.share_of_periods", "swap")
                             .replace("actuations_per_vm_hour", "ch/VMh") for m in metrics]
        lines = [head]
        for p in policies:
            line = [p]
            for m in metrics:
                v = by.get((p, m))
                line.append(" / ".join(fmt(x) for x in spread(v)) if v else "-")
            lines.append(line)
        if args.markdown:
            print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
            print("\n".join("| " + " | ".join(line) + " |" for line in lines[1:]))
        else:
            widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
            for line in lines:
                print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)))
        for m in metrics:
            up = any(m.endswith(h) for h in HIGHER_IS_BETTER)
            have = {p: spread(by[(p, m)]) for p in policies if (p, m) in by and p != "oracle"}
            if len(have) < 2:
                continue
            best = max(have, key=lambda p: have[p][1] if up else -have[p][1])
            worst_of = {p: (have[p][0] if up else have[p][2]) for p in have}
            others = [p for p in have if p != best]
            ahead = all((worst_of[best] >= worst_of[p]) if up else (worst_of[best] <= worst_of[p]) for p in others)
            tie = any(have[p][1] == have[best][1] for p in others)
            verdict = "tied on the median" if tie else ("ahead" if ahead else "best median, behind on a worst slice")
            print(f"  {m}: {best} {verdict}")


if __name__ == "__main__":
    main()
