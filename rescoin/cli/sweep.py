"""``rescoin sweep``: policies x slices x factors x memory models, every replay's metrics in one file."""
from __future__ import annotations

import argparse
import logging
import time

from rich.console import Console

from rescoin.cli.density import check, common_args, held_of, slices_of
from rescoin.errors import UserError
from rescoin.offline import density as dens
from rescoin.offline.sweep import RunSpec, SweepError, rows, runner, write_rows


def _factors(text: str) -> list[float]:
    try:
        out = [float(f) for f in text.split(",") if f.strip()]
    except ValueError:
        out = []
    if not out or not all(f > 0 and f < float("inf") for f in out):
        raise UserError(f"--factors: {text!r} is not a list of numbers > 0 (e.g. 1,1.5,2,3)")
    return out


def cmd_sweep(args: argparse.Namespace) -> int:
    policies, presets = check(args)
    slices, held, factors = slices_of(args), held_of(args), _factors(args.factors)
    if not args.out.endswith((".json", ".csv")):
        raise UserError(f"--out {args.out}: give a .json or a .csv file")
    err = Console(stderr=True)
    if not getattr(args, "verbose", False):
        logging.getLogger("distributed").setLevel(logging.WARNING)
    specs = [RunSpec(args.trace, s, p, tuple(sorted({**held, args.resource: f}.items())), m, args.model, f)
             for m in presets for s in slices for p in policies for f in factors]
    from rescoin.view import progress

    t0 = time.perf_counter()
    try:
        with runner(args.scheduler, args.workers) as r, progress(err) as bar:
            task = bar.add_task("replays", total=len(specs))
            done = r.run(specs, on_done=lambda _o: bar.advance(task))
        write_rows(rows(done, dens.objective), args.out)
    except SweepError as e:
        raise UserError(str(e)) from None
    failed = [o for o in done if o.error]
    for o in failed:
        err.print(f"failed: {o.spec.name}: {o.error}", markup=False, highlight=False, soft_wrap=True)
    print(f"{len(done)} replays ({len(failed)} failed) in {time.perf_counter() - t0:.1f} s: {args.out}")
    return 0


def add_sweep_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``sweep`` to an argparse sub-parser set."""
    p = subparsers.add_parser(
        "sweep", help="many replays (policies x slices x factors x memory models) to one JSON/CSV (on Dask)",
        description="Every policy on every slice at every factor of --resource and every memory model preset, "
                    "through dask.distributed; one row per replay (its metrics, and whether the density "
                    "objective holds) in --out. A failed replay is a row with its error.")
    common_args(p)
    p.add_argument("--factors", required=True, metavar="F,F,...", help="factors of --resource, e.g. 1,1.5,2,3")
    p.add_argument("--out", required=True, metavar="FILE.json|FILE.csv", help="where the rows go")
    p.set_defaults(func=cmd_sweep)
    return p
