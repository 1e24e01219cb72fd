"""Placement rules: targets, movability, groups, violations and evacuations."""
from __future__ import annotations

from rescoin.cluster.model import ClusterState, HostInfo, Rules, VmInfo
from rescoin.cluster.rules import allowed_targets, evacuations, group_of, movable, violations


def vm(name: str, host: str, mem: float = 1024, **kw) -> VmInfo:
    return VmInfo(uuid=f"u-{name}", name=name, host=host, vcpus=2, memory_mib=mem, mem_forecast=mem, **kw)


def state(*vms: VmInfo, in_flight: tuple[str, ...] = ()) -> ClusterState:
    hosts = tuple(HostInfo(name=h, cpus=8, memory_mib=8192) for h in ("h1", "h2", "h3"))
    return ClusterState(now=1000.0, hosts=hosts, vms=vms, in_flight=in_flight)


def test_targets_skip_own_host_maintenance_and_unpinned_hosts():
    s = state(vm("a", "h1"))
    assert allowed_targets(s.vms[0], s, Rules()) == ["h2", "h3"]
    assert allowed_targets(s.vms[0], s, Rules(maintenance=frozenset({"h2"}))) == ["h3"]
    assert allowed_targets(s.vms[0], s, Rules(pins={"a": frozenset({"h1", "h2"})})) == ["h2"]


def test_targets_respect_anti_affinity_unless_the_partner_moves_too():
    s = state(vm("a", "h1"), vm("b", "h2"))
    rules = Rules(anti_affinity=(frozenset({"a", "b"}),))
    assert allowed_targets(s.vms[0], s, rules) == ["h3"]
    assert allowed_targets(s.vms[0], s, rules, moving=("b",)) == ["h2", "h3"]


def test_targets_need_memory_room_after_the_reserve():
    s = state(vm("big", "h2", 6000), vm("a", "h1", 2000))
    assert allowed_targets(s.vms[1], s, Rules()) == ["h2", "h3"]  # 6000 + 2000 <= 8192
    assert allowed_targets(s.vms[1], s, Rules(reserve_mib={"h2": 512})) == ["h3"]


def test_movable_checks_ignore_in_flight_and_uptime():
    s = state(vm("a", "h1", uptime_s=100), vm("b", "h1"), vm("c", "h1"), in_flight=("u-c",))
    assert not movable(s.vms[0], s, Rules(), now=s.now)
    assert movable(s.vms[0], s, Rules(), now=s.now, min_uptime=60)
    assert movable(s.vms[1], s, Rules(), now=s.now) and not movable(s.vms[1], s, Rules(ignore=frozenset({"b"})), s.now)
    assert not movable(s.vms[2], s, Rules(), now=s.now)


def test_group_of_joins_overlapping_affinity_groups():
    rules = Rules(affinity=(frozenset({"a", "b"}), frozenset({"a", "c"})))
    assert group_of("a", rules) == {"a", "b", "c"} and group_of("z", rules) == {"z"}


def test_violations_one_line_each_and_evacuations():
    s = state(vm("a", "h1"), vm("b", "h1"), vm("c", "h2"), vm("d", "h3"))
    rules = Rules(anti_affinity=(frozenset({"a", "b"}),), affinity=(frozenset({"b", "c"}),),
                  pins={"d": frozenset({"h1"})}, maintenance=frozenset({"h2"}))
    lines = violations(s, rules)
    assert lines == ["anti-affinity: a and b both on h1", "maintenance: c still on h2", "pin: d on h3, outside h1",
                     "affinity: b, c split over h1, h2"]
    assert [v.name for v in evacuations(s, rules)] == ["c", "d"]
    assert violations(state(vm("a", "h1"), vm("b", "h2")), Rules(anti_affinity=(frozenset({"a", "b"}),))) == []
