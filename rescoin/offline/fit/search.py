"""The coordinate search of ``rescoin fit``: per stage a candidate grid, the candidates scored side by side
in one replay (row block k = candidate k, built with :meth:`PaddedEWMA.from_rows`), and the best chosen."""
from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from rescoin.core.predict import PaddedEWMA, PredictorParams
from rescoin.core.resources import N_RES, RESOURCES, Resource
from rescoin.offline.fit.series import FIT, FITTED, GRID, PER_VM_DAYS, STAGES, Series, Sums, params_for, parts, replay

Progress = Callable[[str, int], Callable[[], None]]
Values = dict[str, np.ndarray]  # parameter name -> (V, N_RES) current best


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


@dataclass
class _Search:
    """What every stage of one fit shares: the series, its parts, and which VMs and resources can be fitted."""

    s: Series
    base: dict[Resource, PredictorParams]
    part: np.ndarray
    w_under: float
    progress: Progress | None
    eligible: np.ndarray  # (V, N_RES): enough fitted-part history for per-VM parameters
    has_data: np.ndarray  # (N_RES,): any usage in the fitted part

    def tick(self, label: str, steps: int) -> Callable[[], None] | None:
        return self.progress(label, steps) if self.progress else None


def _stage_grid(name: str, current: np.ndarray) -> list[float]:
    return sorted(set(GRID[name]) | {float(v) for v in np.unique(current)})


def _candidates(stage: tuple[str, ...], shared: Values, own: Values | None) -> list[tuple[float, ...]]:
    """Every combination of the stage's grids; the grids always include the current values."""
    grids = [sorted(set(_stage_grid(n, shared[n]) + (_stage_grid(n, own[n]) if own is not None else [])))
             for n in stage]
    return list(itertools.product(*grids))


def _stage_values(combos: list[tuple[float, ...]], stage: tuple[str, ...], name: str) -> np.ndarray:
    j = stage.index(name)
    return np.array([c[j] for c in combos], dtype=float)


def _candidate_rows(stage: tuple[str, ...], combos: list[tuple[float, ...]], blocks: list[Values],
                    V: int) -> dict[str, np.ndarray]:
    """Per-row parameters: for each block of current values, K row blocks of V VMs, one per candidate."""
    K = len(combos)
    rows = {}
    for n in FITTED:
        per_block = []
        for cur in blocks:
            if n in stage:
                per_block.append(np.broadcast_to(_stage_values(combos, stage, n)[:, None, None], (K, V, N_RES)))
            else:
                per_block.append(np.broadcast_to(cur[n][None], (K, V, N_RES)))
        rows[n] = np.concatenate(per_block).reshape(-1, N_RES)
    return rows


def _choose(ctx: _Search, stage: tuple[str, ...], combos: list[tuple[float, ...]], fitpart: Sums,
            shared: Values, own: Values | None) -> None:
    """Keep the best candidate: per resource over all VMs (shared), and per eligible VM (own)."""
    K, V = len(combos), ctx.s.shape[1]
    shared_loss = fitpart.loss(ctx.w_under, axis=1)[:K]  # (K, N_RES), summed over VMs
    best = np.nanargmin(np.where(np.isnan(shared_loss), np.inf, shared_loss), axis=0)
    for n in stage:
        vals = _stage_values(combos, stage, n)
        shared[n] = np.where(ctx.has_data[None], np.tile(vals[best], (V, 1)), shared[n])
    if own is None:
        return
    vm_loss = fitpart.loss(ctx.w_under)[K:]  # (K, V, N_RES)
    pick = np.argmin(np.where(np.isnan(vm_loss), np.inf, vm_loss), axis=0)  # (V, N_RES)
    ok = ctx.eligible & np.isfinite(np.take_along_axis(vm_loss, pick[None], 0)[0])
    for n in stage:
        own[n] = np.where(ok, _stage_values(combos, stage, n)[pick], shared[n])


def _run_stage(ctx: _Search, stage: tuple[str, ...], label: str, shared: Values, own: Values | None) -> int:
    """One stage: score every candidate of the stage's grid in one replay and keep the best; returns how many."""
    combos = _candidates(stage, shared, own)
    blocks = [shared] + ([own] if own is not None else [])
    rows = _candidate_rows(stage, combos, blocks, ctx.s.shape[1])
    tick = ctx.tick(f"{label}: {' x '.join(stage)} ({len(combos)} candidates)", ctx.s.shape[0])
    sums = replay(PaddedEWMA.from_rows(ctx.base, rows, "fit"), ctx.s, ctx.part, k=len(combos) * len(blocks),
                  tick=tick)
    _choose(ctx, stage, combos, sums.part(FIT), shared, own)
    return len(combos)


def _per_vm_result(ctx: _Search, fitted: dict[Resource, PredictorParams], fitted_sums: Sums, own: Values
                   ) -> tuple[dict[str, dict[Resource, PredictorParams]],
                              dict[str, dict[Resource, tuple[float, float]]], Sums]:
    """The per-VM parameters of eligible VMs, with their own and the shared fit-part loss."""
    per_vm_sums = replay(PaddedEWMA.from_rows(ctx.base, {n: own[n] for n in FITTED}, "fit"), ctx.s, ctx.part,
                         tick=ctx.tick("per-VM check", ctx.s.shape[0]))
    own_l = per_vm_sums.part(FIT).loss(ctx.w_under)[0]
    shared_l = fitted_sums.part(FIT).loss(ctx.w_under)[0]
    vm_params: dict[str, dict[Resource, PredictorParams]] = {}
    vm_loss: dict[str, dict[Resource, tuple[float, float]]] = {}
    for v in np.flatnonzero(ctx.eligible.any(axis=1)):
        u = str(ctx.s.uuids[v])
        for r in RESOURCES:
            if ctx.eligible[v, r] and ctx.has_data[r]:
                values: dict[str, Any] = {n: float(own[n][v, r]) for n in FITTED}
                vm_params.setdefault(u, {})[r] = replace(fitted[r], **values)
                vm_loss.setdefault(u, {})[r] = (float(own_l[v, r]), float(shared_l[v, r]))
    return vm_params, vm_loss, per_vm_sums


def fit(s: Series, base: dict[Resource, PredictorParams], w_under: float = 4.0, holdout: float = 0.25,
        per_vm: bool = False, rounds: int = 2, progress: Progress | None = None) -> FitResult:
    """Coordinate search of the fitted parameters, per resource (and per VM with ``per_vm``).

    ``progress(description, total_steps)`` returns a tick function called once per replayed period.
    """
    T, V = s.shape
    part = parts(s, holdout)
    ctx = _Search(s=s, base=base, part=part, w_under=w_under, progress=progress,
                  eligible=(part == FIT).sum(axis=0) * s.period >= PER_VM_DAYS * 86400.0,
                  has_data=np.nansum(np.where(part == FIT, s.usage, 0.0), axis=(0, 1)) > 0)
    # current best: shared (per resource) and per VM, as (V, N_RES) arrays per parameter
    shared = {n: np.tile([getattr(base[r], n) for r in RESOURCES], (V, 1)).astype(float) for n in FITTED}
    own = {n: a.copy() for n, a in shared.items()}
    n_cands = 0
    for rnd in range(rounds):
        # per-VM parameters: one more coordinate round in the last one, starting from the shared optimum
        vm_round = per_vm and rnd == rounds - 1
        if vm_round:
            own = {n: a.copy() for n, a in shared.items()}
        for stage in STAGES:
            n_cands += _run_stage(ctx, stage, f"round {rnd + 1}/{rounds}", shared, own if vm_round else None)
    fitted = params_for(base, {n: shared[n][0] for n in FITTED})
    tick = ctx.tick("held-back check", 2 * T)
    base_sums = replay(PaddedEWMA(base, "base"), s, part, tick=tick)
    fitted_sums = replay(PaddedEWMA(fitted, "fitted"), s, part, tick=tick)
    vm_params, vm_loss, per_vm_sums = _per_vm_result(ctx, fitted, fitted_sums, own) if per_vm else ({}, {}, None)
    return FitResult(base=base, fitted=fitted, per_vm=vm_params, per_vm_loss=vm_loss, base_sums=base_sums,
                     fitted_sums=fitted_sums, per_vm_sums=per_vm_sums, candidates=n_cands,
                     fitted_resources=[r.label for r in RESOURCES if ctx.has_data[r]])

