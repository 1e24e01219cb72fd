"""``rescoin density``: each policy's highest overcommit at equal service, through dask.distributed."""
from __future__ import annotations

import argparse
import json
import logging
import textwrap
import time

from rich.console import Console

from rescoin.cli.argtypes import number, overcommit, overcommit_text
from rescoin.errors import UserError
from rescoin.offline import density as dens
from rescoin.offline.sweep import RunSpec, Slice, SweepError, rows, runner, write_rows

LEGEND = {
    "density": "highest factor of the resource meeting the objective (median slice; - = not even at 1)",
    "min/max": "the worst and the best slice's density",
    "vs oracle": "density / the oracle's density on the same slice (0: fails at 1), median slice",
    "reclaim": "share of provisioned memory returned to the host, at the density",
    "swap": "share of periods the host swapped, at the density",
    "bal/VMh": "balloon changes per VM-hour, at the density",
    "again": "a higher grid factor where the objective holds again (non-monotone)",
}


def slices_of(args: argparse.Namespace) -> list[Slice]:
    if not args.slices:
        return [Slice(args.vm_offset, args.start_day, args.vms, args.days)]
    out = []
    for part in filter(None, (p.strip() for p in args.slices.split(","))):
        off, sep, day = part.partition(":")
        try:
            sl = Slice(int(off), float(day), args.vms, args.days)
        except ValueError:
            sl = None
        if not sep or sl is None or sl.vm_offset < 0 or not sl.start_day >= 0:
            raise UserError(f"--slices: {part!r} is not VM_OFFSET:START_DAY (e.g. 175:15,275:15)")
        out.append(sl)
    if not out:
        raise UserError("--slices: no slice given (e.g. 175:15,275:15)")
    return out


def held_of(args: argparse.Namespace) -> dict[str, float]:
    """Every resource's factor but the varied one's (which the search sets)."""
    from rescoin.cli.argtypes import OVERCOMMIT_KEYS
    from rescoin.hosts.sim import overcommit_factors

    if isinstance(args.hold, dict) and args.resource in args.hold:
        raise UserError(f"--hold names {args.resource}, the resource being varied; hold only the others")
    factors = overcommit_factors(args.hold)
    return {k: float(factors[i]) for i, k in enumerate(OVERCOMMIT_KEYS) if k != args.resource}


def check(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """Policies (the oracle always among them: the ratios need it) and memory presets; the trace's path."""
    from rescoin.hosts.simmemory import PRESETS
    from rescoin.offline.simulate import parse_policies
    from rescoin.offline.traces import TraceError, detect_format
    from rescoin.offline.traces.files import check_selection

    try:
        policies = parse_policies(args.policies)
        check_selection(args.vms, args.vm_offset, args.days, args.start_day)
        detect_format(args.trace)
    except (ValueError, TraceError) as e:
        raise UserError(str(e)) from None
    if "oracle" not in policies:
        policies.append("oracle")
    presets = [m.strip() for m in args.memory_model.split(",") if m.strip()]
    bad = [m for m in presets if m not in PRESETS]
    if bad or not presets:
        raise UserError(f"--memory-model: unknown {', '.join(bad) or 'nothing'}; choose from {', '.join(PRESETS)}")
    if args.model:
        from rescoin.core.predict import load_model

        try:
            load_model(args.model)
        except ValueError as e:
            raise UserError(str(e)) from None
    return policies, presets


def _search(args, policies, presets, slices, held, console):
    """Every (policy, slice, preset) searched together; returns what was found, the runs and the failures."""
    from rescoin.view import progress

    done: list = []
    keys = [(p, s, m) for m in presets for s in slices for p in policies]

    def spec(key, f: float) -> RunSpec:
        p, s, m = key
        oc = tuple(sorted({**held, args.resource: f}.items()))
        return RunSpec(args.trace, s, p, oc, m, args.model, f)

    try:
        with runner(args.scheduler, args.workers) as r, progress(console) as bar:
            task = bar.add_task("replays", total=0)

            def run_round(runs):
                specs = {spec(k, f): (k, f) for k, f in runs}
                bar.update(task, total=bar.tasks[0].total + len(specs))
                outs = r.run(list(specs), on_done=lambda _o: bar.advance(task))
                done.extend(outs)
                return {specs[o.spec]: o.result for o in outs}

            found = dens.search(keys, run_round, dens.grid(args.grid_max))
    except SweepError as e:
        raise UserError(str(e)) from None
    return found, done


def density_result(args, policies, presets, slices, held, found, done) -> dict:
    """The JSON object: resource, hold, policies (the first preset's), and per preset when several."""
    per = {m: dens.summarise({(p, s): found[(p, s, m)] for p in policies for s in slices}, policies, slices)
           for m in presets}
    out: dict = {"resource": args.resource, "hold": held, "policies": per[presets[0]],
                 "memory_model": presets[0] if len(presets) == 1 else presets,
                 "slices": [{"vm_offset": s.vm_offset, "start_day": s.start_day, "vms": s.vms, "days": s.days}
                            for s in slices],
                 "grid": list(dens.grid(args.grid_max)), "bisect_steps": dens.BISECT_STEPS,
                 "failed": [{"run": o.spec.name, "error": o.error} for o in done if o.error]}
    if len(presets) > 1:
        out["memory_models"] = {m: {"policies": per[m]} for m in presets}
    return out


def _fmt(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _tables(result: dict) -> list:
    from rich.table import Table

    from rescoin.view import COMPACT, Col, fit_tables

    several = len(result["slices"]) > 1
    cols = [Col("policy", "left"), Col("density")] + ([Col("min"), Col("max")] if several else []) + [
        Col("vs oracle"), Col("reclaim"), Col("swap"), Col("bal/VMh"), Col("again")]
    hold = overcommit_text(result["hold"])
    models = result.get("memory_models") or {result["memory_model"]: {"policies": result["policies"]}}
    out: list = []
    for name, block in models.items():
        body = []
        for p, row in block["policies"].items():
            again = row["holds_again_at"]
            again = [a for a in again if a is not None] if isinstance(again, list) else [again]
            body.append([p, _fmt(row["density"])] + ([_fmt(row["min"]), _fmt(row["max"])] if several else []) + [
                _fmt(row["ratio_to_oracle"]), _fmt(row["reclaimed"], 3), _fmt(row["swap"], 3),
                _fmt(row["balloon_changes_per_vm_hour"]), ",".join(f"{a:g}" for a in again if a is not None) or "-"])
        title = f"{result['resource']} density, held {hold}, memory model {name}"
        out += fit_tables(title, cols, body, **COMPACT)
    key = Table.grid(padding=(0, 2, 0, 0))
    key.add_column(no_wrap=True)
    key.add_column()
    for k in LEGEND if several else [k for k in LEGEND if k != "min/max"]:
        key.add_row(k, LEGEND[k])
    out.append(key)
    return out


def cmd_density(args: argparse.Namespace) -> int:
    policies, presets = check(args)
    slices = slices_of(args)
    held = held_of(args)
    console = Console(stderr=True)
    if not getattr(args, "verbose", False):  # the cluster's start and stop say nothing an evaluator needs
        logging.getLogger("distributed").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    found, done = _search(args, policies, presets, slices, held, console)
    result = density_result(args, policies, presets, slices, held, found, done)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    for f in result["failed"]:
        console.print(f"failed: {f['run']}: {f['error']}", markup=False, highlight=False, soft_wrap=True)
    if args.out:
        try:
            write_rows(rows(done, dens.objective), args.out)
        except SweepError as e:
            raise UserError(str(e)) from None
    if args.format == "json":
        print(json.dumps(result, indent=1))
    else:
        out = Console()
        out.print(f"{len(done)} replays ({len(result['failed'])} failed) in {result['seconds']} s", highlight=False)
        for t in _tables(result):
            out.print(t)
    return 0


DESCRIPTION = textwrap.fill(f"""\
For each policy, the highest overcommit factor of --resource (the others held) at which the service
objective holds: memory violations <= {dens.MEMORY_VIOLATIONS:g} of VM-periods, CPU violations <=
{dens.CPU_VIOLATIONS:g} and CPU worst-off >= {dens.CPU_WORST_OFF:g}, zero sharing-incentive breaches
on every resource. Grid {', '.join(f'{g:g}' for g in dens.GRID)} (--grid-max adds higher factors),
then {dens.BISECT_STEPS} bisection steps between the last passing and the first failing grid factor.
Monotonicity is not guaranteed: the density is the highest factor f at which the objective holds at
f and at every grid factor below f (the first failing grid factor ends the search); a higher grid
factor where it holds again is reported as "holds_again_at", not as the density. Null where factor 1
already fails. The runs go through dask.distributed: a LocalCluster (one worker per core) unless
--scheduler names one.""", 79)


def common_args(p: argparse.ArgumentParser) -> None:
    """What density and sweep share: the trace, its slices, the resource varied and held, where to run."""
    p.add_argument("--trace", required=True, help="trace directory (Bitbrains, PlanetLab or Azure v1 format)")
    p.add_argument("--resource", choices=("memory", "cpu"), required=True, help="the resource whose factor varies")
    p.add_argument("--hold", type=overcommit, default=1.5, metavar="F|cpu=F,...",
                   help="the other resources' factors: one for all, or per resource (default 1.5)")
    p.add_argument("--vms", type=number(int, 0, strict=True), default=None, help="VMs per slice (default: all)")
    p.add_argument("--days", type=number(float, 0, strict=True), default=None, help="days per slice (default: all)")
    p.add_argument("--start-day", type=number(float, 0), default=0.0, help="start day (one slice)")
    p.add_argument("--vm-offset", type=number(int, 0), default=0, help="VMs skipped first (one slice)")
    p.add_argument("--slices", default=None, metavar="OFFSET:DAY,...",
                   help="several slices (VM offset:start day each), instead of --vm-offset/--start-day")
    p.add_argument("--policies", default=None, help="comma-separated (default all; the oracle is always added)")
    p.add_argument("--memory-model", default="default", metavar="PRESET[,PRESET]",
                   help="memory model preset(s): off, default, fast; several = a sensitivity sweep")
    p.add_argument("--model", default=None, help="predictor model TOML (default models/default.toml)")
    p.add_argument("--scheduler", default=None, metavar="ADDR",
                   help="tcp://HOST:PORT of a running dask scheduler; 'none' = in this process "
                        "(default: a new LocalCluster)")
    p.add_argument("--workers", type=number(int, 0, strict=True), default=None,
                   help="LocalCluster worker processes (default: one per core)")


def add_density_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``density`` to an argparse sub-parser set."""
    p = subparsers.add_parser("density", help="each policy's highest overcommit at equal service (on Dask)",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(p)
    p.add_argument("--grid-max", type=number(float, 8.0), default=8.0, metavar="F",
                   help=f"highest factor searched (default 8; above it: {', '.join(f'{f:g}' for f in dens.BEYOND)})")
    p.add_argument("--out", default=None, metavar="FILE.json|FILE.csv", help="write every replay's metrics here")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(func=cmd_density)
    return p
