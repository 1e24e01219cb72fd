"""The ``rescoin`` command: sub-commands for operators and evaluators."""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path

from rich.console import Console

from . import __version__

log = logging.getLogger("rescoin")


class UserError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


# -- shared helpers ---------------------------------------------------------------
def _load(path: str, vms: int | None, days: float | None, start_day: float, vm_offset: int = 0, console=None):
    from .traces import TraceError, load_trace
    from .view import progress

    try:
        with progress(console, transient=True) as bar:
            task = bar.add_task("loading trace", total=None)

            def tick(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            return load_trace(path, vms=vms, vm_offset=vm_offset, days=days, start_day=start_day, progress=tick)
    except TraceError as e:
        raise UserError(str(e)) from None


def _positive(kind):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return v

    return parse


def _nonneg(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


def _trace_args(p: argparse.ArgumentParser, default_vms: int | None = None) -> None:
    p.add_argument("--vms", type=_positive(int), default=default_vms, help="use this many VMs (default: all)")
    p.add_argument("--vm-offset", type=int, default=0, help="skip this many VMs first (held-out slices)")
    p.add_argument("--days", type=_positive(float), default=None, help="replay this many days (default: all)")
    p.add_argument("--start-day", type=_nonneg, default=0.0, help="start this many days into the trace")
    p.add_argument("--overcommit", type=_positive(float), default=1.5,
                   help="sum of VM sizes / host capacity (default 1.5)")


# -- simulate ---------------------------------------------------------------------------
def cmd_simulate(args: argparse.Namespace) -> int:
    from .simulate import SimSettings, parse_policies, simulate
    from .view import metric_tables, progress

    console = Console(stderr=args.format == "json")
    try:
        policies = parse_policies(args.policies)
    except ValueError as e:
        raise UserError(str(e)) from None
    trace = _load(args.trace, args.vms, args.days, args.start_day, args.vm_offset, console)
    settings = SimSettings(overcommit=args.overcommit, model=args.model)
    t0 = time.perf_counter()
    with progress(console) as bar:
        tasks = {p: bar.add_task(p, total=trace.n_periods) for p in policies}
        result = simulate(trace, policies, settings, on_step=lambda name, _s: bar.advance(tasks[name]))
    elapsed = time.perf_counter() - t0
    result["seconds"] = round(elapsed, 2)
    result["seed"] = args.seed
    if args.format == "json":
        print(json.dumps(result, indent=1))
    else:
        console.print(f"[bold]{result['trace']}[/]: {result['vms']} VMs x {result['periods']} periods, "
                      f"overcommit {args.overcommit}, {elapsed:.1f} s")
        for table in metric_tables(result):
            console.print(table)
    return 0


# -- run ----------------------------------------------------------------------------------
def _open_host(uri: str, args: argparse.Namespace, console: Console):
    if uri.startswith("sim:"):
        from .hosts.sim import SimHost

        trace = _load(uri[4:] or str(_sample()), args.vms, args.days, args.start_day, 0, console)
        return SimHost(trace, overcommit=args.overcommit), float(trace.period)
    from .agent import AgentClient
    from .hosts.libvirt import HostUnavailable, LibvirtHost

    from fnmatch import fnmatch

    from .hosts.libvirt import HostSettings

    settings = HostSettings()
    if args.disk_kibs:
        settings.disk_kibs = args.disk_kibs
    if args.net_kibs:
        settings.net_kibs = args.net_kibs
    if args.host_memory:
        settings.reserve_mib = 0.0
    pattern = args.vm_filter
    host = LibvirtHost(uri, settings=settings, agents=AgentClient(timeout=args.agent_timeout),
                       managed=(lambda _uuid, name: fnmatch(name, pattern)) if pattern else None)
    if args.host_memory:
        host.memory_limit_mib = args.host_memory
    try:
        host.capacity  # connect now: a wrong URI is reported before the daemon starts
    except HostUnavailable as e:
        raise UserError(f"{e} (is libvirtd running? try scripts/setup-host)") from None
    host.start_events()
    return host, 300.0


def _sample() -> Path:
    from .traces import sample_trace_path

    return sample_trace_path()


class DryRunHost:
    """Wraps a host so plans are printed, never applied."""

    def __init__(self, host, console: Console) -> None:
        self.host, self.console = host, console

    @property
    def capacity(self):
        return self.host.capacity

    def observe(self):
        return self.host.observe()

    def apply(self, plan):
        from .hosts.base import ApplyResult

        counts = plan.counts()
        names = plan.vms.names
        for kind, mask in plan.changed.items():
            if kind == "pin" or not mask.any():
                continue
            values = getattr(plan.controls, {"shares": "shares", "quota": "quota", "balloon": "balloon",
                                             "blkio": "blkio", "diskcap": "diskcap", "netcap": "netcap"}[kind])
            for i in mask.nonzero()[0]:
                self.console.print(f"dry-run (not applied): {names[i]} {kind} -> {values[i]:.6g}")
        if counts.get("pin"):
            self.console.print(f"dry-run (not applied): {counts['pin']} vCPU pin changes")
        return ApplyResult(applied={k: 0 for k in counts})


def cmd_run(args: argparse.Namespace) -> int:
    from .historycsv import HistoryWriter
    from .loop import ControlLoop, run_daemon
    from .policies import make_policy
    from .predict import load_model

    console = Console(stderr=True)
    try:
        policy = make_policy(args.policy)
        predictor = load_model(args.model) if args.model else "auto"
    except ValueError as e:
        raise UserError(str(e)) from None
    host, trace_period = _open_host(args.uri, args, console)
    if args.dry_run:
        host = DryRunHost(host, console)
    period = args.period or trace_period
    loop = ControlLoop(host, policy, predictor=predictor, period=period)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    writer = HistoryWriter(args.history, host.capacity.name) if args.history else None
    steps = 0

    def on_step(step) -> None:
        nonlocal steps
        steps += 1
        if writer is not None:
            writer.write(step, loop.history)
        log.info("period %d: %d VMs, %d actions, %.1f ms", loop.history.t, step.obs.n,
                 step.result.total, step.seconds * 1e3)

    log.info("rescoin %s: policy %s on %s, period %.0f s", __version__, policy.name, args.uri, period)
    speed = args.speed if args.uri.startswith("sim:") else 1.0
    try:
        run_daemon(loop, period, stop, on_step, speed=speed, max_steps=args.max_periods)
    finally:
        if writer is not None:
            writer.close()
        if args.restore_on_exit and hasattr(host, "restore"):
            log.info("restored the original settings of %d VMs", host.restore())
    log.info("stopped after %d periods", steps)
    return 0


# -- demo -------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from .historycsv import HistoryWriter
    from .hosts.sim import SimHost
    from .loop import ControlLoop, run_daemon
    from .policies import make_policy
    from .simulate import SimSettings, simulate
    from .view import LiveView, metric_tables, progress

    console = Console()
    path = args.trace or str(_sample())
    trace = _load(path, args.vms, args.days, 0.0, 0, console)
    console.print(f"[bold]rescoin demo[/]: {trace.name}, overcommit {args.overcommit}. "
                  "Data: Bitbrains GWA-T-12 (Shen, van Beek, Iosup, CCGrid 2015; gwa.ewi.tudelft.nl).")
    host = SimHost(trace, overcommit=args.overcommit)
    loop = ControlLoop(host, make_policy("rescoin"), period=float(trace.period))
    out = Path(args.history)
    stop = threading.Event()
    speed = trace.n_periods * trace.period / max(args.seconds, 0.1)
    with HistoryWriter(out, "demo-host") as writer, LiveView(console, "rescoin on a simulated host") as view:
        last = {}

        def on_step(step) -> None:
            writer.write(step, loop.history)
            view.update(step, loop.history)
            last["step"] = step

        run_daemon(loop, float(trace.period), stop, on_step, speed=speed)
        if "step" in last:
            view.update(last["step"], loop.history, force=True)
    console.print(f"history: {writer.rows} rows in {out}/")
    policies = ["rescoin", "static", "mom", "oracle"]
    with progress(console) as bar:
        tasks = {p: bar.add_task(p, total=trace.n_periods) for p in policies}
        result = simulate(trace, policies, SimSettings(overcommit=args.overcommit),
                          on_step=lambda name, _s: bar.advance(tasks[name]))
    for table in metric_tables(result):
        console.print(table)
    return 0


# -- parser -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from .policies import POLICIES

    p = argparse.ArgumentParser(prog="rescoin", description="Predictive multi-resource fairness scheduler for KVM hosts.")
    p.add_argument("--version", action="version", version=f"rescoin {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser("simulate", help="evaluate policies on a trace (rescoin vs peers vs the oracle)",
                       description="Replay a trace through the control loop once per policy and print the metrics.")
    s.add_argument("--trace", required=True, help="trace directory (Bitbrains, PlanetLab or Azure v1 format)")
    _trace_args(s)
    s.add_argument("--policies", default=None, help=f"comma-separated; default all: {','.join(POLICIES)}")
    s.add_argument("--model", default=None, help="predictor model TOML (default models/default.toml)")
    s.add_argument("--seed", type=int, default=0, help="recorded in the output; the replay itself is deterministic")
    s.add_argument("--format", choices=("table", "json"), default="table")
    s.set_defaults(func=cmd_simulate)

    r = sub.add_parser("run", help="run the scheduler daemon",
                       description="Run the control loop every period until SIGTERM/SIGINT.")
    r.add_argument("--uri", default="qemu:///system", help="hypervisor URI, or sim:TRACE_DIR for a simulated host")
    r.add_argument("--policy", default="rescoin", choices=list(POLICIES))
    r.add_argument("--model", default=None, help="predictor model TOML")
    r.add_argument("--period", type=_positive(float), default=None, help="seconds between steps (default: 300 for sim)")
    r.add_argument("--speed", type=_nonneg, default=1.0, help="time compression for sim hosts (0 = as fast as possible)")
    r.add_argument("--history", default=None, metavar="DIR", help="write history CSV files here")
    r.add_argument("--dry-run", action="store_true", help="plan and print actions, apply nothing")
    r.add_argument("--max-periods", type=_positive(int), default=None, help="stop after this many periods")
    r.add_argument("--restore-on-exit", action="store_true",
                   help="on SIGTERM/SIGINT put back every VM's original shares, pins and balloon target")
    r.add_argument("--vm-filter", default=None, metavar="GLOB", help="manage only VMs whose name matches")
    r.add_argument("--host-memory", type=_positive(float), default=None, metavar="MiB",
                   help="memory the managed VMs may share (default: host memory minus a 1 GiB reserve)")
    r.add_argument("--disk-kibs", type=_positive(float), default=None, metavar="KiB/s",
                   help="disk bandwidth shared by blkio weights (default 204800)")
    r.add_argument("--net-kibs", type=_positive(float), default=None, metavar="KiB/s",
                   help="link bandwidth shared by interface caps (default 125000)")
    r.add_argument("--agent-timeout", type=_positive(float), default=1.0,
                   help="seconds to wait for all guest agents together (default 1)")
    _trace_args(r)
    r.set_defaults(func=cmd_run)

    d = sub.add_parser("demo", help="the control loop on a simulated host replaying a real trace sample",
                       description="Replays the shipped Bitbrains sample with a live view, writes history CSV, "
                                   "then compares rescoin, static, mom and the oracle.")
    d.add_argument("--trace", default=None, help="trace directory (default: the shipped 24-VM, 7-day sample)")
    d.add_argument("--vms", type=_positive(int), default=None)
    d.add_argument("--days", type=_positive(float), default=None)
    d.add_argument("--overcommit", type=_positive(float), default=1.5)
    d.add_argument("--seconds", type=_positive(float), default=20.0, help="wall time for the live replay")
    d.add_argument("--history", default="rescoin-history", metavar="DIR", help="where to write history CSV")
    d.set_defaults(func=cmd_demo)

    from .lab import add_lab_parser

    add_lab_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except UserError as e:
        print(f"rescoin: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
