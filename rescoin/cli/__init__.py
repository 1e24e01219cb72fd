"""The ``rescoin`` command: sub-commands for operators and evaluators."""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import select
import sys
import threading
import time
from pathlib import Path

from rich.console import Console

from rescoin import __version__
from rescoin.cli.argtypes import number, overcommit, overcommit_text
from rescoin.errors import RescoinError, UserError

log = logging.getLogger("rescoin")


# -- shared helpers ---------------------------------------------------------------
def _load(path: str, vms: int | None, days: float | None, start_day: float, vm_offset: int = 0, console=None):
    from rescoin.offline.traces import TraceError, load_trace
    from rescoin.view import progress

    try:
        with progress(console, transient=True) as bar:
            task = bar.add_task("loading trace", total=None)

            def tick(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            return load_trace(path, vms=vms, vm_offset=vm_offset, days=days, start_day=start_day, progress=tick)
    except TraceError as e:
        raise UserError(str(e)) from None


def _positive(kind):
    return number(kind, 0, strict=True)


_nonneg = number(float, 0)


def _weights(text: str) -> tuple[float, ...]:
    one = number(float, 0, strict=True)
    try:
        return tuple(one(w) for w in text.split(","))
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"weights {text!r}: each must be a number > 0 ({e})") from None
OVERCOMMIT_HELP = ("sum of VM sizes / host capacity: one factor for all resources, or per resource "
                   "(cpu, memory, disk, net; the others keep 1.5), e.g. cpu=4,memory=1.5 (default 1.5)")


def _trace_args(p: argparse.ArgumentParser, default_vms: int | None = None) -> None:
    p.add_argument("--vms", type=_positive(int), default=default_vms, help="use this many VMs (default: all)")
    p.add_argument("--vm-offset", type=int, default=0, help="skip this many VMs first (held-out slices)")
    p.add_argument("--days", type=_positive(float), default=None, help="replay this many days (default: all)")
    p.add_argument("--start-day", type=_nonneg, default=0.0, help="start this many days into the trace")
    p.add_argument("--overcommit", type=overcommit, default=1.5, metavar="F|cpu=F,memory=F",
                   help=OVERCOMMIT_HELP)


# -- simulate ---------------------------------------------------------------------------
def cmd_simulate(args: argparse.Namespace) -> int:
    from rescoin.offline.simulate import SimSettings, parse_policies, simulate
    from rescoin.view import metric_tables, progress

    console = Console(stderr=args.format == "json")
    try:
        policies = parse_policies(args.policies)
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.model:
        from rescoin.core.predict import load_model

        try:
            load_model(args.model)  # each policy's loop loads it again: a bad file is said before the replay
        except ValueError as e:
            raise UserError(str(e)) from None
    trace = _load(args.trace, args.vms, args.days, args.start_day, args.vm_offset, console)
    settings = SimSettings(overcommit=args.overcommit, model=args.model, weights=args.weights)
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
                      f"overcommit {overcommit_text(args.overcommit)}, {elapsed:.1f} s")
        for table in metric_tables(result):
            console.print(table)
    return 0


# -- run ----------------------------------------------------------------------------------
def _run_config(args: argparse.Namespace):
    """The configuration file, with the options given on the command line on top."""
    from rescoin.ops.config import ConfigError, load

    try:
        return _overrides(load(args.config), args)
    except ConfigError as e:
        raise UserError(str(e)) from None


def _overrides(cfg, args: argparse.Namespace):
    """Command-line options win over the file, at start and at every reload."""
    from dataclasses import replace

    d, h, a = cfg.daemon, cfg.host, cfg.agent
    pick = lambda value, default: default if value is None else value  # noqa: E731
    d = replace(d, uri=pick(args.uri, d.uri), policy=pick(args.policy, d.policy), model=pick(args.model, d.model),
                period=pick(args.period, d.period), history_dir=pick(args.history, d.history_dir),
                state_file=pick(args.state, d.state_file), status_socket=pick(args.status_socket, d.status_socket),
                dry_run=d.dry_run or args.dry_run, restore_on_exit=d.restore_on_exit or args.restore_on_exit,
                vm_filter=pick(args.vm_filter, d.vm_filter))
    h = replace(h, memory_mib=pick(args.host_memory, h.memory_mib), disk_kibs=pick(args.disk_kibs, h.disk_kibs),
                net_kibs=pick(args.net_kibs, h.net_kibs), actuator=pick(args.actuator, h.actuator))
    if args.host_memory:
        h = replace(h, reserve_mib=0.0)
    if d.uri.startswith("sim:"):  # a simulation keeps no state and serves no status unless asked to
        d = replace(d, state_file=args.state or "", status_socket=args.status_socket or "",
                    history_dir=args.history or "")
    a = replace(a, timeout=pick(args.agent_timeout, a.timeout))
    m = replace(cfg.metrics, enabled=cfg.metrics.enabled or args.metrics is not None,
                listen=pick(args.metrics, cfg.metrics.listen))
    return replace(cfg, daemon=d, host=h, agent=a, metrics=m)


def cmd_run(args: argparse.Namespace) -> int:
    from rescoin.core.loop import HostUnavailableError
    from rescoin.hosts.dryrun import DryRunHost
    from rescoin.offline.traces import TraceError
    from rescoin.ops.config import ConfigError
    from rescoin.ops.daemon import Daemon

    cfg = _run_config(args)
    console = Console(stderr=True)
    sim = {"vms": args.vms, "vm_offset": args.vm_offset, "days": args.days, "start_day": args.start_day,
           "overcommit": args.overcommit}
    try:
        speed = args.speed if cfg.daemon.uri.startswith("sim:") else 1.0
        daemon = Daemon(cfg, config_path=args.config, sim=sim, overrides=lambda c: _overrides(c, args), speed=speed,
                        dry_run_host=lambda h: DryRunHost(h, console))
        daemon.check_capacity()  # connect now: a wrong URI or a reserve above the host's size is reported at once
    except (ConfigError, TraceError, ValueError) as e:
        raise UserError(str(e)) from None
    except HostUnavailableError as e:
        raise UserError(f"{e} (is libvirtd running? try scripts/setup-host)") from None
    except PermissionError as e:
        raise UserError(f"{e.filename}: permission denied (run as root, or set other paths in the config)") from None
    daemon.install_signals()
    return daemon.run(max_periods=args.max_periods)


def cmd_config(args: argparse.Namespace) -> int:
    from rescoin.ops.config import ConfigError, check_files, default_text, load

    if args.action == "default":
        sys.stdout.write(default_text())
        return 0
    try:
        cfg = load(args.path)
        check_files(cfg, args.path)  # what `run` would fail on: the agent key file, the model file
    except ConfigError as e:
        raise UserError(str(e)) from None
    print(f"{args.path}: valid ({len(cfg.vm)} per-VM entries; policy {cfg.daemon.policy}, "
          f"period {cfg.daemon.period:.0f} s, uri {cfg.daemon.uri})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from rescoin.ops.status import query, render

    console = Console()
    path = args.socket

    def fetch() -> dict:
        try:
            return query(path)
        except FileNotFoundError:
            raise UserError(f"{path}: no status socket; is the daemon running? "
                            "(scripts/start-scheduler status)") from None
        except PermissionError:
            raise UserError(f"{path}: permission denied; `rescoin status` needs root") from None
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: no answer from the daemon ({e})") from None

    if args.json:
        print(json.dumps(fetch(), indent=1))
        return 0
    if not args.watch:
        console.print(render(fetch()))
        return 0
    from rich.live import Live

    with Live(render(fetch()), console=console, refresh_per_second=2) as live:
        try:
            while True:
                time.sleep(args.interval)
                live.update(render(fetch()))
        except KeyboardInterrupt:
            return 0


def _sample() -> Path:
    from rescoin.offline.traces import sample_trace_path

    return sample_trace_path()


# -- demo -------------------------------------------------------------------------------------
def _demo_history_dir(given: str | None) -> Path:
    """A directory no earlier run wrote to: a second demo never doubles the rows analyze sees."""
    if given is not None:
        if Path(given).is_dir() and any(Path(given).glob("history-*.csv")):
            raise UserError(f"{given} already holds history from an earlier run; give a new directory "
                            "(or leave out --history for a fresh one)")
        return Path(given)
    base = f"rescoin-history-{time.strftime('%Y%m%d-%H%M%S')}"
    out, n = Path(base), 1
    while out.exists():
        n += 1
        out = Path(f"{base}-{n}")
    return out


def cmd_demo(args: argparse.Namespace) -> int:
    from rescoin.core.loop import ControlLoop, run_daemon
    from rescoin.core.registry import build
    from rescoin.hosts.sim import SimHost
    from rescoin.offline.historycsv import HistoryWriter
    from rescoin.offline.simulate import SimSettings, simulate
    from rescoin.ops.paths import PathError
    from rescoin.view import LiveView, metric_tables, progress

    console = Console()
    out = _demo_history_dir(args.history)
    try:
        writer = HistoryWriter(out, "demo-host")  # first: a bad --history is the only line printed
    except PathError as e:
        raise UserError(str(e)) from None
    path = args.trace or str(_sample())
    trace = _load(path, args.vms, args.days, 0.0, 0, console)
    console.print(f"[bold]rescoin demo[/]: {trace.name}, overcommit {overcommit_text(args.overcommit)}. "
                  "Data: Bitbrains GWA-T-12 (Shen, van Beek, Iosup, CCGrid 2015; gwa.ewi.tudelft.nl).")
    host = SimHost(trace, overcommit=args.overcommit)
    loop = ControlLoop(host, build("rescoin"), period=float(trace.period))
    console.print(f"history: writing to {out}/")
    stop = threading.Event()
    speed = trace.n_periods * trace.period / max(args.seconds, 0.1)
    with writer, LiveView(console, "rescoin on a simulated host") as view:
        last = {}

        def on_step(step) -> None:
            writer.try_write(step, loop.history)
            view.update(step, loop.history)
            last["step"] = step

        run_daemon(loop, float(trace.period), stop, on_step, speed=speed)
        if "step" in last:
            view.update(last["step"], loop.history, force=True)
    console.print(f"history: {writer.rows} rows in {out}/")
    policies = ["none", "static", "mom", "rescoin", "oracle"]  # none: what an unmanaged host costs
    with progress(console) as bar:
        tasks = {p: bar.add_task(p, total=trace.n_periods) for p in policies}
        result = simulate(trace, policies, SimSettings(overcommit=args.overcommit),
                          on_step=lambda name, _s: bar.advance(tasks[name]))
    for table in metric_tables(result):
        console.print(table)
    return 0


# -- parser -------------------------------------------------------------------------------------
def _add_simulate(sub: argparse._SubParsersAction) -> None:
    from rescoin.core.registry import POLICIES

    s = sub.add_parser("simulate", help="evaluate policies on a trace (rescoin vs peers vs the oracle)",
                       description="Replay a trace through the control loop once per policy and print the metrics.")
    s.add_argument("--trace", required=True, help="trace directory (Bitbrains, PlanetLab or Azure v1 format)")
    _trace_args(s)
    s.add_argument("--policies", default=None, help=f"comma-separated; default all: {','.join(POLICIES)}")
    s.add_argument("--model", default=None, help="predictor model TOML (default models/default.toml)")
    s.add_argument("--weights", type=_weights, default=None, metavar="W,W,...",
                   help="per-VM weights, repeated over the VMs (e.g. 1,2,4); default all 1")
    s.add_argument("--seed", type=int, default=0, help="recorded in the output; the replay itself is deterministic")
    s.add_argument("--format", choices=("table", "json"), default="table")
    s.set_defaults(func=cmd_simulate)


def _add_run(sub: argparse._SubParsersAction) -> None:
    from rescoin.core.registry import POLICIES

    r = sub.add_parser("run", help="run the scheduler daemon",
                       description="Run the control loop every period until SIGTERM/SIGINT; SIGHUP reloads the "
                                   "configuration. Options given here override the configuration file.")
    r.add_argument("--config", default=None, metavar="PATH",
                   help="TOML configuration (default /etc/rescoin/rescoin.toml)")
    r.add_argument("--uri", default=None, help="hypervisor URI (default qemu:///system), or sim:TRACE_DIR")
    r.add_argument("--policy", default=None, choices=[p for p in POLICIES if p != "oracle"])
    r.add_argument("--model", default=None, help="predictor model TOML (default models/default.toml)")
    r.add_argument("--period", type=_positive(float), default=None, help="seconds between steps (default 300)")
    r.add_argument("--speed", type=_nonneg, default=1.0,
                   help="time compression for sim hosts (0 = as fast as possible)")
    r.add_argument("--history", default=None, metavar="DIR", help="write history CSV files here ('' = none)")
    r.add_argument("--state", default=None, metavar="FILE", help="daemon state file, saved each period ('' = none)")
    r.add_argument("--status-socket", default=None, metavar="PATH", help="UNIX socket for `rescoin status`")
    r.add_argument("--metrics", default=None, metavar="ADDR:PORT", help="serve Prometheus metrics here")
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
    r.add_argument("--actuator", choices=("libvirt", "cgroup"), default=None,
                   help="apply CPU, blkio and pins through libvirt (default) or the VMs' cgroups directly")
    r.add_argument("--agent-timeout", type=_positive(float), default=None,
                   help="seconds to wait for all guest agents together (default 1)")
    _trace_args(r)
    r.set_defaults(func=cmd_run)


def _add_config(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("config", help="print a commented default configuration, or check one",
                       description="`rescoin config default` prints every option with its default and unit; "
                                   "`rescoin config check PATH` validates a file.")
    csub = c.add_subparsers(dest="action", metavar="ACTION")
    csub.required = True
    csub.add_parser("default", help="print a complete, commented default file")
    chk = csub.add_parser("check", help="validate a configuration file")
    chk.add_argument("path")
    c.set_defaults(func=cmd_config)


def _add_status(sub: argparse._SubParsersAction) -> None:
    st = sub.add_parser("status", help="what the running daemon sees and does (root)",
                        description="Reads the daemon's status socket: per VM usage, forecast, allocation, credit, "
                                    "last actions and agent health; host capacity, reserve and contention.")
    st.add_argument("--socket", default="/run/rescoin/status.sock")
    st.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    st.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    st.add_argument("--interval", type=_positive(float), default=2.0)
    st.set_defaults(func=cmd_status)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("demo", help="the control loop on a simulated host replaying a real trace sample",
                       description="Replays the shipped Bitbrains sample with a live view, writes history CSV, "
                                   "then compares rescoin, static, mom and the oracle.")
    d.add_argument("--trace", default=None, help="trace directory (default: the shipped 24-VM, 7-day sample)")
    d.add_argument("--vms", type=_positive(int), default=None)
    d.add_argument("--days", type=_positive(float), default=None)
    d.add_argument("--overcommit", type=overcommit, default=1.5, metavar="F|cpu=F,memory=F", help=OVERCOMMIT_HELP)
    d.add_argument("--seconds", type=_positive(float), default=20.0, help="wall time for the live replay")
    d.add_argument("--history", default=None, metavar="DIR",
                   help="a new directory for the history CSV (default: a new ./rescoin-history-DATE-TIME)")
    d.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: each sub-command adds its own parser."""
    p = argparse.ArgumentParser(prog="rescoin",
                                description="Predictive multi-resource fairness scheduler for KVM hosts.")
    p.add_argument("--version", action="version", version=f"rescoin {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in (_add_simulate, _add_run, _add_config, _add_status, _add_demo):
        add(sub)
    from rescoin.cli.agent import add_agent_parser
    from rescoin.cli.analyze import add_analyze_parser
    from rescoin.cli.balance import add_balance_parser
    from rescoin.cli.density import add_density_parser
    from rescoin.cli.fit import add_fit_parser
    from rescoin.cli.lab import add_lab_parser
    from rescoin.cli.sweep import add_sweep_parser

    add_lab_parser(sub)
    add_agent_parser(sub)
    add_analyze_parser(sub)
    add_fit_parser(sub)
    add_density_parser(sub)
    add_sweep_parser(sub)
    add_balance_parser(sub)
    return p


def dispatch(args: argparse.Namespace) -> int:
    """Run the chosen sub-command: a user error is one line and exit 2, Ctrl-C exit 130.

    A reader that goes away (``rescoin status --json | head``) ends the command quietly with exit 1,
    as Python's documentation recommends: no traceback, and no second error when Python flushes
    stdout on exit.
    """
    try:
        code = args.func(args)
        sys.stdout.flush()  # buffered output meets a closed pipe here, not at interpreter exit
        return code
    except RescoinError as e:
        print(f"rescoin: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        if not stdout_reader_gone():
            raise  # some other pipe or socket: a real error, not a reader that has had enough
        _stdout_to_devnull()
        return 1


def stdout_reader_gone(fd: int | None = None) -> bool:
    """Has the reader of stdout (or of ``fd``) gone away? poll() flags a pipe without readers as an error."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno() if fd is None else fd, select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):  # no real file: cannot tell, assume so
        return True


def _stdout_to_devnull() -> None:
    """Point stdout at /dev/null so that what is still buffered is dropped, not written to a closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):  # not a real file (captured by a test harness)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives until exit
    finally:
        os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return dispatch(args)

