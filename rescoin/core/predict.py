"""Demand predictors, vectorised over VMs and resources.

Observed usage is censored (a VM never uses more than it was given), so a
predictor that follows usage alone shrinks allocations period after period.
Every predictor here therefore also reads the unmet-demand signal and grows
its estimate multiplicatively while that signal is on.

All predictors share one interface: ``predict(history) -> Forecast``. Their
per-VM state lives in ``History`` so it follows VMs as they come and go.
"""
from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from rescoin.core.arrays import fillnan
from rescoin.core.history import History
from rescoin.core.model import Forecast, VMSet
from rescoin.core.resources import N_RES, RESOURCES, Resource
from rescoin.shipped import MODELS_DIR


@dataclass(frozen=True)
class PredictorParams:
    """Parameters of the padded FUSD-EWMA for one resource."""

    alpha_up: float = 0.7  # smoothing when usage rises (fast up)
    alpha_down: float = 0.7  # smoothing when usage falls (slow down)
    pad_error: float = 0.0  # margin: this many times the smoothed recent under-prediction
    pad_std: float = 0.0  # margin: this many standard deviations of short-term variability
    pad_frac: float = 0.0  # margin: this share of the estimate (a guest's free-memory reserve)
    pad_beta: float = 0.2  # smoothing of the error and variability trackers
    growth: float = 1.0  # multiplicative growth per period while the unmet signal is on
    threshold: float = 0.01  # unmet signal above this counts as "on"
    hold_last: float = 0.0  # 1 = never forecast below the latest observation (0 = plain EWMA)
    max_growth: float = 8.0  # the correction never multiplies the estimate by more than this
    season: int = 0  # periods in a day (or week): never forecast below what was used one season ago, next period

    def check(self, where: str) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not _finite(v):
                raise ValueError(f"{where}.{f.name} = {v!r}: must be a finite number")
        if not 0.0 <= self.hold_last <= 1.0:
            raise ValueError(f"{where}.hold_last = {self.hold_last}: must be in [0, 1]")
        for name in ("alpha_up", "alpha_down", "pad_beta"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{where}.{name} = {getattr(self, name)}: must be in (0, 1]")
        if self.pad_error < 0 or self.pad_std < 0 or self.pad_frac < 0:
            raise ValueError(f"{where}: padding factors must be >= 0")
        if not float(self.season).is_integer() or self.season < 0 or self.season > 100000:
            raise ValueError(f"{where}.season = {self.season}: must be a whole number of periods, 0 = off")
        if self.max_growth < 1.0:
            raise ValueError(f"{where}.max_growth = {self.max_growth}: must be >= 1")
        if self.growth < 1.0:
            raise ValueError(f"{where}.growth = {self.growth}: must be >= 1 (1 = no correction)")
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"{where}.threshold = {self.threshold}: must be in [0, 1)")


def _finite(v: int | float) -> bool:
    """A finite number; an integer too large for a float (TOML allows them) is not."""
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


#: the parameters that may differ per history row (per VM, or per fit candidate); the season may not
ROW_PARAMS = ("alpha_up", "alpha_down", "pad_error", "pad_std", "pad_beta", "pad_frac", "growth", "threshold",
              "hold_last", "max_growth")

#: ResCoin's smoothing factors (cpu 0.7, memory 0.8, disk 0.8); net follows disk
RESCOIN_ALPHA = {Resource.CPU: 0.7, Resource.MEMORY: 0.8, Resource.DISK: 0.8, Resource.NET: 0.8}


class Predictor(Protocol):
    name: str

    def predict(self, history: History) -> Forecast: ...


class LastValue:
    """Tomorrow looks like today: what reactive controllers (MoM, the seeds) assume."""

    name = "last"

    def predict(self, history: History) -> Forecast:
        x = history.latest("usage").copy()
        return Forecast(point=x, value=x)


class PaddedEWMA:
    """EWMA / FUSD-EWMA with error and burst padding and under-estimation correction.

    With ``alpha_up == alpha_down``, no padding and ``growth == 1`` this is the
    plain EWMA of the ResCoin prototype.
    """

    def __init__(self, params: dict[Resource, PredictorParams], name: str = "fusd",
                 per_vm: dict[str, dict[Resource, PredictorParams]] | None = None) -> None:
        self.name = name
        self.params = {r: params.get(r, PredictorParams()) for r in RESOURCES}
        for r, p in self.params.items():
            p.check(f"{name}.{r.label}")
        # per-VM parameters (keyed by UUID or name), e.g. from `rescoin fit --per-vm`; the season stays global
        self.per_vm = {str(k): dict(v) for k, v in (per_vm or {}).items()}
        for key, table in self.per_vm.items():
            for r, p in table.items():
                p.check(f"{name}.vm.{key}.{r.label}")
                if p.season != self.params[r].season:
                    raise ValueError(f"{name}.vm.{key}.{r.label}.season: the season cannot differ per VM")
        self._rows_for: tuple[VMSet | None, dict[str, np.ndarray]] = (None, {})
        self._fixed_rows: dict[str, np.ndarray] | None = None
        #: parameter -> ``(N_RES,)`` column; broadcasts over the history's rows
        self._columns = {n: np.array([getattr(self.params[r], n) for r in RESOURCES], dtype=float)
                         for n in ROW_PARAMS}
        self._season = int(max(p.season for p in self.params.values()))
        self._seasonal = np.array([self.params[r].season > 0 for r in RESOURCES])
        self._key = f"predict.{name}."

    @classmethod
    def from_rows(cls, params: dict[Resource, PredictorParams], rows: Mapping[str, np.ndarray],
                  name: str = "rows") -> PaddedEWMA:
        """A predictor whose history row i uses ``rows[p][i]`` for parameter ``p`` (each ``(n_rows, N_RES)``).

        Parameters not in ``rows`` come from ``params``. The fit replays many candidate parameter sets at
        once this way: row block k of the replayed rows is candidate k. The caller gives valid values
        (a candidate grid inside PredictorParams' ranges); the rows' count must be the history's.
        """
        pred = cls(params, name)
        bad = set(rows) - set(ROW_PARAMS)
        if bad:
            raise ValueError(f"{name}: {sorted(bad)} cannot differ per row; allowed: {list(ROW_PARAMS)}")
        fixed = {n: np.ascontiguousarray(a, dtype=float) for n, a in rows.items()}
        shapes = {a.shape for a in fixed.values()}
        if len(shapes) > 1 or any(len(sh) != 2 or sh[1] != N_RES for sh in shapes):
            raise ValueError(f"{name}: per-row parameters must all be (n_rows, {N_RES}) arrays, got {shapes}")
        pred._fixed_rows = {**pred._columns, **fixed}
        return pred

    def _per_row(self, history: History) -> dict[str, np.ndarray]:
        """This period's parameter arrays: the columns, or rows where a VM has its own parameters."""
        if self._fixed_rows is not None:
            return self._fixed_rows
        cols = self._columns
        vms = history.vms
        if not self.per_vm or vms is None:
            return cols
        last = self._rows_for[0]
        # a real host builds a new VMSet each period: rebuild the rows only when the VMs changed
        if last is not None and (last is vms or (np.array_equal(last.uuids, vms.uuids)
                                                 and np.array_equal(last.names, vms.names))):
            return self._rows_for[1]
        rows = {n: np.broadcast_to(c, (vms.n, N_RES)).copy() for n, c in cols.items()}
        for i, (uuid, name) in enumerate(zip(vms.uuids.tolist(), vms.names.tolist(), strict=True)):
            own = self.per_vm.get(uuid) or self.per_vm.get(name) or {}
            for r, params in own.items():
                for n in ROW_PARAMS:
                    rows[n][i, int(r)] = getattr(params, n)
        self._rows_for = (vms, rows)
        return rows

    def predict(self, history: History) -> Forecast:
        p = self._per_row(history)
        x = history.latest("usage")
        sig = history.latest("signal")
        level = history.state(self._key + "level")
        err = history.state(self._key + "err", fill=0.0)
        var = history.state(self._key + "var", fill=0.0)
        corr = history.state(self._key + "corr", fill=1.0)
        prev_value = history.state(self._key + "value")

        seen = ~np.isnan(x)
        fresh = seen & np.isnan(level)
        level[fresh] = x[fresh]
        dev = np.where(seen, x - level, 0.0)
        alpha = np.where(dev > 0, p["alpha_up"], p["alpha_down"])
        # trackers see the deviation before the level moves
        under = np.where(seen & ~np.isnan(prev_value), np.maximum(x - prev_value, 0.0), 0.0)
        err += p["pad_beta"] * (under - err)
        var += p["pad_beta"] * (dev * dev - var)
        level += alpha * dev

        # grow only where the allocation is what holds the VM back (usage at it, or unknown):
        # pressure from a contended host does not go away by asking for more
        alloc = history.latest("allocation")
        bound = ~(x < 0.9 * alloc)  # NaN (unknown) counts as bound
        on = (fillnan(sig, 0.0) > p["threshold"]) & bound
        grown = np.minimum(corr * p["growth"], p["max_growth"])
        relaxed = np.maximum(1.0, np.sqrt(corr))
        corr[...] = np.where(on, grown, relaxed)

        pad = np.maximum(p["pad_error"] * err, p["pad_std"] * np.sqrt(var))
        point = level.copy()
        held = level + p["hold_last"] * np.maximum(np.where(seen, x, level) - level, 0.0)
        value = held * corr * (1.0 + p["pad_frac"]) + pad
        if self._season:
            value = self._seasonal_floor(history, x, value, p["pad_frac"])
        prev_value[...] = value
        return Forecast(point=point, value=value)

    def _seasonal_floor(self, history: History, x: np.ndarray, value: np.ndarray,
                        pad_frac: np.ndarray) -> np.ndarray:
        """Business workloads repeat daily: what a VM used one season ago, next period, is a floor."""
        ring = history.state(self._key + "season", shape=(self._season, N_RES))
        t = history.t - 1
        # one season before the period being forecast, give or take a period (samples drift)
        near = ring[:, [(t + k) % self._season for k in (0, 1, 2)]]
        ahead = np.where(np.isnan(near).all(axis=1), np.nan, np.nanmax(np.where(np.isnan(near), -np.inf, near), axis=1))
        ring[:, t % self._season] = x
        floor = np.where(self._seasonal & ~np.isnan(ahead), ahead * (1.0 + pad_frac), -np.inf)
        result: np.ndarray = np.maximum(value, floor)
        return result


def ewma(name: str = "ewma") -> PaddedEWMA:
    """The ResCoin prototype's predictor: plain EWMA, no padding, no correction."""
    return PaddedEWMA({r: PredictorParams(alpha_up=a, alpha_down=a) for r, a in RESCOIN_ALPHA.items()}, name)


def load_model(path: str | Path) -> PaddedEWMA:
    """Read predictor parameters from a TOML model file (``[cpu]``, ``[memory]``, ...)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{path}: model file not found; see models/ for the shipped ones") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory; give a model file such as models/default.toml") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read the model file: {e.strerror or e}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text; a model file is TOML, which must be UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML: {e}") from None
    params = _resource_tables(path, {k: v for k, v in data.items() if k not in ("name", "about", "source", "vm")},
                              {}, "")
    vm = data.get("vm", {})
    if not isinstance(vm, dict) or not all(isinstance(t, dict) for t in vm.values()):
        raise ValueError(f'{path}: vm must hold tables like [vm."<uuid or name>".memory]')
    base = {r: params.get(r, PredictorParams()) for r in RESOURCES}
    per_vm = {str(key): _resource_tables(path, tables, base, f'vm."{key}".') for key, tables in vm.items()}
    name = str(data.get("name", path.stem))
    try:
        return PaddedEWMA(params, name, per_vm=per_vm)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _resource_tables(path: Path, tables: dict[str, Any], base: dict[Resource, PredictorParams],
                     prefix: str) -> dict[Resource, PredictorParams]:
    """``{"cpu": {...}, ...}`` -> parameters per resource, each starting from ``base`` (or the defaults)."""
    known = {f.name for f in fields(PredictorParams)}
    out: dict[Resource, PredictorParams] = {}
    for key, table in tables.items():
        try:
            r = Resource.parse(key)
        except ValueError as e:
            raise ValueError(f"{path}: [{prefix}{key}]: {e}") from None
        if not isinstance(table, dict):
            raise ValueError(f"{path}: {prefix}{key} must be a table of parameters")
        bad = set(table) - known
        if bad:
            raise ValueError(f"{path}: [{prefix}{key}] unknown parameter(s) {sorted(bad)}; allowed: {sorted(known)}")
        try:
            out[r] = replace(base.get(r, PredictorParams()), **table)
        except TypeError as e:
            raise ValueError(f"{path}: [{prefix}{key}]: {e}") from None
    return out


def default_predictor() -> PaddedEWMA:
    return load_model(MODELS_DIR / "default.toml")


def make_predictor(name: str) -> Predictor | None:
    """A predictor by name: "default", "ewma", "last", "none", or a model file path."""
    if name == "default":
        return default_predictor()
    if name == "ewma":
        return ewma()
    if name == "last":
        return LastValue()
    if name == "none":
        return None
    return load_model(name)


__all__ = [
    "N_RES", "ROW_PARAMS", "Predictor", "PredictorParams", "PaddedEWMA", "LastValue", "ewma",
    "load_model", "default_predictor", "make_predictor",
]
