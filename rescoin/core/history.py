"""Per-VM history in numpy ring buffers, keyed by UUID.

Rows follow the VM order of the latest observation. When VMs come or go,
every ring and every piece of per-VM state is realigned at once, so
predictors and policies always index the current rows and never see a
departed VM's data under a new VM's row.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rescoin.core.model import Observation, VMSet
from rescoin.core.resources import N_RES

#: ring-buffered series, each (window, n_vms, N_RES)
SERIES = ("usage", "signal", "forecast", "allocation", "entitlement")
#: what the policy reported about the period it decided in (``Allocation.diagnostics``), same shape;
#: NaN where the policy computes no such value. Optional in a snapshot (older state files lack it).
NOTED = ("credit", "ledger")
#: per-VM state holding the ledger a VM arrived with (mean unused entitlement per period)
CARRIED = "carried"


def realign_rows(old: VMSet | None, new: VMSet) -> np.ndarray | None:
    """Map each new row to its old row (or -1); None if the rows did not change."""
    if old is not None and (old is new or np.array_equal(old.uuids, new.uuids)):
        return None
    if old is None or old.n == 0:
        return np.full(new.n, -1, dtype=np.intp)
    index = {u: i for i, u in enumerate(old.uuids.tolist())}
    return np.fromiter((index.get(u, -1) for u in new.uuids.tolist()), dtype=np.intp, count=new.n)


class History:
    """The last ``window`` periods of every VM, plus named per-VM state."""

    def __init__(self, window: int = 60) -> None:
        if window < 2:
            raise ValueError("history window must be at least 2 periods")
        self.window = window
        self.vms: VMSet | None = None
        self.t = 0  # periods pushed so far
        self.ts = np.full(window, np.nan)
        self._ring = {name: np.full((window, 0, N_RES), np.nan) for name in SERIES + NOTED}
        self._state: dict[str, np.ndarray] = {}
        self._fill: dict[str, float] = {}
        self.age = np.zeros(0, dtype=np.intp)
        self.pending: dict[str, np.ndarray] = {}  # decided this period, in force next period
        self._arriving: dict[str, np.ndarray] = {}  # UUID -> ledger, set when the VM's row appears

    # -- rows ---------------------------------------------------------------
    @property
    def n(self) -> int:
        return 0 if self.vms is None else self.vms.n

    def align(self, vms: VMSet) -> np.ndarray | None:
        """Make the rows follow ``vms``; returns the old-row map if anything moved."""
        rows = realign_rows(self.vms, vms)
        if rows is None:
            self.vms = vms
            return None
        known = rows >= 0
        src = np.maximum(rows, 0)
        for name, ring in self._ring.items():
            new = np.full((self.window, vms.n, N_RES), np.nan)
            new[:, known] = ring[:, src[known]]
            self._ring[name] = new
        for name, arr in self._state.items():
            new = np.full((vms.n,) + arr.shape[1:], self._fill[name], dtype=arr.dtype)
            new[known] = arr[src[known]]
            self._state[name] = new
        for name, arr in self.pending.items():
            new = np.full((vms.n,) + arr.shape[1:], np.nan)
            new[known] = arr[src[known]]
            self.pending[name] = new
        age = np.zeros(vms.n, dtype=np.intp)
        age[known] = self.age[src[known]]
        self.age = age
        self.vms = vms
        if self._arriving:
            carried = self.state(CARRIED, fill=0.0)
            for i in np.flatnonzero(~known):
                ledger = self._arriving.pop(str(vms.uuids[i]), None)
                if ledger is not None:
                    carried[i] = ledger
        return rows

    def carried(self) -> np.ndarray | None:
        """The ledgers VMs arrived with, ``(n, N_RES)``, or None if none did (read-only: creates nothing)."""
        arr = self._state.get(CARRIED)
        return arr if arr is not None and arr.shape == (self.n, N_RES) else None

    def carry(self, uuid: str, ledger: Sequence[float] | np.ndarray) -> None:
        """A VM arrives with this credit ledger (from its source host): seed its row when it appears.

        A ledger is a claim read from domain metadata: one of the wrong length is
        ignored (the VM starts with no credits), non-finite entries count as 0.
        """
        value = np.asarray(ledger, dtype=float).ravel()
        if value.size != N_RES:
            return
        self._arriving[uuid] = np.nan_to_num(value, nan=0.0, posinf=0.0, neginf=0.0)

    # -- writing ------------------------------------------------------------
    @property
    def slot(self) -> int:
        """Ring index of the latest period."""
        return (self.t - 1) % self.window

    def push(self, obs: Observation) -> None:
        """Start a new period: store what was observed and what was in force."""
        if self.t > 0:
            self.age += 1  # VMs already known are a period older; new ones join at 0
        self.align(obs.vms)
        self.t += 1
        s = self.slot
        self.ts[s] = obs.ts
        self._ring["usage"][s] = obs.usage
        self._ring["signal"][s] = obs.signal
        for name in ("forecast", "allocation", "entitlement"):
            value = self.pending.get(name)
            self._ring[name][s] = np.nan if value is None else value
        for name in NOTED:
            self._ring[name][s] = np.nan

    def note(self, **series: np.ndarray) -> None:
        """Record what the policy reported about this period (its credit), in this period's slot."""
        for name, value in series.items():
            if name not in NOTED:
                raise KeyError(name)
            self._ring[name][self.slot] = value

    def decide(self, **series: np.ndarray) -> None:
        """Record what this period decided (forecast, allocation, entitlement) for the next one."""
        for name, value in series.items():
            if name not in SERIES:
                raise KeyError(name)
            self.pending[name] = np.asarray(value, dtype=float)

    # -- reading ------------------------------------------------------------
    def latest(self, name: str) -> np.ndarray:
        """The newest period of a series, ``(n, N_RES)``."""
        result: np.ndarray = self._ring[name][self.slot]
        return result

    def last(self, name: str, k: int) -> np.ndarray:
        """The newest ``k`` periods of a series, oldest first, ``(k', n, N_RES)``."""
        k = max(0, min(k, self.t, self.window))
        idx = (self.t - k + np.arange(k)) % self.window
        return self._ring[name][idx]

    def state(self, name: str, shape: tuple[int, ...] = (N_RES,), fill: float = np.nan) -> np.ndarray:
        """Per-VM state that survives between periods and follows VM rows (made anew if its shape changed)."""
        arr = self._state.get(name)
        if arr is None or arr.shape != (self.n,) + tuple(shape):
            arr = np.full((self.n,) + shape, fill)
            self._state[name] = arr
            self._fill[name] = fill
        return arr

    # -- persistence --------------------------------------------------------
    def snapshot(self) -> dict[str, np.ndarray]:
        """Everything needed to resume after a restart, as plain arrays."""
        out: dict[str, np.ndarray] = {
            "meta": np.array([self.window, self.t]),
            "ts": self.ts.copy(),
            "age": self.age.copy(),
            "uuids": np.array([] if self.vms is None else self.vms.uuids, dtype=str),
        }
        out.update({f"ring.{k}": v.copy() for k, v in self._ring.items()})
        out.update({f"state.{k}": v.copy() for k, v in self._state.items()})
        out.update({f"fill.{k}": np.array(v) for k, v in self._fill.items()})
        out.update({f"pending.{k}": v.copy() for k, v in self.pending.items()})
        return out

    @classmethod
    def restore(cls, data: dict[str, np.ndarray], window: int | None = None) -> History:
        """A History from ``snapshot()`` arrays; ValueError naming the first array that does not fit.

        Everything is checked before use (a state file may be damaged or come
        from another version): a ring shorter than the window or a per-VM array
        of the wrong length would otherwise fail every period.
        """
        data = dict(data)
        for key in ("meta", "ts", "age", "uuids"):
            if key not in data:
                raise ValueError(f"no {key!r} array")
        meta = np.asarray(data.pop("meta"))
        _expect("meta", meta, (2,), "iu")
        w, t = (int(x) for x in meta)
        if window is not None and w != window:
            raise ValueError(f"history window {w} periods, the daemon keeps {window}")
        if w < 2 or t < 0:
            raise ValueError(f"window {w} and period count {t} are out of range")
        uuids = np.asarray(data.pop("uuids"))
        _expect("uuids", uuids, (None,), "U")
        n = uuids.shape[0]
        if len(set(uuids.tolist())) != n:
            raise ValueError("VM UUIDs are not unique")
        h = cls(w)
        h.t = t
        h.ts = _expect("ts", data.pop("ts"), (w,), "f")
        h.age = _expect("age", data.pop("age"), (n,), "iu").astype(np.intp)
        if (h.age < 0).any():
            raise ValueError("negative VM ages")
        h.vms = VMSet.build(uuids, uuids, np.full((n, N_RES), np.nan))
        for key, value in data.items():
            kind, _, name = key.partition(".")
            if kind == "ring" and name in SERIES + NOTED:
                h._ring[name] = _expect(key, value, (w, n, N_RES), "f")
            elif kind == "state":
                value = np.asarray(value)
                if value.ndim < 1 or value.shape[0] != n or value.dtype.kind not in "fiub":
                    raise ValueError(f"{key!r} has shape {value.shape} and type {value.dtype}, not one row per VM")
                if f"fill.{name}" not in data:
                    raise ValueError(f"{key!r} has no fill value")
                h._state[name] = np.array(value)
            elif kind == "fill":
                h._fill[name] = float(_expect(key, value, (), "fiu"))
            elif kind == "pending" and name in SERIES:
                h.pending[name] = _expect(key, value, (n, N_RES), "f")
            else:
                raise ValueError(f"unknown array {key!r}")
        missing = [s for s in SERIES if f"ring.{s}" not in data]
        if missing:
            raise ValueError(f"no ring for {', '.join(missing)}")
        for name in NOTED:
            if f"ring.{name}" not in data:
                h._ring[name] = np.full((w, n, N_RES), np.nan)
        return h


def _expect(key: str, value: np.ndarray, shape: tuple[int | None, ...], kinds: str) -> np.ndarray:
    """``value`` as a copy if it has ``shape`` (None = any length) and a dtype kind in ``kinds``."""
    value = np.asarray(value)
    fits = value.ndim == len(shape) and all(want is None or got == want
                                            for got, want in zip(value.shape, shape, strict=True))
    if not fits or value.dtype.kind not in kinds:
        want = "x".join("n" if s is None else str(s) for s in shape) or "a scalar"
        kind = {"f": "floats", "iu": "integers", "U": "strings"}.get(kinds, "numbers")
        raise ValueError(f"{key!r} has shape {value.shape} and type {value.dtype}; expected {want} {kind}")
    return np.array(value, dtype=float) if kinds == "f" else np.array(value)
