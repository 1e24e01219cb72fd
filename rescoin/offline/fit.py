"""Fit predictor parameters to history: ``rescoin fit HISTORY... -o models/NAME.toml`` (DESIGN section 6).

Each VM's recorded usage and unmet-demand signal are replayed through a real
:class:`~rescoin.core.predict.PaddedEWMA`, one period at a time and vectorised over
all VMs and over many candidate parameter sets at once; the forecast made after
period t is scored against the usage of period t+1 with a loss that weighs
under-estimation more (it hurts VMs; over-estimation only wastes the host)::

    loss = sum(w_under * max(usage - forecast, 0) + max(forecast - usage, 0)) / sum(usage)

Per resource, ``alpha_up, alpha_down, pad_error, pad_std, pad_frac`` are chosen
by coordinate search over a grid (each stage tries every combination of one
group of parameters with the others held at their best so far, and always
includes the current values, so the loss never rises). The other parameters
(growth, threshold, hold_last, season, max_growth, pad_beta) come from the base
model. The first part of each VM's series is used for fitting; the last
``--holdout`` share is held back to compare the fitted and the base model on
data the search never saw.

Candidates run side by side as rows: row block k of the replayed rows is
candidate k, built with :meth:`PaddedEWMA.from_rows`, the predictor's public
constructor for per-row parameters.
"""
from __future__ import annotations

import argparse
import errno
import itertools
import math
import os
import shlex
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from rescoin import __version__
from rescoin.core.history import History
from rescoin.core.model import Observation, VMSet
from rescoin.core.predict import MODELS_DIR, PaddedEWMA, PredictorParams, load_model
from rescoin.core.resources import N_RES, RESOURCES, HostCapacity, Resource
from rescoin.offline.analysis import HistoryData, HistoryError, load_with_progress

FITTED = ("alpha_up", "alpha_down", "pad_error", "pad_std", "pad_frac")
GRID: dict[str, tuple[float, ...]] = {
    "alpha_up": (0.1, 0.2, 0.3, 0.5, 0.7, 0.85, 1.0),
    "alpha_down": (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0),
    "pad_error": (0.0, 0.5, 1.0, 2.0, 3.0, 5.0),
    "pad_std": (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0),
    "pad_frac": (0.0, 0.02, 0.05, 0.1, 0.2, 0.3),
}
STAGES: tuple[tuple[str, ...], ...] = (("alpha_up", "alpha_down"), ("pad_error", "pad_std"), ("pad_frac",))
PER_VM_DAYS = 2.0  # per-VM parameters only for VMs with at least this much history in the fitted part
#: the defaults that made the shipped models/default.toml (see its header and the README), so that a plain
#: ``rescoin fit HISTORY -o PATH`` gives a model of the shipped quality
DEFAULT_BASE = MODELS_DIR / "hand-tuned.toml"
DEFAULT_UNDER_WEIGHT = "cpu=50,memory=500,disk=50,net=50"
#: periods of history per VM (median over VMs) below which the fit warns that it is not to be trusted: a day of
#: 5-minute periods, the least that shows a daily cycle; below MIN_PERIODS (every VM) there is nothing to fit
WARN_PERIODS = 288
MIN_PERIODS = 3
FIT, HELD = 1, 2  # parts of each series: 0 = not scored


# -- series ----------------------------------------------------------------------------------
@dataclass
class Series:
    """Usage and signal on a regular grid: ``(T, n_vms, N_RES)``, NaN where a VM has no sample."""

    ts: np.ndarray
    uuids: np.ndarray
    names: np.ndarray
    usage: np.ndarray
    signal: np.ndarray
    period: float

    @property
    def shape(self) -> tuple[int, int]:
        return self.usage.shape[0], self.usage.shape[1]


def series_from_history(d: HistoryData) -> Series:
    """Rows of HistoryData onto a (period, VM, resource) grid, periods bucketed by the median step."""
    if d.n == 0:
        raise HistoryError("no usable history rows to fit on")
    res = d.res.astype(np.int64)
    group = res * max(d.n_vms, 1) + d.vm
    dt = np.diff(d.ts)[group[1:] == group[:-1]]
    dt = dt[dt > 0]
    period = float(np.median(dt)) if dt.size else 300.0
    t0 = float(d.ts.min())
    buckets, tidx = np.unique(np.round((d.ts - t0) / period).astype(np.int64), return_inverse=True)
    shape = (buckets.size, d.n_vms, N_RES)
    usage = np.full(shape, np.nan)
    signal = np.full(shape, np.nan)
    usage[tidx, d.vm, res] = d.values["usage"]
    signal[tidx, d.vm, res] = d.values["signal"]
    return Series(ts=t0 + buckets * period, uuids=d.uuids, names=d.names, usage=usage, signal=signal,
                  period=period)


def history_length_problem(s: Series) -> tuple[str, str] | None:
    """("error" | "warning", message) when the history is too short to fit on, else None."""
    per_vm = (~np.isnan(s.usage)).any(axis=2).sum(axis=0)  # periods with a sample, per VM
    longest, median = int(per_vm.max(initial=0)), float(np.median(per_vm)) if per_vm.size else 0.0
    if longest < MIN_PERIODS:
        return "error", (f"only {longest} period{'s' * (longest != 1)} of history per VM: a fit needs at least "
                         f"{MIN_PERIODS} (and {WARN_PERIODS}, a day of 5-minute periods, to be trusted)")
    if median < WARN_PERIODS:
        return "warning", (f"only {median:g} periods of history per VM (median over {per_vm.size} VMs; fewer than "
                           f"{WARN_PERIODS}, a day of 5-minute periods): the fitted model may be worse than the base; "
                           "check it with --check on other history")
    return None


def parts(s: Series, holdout: float) -> np.ndarray:
    """Per period, VM and resource: FIT for the first (1 - holdout) of each VM's samples, HELD after, 0 = none."""
    known = ~np.isnan(s.usage)
    count = known.sum(axis=0)
    fit_n = np.ceil((1.0 - holdout) * count)
    rank = np.cumsum(known, axis=0)
    out = np.where(rank <= fit_n[None], FIT, HELD).astype(np.int8)
    out[~known] = 0
    out[0] = 0  # the first period is never forecast
    return out


# -- replay ----------------------------------------------------------------------------------
@dataclass
class Sums:
    """Error sums of a replay, ``(K, n_vms, N_RES, 3)``: the last axis is the part (0, FIT, HELD)."""

    under: np.ndarray
    over: np.ndarray
    usage: np.ndarray

    def part(self, p: int) -> Sums:
        return Sums(self.under[..., p], self.over[..., p], self.usage[..., p])

    def loss(self, w_under: float, axis=None) -> np.ndarray:
        u, o, x = (a.sum(axis=axis) if axis is not None else a for a in (self.under, self.over, self.usage))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(x > 0, (np.asarray(w_under, dtype=float) * u + o) / x, np.nan)

    def ratio(self, which: str, axis=None) -> np.ndarray:
        a = getattr(self, which)
        a, x = (a.sum(axis=axis), self.usage.sum(axis=axis)) if axis is not None else (a, self.usage)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(x > 0, a / x, np.nan)


def _rows_vmset(n: int) -> VMSet:
    ids = np.array([f"row-{i}" for i in range(n)])
    return VMSet.build(ids, ids, np.ones((n, N_RES)))


def replay(pred: PaddedEWMA, s: Series, part: np.ndarray, k: int = 1,
           tick: Callable[[], None] | None = None) -> Sums:
    """Replay the series through ``pred`` for ``k`` row blocks of all VMs (block b = rows b*V .. b*V+V-1).

    The forecast made after period t is compared with the usage of period t+1.
    """
    T, V = s.shape
    n = k * V
    vms = _rows_vmset(n)
    host = HostCapacity("fit", np.ones(N_RES), 1)
    h = History(window=2)
    acc = np.zeros((3, k, V * N_RES * 3))  # under, over, usage; (k, V*R*part) with the part last
    col = np.arange(V * N_RES) * 3
    for t in range(T):
        u = np.tile(s.usage[t], (k, 1))
        sig = np.tile(s.signal[t], (k, 1))
        h.push(Observation(ts=s.ts[t], interval=s.period, host=host, vms=vms, usage=u, signal=sig,
                           controls=None, age=None))
        value = pred.predict(h).value
        if t + 1 < T:
            nxt = s.usage[t + 1].reshape(1, V * N_RES)
            e = nxt - value.reshape(k, V * N_RES)
            ok = ~np.isnan(e)  # both known (a forecast is NaN only before a VM's first sample)
            e[~ok] = 0.0
            pos = np.maximum(e, 0.0)
            idx = col + part[t + 1].reshape(-1)
            acc[0][:, idx] += pos
            acc[1][:, idx] += pos - e
            acc[2][:, idx] += np.where(ok, nxt, 0.0)
        if tick is not None:
            tick()
    shape = (k, V, N_RES, 3)
    return Sums(acc[0].reshape(shape), acc[1].reshape(shape), acc[2].reshape(shape))


def _params_for(base: dict[Resource, PredictorParams], values: dict[str, np.ndarray]) -> dict[Resource, PredictorParams]:
    """Per-resource parameters with the fitted ones from ``values[name]`` (each ``(N_RES,)``)."""
    return {r: replace(base[r], **{n: float(values[n][int(r)]) for n in FITTED}) for r in RESOURCES}


# -- search ----------------------------------------------------------------------------------
@dataclass
class FitResult:
    base: dict[Resource, PredictorParams]
    fitted: dict[Resource, PredictorParams]
    per_vm: dict[str, dict[Resource, PredictorParams]]  # uuid -> resource -> params (eligible VMs only)
    per_vm_loss: dict[str, dict[Resource, tuple[float, float]]]  # uuid -> resource -> (own, shared) fit loss
    base_sums: Sums  # (1, V, R, 3)
    fitted_sums: Sums
    per_vm_sums: Sums | None
    candidates: int
    fitted_resources: list[str]  # resources with data (others keep the base)


def _stage_grid(name: str, current: np.ndarray) -> list[float]:
    return sorted(set(GRID[name]) | {float(v) for v in np.unique(current)})


def fit(s: Series, base: dict[Resource, PredictorParams], w_under: float = 4.0, holdout: float = 0.25,
        per_vm: bool = False, rounds: int = 2,
        progress: Callable[[str, int], Callable[[], None]] | None = None) -> FitResult:
    """Coordinate search of the fitted parameters, per resource (and per VM with ``per_vm``).

    ``progress(description, total_steps)`` returns a tick function called once per replayed period.
    """
    T, V = s.shape
    part = parts(s, holdout)
    # current best: shared (per resource) and per VM, as (V, N_RES) arrays per parameter
    shared = {n: np.tile([getattr(base[r], n) for r in RESOURCES], (V, 1)).astype(float) for n in FITTED}
    own = {n: a.copy() for n, a in shared.items()}
    fit_samples = (part == FIT).sum(axis=0)  # (V, N_RES)
    eligible = fit_samples * s.period >= PER_VM_DAYS * 86400.0
    has_data = (np.nansum(np.where(part == FIT, s.usage, 0.0), axis=(0, 1)) > 0)
    n_cands = 0
    for rnd in range(rounds):
        # per-VM parameters: one more coordinate round in the last one, starting from the shared optimum
        vm_round = per_vm and rnd == rounds - 1
        if vm_round:
            own = {n: a.copy() for n, a in shared.items()}
        for stage in STAGES:
            grids = [sorted(set(_stage_grid(n, shared[n]) + (_stage_grid(n, own[n]) if vm_round else [])))
                     for n in stage]
            combos = list(itertools.product(*grids))
            K = len(combos)
            n_cands += K
            blocks = [shared] + ([own] if vm_round else [])
            rows = {}
            for n in FITTED:
                per_block = []
                for cur in blocks:
                    if n in stage:
                        j = stage.index(n)
                        vals = np.array([c[j] for c in combos], dtype=float)
                        per_block.append(np.broadcast_to(vals[:, None, None], (K, V, N_RES)))
                    else:
                        per_block.append(np.broadcast_to(cur[n][None], (K, V, N_RES)))
                rows[n] = np.concatenate(per_block).reshape(-1, N_RES)
            k_all = K * len(blocks)
            label = f"round {rnd + 1}/{rounds}: {' x '.join(stage)} ({K} candidates)"
            tick = progress(label, T) if progress else None
            sums = replay(PaddedEWMA.from_rows(base, rows, "fit"), s, part, k=k_all, tick=tick)
            fitpart = sums.part(FIT)
            shared_loss = fitpart.loss(w_under, axis=1)[:K]  # (K, N_RES), summed over VMs
            best = np.nanargmin(np.where(np.isnan(shared_loss), np.inf, shared_loss), axis=0)
            for n in stage:
                j = stage.index(n)
                vals = np.array([c[j] for c in combos])
                shared[n] = np.where(has_data[None], np.tile(vals[best], (V, 1)), shared[n])
            if vm_round:
                vm_loss = fitpart.loss(w_under)[K:]  # (K, V, N_RES)
                pick = np.argmin(np.where(np.isnan(vm_loss), np.inf, vm_loss), axis=0)  # (V, N_RES)
                ok = eligible & np.isfinite(np.take_along_axis(vm_loss, pick[None], 0)[0])
                for n in stage:
                    j = stage.index(n)
                    vals = np.array([c[j] for c in combos])
                    own[n] = np.where(ok, vals[pick], shared[n])
    fitted_vals = {n: shared[n][0] for n in FITTED}
    fitted = _params_for(base, fitted_vals)
    tick = progress("held-back check", 2 * T) if progress else None
    base_sums = replay(PaddedEWMA(base, "base"), s, part, tick=tick)
    fitted_sums = replay(PaddedEWMA(fitted, "fitted"), s, part, tick=tick)
    vm_params: dict[str, dict[Resource, PredictorParams]] = {}
    vm_loss: dict[str, dict[Resource, tuple[float, float]]] = {}
    per_vm_sums = None
    if per_vm:
        tick = progress("per-VM check", T) if progress else None
        per_vm_sums = replay(PaddedEWMA.from_rows(base, {n: own[n] for n in FITTED}, "fit"), s, part, tick=tick)
        own_l = per_vm_sums.part(FIT).loss(w_under)[0]
        shared_l = fitted_sums.part(FIT).loss(w_under)[0]
        for v in np.flatnonzero(eligible.any(axis=1)):
            u = str(s.uuids[v])
            for r in RESOURCES:
                if eligible[v, r] and has_data[r]:
                    vm_params.setdefault(u, {})[r] = replace(fitted[r], **{n: float(own[n][v, r]) for n in FITTED})
                    vm_loss.setdefault(u, {})[r] = (float(own_l[v, r]), float(shared_l[v, r]))
    return FitResult(base=base, fitted=fitted, per_vm=vm_params, per_vm_loss=vm_loss, base_sums=base_sums,
                     fitted_sums=fitted_sums, per_vm_sums=per_vm_sums, candidates=n_cands,
                     fitted_resources=[r.label for r in RESOURCES if has_data[r]])


# -- reports -----------------------------------------------------------------------------------
def _num(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def summary(res: FitResult, w_under: float) -> dict:
    """Per resource: fit-part loss before/after and the held-back errors of base, fitted (and per-VM)."""
    out = {}
    for r in RESOURCES:
        i = int(r)
        row = {}
        for name, sums in (("base", res.base_sums), ("fitted", res.fitted_sums), ("per_vm", res.per_vm_sums)):
            if sums is None:
                continue
            fp, hp = sums.part(FIT), sums.part(HELD)
            row[name] = {
                "fit_loss": _num(fp.loss(w_under, axis=(0, 1))[i]),
                "held_loss": _num(hp.loss(w_under, axis=(0, 1))[i]),
                "held_under_error": _num(hp.ratio("under", axis=(0, 1))[i]),
                "held_over_error": _num(hp.ratio("over", axis=(0, 1))[i]),
            }
        out[r.label] = row
    return out


def _f(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def print_tables(console, res: FitResult, summ: dict, holdout: float) -> None:
    from rich.table import Table

    t = Table(title="fitted parameters (loss on the fitted part: base -> fitted)", title_justify="left",
              header_style="bold")
    for c in ("resource", *FITTED, "loss base", "loss fitted"):
        t.add_column(c, justify="left" if c == "resource" else "right")
    for r in RESOURCES:
        p = res.fitted[r]
        s = summ[r.label]
        t.add_row(r.label + ("" if r.label in res.fitted_resources else " (no data: base kept)"),
                  *[f"{getattr(p, n):g}" for n in FITTED], _f(s["base"]["fit_loss"]), _f(s["fitted"]["fit_loss"]))
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
        row = [r.label, _f(s["base"]["held_under_error"]), _f(s["fitted"]["held_under_error"]),
               _f(s["base"]["held_over_error"]), _f(s["fitted"]["held_over_error"]),
               _f(s["base"]["held_loss"]), _f(s["fitted"]["held_loss"])]
        if res.per_vm_sums is not None:
            row += [_f(s["per_vm"]["held_under_error"]), _f(s["per_vm"]["held_loss"])]
        h.add_row(*row)
    console.print(h)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(round(v, 10))
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _table(params: PredictorParams) -> list[str]:
    out = []
    for f in fields(PredictorParams):
        v = getattr(params, f.name)
        out.append(f"{f.name} = {int(v) if f.name == 'season' else _toml_value(float(v))}")
    return out


def command_line(args: argparse.Namespace) -> str:
    """The canonical ``rescoin fit`` command that reproduces this run."""
    parts_ = ["rescoin", "fit", *args.history, "-o", args.output, "--base", _show(args.base),
              "--under-weight", str(args.under_weight)]  # always said: the defaults may change, the file stays
    for flag, value, default in (("--holdout", args.holdout, 0.25), ("--rounds", args.rounds, 2)):
        if value != default:
            parts_ += [flag, f"{value:g}"]
    if args.per_vm:
        parts_.append("--per-vm")
    if args.name:
        parts_ += ["--name", args.name]
    return shlex.join(parts_)  # --comment lines only add to the header: left out


def _without_comments(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--comment":
            skip = True
        elif not a.startswith("--comment="):
            out.append(a)
    return out


def model_text(res: FitResult, summ: dict, args: argparse.Namespace, d: HistoryData, s: Series,
               name: str) -> str:
    span = " .. ".join(datetime.fromtimestamp(float(t), tz=UTC).strftime("%Y-%m-%d %H:%M")
                       for t in (s.ts[0], s.ts[-1]))
    lines = [
        "# Predictor parameters fitted by `rescoin fit` (rescoin/fit.py) from history CSV files.",
        f"# command: {command_line(args)}",
    ]
    if Path(sys.argv[0]).name == "fit.py":
        lines.append(f"# run as:  python -m rescoin.offline.fit {shlex.join(_without_comments(sys.argv[1:]))}"
                     + (" (plus the --comment lines below)" if args.comment else ""))
    lines += [
        f"# made: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by rescoin {__version__}; base model: {_show(args.base)}",
        (f"# history: {d.n:,} rows from {len(d.files)} files, {s.shape[1]} VMs, {s.shape[0]} periods of "
         f"{s.period:g} s, {span} UTC"),
        f"# loss = sum(W x max(usage - forecast, 0) + max(forecast - usage, 0)) / sum(usage), W = {args.under_weight},",
        "#   the forecast made after period t (PaddedEWMA replay of usage and signal) against the usage of t+1.",
        f"# fitted: {', '.join(FITTED)}, by coordinate search over a grid ({res.candidates} candidates,",
        f"#   {args.rounds} rounds) on " + (f"the first {1 - args.holdout:.0%} of each VM's series" if args.holdout
                                             else "all of each VM's series") + "; the other parameters are the "
        "base model's.",
        "# what each key means: rescoin/predict.py, PredictorParams.",
    ]
    lines.append("#")
    if args.holdout:
        lines.append(f"# held-back: the last {args.holdout:.0%} of each VM's series in the same history, not used "
                     "for fitting")
    lines.append(f"# {'resource':<9}{'fit-part loss base -> fitted':>30}{'held-back loss base -> fitted':>32}"
                 f"{'held-back under_error base -> fitted':>39}")
    for r in RESOURCES:
        sm = summ[r.label]
        b, f = sm["base"], sm["fitted"]
        kept = "" if r.label in res.fitted_resources else "  (no data: base kept)"
        lines.append(f"# {r.label:<9}{_f(b['fit_loss']) + ' -> ' + _f(f['fit_loss']):>30}"
                     f"{_f(b['held_loss']) + ' -> ' + _f(f['held_loss']):>32}"
                     f"{_f(b['held_under_error']) + ' -> ' + _f(f['held_under_error']):>39}{kept}")
    if args.comment:
        lines.append("#")
    for c in args.comment or []:
        lines += [f"# {line}" for line in c.splitlines()]
    lines += ["", f"name = {_toml_value(name)}",
              f"about = {_toml_value('fitted by rescoin fit on ' + ', '.join(args.history))}", ""]
    for r in RESOURCES:
        lines.append(f"[{r.label}]")
        lines += _table(res.fitted[r])
        lines.append("")
    if res.per_vm:
        lines += per_vm_lines(res, s)
    return "\n".join(lines)


def per_vm_lines(res: FitResult, s: Series) -> list[str]:
    """``[vm."UUID".resource]`` tables: VMs with their own parameters (run and simulate use them)."""
    names = {str(u): str(n) for u, n in zip(s.uuids, s.names)}
    lines = [
        f"# Per-VM parameters (--per-vm): VMs with at least {PER_VM_DAYS:g} days of samples in the fitted part,",
        "# by UUID; a VM listed here uses these instead of the tables above for the keys given.",
        "",
    ]
    for u, per in res.per_vm.items():
        for r, p in per.items():
            own, shared = res.per_vm_loss[u][r]
            lines.append(f'[vm."{u}".{r.label}]')
            lines.append(f"# {names.get(u, u)}: fit-part loss {own:.4f} with these, {shared:.4f} with the "
                         "per-resource parameters")
            lines += [f"{n} = {_toml_value(float(getattr(p, n)))}" for n in FITTED]
            lines.append("")
    return lines


# -- command -------------------------------------------------------------------------------------
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


def check_table(s: Series, models: dict[str, PaddedEWMA], w_under: float,
                progress: Callable[[str, int], Callable[[], None]] | None = None) -> dict:
    """Score whole models on the whole series (no fitting): per resource and model, under/over error and loss."""
    part = parts(s, 0.0)
    out: dict[str, dict] = {r.label: {} for r in RESOURCES}
    for name, model in models.items():
        tick = progress(f"replaying {name}", s.shape[0]) if progress else None
        sums = replay(model, s, part, tick=tick).part(FIT)
        loss = sums.loss(w_under, axis=(0, 1))
        under, over = sums.ratio("under", axis=(0, 1)), sums.ratio("over", axis=(0, 1))
        for r in RESOURCES:
            i = int(r)
            out[r.label][name] = {"under_error": _num(under[i]), "over_error": _num(over[i]), "loss": _num(loss[i])}
    return out


def output_problem(path: Path, force: bool) -> str | None:
    """Why the model cannot be written to ``path``, found before the fit runs (None if it can)."""
    parent = path.parent
    if path.is_dir():
        return f"{path}: is a directory; give a file name such as {path / 'NAME.toml'}"
    if path.exists() and not force:
        return f"{path}: exists; pass --force to replace it, or choose another name"
    if path.exists() and not path.is_file():
        return f"{path}: exists and is not a regular file; choose another name"
    if not parent.exists():
        return f"{path}: directory {parent} does not exist; create it first"
    if not parent.is_dir():
        return f"{path}: {parent} is not a directory"
    try:  # the only sure test of "can write here" (read-only mounts, ACLs, root-squash): try it
        probe = _temp_beside(path)
        probe.open("x").close()
        probe.unlink()
    except OSError as e:
        return f"{path}: cannot write in {parent}: {e.strerror or e}"
    return None


def _temp_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_model(path: Path, text: str, force: bool) -> None:
    """Write ``text`` whole or not at all (temp file beside it, checked, renamed); never replace a file
    that appeared meanwhile unless ``force``. A replaced file keeps its permission bits."""
    tmp = _temp_beside(path)
    try:
        with tmp.open("x", encoding="utf-8") as f:
            f.write(text)
        load_model(tmp)  # what run --model and simulate --model will do
        if path.exists():
            if not force:
                raise FileExistsError(errno.EEXIST, "appeared during the fit; pass --force to replace it")
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _show(path: str | Path) -> str:
    """A model path as people type it: relative to the repository for the shipped models."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(MODELS_DIR.parent))
    except ValueError:
        return str(path)


def _progress_ticker(bar):
    current = {}

    def make_tick(label: str, total: int):
        if "task" in current:
            bar.remove_task(current["task"])
        task = current["task"] = bar.add_task(label, total=total)
        return lambda: bar.advance(task)

    return make_tick


def cmd_fit(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from rescoin.errors import UserError
    from rescoin.view import progress

    err = Console(stderr=True)
    out = Console(width=None if sys.stdout.isatty() else 140)
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
    try:
        data = load_with_progress(args.history, err)
        s = series_from_history(data)
    except HistoryError as e:
        raise UserError(str(e)) from None
    msg = data.skipped_message()
    if msg:
        err.print(msg, markup=False, highlight=False, soft_wrap=True)
    short = history_length_problem(s) if checked is None else None
    if short and short[0] == "error":
        raise UserError(short[1])
    if short:
        print(f"rescoin: warning: {short[1]}", file=sys.stderr)
    if checked is not None:
        names = {"base": base_model, "checked": checked}
        with progress(err, transient=True) as bar:
            table = check_table(s, names, args.under_weight, _progress_ticker(bar))
        t = Table(title=f"{_show(args.check)} against the base {_show(args.base)} on all of this history "
                        f"(no fitting; loss weighs under-estimation x{args.under_weight})",
                  title_justify="left", header_style="bold")
        for c in ("resource", "under base", "under checked", "over base", "over checked", "loss base",
                  "loss checked"):
            t.add_column(c, justify="left" if c == "resource" else "right")
        for r in RESOURCES:
            b, c = table[r.label]["base"], table[r.label]["checked"]
            t.add_row(r.label, _f(b["under_error"]), _f(c["under_error"]), _f(b["over_error"]),
                      _f(c["over_error"]), _f(b["loss"]), _f(c["loss"]))
        out.print(f"{data.n:,} rows, {s.shape[1]} VMs, {s.shape[0]} periods of {s.period:g} s", highlight=False)
        out.print(t)
        return 0
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
    p.add_argument("history", nargs="+", metavar="HISTORY", help="history CSV files (.csv, .csv.gz), globs or directories")
    p.add_argument("-o", "--output", metavar="PATH", help="model TOML to write, e.g. models/NAME.toml "
                                                          "(its directory must exist)")
    p.add_argument("--force", action="store_true", help="replace the -o file if it exists")
    p.add_argument("--base", default=str(DEFAULT_BASE), metavar="PATH",
                   help=f"model whose other parameters are kept and compared against (default {_show(DEFAULT_BASE)}, "
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


def main(argv: list[str] | None = None) -> int:
    """``python -m rescoin.offline.fit HISTORY... -o PATH`` (the same as ``rescoin fit``)."""
    from rescoin.offline.analysis import run_standalone

    argv = list(sys.argv[1:] if argv is None else argv)
    return run_standalone(add_fit_parser, ["fit"] + argv)


if __name__ == "__main__":
    sys.exit(main())
