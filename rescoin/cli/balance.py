"""``rescoin balance plan|apply|run|best-node``: argparse and output only (rescoin.cluster.balance does the work)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from rescoin.errors import UserError


def _balance_config(args: argparse.Namespace):
    """The ``[balance]`` section of ``--config`` (validated with the rest of the file), or None without it."""
    if not args.config:
        return None
    from rescoin.ops.config import load

    return load(args.config).balance


def _rules(args: argparse.Namespace, cfg=None):
    """The rules from ``--config``'s [balance] section, else from the command line."""
    from rescoin.cluster.model import Rules

    if cfg is not None:
        from rescoin.ops.balance_config import rules_from

        return rules_from(cfg)
    reserve = {}
    for item in args.reserve or []:
        host, _, mib = item.partition("=")
        try:
            reserve[host] = float(mib)
        except ValueError:
            raise UserError(f"--reserve wants HOST=MIB, got {item!r}") from None
    anti = tuple(frozenset(g.split(",")) for g in args.anti_affinity or [])
    return Rules(anti_affinity=anti, reserve_mib=reserve)


def _capacity(args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    out = {}
    for item in args.capacity or []:
        host, _, spec = item.partition("=")
        cpus, _, mib = spec.partition(":")
        try:
            out[host] = (float(cpus), float(mib))
        except ValueError:
            raise UserError(f"--capacity wants HOST=CPUS:MIB, got {item!r}") from None
    return out


def _cluster(args: argparse.Namespace):
    from rescoin.cluster.balance import Cluster
    from rescoin.ops.metrics import ClusterMetrics

    cfg = _balance_config(args)
    uris = args.hosts.split(",") if args.hosts else list(cfg.hosts if cfg is not None else ())
    if not uris:
        raise UserError("name the hosts: --hosts URI,URI (or --config with a [balance] section)")
    metrics = ClusterMetrics(args.metrics) if getattr(args, "metrics", None) else None
    return Cluster.open(uris, _rules(args, cfg), _capacity(args), metrics)


def _balancer(args: argparse.Namespace):
    from rescoin.cluster.balance import balancer

    opts = {"hold": args.hold} if args.hold is not None else {}
    return balancer(args.balancer, **opts)


def _outcomes(outcomes) -> int:
    for o in outcomes:
        down = f", downtime {o.downtime_ms:.0f} ms" if o.downtime_ms is not None else ""
        print(f"{o.move.name}: {o.move.source} -> {o.move.target}: {o.outcome} in {o.seconds:.2f} s{down}"
              f"{' (' + o.detail + ')' if o.detail else ''}")
    return 0 if all(o.ok for o in outcomes) else 1


def cmd_plan(args: argparse.Namespace) -> int:
    from rescoin.cluster.balance import plan_json, plan_table

    cluster = _cluster(args)
    try:
        state, moves = cluster.plan(_balancer(args))
    finally:
        cluster.close()
    print(json.dumps(plan_json(state, moves), indent=1) if args.json else plan_table(state, moves))
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from rescoin.cluster.balance import load_plan

    moves = load_plan(args.plan)
    cluster = _cluster(args)
    try:
        return _outcomes(cluster.carry_out(moves))
    finally:
        cluster.close()


def cmd_run(args: argparse.Namespace) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _s, _f: stop.set())
    cluster = _cluster(args)
    try:
        outcomes = cluster.run(_balancer(args), args.interval, once=args.once, dry_run=args.dry_run, stop=stop)
    except KeyboardInterrupt:
        return 130
    finally:
        cluster.close()
    return _outcomes(outcomes)


def cmd_best_node(args: argparse.Namespace) -> int:
    from rescoin.cluster.balance import best_node

    cluster = _cluster(args)
    try:
        host, why = best_node(cluster.state(), cluster.rules, args.vcpus, args.memory)
    finally:
        cluster.close()
    print(f"{host}  ({why})")
    return 0


def add_balance_parser(sub) -> None:
    """Add ``balance plan|apply|run|best-node`` (and ``simulate`` when c-sim's is present)."""
    p = sub.add_parser("balance", help="balance VMs between libvirt hosts by live migration",
                       description="Plan, approve and carry out live migrations between libvirt hosts.")
    actions = p.add_subparsers(dest="balance_action", metavar="ACTION")
    p.set_defaults(func=lambda _a: (p.print_help(sys.stderr), 2)[1])

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--hosts", metavar="URI,...", help="libvirt URIs of the hosts")
        q.add_argument("--config", metavar="FILE", help="a config with a [balance] section")
        q.add_argument("--balancer", default="rescoin", help="balancer name (default rescoin)")
        q.add_argument("--hold", type=int, help="rounds an imbalance must last (balancer option)")
        q.add_argument("--reserve", action="append", metavar="HOST=MIB", help="memory kept free on HOST")
        q.add_argument("--anti-affinity", action="append", metavar="VM,VM", help="never on one host")
        q.add_argument("--capacity", action="append", metavar="HOST=CPUS:MIB",
                       help="treat HOST as this big (at most what libvirt reports)")

    plan = actions.add_parser("plan", help="print the moves the balancer proposes (changes nothing)")
    common(plan)
    plan.add_argument("--json", action="store_true", help="a JSON plan for `balance apply`")
    plan.set_defaults(func=cmd_plan)
    apply = actions.add_parser("apply", help="carry out an approved JSON plan (preconditions re-checked)")
    apply.add_argument("plan", metavar="PLAN.json")
    common(apply)
    apply.set_defaults(func=cmd_apply)
    run = actions.add_parser("run", help="balance every interval until SIGTERM")
    common(run)
    run.add_argument("--interval", type=float, default=30.0, help="seconds between rounds (default 30)")
    run.add_argument("--once", action="store_true", help="one round, then exit")
    run.add_argument("--dry-run", action="store_true", help="move nothing, log what would move")
    run.add_argument("--metrics", metavar="ADDR:PORT", help="serve Prometheus metrics here")
    run.set_defaults(func=cmd_run)
    best = actions.add_parser("best-node", help="the host a new VM should start on")
    common(best)
    best.add_argument("--vcpus", type=int, required=True)
    best.add_argument("--memory", type=float, required=True, metavar="MIB")
    best.set_defaults(func=cmd_best_node)
    from rescoin.cli.balance_sim import add_simulate_parser

    add_simulate_parser(actions)
