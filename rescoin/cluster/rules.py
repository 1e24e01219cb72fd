"""Placement rules as pure functions over ``Rules`` and ``ClusterState`` (affinity, anti-affinity, pins, ...).

Every balancer asks the same questions (may this VM move, where to, what is
broken now); answering them once here keeps the peers comparable.
Memory room uses ``mem_forecast`` (the padded working set over the migration
horizon, what the VM will need there) and falls back to ``memory_mib`` for a
VM with no forecast yet, so an unknown VM is never packed in as if it were empty.
"""
from __future__ import annotations

from collections.abc import Iterable

from rescoin.cluster.model import ClusterState, Rules, VmInfo


def _mem(vm: VmInfo) -> float:
    return vm.mem_forecast if vm.mem_forecast > 0 else vm.memory_mib


def group_of(vm_name: str, rules: Rules) -> frozenset[str]:
    """The VMs that must move with ``vm_name`` (its affinity groups, itself included)."""
    out = {vm_name}
    for group in rules.affinity:
        if vm_name in group:
            out |= group
    return frozenset(out)


def _maintenance(state: ClusterState, rules: Rules, host: str) -> bool:
    return host in rules.maintenance or any(h.name == host and h.maintenance for h in state.hosts)


def allowed_targets(vm: VmInfo, state: ClusterState, rules: Rules, moving: Iterable[str] = ()) -> list[str]:
    """Hosts ``vm`` may move to; ``moving`` names VMs leaving with it (its group), not counted where they are."""
    leaving = set(moving) | {vm.name}
    pins = rules.pins.get(vm.name)
    foes = set().union(*(g for g in rules.anti_affinity if vm.name in g)) - {vm.name} if rules.anti_affinity else set()
    out = []
    for host in state.hosts:
        if host.name == vm.host or _maintenance(state, rules, host.name):
            continue
        if pins is not None and host.name not in pins:
            continue
        there = [v for v in state.on(host.name) if v.name not in leaving]
        if any(v.name in foes for v in there):
            continue
        reserve = rules.reserve_mib.get(host.name, host.reserve_mib)
        if sum(_mem(v) for v in there) + _mem(vm) > host.memory_mib - reserve:
            continue
        out.append(host.name)
    return out


def movable(vm: VmInfo, state: ClusterState, rules: Rules, now: float, min_uptime: float = 300.0) -> bool:
    """Not ignored, not being migrated, and up at least ``min_uptime`` seconds."""
    return vm.name not in rules.ignore and vm.uuid not in state.in_flight and vm.uptime_s >= min_uptime


def violations(state: ClusterState, rules: Rules) -> list[str]:
    """One line per broken rule in ``state``."""
    out = []
    where = {v.name: v.host for v in state.vms}
    for group in rules.anti_affinity:
        members = sorted(n for n in group if n in where)
        for i, a in enumerate(members):
            out += [f"anti-affinity: {a} and {b} both on {where[a]}" for b in members[i + 1:] if where[a] == where[b]]
    for vm in state.vms:
        pins = rules.pins.get(vm.name)
        if pins is not None and vm.host not in pins:
            out.append(f"pin: {vm.name} on {vm.host}, outside {', '.join(sorted(pins))}")
        if _maintenance(state, rules, vm.host):
            out.append(f"maintenance: {vm.name} still on {vm.host}")
    for group in rules.affinity:
        hosts = sorted({where[n] for n in group if n in where})
        if len(hosts) > 1:
            out.append(f"affinity: {', '.join(sorted(group))} split over {', '.join(hosts)}")
    return out


def evacuations(state: ClusterState, rules: Rules) -> list[VmInfo]:
    """VMs that must leave their host: on a maintenance host, or outside their pins."""
    return [v for v in state.vms if _maintenance(state, rules, v.host)
            or (v.name in rules.pins and v.host not in rules.pins[v.name])]


__all__ = ["allowed_targets", "evacuations", "group_of", "movable", "violations"]
