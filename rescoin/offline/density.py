"""Density at equal service (issue 10 item 4): the highest overcommit factor at which a policy still serves.

The service objective, in this one place (``objective``), over a run's metrics
(``rescoin.offline.simulate.run_policy``), all of it at once:

- memory: violations at most 1e-3 of VM-periods;
- CPU: violations at most 5e-3 of VM-periods and worst-off at least 0.99;
- zero sharing-incentive breaches on every managed resource (cpu, memory, disk
  and net alike: a VM given less than min(demand, entitlement) anywhere is a
  breach). A resource no VM had demand for (metrics None) is not judged.

The factor tried applies to the varied resource; the others sit at the held
factors. The search runs a fixed grid (``GRID``) in one round, then bisects
between the last passing grid factor and the first failing one
(``BISECT_STEPS`` rounds, to 1/16 of that gap), every (policy, slice) pair of
a round together, so a cluster gets the whole round at once.

Monotonicity is not guaranteed (a policy can fail at 1.5 and pass at 2). The
rule: the density is the highest factor f such that the objective holds at f
and at every grid factor below f; the first failing grid factor ends the
search. If the objective holds again at a higher grid factor, that factor is
reported as ``holds_again_at`` (non-monotone), never as the density. The
density is None where factor 1 already fails.

Pure: no Dask here; ``search`` takes the function that runs a round.
"""
from __future__ import annotations

import statistics
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

GRID: tuple[float, ...] = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)
BISECT_STEPS = 4  # the gap between two grid factors halved 4 times: to 1/16 of it
#: factors past 8 for ``grid(top)``: where several policies reach 8 the default grid cannot tell them apart
BEYOND: tuple[float, ...] = (10.0, 12.0, 16.0, 24.0, 32.0)


def grid(top: float = GRID[-1]) -> tuple[float, ...]:
    """The search grid up to ``top``: ``GRID``'s factors, then ``BEYOND``'s up to it."""
    if not top >= GRID[-1]:
        raise ValueError(f"the grid's top must be at least {GRID[-1]:g}, got {top:g}")
    return GRID + tuple(f for f in BEYOND if f <= top)
MEMORY_VIOLATIONS = 1e-3
CPU_VIOLATIONS = 5e-3
CPU_WORST_OFF = 0.99
BREACH_RESOURCES = ("cpu", "memory", "disk", "net")

#: one run: a (policy, slice, ...) key and the factor of the varied resource
Run = tuple[Hashable, float]
#: runs a round; a run missing from the answer, or answered None, failed (and fails the objective)
RunRound = Callable[[list[Run]], Mapping[Run, dict | None]]


def objective(result: dict | None) -> tuple[bool, list[str]]:
    """Does one run meet the service objective? ``(ok, reasons it does not)``."""
    if result is None:
        return False, ["the run failed"]
    reasons: list[str] = []

    def over(label: str, metric: str, limit: float, low: bool = False) -> None:
        v = (result.get(label) or {}).get(metric)
        if v is not None and (v < limit if low else v > limit):
            reasons.append(f"{label} {metric} {v:.4g} {'<' if low else '>'} {limit:g}")

    over("memory", "violations", MEMORY_VIOLATIONS)
    over("cpu", "violations", CPU_VIOLATIONS)
    over("cpu", "worst_off", CPU_WORST_OFF, low=True)
    for label in BREACH_RESOURCES:
        over(label, "breaches", 0.0)
    return not reasons, reasons


def ok(result: dict | None) -> bool:
    return objective(result)[0]


def at_density(result: dict | None) -> dict[str, float | None]:
    """What the host pays at the density: reclaimed memory, host swap, balloon changes per VM-hour."""
    if result is None:
        return {"reclaimed": None, "swap": None, "balloon_changes_per_vm_hour": None}
    mem = result.get("memory") or {}
    swap = result.get("host_swap") or {}
    return {"reclaimed": mem.get("reclaimed"), "swap": swap.get("share_of_periods"),
            "balloon_changes_per_vm_hour": mem.get("actuations_per_vm_hour")}


@dataclass
class Found:
    """One (policy, slice)'s search: its density, the run at it, and why the next factor failed."""

    density: float | None
    result: dict | None = None
    holds_again_at: float | None = None
    failed_at: float | None = None
    reasons: list[str] = field(default_factory=list)


def _from_grid(key: Hashable, grid: Sequence[float], res: Mapping[Run, dict | None]) -> tuple[Found, float | None]:
    """The grid's verdict for one key, and the upper bound left to bisect (None: nothing to bisect)."""
    passes = [ok(res.get((key, f))) for f in grid]
    first = next((i for i, p in enumerate(passes) if not p), None)
    if first is None:
        return Found(grid[-1], res.get((key, grid[-1]))), None
    again = next((grid[j] for j in range(first + 1, len(grid)) if passes[j]), None)
    reasons = objective(res.get((key, grid[first])))[1]
    if first == 0:
        return Found(None, None, again, grid[0], reasons), None
    return Found(grid[first - 1], res.get((key, grid[first - 1])), again, grid[first], reasons), grid[first]


def search(keys: Iterable[Hashable], run_round: RunRound, grid: Sequence[float] = GRID,
           steps: int = BISECT_STEPS) -> dict[Hashable, Found]:
    """Each key's density: the grid in one round, then ``steps`` bisection rounds over all keys at once."""
    keys = list(keys)
    res = run_round([(k, f) for k in keys for f in grid])
    found: dict[Hashable, Found] = {}
    upper: dict[Hashable, float] = {}
    for k in keys:
        found[k], hi = _from_grid(k, grid, res)
        if hi is not None:
            upper[k] = hi
    for _ in range(steps):
        if not upper:
            break
        mids = {k: (found[k].density + hi) / 2 for k, hi in upper.items()}  # type: ignore[operator]
        res = run_round([(k, m) for k, m in mids.items()])
        for k, m in mids.items():
            r = res.get((k, m))
            good, why = objective(r)
            if good:
                found[k].density, found[k].result = m, r
            else:
                upper[k], found[k].failed_at, found[k].reasons = m, m, why
    return found


def median_low(values: Sequence[float | None]) -> float | None:
    """The median slice (lower of the two middle ones); None (fails at factor 1) sorts below every factor."""
    if not values:
        return None
    order = sorted(values, key=lambda v: -1.0 if v is None else v)
    return order[(len(order) - 1) // 2]


def _median(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return float(statistics.median(known)) if known else None


def summarise(found: Mapping[tuple[str, Hashable], Found], policies: Sequence[str], slices: Sequence[Hashable],
              oracle: str = "oracle") -> dict[str, dict]:
    """Per policy: density (median slice), ratio to the oracle's density, and the costs at the density.

    ``ratio_to_oracle`` is taken per slice (the policy's density / the oracle's on that slice; 0 where
    the policy fails at factor 1 and the oracle does not; None where the oracle has no density), then
    the median slice as for the density; the costs are medians over slices of each slice's run at its density.
    With several slices each policy also gets "slices" (per-slice densities), "min" and "max".
    """
    out: dict[str, dict] = {}
    for p in policies:
        per = [found[(p, s)] for s in slices]
        dens = [f.density for f in per]
        ratios: list[float | None] = []
        for s, f in zip(slices, per, strict=True):
            o = found.get((oracle, s))
            if o is None or not o.density:
                ratios.append(None)  # no oracle figure on this slice: no ratio
            else:  # a policy that fails at factor 1 where the oracle does not gets 0
                ratios.append((f.density or 0.0) / o.density)
        costs = [at_density(f.result) for f in per]
        row: dict = {"density": median_low(dens), "ratio_to_oracle": median_low(ratios)}
        row.update({k: _median(c[k] for c in costs) for k in costs[0]})
        again = [f.holds_again_at for f in per]
        if len(slices) > 1:
            row.update({"slices": dens, "min": min(dens, key=lambda v: -1.0 if v is None else v),
                        "max": max(dens, key=lambda v: -1.0 if v is None else v), "holds_again_at": again})
        else:
            row["holds_again_at"] = again[0]
        row["failed_at"] = [f.failed_at for f in per] if len(slices) > 1 else per[0].failed_at
        median_slice = next(f for f in per if f.density == row["density"])
        row["why"] = median_slice.reasons  # why the median slice's next factor failed
        out[p] = row
    return out
