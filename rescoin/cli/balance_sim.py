"""``rescoin balance simulate``: every balancer on a simulated cluster replaying a trace."""
from __future__ import annotations

import argparse
import json
import time

from rescoin.cli.argtypes import number, overcommit
from rescoin.errors import UserError

LEGEND = ("mem viol: share of VM-periods granted < 95% of memory demand; worst: 5th\n"
          "percentile of per-VM memory satisfaction; sat: granted/demand; mig/vm-d:\n"
          "migrations per VM-day; GiB: memory copied; osc: moves back within an hour")


def _hosts(text: str) -> tuple[float, ...]:
    """``8`` (eight equal hosts) or ``2,1,1`` (relative sizes)."""
    try:
        parts = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        parts = []
    if len(parts) == 1 and parts[0] == int(parts[0]) and parts[0] >= 1 and "," not in text:
        return (1.0,) * int(parts[0])
    if len(parts) < 1 or not all(p > 0 for p in parts):
        raise UserError(f"--hosts {text!r}: give a count (8) or relative sizes (2,1,1)")
    return tuple(parts)


def table(out: dict) -> str:
    """Fits 80 columns."""
    head = f"{'balancer':<12}{'mem viol':>9}{'worst':>7}{'sat':>7}{'cpu viol':>9}{'mig/vm-d':>9}{'GiB':>8}{'osc':>5}"
    lines = [head, "-" * len(head)]
    for name, r in out["balancers"].items():
        m, c = r["memory"], r["cpu"]
        lines.append(f"{name:<12}{m['violations']:>9.4f}{m['worst_off']:>7.3f}{m['satisfaction']:>7.4f}"
                     f"{c['violations']:>9.4f}{r['migrations_per_vm_day']:>9.3f}{r['migrated_gib']:>8.1f}"
                     f"{r['oscillations']:>5d}")
    lines.append(f"{out['hosts']} hosts, {out['vms']} VMs, {out['periods']} periods")
    return "\n".join(lines + [LEGEND])


def cmd_simulate(args: argparse.Namespace) -> int:
    from rescoin.cluster.balancers import BALANCERS
    from rescoin.cluster.sim import ClusterSettings, simulate_cluster
    from rescoin.offline.simulate import SimSettings
    from rescoin.offline.traces import load_trace, load_windows
    from rescoin.view import progress

    names = [n.strip() for n in args.balancers.split(",") if n.strip()]
    bad = [n for n in names if n not in BALANCERS]
    if bad or not names:
        raise UserError(f"unknown balancer {','.join(bad) or '(none)'}; choose from {', '.join(BALANCERS)}")
    hosts = _hosts(args.hosts)
    if args.windows > 1 and args.days is None:
        raise UserError("--windows K needs --days D: each window is D days long")
    try:
        if args.windows > 1:
            trace = load_windows(args.trace, windows=args.windows, days=args.days, vms=args.vms,
                                 vm_offset=args.vm_offset, start_day=args.start_day)
        else:
            trace = load_trace(args.trace, vms=args.vms, vm_offset=args.vm_offset, days=args.days,
                               start_day=args.start_day)
    except (OSError, ValueError) as e:
        raise UserError(f"--trace {args.trace}: {e}") from None
    n = int(trace.demand.shape[1])
    if n < len(hosts) or (args.vms is not None and n < args.vms * args.windows):
        raise UserError(f"the trace has {n} VMs from offset {args.vm_offset}; {args.vms} asked "
                        f"(x {args.windows} windows) for {len(hosts)} hosts")
    t0 = time.perf_counter()
    with progress() as bar:
        task = bar.add_task("periods", total=len(names) * int(trace.demand.shape[0]))
        out = simulate_cluster(trace, names, ClusterSettings(hosts=hosts, every=args.every),
                               SimSettings(overcommit=args.overcommit), on_period=lambda _n, _t: bar.advance(task))
    if args.format == "json":
        print(json.dumps(out))
    else:
        print(table(out))
        print(f"{time.perf_counter() - t0:.1f} s")
    return 0


def add_simulate_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``simulate`` to the ``balance`` sub-parser set."""
    from rescoin.cluster.balancers import BALANCERS

    p = subparsers.add_parser("simulate", help="replay a trace on a simulated cluster, once per balancer",
                              description="N simulated hosts, each running the rescoin control loop, and a "
                                          "cluster balancer moving VMs between them; metrics over all VMs.")
    p.add_argument("--trace", required=True, metavar="DIR")
    p.add_argument("--hosts", default="8", help="host count (8) or relative sizes (2,1,1)")
    p.add_argument("--vms", type=number(int, 1), default=None)
    p.add_argument("--days", type=number(float, 0, strict=True), default=None)
    p.add_argument("--start-day", type=number(float, 0), default=0.0)
    p.add_argument("--vm-offset", type=number(int, 0), default=0)
    p.add_argument("--overcommit", type=overcommit, default={"memory": 2.0, "cpu": 1.5})
    p.add_argument("--windows", type=number(int, 1), default=1, metavar="K",
                   help="stack K consecutive windows of --days D as VMs of their own (a VM's second week next "
                        "to the others' first: more VMs than the trace part has; weeks keep the weekday aligned)")
    p.add_argument("--every", type=number(int, 1), default=1, help="periods between balancer rounds")
    p.add_argument("--balancers", default=",".join(BALANCERS), metavar="A,B")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(func=cmd_simulate)
    return p
