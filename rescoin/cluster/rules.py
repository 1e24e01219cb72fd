"""Placement rules applied to a ClusterState (minimal stand-in; replaced at merge)."""
from __future__ import annotations

from collections.abc import Iterable

from rescoin.cluster.model import ClusterState, HostInfo, Rules, VmInfo


def group_of(vm_name: str, rules: Rules) -> frozenset[str]:
    """The affinity group a VM moves with (itself alone when in none)."""
    for g in rules.affinity:
        if vm_name in g:
            return g
    return frozenset({vm_name})


def _down(h: HostInfo, rules: Rules) -> bool:
    return h.maintenance or h.name in rules.maintenance


def allowed_targets(vm: VmInfo, state: ClusterState, rules: Rules, moving: Iterable[VmInfo] = ()) -> list[str]:
    """Hosts the VM (with its affinity group, ``moving``) may go to: pins, anti-affinity, maintenance."""
    names = {vm.name} | {m.name for m in moving} | set(group_of(vm.name, rules))
    out = []
    for h in state.hosts:
        if h.name == vm.host or _down(h, rules):
            continue
        if any(n in rules.pins and h.name not in rules.pins[n] for n in names):
            continue
        there = {v.name for v in state.on(h.name)}
        if any(len(g & names) and len(g & there) for g in rules.anti_affinity):
            continue
        out.append(h.name)
    return out


def movable(vm: VmInfo, state: ClusterState, rules: Rules, now: float, min_uptime: float = 300) -> bool:
    """Not ignored, not in flight, up long enough."""
    return vm.name not in rules.ignore and vm.uuid not in state.in_flight and vm.uptime_s >= min_uptime


def violations(state: ClusterState, rules: Rules) -> list[str]:
    """VM names that break anti-affinity or pins where they are."""
    out = []
    for v in state.vms:
        if v.name in rules.pins and v.host not in rules.pins[v.name]:
            out.append(v.name)
    for g in rules.anti_affinity:
        seen: dict[str, str] = {}
        for v in state.vms:
            if v.name in g:
                if v.host in seen:
                    out.append(v.name)
                seen[v.host] = v.name
    return out


def evacuations(state: ClusterState, rules: Rules) -> list[VmInfo]:
    """VMs on hosts in maintenance, largest first."""
    down = {h.name for h in state.hosts if _down(h, rules)}
    return sorted((v for v in state.vms if v.host in down and v.name not in rules.ignore),
                  key=lambda v: -v.memory_mib)
