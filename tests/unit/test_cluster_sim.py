"""The cluster simulator, the migration cost model and the balancers: behaviours that could fail."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from rescoin.cli import main
from rescoin.cluster import migration
from rescoin.cluster.balancers import UnknownBalancerError, build
from rescoin.cluster.model import ClusterState, HostInfo, Move, Rules, VmInfo
from rescoin.cluster.sim import ClusterSettings, ClusterSim, placement
from rescoin.core.resources import MEMORY, N_RES
from rescoin.offline.simulate import SimSettings

TRACE = "rescoin/data/bitbrains_sample"


def tiny_trace(n: int = 8, periods: int = 6):
    demand = np.zeros((periods, n, N_RES))
    demand[:, :, 0] = 0.5
    demand[:, :, MEMORY] = 1000.0
    demand[:, :, 2:] = 10.0
    sizes = np.full((n, N_RES), np.nan)
    sizes[:, 0], sizes[:, MEMORY] = 2, 2048.0
    return SimpleNamespace(demand=demand, sizes=sizes, vm_ids=list(range(n)), name="tiny", period=300.0, start=0.0)


def vm(name: str, host: str, mem: float = 1000.0, **kw) -> VmInfo:
    return VmInfo(uuid=name, name=name, host=host, vcpus=2, memory_mib=2048, mem_used=mem, mem_forecast=mem, **kw)


def test_migration_busy_guest_takes_longer_and_pauses_longer() -> None:
    idle, busy = vm("i", "a", 256), vm("b", "a", 256, dirty_mib_s=300.0)
    assert 2.1 <= migration.duration_s(idle, 1180.0) <= 2.8
    assert migration.duration_s(busy, 1180.0) > migration.duration_s(idle, 1180.0)
    assert 0.06 <= migration.downtime_s(idle, 1180.0) < migration.downtime_s(busy, 1180.0) <= 0.31
    assert migration.copy_factor(5000.0, 1180.0) == migration.ROUNDS


def test_placement_balances_by_share() -> None:
    at = placement(np.array([4.0, 4.0, 2.0, 2.0, 2.0, 2.0]), np.array([2.0, 1.0]))
    # by hand: 4->h0 (2), 4->h1 (4), 2->h0 (3), 2->h0 (4), tie 4/4 -> h0 (5), 2->h1 (6)
    assert np.bincount(at, weights=[4, 4, 2, 2, 2, 2]).tolist() == [10.0, 6.0]


class OneMove:
    name = "one"

    def __init__(self, target: str = "host1") -> None:
        self.target, self.told = target, []

    def plan(self, state, rules):
        v = next(v for v in state.vms if v.host == "host0")
        if state.now == 0:
            return [Move(v.uuid, v.name, "host0", self.target, "test")]
        return []

    def moved(self, move, ok, now):
        self.told.append(ok)


def test_a_migration_moves_memory_and_costs_downtime() -> None:
    b = OneMove()
    sim = ClusterSim(tiny_trace(), b, ClusterSettings(hosts=(1, 1)), SimSettings(overcommit=1.0))
    vm_row = int(np.flatnonzero(sim.at == 0)[0])
    sim.run()
    assert b.told == [True]
    assert not sim.hosts[0].presence[1:, vm_row].any() and sim.hosts[1].presence[1:, vm_row].all()
    assert sim.result()["migrated_gib"] > 0
    assert sim.metrics.result()["cpu"]["satisfaction"] < 1.0  # the downtime cost it service


def test_a_failed_migration_leaves_the_vm_on_the_source() -> None:
    b = OneMove()
    sim = ClusterSim(tiny_trace(), b, ClusterSettings(hosts=(1, 1), fail_p=1.0), SimSettings(overcommit=1.0))
    row = int(np.flatnonzero(sim.at == 0)[0])
    sim.run()
    assert b.told == [False] and sim.hosts[0].presence[:, row].all() and sim.moves == 0


def test_moving_back_within_an_hour_is_an_oscillation() -> None:
    sim = ClusterSim(tiny_trace(), OneMove(), ClusterSettings(hosts=(1, 1)), SimSettings(overcommit=1.0))
    list(loop.step() for loop in sim.loops)
    steps = [loop.step() for loop in sim.loops]
    state = sim.state(1, steps)
    v = next(v for v in state.vms if v.host == "host0")
    assert sim.migrate(1, Move(v.uuid, v.name, "host0", "host1", ""), v, state)
    steps = [loop.step() for loop in sim.loops]
    state = sim.state(2, steps)
    v = next(x for x in state.vms if x.uuid == v.uuid)
    assert v.host == "host1"
    assert sim.migrate(2, Move(v.uuid, v.name, "host1", "host0", ""), v, state)
    assert sim.oscillations == 1


HOT = ClusterState(now=1000, hosts=(HostInfo("a", 8, 4000, contention=1.0), HostInfo("b", 8, 4000)),
                   vms=tuple(vm(f"v{i}", "a", 1000, mem_unserved=100.0 if i == 0 else 0.0) for i in range(5)))


def test_rescoin_holds_then_moves_and_none_never_moves() -> None:
    b = build("rescoin", hold=2)
    assert b.plan(HOT, Rules()) == []
    moves = b.plan(HOT, Rules())
    assert [(m.name, m.target) for m in moves] == [("v0", "b")]
    assert build("none").plan(HOT, Rules()) == []


def test_rescoin_respects_pins_and_ignore() -> None:
    rules = Rules(pins={"v0": frozenset({"a"})}, ignore=frozenset({"v1"}))
    b = build("rescoin", hold=1)
    assert {m.name for m in b.plan(HOT, rules)}.isdisjoint({"v0", "v1"})


def test_pve_dynamic_waits_three_rounds_of_imbalance() -> None:
    b = build("pve-dynamic")
    assert b.plan(HOT, Rules()) == [] and b.plan(HOT, Rules()) == []
    assert len(b.plan(HOT, Rules())) == 1


def test_proxlb_closes_the_memory_gap_within_balanciness() -> None:
    moves = build("proxlb").plan(HOT, Rules())
    left = 5 - len(moves)
    assert abs(left * 1000 - len(moves) * 1000) / 4000 <= 0.25 and moves


def test_derumier_one_move_then_waits_a_minute() -> None:
    b = build("derumier")
    moves = b.plan(HOT, Rules())
    assert len(moves) == 1
    b.moved(moves[0], True, HOT.now)
    assert b.plan(HOT, Rules()) == []


def test_hindsight_moves_on_truth_not_forecast() -> None:
    calm = ClusterState(now=1000, hosts=HOT.hosts, vms=tuple(vm(v.name, "a", 500) for v in HOT.vms))
    b = build("hindsight")
    assert b.plan(calm, Rules()) == []
    b.truth = {v.uuid: (0.0, 1000.0) for v in calm.vms}
    assert len(b.plan(calm, Rules())) == 1


def test_unknown_balancer_is_one_line() -> None:
    with pytest.raises(UnknownBalancerError, match="choose from rescoin"):
        build("nope")


def test_cli_json_shape(capsys) -> None:
    code = main(["balance", "simulate", "--trace", TRACE, "--hosts", "2", "--vms", "6", "--days", "0.1",
                 "--balancers", "none,rescoin", "--format", "json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and set(out) == {"balancers", "hosts", "vms", "periods"}
    r = out["balancers"]["rescoin"]
    assert set(r) == {"memory", "cpu", "migrations_per_vm_day", "migrated_gib", "oscillations"}
    assert set(r["memory"]) == {"satisfaction", "violations", "worst_off"}


def test_cli_bad_balancer_is_one_line(capsys) -> None:
    assert main(["balance", "simulate", "--trace", TRACE, "--balancers", "nope"]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "choose from" in err


def test_windows_stack_a_vms_later_days_as_vms_of_their_own(capsys) -> None:
    from rescoin.offline.traces import load_trace, load_windows

    two = load_windows(TRACE, windows=2, days=1.0, vms=3, start_day=1.0)
    first = load_trace(TRACE, vms=3, days=1.0, start_day=1.0)
    second = load_trace(TRACE, vms=3, days=1.0, start_day=2.0)
    assert two.n_vms == 6 and two.n_periods == first.n_periods
    assert two.vm_ids == [f"{v}@w0" for v in first.vm_ids] + [f"{v}@w1" for v in second.vm_ids]
    np.testing.assert_array_equal(two.demand[:, 3:], second.demand)
    assert not np.array_equal(two.demand[:, :3], two.demand[:, 3:])  # a later day, not a copy
    code = main(["balance", "simulate", "--trace", TRACE, "--hosts", "2", "--vms", "3", "--days", "0.1",
                 "--windows", "2", "--balancers", "none", "--format", "json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["vms"] == 6


def test_windows_past_the_traces_end_or_without_days_are_one_line(capsys) -> None:
    assert main(["balance", "simulate", "--trace", TRACE, "--vms", "3", "--days", "4", "--windows", "2"]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "windows" in err
    assert main(["balance", "simulate", "--trace", TRACE, "--vms", "3", "--windows", "2"]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--days" in err
