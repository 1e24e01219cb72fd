"""What every balancer shares: per-host load arrays, affinity units and the maintenance evacuation.

An affinity group is a unit: its members on one host leave together, to one
target, or not at all. ``unit`` and ``unit_targets`` answer that once for
every balancer, so none of them can split a group by moving one member.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from rescoin.cluster.model import ClusterState, Move, Rules, VmInfo
from rescoin.cluster.rules import allowed_targets, evacuations, group_of, movable


@dataclass
class Loads:
    """Per host: capacity, reserve and summed per-VM figures (cpu cores, memory MiB)."""

    names: list[str]
    cpus: np.ndarray
    mem: np.ndarray
    reserve: np.ndarray
    cpu: np.ndarray
    memu: np.ndarray
    index: dict[str, int] = field(default_factory=dict)

    @staticmethod
    def of(state: ClusterState, rules: Rules, cpu: np.ndarray, mem: np.ndarray) -> Loads:
        names = [h.name for h in state.hosts]
        index = {n: i for i, n in enumerate(names)}
        at = np.array([index[v.host] for v in state.vms], dtype=np.intp)
        k = len(names)
        return Loads(names, np.array([h.cpus for h in state.hosts], float),
                     np.array([h.memory_mib for h in state.hosts], float),
                     np.array([max(h.reserve_mib, rules.reserve_mib.get(h.name, 0.0)) for h in state.hosts]),
                     np.bincount(at, weights=cpu, minlength=k), np.bincount(at, weights=mem, minlength=k), index)

    def shares(self) -> tuple[np.ndarray, np.ndarray]:
        """CPU and memory load as shares of each host's own usable capacity (hosts of any size compare)."""
        return self.cpu / self.cpus, (self.memu + self.reserve) / self.mem

    def shift(self, src: str, dst: str, cpu: float, mem: float) -> None:
        i, j = self.index[src], self.index[dst]
        self.cpu[i] -= cpu
        self.cpu[j] += cpu
        self.memu[i] -= mem
        self.memu[j] += mem


def unit(vm: VmInfo, state: ClusterState, rules: Rules) -> tuple[list[VmInfo], list[VmInfo]]:
    """``vm``'s affinity group as it stands: the members on ``vm``'s host (what moves) and those elsewhere.

    A VM in no group is its own unit; the second list is non-empty only for a group already split over hosts.
    """
    group = group_of(vm.name, rules)
    members = [v for v in state.vms if v.name in group]
    return [v for v in members if v.host == vm.host], [v for v in members if v.host != vm.host]


def unit_targets(members: list[VmInfo], state: ClusterState, rules: Rules) -> list[str]:
    """Hosts every member may move to, each asked with all of ``members`` leaving together.

    ``moving`` names only the members that leave: a member of a split group that stays
    where it is still counts on its host.
    """
    names = [v.name for v in members]
    common: list[str] | None = None
    for v in members:
        here = allowed_targets(v, state, rules, moving=names)
        common = here if common is None else [t for t in common if t in here]
    return common or []


def unit_reason(members: list[VmInfo], rules: Rules) -> str:
    """The reason's suffix for a group move: which group it moves with (empty for a lone VM)."""
    group = group_of(members[0].name, rules)
    return f"; moves with its affinity group {', '.join(sorted(group))}" if len(group) > 1 else ""


def first_unit(moves: list[Move], rules: Rules) -> list[Move]:
    """The first move and the rest of its group's moves: a peer that starts one evacuation a round starts a unit."""
    if not moves:
        return []
    group, n = group_of(moves[0].name, rules), 1
    while n < len(moves) and moves[n].name in group and moves[n].source == moves[0].source:
        n += 1
    return moves[:n]


def in_a_group(vm: VmInfo, rules: Rules) -> bool:
    return len(group_of(vm.name, rules)) > 1


def evacuate(state: ClusterState, rules: Rules, loads: Loads, now: float,
             mem_of: Callable[[VmInfo], float]) -> list[Move]:
    """Maintenance first: every VM off a host in maintenance (or outside its pins), to the allowed host with most room.

    An affinity group leaves as one unit: one target allowed for every member with room for their sum,
    or it stays (a split would break the rule the evacuation is there to keep). A group already split
    prefers the host holding most of its other members, which heals the split.
    """
    out: list[Move] = []
    done: set[str] = set()
    for vm in evacuations(state, rules):
        if vm.name in done:
            continue
        members, rest = unit(vm, state, rules)
        done |= {v.name for v in members}
        if any(v.uuid in state.in_flight for v in members + rest):
            continue
        m = sum(mem_of(v) for v in members)
        joined = Counter(v.host for v in rest)
        room = []
        for t in unit_targets(members, state, rules):
            i = loads.index[t]
            free = loads.mem[i] - loads.reserve[i] - loads.memu[i]
            if free >= m:
                room.append((joined[t], free, t))
        if not room:
            continue
        best = max(room)[2]
        why = "maintenance evacuation" + unit_reason(members, rules)
        for v in members:
            loads.shift(v.host, best, v.cpu_used, mem_of(v))
            out.append(Move(v.uuid, v.name, v.host, best, why))
    return out


def candidates(state: ClusterState, rules: Rules, host: str, now: float, min_uptime: float = 300) -> list[VmInfo]:
    return [v for v in state.on(host) if movable(v, state, rules, now, min_uptime)]
