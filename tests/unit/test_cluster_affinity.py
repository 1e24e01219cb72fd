"""Affinity groups move together: rescoin moves a group as one unit, evacuations keep it whole, no peer splits it."""
from __future__ import annotations

from dataclasses import replace

import pytest

from rescoin.cluster.balancers import build
from rescoin.cluster.balancers.rescoin import RescoinBalancer
from rescoin.cluster.model import ClusterState, HostInfo, Move, Rules, VmInfo
from rescoin.cluster.rules import violations

GB = 16384.0  # every host's memory (MiB); rescoin's headroom leaves 0.97 of it = 15892


def vm(name: str, host: str, mem: float, unserved: float = 0.0, **kw) -> VmInfo:
    return VmInfo(uuid=name, name=name, host=host, vcpus=2, memory_mib=mem + 512, mem_used=mem, mem_forecast=mem,
                  mem_unserved=unserved, **kw)


def cluster(*vms: VmInfo, hot: tuple[str, ...] = ("a",), now: float = 1000.0, in_flight: tuple[str, ...] = (),
            hosts: tuple[str, ...] = ("a", "b", "c")) -> ClusterState:
    return ClusterState(now=now, vms=vms, in_flight=in_flight,
                        hosts=tuple(HostInfo(h, 8, GB, contention=1.0 if h in hot else 0.0) for h in hosts))


def apply(state: ClusterState, moves: list[Move], dt: float = 100.0) -> ClusterState:
    """The state after every move succeeded, ``dt`` seconds later."""
    where = {m.vm: m.target for m in moves}
    return replace(state, now=state.now + dt, vms=tuple(replace(v, host=where.get(v.uuid, v.host)) for v in state.vms))


def split(state: ClusterState, rules: Rules) -> list[str]:
    return [line for line in violations(state, rules) if line.startswith("affinity")]


G = Rules(affinity=(frozenset({"g1", "g2"}),))


def test_a_group_on_a_hot_host_moves_together_to_one_host():
    # a is 17,400 MiB on 16,384 and g1 is short of memory; b has room for one 3000 MiB VM and c for both
    s = cluster(vm("g1", "a", 3000, unserved=300), vm("g2", "a", 3000), vm("x1", "a", 3800), vm("x2", "a", 3800),
                vm("x3", "a", 3800), vm("b0", "b", 11500), vm("c0", "c", 2000))
    moves = RescoinBalancer(hold=1).plan(s, G)
    assert sorted(m.name for m in moves) == ["g1", "g2"]
    assert {m.target for m in moves} == {"c"} and {m.source for m in moves} == {"a"}
    assert all("moves with its affinity group g1, g2" in m.reason for m in moves)
    assert sum(m.gain for m in moves) > sum(m.cost for m in moves) > 0
    assert split(apply(s, moves), G) == []


def test_a_lone_vm_still_moves_alone_with_the_old_reason():
    s = cluster(vm("x0", "a", 3800, unserved=300), *(vm(f"x{i}", "a", 3800) for i in range(1, 5)), vm("b0", "b", 2000))
    moves = RescoinBalancer(hold=1).plan(s, G)
    assert [(m.name, m.target) for m in moves] == [("x0", "c")]  # the emptiest host
    assert "affinity" not in moves[0].reason


def crowded() -> ClusterState:
    """a is 18,000 MiB; the 12,000 MiB group fits neither b nor c (4000 + 12,000 > 15,892), each member alone would."""
    return cluster(vm("g1", "a", 6000, unserved=500), vm("g2", "a", 6000), vm("x1", "a", 4000), vm("x2", "a", 2000),
                   vm("b0", "b", 4000), vm("c0", "c", 4000))


def test_a_group_that_fits_nowhere_as_a_whole_does_not_move():
    moves = RescoinBalancer(hold=1).plan(crowded(), G)
    assert moves and not {m.name for m in moves} & {"g1", "g2"}  # the host still sheds, but a lone VM


def small() -> ClusterState:
    """a is 17,000 MiB; g1 is starved of CPU (what derumier picks first); the pair fits c together."""
    return cluster(vm("g1", "a", 1500, unserved=300, cpu_unserved=2.0), vm("g2", "a", 1500), vm("x1", "a", 7000),
                   vm("x2", "a", 7000), vm("b0", "b", 4000), vm("c0", "c", 2000))


@pytest.mark.parametrize("case", [crowded, small])
@pytest.mark.parametrize("name", ["rescoin", "derumier", "pve-dynamic", "proxlb"])
def test_no_balancer_splits_a_group_over_rounds(name: str, case):
    b, s = build(name), case()
    moved = []
    for _ in range(5):
        moves = b.plan(s, G)
        for m in moves:
            b.moved(m, True, s.now)
        moved += [m.name for m in moves]
        s = apply(s, moves)
        assert split(s, G) == [], f"{name} split the group: {moved}"
    assert moved  # every balancer acted: the group was in reach and stayed whole
    hosts = {v.host for v in s.vms if v.name in ("g1", "g2")}
    if case is crowded:
        assert hosts == {"a"}
    elif name == "rescoin":
        assert hosts == {"c"}  # rescoin moves the group; the peers skip it


def test_a_member_that_may_not_move_holds_the_whole_group():
    s = cluster(vm("g1", "a", 3000, unserved=300), vm("g2", "a", 3000, uptime_s=60), vm("x1", "a", 3800),
                vm("x2", "a", 3800), vm("x3", "a", 3800), vm("c0", "c", 2000))
    moves = RescoinBalancer(hold=1).plan(s, G)
    assert moves and not {m.name for m in moves} & {"g1", "g2"}
    ignored = Rules(affinity=G.affinity, ignore=frozenset({"g2"}))
    s = replace(s, vms=tuple(replace(v, uptime_s=1e9) for v in s.vms))
    assert not {m.name for m in RescoinBalancer(hold=1).plan(s, ignored)} & {"g1", "g2"}
    assert {m.name for m in RescoinBalancer(hold=1).plan(s, G)} == {"g1", "g2"}


def test_a_split_group_joins_the_host_holding_most_of_it():
    rules = Rules(affinity=(frozenset({"g1", "g2", "g3"}),))
    base = (vm("g1", "a", 3000, unserved=800), vm("x1", "a", 4000), vm("x2", "a", 4000), vm("x3", "a", 4000),
            vm("x4", "a", 2000), vm("g2", "c", 3000), vm("g3", "c", 3000))
    s = cluster(*base)  # b is empty, yet g1 goes where g2 and g3 are
    moves = RescoinBalancer(hold=1).plan(s, rules)
    assert [(m.name, m.target) for m in moves if m.name == "g1"] == [("g1", "c")]
    assert split(apply(s, moves), rules) == []
    full = cluster(*base, vm("c0", "c", 9000))  # c cannot take g1: it stays rather than scatter the group
    assert "g1" not in {m.name for m in RescoinBalancer(hold=1).plan(full, rules)}


def maintenance(a_room_for: str) -> tuple[ClusterState, Rules]:
    """Host m in maintenance holds g1 and g2 (4000 MiB each); b has 7000 MiB free, c ``a_room_for`` decides."""
    c0 = {"both": 8384, "one": 12384}[a_room_for]
    s = cluster(vm("g1", "m", 4000), vm("g2", "m", 4000), vm("b0", "b", 9384), vm("c0", "c", c0),
                hot=(), hosts=("m", "b", "c"))
    return s, Rules(affinity=G.affinity, maintenance=frozenset({"m"}))


@pytest.mark.parametrize("name", ["rescoin", "derumier", "pve-dynamic", "proxlb"])
def test_a_maintenance_hosts_group_is_evacuated_together(name: str):
    # one by one, g1 would take c (most room, 8000) and g2 then b (7000 against c's 4000): a split
    s, rules = maintenance("both")
    moves = build(name).plan(s, rules)
    assert sorted((m.name, m.target) for m in moves) == [("g1", "c"), ("g2", "c")]
    assert all(m.reason.startswith("maintenance evacuation") and "g1, g2" in m.reason for m in moves)


@pytest.mark.parametrize("name", ["rescoin", "derumier", "pve-dynamic", "proxlb"])
def test_a_group_no_host_can_take_whole_stays_on_the_maintenance_host(name: str):
    s, rules = maintenance("one")  # b 7000 and c 4000 free: each member fits somewhere, the pair nowhere
    assert build(name).plan(s, rules) == []


def big_group(*extra: VmInfo, in_flight: tuple[str, ...] = ()) -> tuple[ClusterState, Rules]:
    """Three 2000 MiB group members on hot a (17,400 MiB), c nearly empty."""
    s = cluster(vm("g1", "a", 2000, unserved=600), vm("g2", "a", 2000), vm("g3", "a", 2000), vm("x1", "a", 3800),
                vm("x2", "a", 3800), vm("x3", "a", 3800), vm("c0", "c", 1000), *extra, in_flight=in_flight)
    return s, Rules(affinity=(frozenset({"g1", "g2", "g3"}),), maintenance=frozenset({"m"}))


def test_a_group_larger_than_the_in_flight_cap_goes_alone_into_a_quiet_round():
    s, rules = big_group()
    moves = RescoinBalancer(hold=1, max_in_flight=2).plan(s, rules)
    assert sorted(m.name for m in moves) == ["g1", "g2", "g3"] and len({m.target for m in moves}) == 1


def test_a_group_larger_than_the_cap_waits_while_anything_else_moves():
    s, rules = big_group(vm("y", "b", 1000), in_flight=("y",))
    assert not {m.name for m in RescoinBalancer(hold=1, max_in_flight=2).plan(s, rules)} & {"g1", "g2", "g3"}
    # a move planned earlier in the round (an evacuation off m) also keeps it waiting
    s, rules = big_group(vm("z", "m", 500))
    s = replace(s, hosts=(*s.hosts, HostInfo("m", 8, GB)))
    moves = [m.name for m in RescoinBalancer(hold=1, max_in_flight=2).plan(s, rules)]
    assert moves[0] == "z" and not set(moves) & {"g1", "g2", "g3"}  # a lone VM may take the slot left


def test_a_group_takes_one_slot_per_member():
    s, rules = big_group()
    assert sorted(m.name for m in RescoinBalancer(hold=1, max_in_flight=3).plan(s, rules)) == ["g1", "g2", "g3"]
    # four slots, one taken: three left, the group fits
    s, rules = big_group(vm("y", "b", 1000), in_flight=("y",))
    assert sorted(m.name for m in RescoinBalancer(hold=1, max_in_flight=4).plan(s, rules)) == ["g1", "g2", "g3"]
    # three slots, one taken: the group (within the cap) waits, a lone VM may use the two left
    moves = RescoinBalancer(hold=1, max_in_flight=3).plan(s, rules)
    assert moves and len(moves) <= 2 and not {m.name for m in moves} & {"g1", "g2", "g3"}
