"""Many independent replays (policy x slice x factor x memory model) through dask.distributed (issue 10 item 5).

A run is a small picklable ``RunSpec``; the worker loads the trace slice itself
(cached per worker process, so a slice is read once per worker however many
runs use it) and calls ``run_policy``. ``DaskRunner`` starts a LocalCluster
(one single-threaded worker process per core: a replay is numpy-bound and holds
the GIL between array calls) or joins an existing scheduler (``tcp://HOST:PORT``);
``InProcess`` runs the same specs here, one after the other, for quick tests.
A run that raises is an ``Outcome`` with its one-line error: never fatal to the others.
"""
from __future__ import annotations

import csv
import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rescoin.errors import RescoinError


class SweepError(RescoinError):
    """The cluster cannot be reached or started, or the results cannot be written."""


@dataclass(frozen=True)
class Slice:
    """A part of the trace: ``vms`` VMs after ``vm_offset``, ``days`` days from ``start_day``."""

    vm_offset: int = 0
    start_day: float = 0.0
    vms: int | None = None
    days: float | None = None

    @property
    def label(self) -> str:
        return f"{self.vm_offset}:{self.start_day:g}"


@dataclass(frozen=True)
class RunSpec:
    """One replay, small enough to ship to a worker."""

    trace: str
    slice: Slice
    policy: str
    overcommit: tuple[tuple[str, float], ...]  # per resource label (a tuple: specs are dictionary keys)
    memory: str = "default"  # a MemoryModel preset name
    model: str | None = None
    factor: float | None = None  # the varied resource's factor, for the name and the output rows

    @property
    def name(self) -> str:
        at = f" x{self.factor:g}" if self.factor is not None else ""
        return f"{self.policy} on slice {self.slice.label}{at} (memory model {self.memory})"


@dataclass
class Outcome:
    spec: RunSpec
    result: dict | None
    error: str | None
    seconds: float


@functools.lru_cache(maxsize=16)  # > the slices of a sweep: a bisection round visits every slice in turn
def _trace(path: str, sl: Slice):
    from rescoin.offline.traces import load_trace

    return load_trace(path, vms=sl.vms, vm_offset=sl.vm_offset, days=sl.days, start_day=sl.start_day)


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def run_spec(spec: RunSpec) -> Outcome:
    """Run one spec (on a worker); an exception becomes the outcome's one-line error."""
    from rescoin.hosts.simmemory import MemoryModel
    from rescoin.offline.simulate import SimSettings, run_policy

    # the loop's warnings (memory floors held, ...) would repeat in every one of hundreds of runs
    log = logging.getLogger("rescoin")
    level = log.level
    log.setLevel(logging.ERROR)
    t0 = time.perf_counter()
    try:
        settings = SimSettings(overcommit=dict(spec.overcommit), model=spec.model,
                               memory=MemoryModel.preset(spec.memory))
        result = run_policy(_trace(spec.trace, spec.slice), spec.policy, settings)
        return Outcome(spec, result, None, time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - any failure of one run is reported by name, not fatal
        return Outcome(spec, None, one_line(e), time.perf_counter() - t0)
    finally:
        log.setLevel(level)


OnDone = Callable[[Outcome], None]


class InProcess:
    """The specs run here, in order: for tests and one-off small runs."""

    def __enter__(self) -> InProcess:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def run(self, specs: Sequence[RunSpec], on_done: OnDone | None = None) -> list[Outcome]:
        out = []
        for s in specs:
            out.append(run_spec(s))
            if on_done is not None:
                on_done(out[-1])
        return out


class DaskRunner:
    """Runs specs on a dask.distributed cluster: a new LocalCluster, or the scheduler at ``address``."""

    def __init__(self, address: str | None = None, workers: int | None = None) -> None:
        self.address = address
        self.workers = workers or os.cpu_count() or 1
        self._cluster: Any = None  # distributed's classes, imported only when a sweep runs
        self._client: Any = None

    def __enter__(self) -> DaskRunner:
        from distributed import Client, LocalCluster

        # the scheduler of a LocalCluster runs in this process: its INFO lines are not the user's business
        logging.getLogger("distributed").setLevel(logging.WARNING)
        try:
            if self.address:
                self._client = Client(self.address, timeout="5s")
            else:
                self._cluster = LocalCluster(n_workers=self.workers, threads_per_worker=1, processes=True,
                                             dashboard_address=None, silence_logs=logging.ERROR)
                self._client = Client(self._cluster)
        except (OSError, TimeoutError) as e:
            self.__exit__()
            where = self.address or "a LocalCluster"
            raise SweepError(f"cannot use {where}: {one_line(e)} (is the scheduler running? "
                             "try --scheduler none to run here)") from None
        return self

    def __exit__(self, *exc) -> None:
        if self._client is not None:
            self._client.close()
        if self._cluster is not None:
            self._cluster.close()
        self._client = self._cluster = None

    def run(self, specs: Sequence[RunSpec], on_done: OnDone | None = None) -> list[Outcome]:
        """Every spec, collected as it completes; a worker lost mid-run is that run's error."""
        from distributed import as_completed

        assert self._client is not None, "use DaskRunner as a context manager"
        futures = {self._client.submit(run_spec, s, pure=False): s for s in specs}
        out = []
        for fut in as_completed(futures):
            try:
                o = fut.result()
            except Exception as e:  # noqa: BLE001 - a killed worker, a spec that would not unpickle
                o = Outcome(futures[fut], None, one_line(e), 0.0)
            out.append(o)
            if on_done is not None:
                on_done(o)
        return out


def runner(scheduler: str | None, workers: int | None = None) -> InProcess | DaskRunner:
    """``None``: a LocalCluster; ``"none"``: in this process; else the address of a running scheduler."""
    if scheduler == "none":
        return InProcess()
    return DaskRunner(scheduler, workers)


def rows(outcomes: Iterable[Outcome], judge: Callable[[dict | None], tuple[bool, list[str]]]) -> list[dict]:
    """One flat row per run: what ran, the verdict of ``judge``, and every metric as ``resource.metric``."""
    out = []
    for o in outcomes:
        ok, why = judge(o.result) if o.error is None else (False, [])
        row = {"policy": o.spec.policy, **{k: v for k, v in asdict(o.spec.slice).items()},
               "memory_model": o.spec.memory, "factor": o.spec.factor,
               "overcommit": ",".join(f"{k}={v:g}" for k, v in o.spec.overcommit),
               "ok": ok, "why": "; ".join(why), "error": o.error, "seconds": round(o.seconds, 3)}
        for label, metrics in (o.result or {}).items():
            if isinstance(metrics, dict):
                row.update({f"{label}.{k}": v for k, v in metrics.items()})
            else:
                row[label] = metrics
        out.append(row)
    return out


def _finite(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def write_rows(table: list[dict], path: str | Path) -> None:
    """``.json``: a list of objects; ``.csv``: a header of every key seen, then a line per run (NaN: empty)."""
    p = Path(path)
    table = [{k: _finite(v) for k, v in r.items()} for r in table]
    try:
        if p.suffix == ".csv":
            keys: dict[str, None] = {}
            for r in table:
                keys.update(dict.fromkeys(r))
            with p.open("w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(keys))
                w.writeheader()
                w.writerows(table)
        else:
            p.write_text(json.dumps(table, indent=1, allow_nan=False, default=str) + "\n")
    except (OSError, ValueError) as e:
        raise SweepError(f"{path}: cannot write the results: {one_line(e)}") from None
