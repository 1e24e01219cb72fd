"""What every balancer shares: per-host load arrays and a move record, vectorised over VMs."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from rescoin.cluster.model import ClusterState, Move, Rules, VmInfo
from rescoin.cluster.rules import allowed_targets, evacuations, movable


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


def evacuate(state: ClusterState, rules: Rules, loads: Loads, now: float, mem_of) -> list[Move]:
    """Maintenance first: every VM off a host in maintenance, to the allowed host with most memory room."""
    out = []
    for vm in evacuations(state, rules):
        if vm.uuid in state.in_flight:
            continue
        targets = allowed_targets(vm, state, rules)
        if not targets:
            continue
        room = [(loads.mem[loads.index[t]] - loads.reserve[loads.index[t]] - loads.memu[loads.index[t]], t)
                for t in targets]
        free, best = max(room)
        m = mem_of(vm)
        if free < m:
            continue
        loads.shift(vm.host, best, vm.cpu_used, m)
        out.append(Move(vm.uuid, vm.name, vm.host, best, "maintenance evacuation"))
    return out


def candidates(state: ClusterState, rules: Rules, host: str, now: float, min_uptime: float = 300) -> list[VmInfo]:
    return [v for v in state.on(host) if movable(v, state, rules, now, min_uptime)]
