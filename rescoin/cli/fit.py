"""``rescoin fit``: the argparse of the sub-command and the run that turns its problems into UserError
(the fit itself is :mod:`rescoin.offline.fit`)."""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from rescoin.core.predict import PaddedEWMA, load_model
from rescoin.core.resources import N_RES, RESOURCES, Resource
from rescoin.errors import UserError
from rescoin.offline.analysis import HistoryData, HistoryError, load_with_progress
from rescoin.offline.fit import (
    DEFAULT_BASE,
    DEFAULT_UNDER_WEIGHT,
    FITTED,
    MIN_PERIODS,
    PER_VM_DAYS,
    WARN_PERIODS,
    FitResult,
    Series,
    check_table,
    fit,
    history_length_problem,
    model_text,
    output_problem,
    series_from_history,
    show_path,
    summary,
    write_model,
)
from rescoin.offline.fit.report import loss_text
from rescoin.view import progress


def print_tables(console, res: FitResult, summ: dict, holdout: float) -> None:
    t = Table(title="fitted parameters (loss on the fitted part: base -> fitted)", title_justify="left",
              header_style="bold")
    for c in ("resource", *FITTED, "loss base", "loss fitted"):
        t.add_column(c, justify="left" if c == "resource" else "right")
    for r in RESOURCES:
        p = res.fitted[r]
        s = summ[r.label]
        t.add_row(r.label + ("" if r.label in res.fitted_resources else " (no data: base kept)"),
                  *[f"{getattr(p, n):g}" for n in FITTED], loss_text(s["base"]["fit_loss"]),
                  loss_text(s["fitted"]["fit_loss"]))
    console.print(t)
    if holdout <= 0:
        console.print("no held-back check (--holdout 0)")
        return
    h = Table(title=f"held-back check: the last {holdout:.0%} of each VM's series, not used for fitting",
              title_justify="left", header_style="bold")
    cols = ["resource", "under base", "under fitted", "over base", "over fitted", "loss base", "loss fitted"]
    if res.per_vm_sums is not None:
        cols += ["under per-VM", "loss per-VM"]
    for c in cols:
        h.add_column(c, justify="left" if c == "resource" else "right")
    for r in RESOURCES:
        s = summ[r.label]
        row = [r.label, loss_text(s["base"]["held_under_error"]), loss_text(s["fitted"]["held_under_error"]),
               loss_text(s["base"]["held_over_error"]), loss_text(s["fitted"]["held_over_error"]),
               loss_text(s["base"]["held_loss"]), loss_text(s["fitted"]["held_loss"])]
        if res.per_vm_sums is not None:
            row += [loss_text(s["per_vm"]["held_under_error"]), loss_text(s["per_vm"]["held_loss"])]
        h.add_row(*row)
    console.print(h)


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return v


@dataclass(frozen=True)
class UnderWeight:
    """The loss's weight of under-estimation, one value per resource (``4`` or ``cpu=4,memory=10``)."""

    values: tuple[float, ...]
    text: str

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.array(self.values, dtype=dtype or float)

    def __str__(self) -> str:
        return self.text

    @classmethod
    def parse(cls, text: str, default: float | tuple[float, ...] = 4.0) -> UnderWeight:
        """``text`` as weights; resources it does not name get ``default`` (one number or one per resource)."""
        def number(t: str) -> float:
            try:
                v = float(t)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{t!r} is not a number") from None
            if not (v > 0 and math.isfinite(v)):
                raise argparse.ArgumentTypeError(f"weights must be > 0, got {t}")
            return v

        text = text.strip()
        if "=" not in text:
            return cls((number(text),) * N_RES, f"{number(text):g}")
        values = list(default) if isinstance(default, tuple) else [float(default)] * N_RES
        for item in text.split(","):
            key, _, val = item.partition("=")
            try:
                r = Resource.parse(key)
            except ValueError as e:
                raise argparse.ArgumentTypeError(str(e)) from None
            values[int(r)] = number(val)
        return cls(tuple(values), ",".join(f"{r.label}={values[int(r)]:g}" for r in RESOURCES))


def _weight(text: str) -> UnderWeight:
    """``--under-weight``: resources not named keep their default weight."""
    return UnderWeight.parse(text, default=UnderWeight.parse(DEFAULT_UNDER_WEIGHT).values)


def _rounds(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= v <= 10:
        raise argparse.ArgumentTypeError(f"must be 1..10, got {text}")
    return v

def _progress_ticker(bar):
    current = {}

    def make_tick(label: str, total: int):
        if "task" in current:
            bar.remove_task(current["task"])
        task = current["task"] = bar.add_task(label, total=total)
        return lambda: bar.advance(task)

    return make_tick


def _models(args: argparse.Namespace) -> tuple[PaddedEWMA, PaddedEWMA | None, Path | None]:
    """The base and --check models and the -o path, all checked before the (slow) history load and fit."""
    if not args.output and not args.check:
        raise UserError("say where to write the fitted model: -o models/NAME.toml (or score a model with --check)")
    try:
        base_model = load_model(args.base)
        checked = load_model(args.check) if args.check else None
    except ValueError as e:
        raise UserError(str(e)) from None
    out_path = Path(args.output) if args.output and checked is None else None
    if out_path is not None:
        if out_path.resolve() == Path(args.base).resolve():
            raise UserError(f"{args.output}: that is the base model; write the fitted model to another file")
        problem = output_problem(out_path, args.force)
        if problem:
            raise UserError(problem)
    return base_model, checked, out_path


def _series(args: argparse.Namespace, err: Console, checking: bool) -> tuple[HistoryData, Series]:
    try:
        data = load_with_progress(args.history, err)
        s = series_from_history(data)
    except HistoryError as e:
        raise UserError(str(e)) from None
    msg = data.skipped_message()
    if msg:
        err.print(msg, markup=False, highlight=False, soft_wrap=True)
    short = history_length_problem(s) if not checking else None
    if short and short[0] == "error":
        raise UserError(short[1])
    if short:
        print(f"rescoin: warning: {short[1]}", file=sys.stderr)
    return data, s


def _run_check(args: argparse.Namespace, base_model: PaddedEWMA, checked: PaddedEWMA, data: HistoryData,
               s: Series, out: Console, err: Console) -> int:
    names = {"base": base_model, "checked": checked}
    with progress(err, transient=True) as bar:
        table = check_table(s, names, args.under_weight, _progress_ticker(bar))
    t = Table(title=f"{show_path(args.check)} against the base {show_path(args.base)} on all of this history "
                    f"(no fitting; loss weighs under-estimation x{args.under_weight})",
              title_justify="left", header_style="bold")
    for c in ("resource", "under base", "under checked", "over base", "over checked", "loss base",
              "loss checked"):
        t.add_column(c, justify="left" if c == "resource" else "right")
    for r in RESOURCES:
        b, c = table[r.label]["base"], table[r.label]["checked"]
        t.add_row(r.label, loss_text(b["under_error"]), loss_text(c["under_error"]), loss_text(b["over_error"]),
                  loss_text(c["over_error"]), loss_text(b["loss"]), loss_text(c["loss"]))
    out.print(f"{data.n:,} rows, {s.shape[1]} VMs, {s.shape[0]} periods of {s.period:g} s", highlight=False)
    out.print(t)
    return 0


def _run_fit(args: argparse.Namespace, base_model: PaddedEWMA, out_path: Path, data: HistoryData, s: Series,
             out: Console, err: Console) -> int:
    name = args.name or out_path.name.removesuffix(".toml")
    with progress(err, transient=True) as bar:
        try:
            res = fit(s, base_model.params, w_under=args.under_weight, holdout=args.holdout, per_vm=args.per_vm,
                      rounds=args.rounds, progress=_progress_ticker(bar))
        except ValueError as e:
            raise UserError(str(e)) from None
    summ = summary(res, args.under_weight)
    out.print(f"{data.n:,} rows, {s.shape[1]} VMs, {s.shape[0]} periods of {s.period:g} s; "
              f"{res.candidates} candidates in {args.rounds} rounds", highlight=False)
    print_tables(out, res, summ, args.holdout)
    text = model_text(res, summ, args, data, s, name)
    try:
        write_model(out_path, text, args.force)
    except OSError as e:
        raise UserError(f"{out_path}: cannot write the model: {e.strerror or e}") from None
    except ValueError as e:  # a bug here, not the user's: say so plainly
        raise UserError(f"{out_path}: the written model does not load: {e}") from None
    out.print(f"wrote {out_path} (loads with rescoin run --model {out_path})", highlight=False)
    if args.per_vm:
        out.print(f'  with per-VM parameters for {len(res.per_vm)} VMs ([vm."UUID".resource] tables)',
                  highlight=False, markup=False)
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    err = Console(stderr=True)
    out = Console(width=None if sys.stdout.isatty() else 140)
    base_model, checked, out_path = _models(args)
    data, s = _series(args, err, checking=checked is not None)
    if checked is not None:
        return _run_check(args, base_model, checked, data, s, out, err)
    assert out_path is not None  # _models: -o is given when --check is not
    return _run_fit(args, base_model, out_path, data, s, out, err)


def add_fit_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``fit`` to an argparse sub-parser set; ``func`` takes the args and returns an exit code."""
    p = subparsers.add_parser(
        "fit", help="fit predictor parameters to history CSV files (writes a model TOML)",
        description="Replay each VM's usage and unmet-demand signal from history through the padded FUSD-EWMA "
                    "predictor and choose, per resource, alpha_up, alpha_down, pad_error, pad_std and pad_frac "
                    "that minimise loss = sum(W x max(usage - forecast, 0) + max(forecast - usage, 0)) / sum(usage) "
                    "(forecast for period t+1 against its usage). Other parameters come from --base. The last "
                    "--holdout share of each series is held back and the fitted and base models are compared on "
                    "it. The output loads with `rescoin run --model PATH` and `rescoin simulate --model PATH`. "
                    f"The defaults are those that made models/default.toml. History of fewer than {WARN_PERIODS} "
                    f"periods per VM (median) gives a warning, of fewer than {MIN_PERIODS} an error; an existing "
                    "-o file is replaced only with --force.")
    p.add_argument("history", nargs="+", metavar="HISTORY",
                   help="history CSV files (.csv, .csv.gz), globs or directories")
    p.add_argument("-o", "--output", metavar="PATH", help="model TOML to write, e.g. models/NAME.toml "
                                                          "(its directory must exist)")
    p.add_argument("--force", action="store_true", help="replace the -o file if it exists")
    p.add_argument("--base", default=str(DEFAULT_BASE), metavar="PATH",
                   help="model whose other parameters are kept and compared against "
                        f"(default {show_path(DEFAULT_BASE)}, "
                        "the base of the shipped models/default.toml)")
    p.add_argument("--under-weight", type=_weight, default=_weight(DEFAULT_UNDER_WEIGHT), metavar="W",
                   help="weight of under-estimation in the loss: one number, or per resource like memory=1000 "
                        f"(the others keep theirs); default {DEFAULT_UNDER_WEIGHT}, which made models/default.toml")
    p.add_argument("--holdout", type=_fraction, default=0.25, metavar="FRACTION",
                   help="share of each VM's series held back for the check (default 0.25; 0 = fit on all)")
    p.add_argument("--per-vm", action="store_true",
                   help=f"also fit per-VM parameters (VMs with >= {PER_VM_DAYS:g} days of samples), written "
                        "into the model as [vm.\"UUID\".resource] tables that run and simulate use for those VMs")
    p.add_argument("--rounds", type=_rounds, default=2, help="rounds of the coordinate search (default 2)")
    p.add_argument("--name", default=None, help="model name in the file (default: the output file's stem)")
    p.add_argument("--comment", action="append", metavar="TEXT",
                   help="a line for the output's header comment (repeatable), e.g. how the history was made")
    p.add_argument("--check", metavar="MODEL", default=None,
                   help="fit nothing: score MODEL against --base on all of HISTORY (an out-of-sample check on "
                        "history the model was not fitted on)")
    p.set_defaults(func=cmd_fit)
    return p
