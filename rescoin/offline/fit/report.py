"""What ``rescoin fit`` reports and writes: the loss summary, the model TOML with its header, the scores of
``--check``, and the safe write of the model file."""
from __future__ import annotations

import argparse
import errno
import math
import os
import shlex
import stat
import sys
from collections.abc import Callable
from dataclasses import fields
from datetime import UTC, datetime
from pathlib import Path

from rescoin import __version__
from rescoin.core.predict import PaddedEWMA, PredictorParams, load_model
from rescoin.core.resources import RESOURCES
from rescoin.offline.analysis import HistoryData
from rescoin.offline.fit.search import FitResult
from rescoin.offline.fit.series import FIT, FITTED, HELD, PER_VM_DAYS, Series, parts, replay
from rescoin.shipped import MODELS_DIR


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


def loss_text(v) -> str:
    return "-" if v is None else f"{v:.4f}"



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
    parts_ = ["rescoin", "fit", *args.history, "-o", args.output, "--base", show_path(args.base),
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
        lines.append(f"# run as:  python -m rescoin {shlex.join(_without_comments(sys.argv[1:]))}"
                     + (" (plus the --comment lines below)" if args.comment else ""))
    lines += [
        f"# made: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by rescoin {__version__}; base model: {show_path(args.base)}",
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
        lines.append(f"# {r.label:<9}{loss_text(b['fit_loss']) + ' -> ' + loss_text(f['fit_loss']):>30}"
                     f"{loss_text(b['held_loss']) + ' -> ' + loss_text(f['held_loss']):>32}"
                     f"{loss_text(b['held_under_error']) + ' -> ' + loss_text(f['held_under_error']):>39}{kept}")
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
    names = {str(u): str(n) for u, n in zip(s.uuids, s.names, strict=True)}
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


def show_path(path: str | Path) -> str:
    """A model path as people type it: relative to the repository for the shipped models."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(MODELS_DIR.parent))
    except ValueError:
        return str(path)

