"""The table of control kinds drives the guard, the simulated host, evaluation and the dry run."""
from __future__ import annotations

import numpy as np
import pytest

from rescoin.core import guard, kinds
from rescoin.core.model import ACTION_KINDS
from rescoin.core.resources import CPU, DISK, MEMORY, N_RES, NET, RESOURCES
from rescoin.offline.evaluate import Metrics
from rescoin.offline.simulate import SimSettings, build_loop

NAN = np.nan


def _trace(kit, periods=6, n=3):
    rng = np.random.default_rng(3)
    demand = np.empty((periods, n, N_RES))
    demand[:, :, CPU] = rng.uniform(0.2, 2.0, (periods, n))
    demand[:, :, MEMORY] = rng.uniform(300, 2000, (periods, n))
    demand[:, :, DISK] = rng.uniform(10, 500, (periods, n))
    demand[:, :, NET] = rng.uniform(10, 500, (periods, n))
    return kit.trace(demand, np.tile([2.0, 2048.0, NAN, NAN], (n, 1)))


def _run(kit):
    loop = build_loop(_trace(kit), "rescoin", SimSettings())
    metrics = Metrics()
    steps = []
    for step in loop.steps():
        metrics.update(step, loop.history)
        steps.append(step)
    return loop.host, steps, metrics.result()


def test_table_names_every_kind_once_and_model_follows_it():
    names = kinds.names()
    assert len(set(names)) == len(names) == len(kinds.KINDS)
    assert names == ACTION_KINDS
    assert {k.resource for k in kinds.KINDS} <= set(range(N_RES))
    assert set(guard._TARGETS) == {k.name for k in kinds.KINDS if k.deadband == "relative"}


def test_every_kind_is_planned_counted_and_evaluated(kit):
    host, steps, result = _run(kit)
    assert all(tuple(s.plan.changed) == kinds.names() for s in steps)
    assert set(host.actions) == set(kinds.names())
    counted = {k for r in range(N_RES) for k in kinds.of_resource(r)}
    assert counted | {"pin"} == set(kinds.names())


def test_an_extra_row_shows_up_everywhere(kit, monkeypatch):
    """A kind added to the table (here a second CPU weight) is planned, applied, counted and evaluated."""
    _, _, before = _run(kit)
    echo = kinds.Kind("shares_echo", "shares", CPU, "cpu.shares", "relative")
    monkeypatch.setattr(kinds, "KINDS", (*kinds.KINDS, echo))
    monkeypatch.setitem(guard._TARGETS, "shares_echo", guard._shares)
    host, steps, after = _run(kit)
    assert all("shares_echo" in s.plan.changed for s in steps)
    np.testing.assert_array_equal(steps[-1].plan.changed["shares_echo"], steps[-1].plan.changed["shares"])
    assert host.actions["shares_echo"] == host.actions["shares"] > 0
    cpu = RESOURCES[CPU].label
    shares, quota = host.actions["shares"], host.actions["quota"]  # same run, same VM-hours: ratios compare
    assert after[cpu]["actuations_per_vm_hour"] == pytest.approx(
        before[cpu]["actuations_per_vm_hour"] * (2 * shares + quota) / (shares + quota))
    assert after[RESOURCES[MEMORY].label] == pytest.approx(before[RESOURCES[MEMORY].label], nan_ok=True)
