"""The peers: none, pve-dynamic (Proxmox 5.2), proxlb (memory balanciness), derumier (the seed's rules).

Affinity groups: the peers' balancing passes skip every VM in a group (their
one-VM moves would split it); maintenance evacuations move a group whole
(``evacuate``), and a peer that starts one evacuation a round starts the
whole group (``first_unit``). So no peer can split a group.
"""
from __future__ import annotations

import numpy as np

from rescoin.cluster import ahp, topsis
from rescoin.cluster.balancers.base import Loads, candidates, evacuate, first_unit, in_a_group
from rescoin.cluster.model import ClusterState, Move, Rules
from rescoin.cluster.rules import allowed_targets


class NoBalancer:
    """Never moves (the baseline)."""

    name = "none"

    def plan(self, state: ClusterState, rules: Rules) -> list[Move]:
        return []

    def moved(self, move: Move, ok: bool, now: float) -> None:
        pass


def _used(state: ClusterState) -> tuple[np.ndarray, np.ndarray]:
    return (np.array([v.cpu_used for v in state.vms], float), np.array([v.mem_used for v in state.vms], float))


class PveDynamic:
    """Proxmox VE 5.2 auto-rebalance: CV of node load over threshold for ``hold`` rounds, bruteforce best move.

    Node load is the mean of CPU and memory shares; a move must lower the CV by ``margin`` (relative).
    """

    name = "pve-dynamic"

    def __init__(self, threshold: float = 0.3, hold: int = 3, margin: float = 0.1) -> None:
        self.threshold, self.hold, self.margin = threshold, hold, margin
        self.count = 0

    def plan(self, state: ClusterState, rules: Rules) -> list[Move]:
        cpu, mem = _used(state)
        loads = Loads.of(state, rules, cpu, mem)
        ev = evacuate(state, rules, loads, state.now, lambda v: v.mem_used)
        if ev or state.in_flight:
            return first_unit(ev, rules) if not state.in_flight else []
        c, m = loads.shares()
        load = (c + m) / 2
        cv = float(load.std() / load.mean()) if load.mean() > 0 else 0.0
        self.count = self.count + 1 if cv > self.threshold else 0
        if self.count < self.hold:
            return []
        best: tuple[float, Move] | None = None
        for i, vm in enumerate(state.vms):
            if vm.uuid in state.in_flight or vm.name in rules.ignore or in_a_group(vm, rules):
                continue
            for t in allowed_targets(vm, state, rules):
                j, s = loads.index[t], loads.index[vm.host]
                trial = load.copy()
                trial[s] -= (cpu[i] / loads.cpus[s] + mem[i] / loads.mem[s]) / 2
                trial[j] += (cpu[i] / loads.cpus[j] + mem[i] / loads.mem[j]) / 2
                if m[j] + mem[i] / loads.mem[j] > 1.0:
                    continue
                new = float(trial.std() / trial.mean())
                if new < cv * (1 - self.margin) and (best is None or new < best[0]):
                    best = (new, Move(vm.uuid, vm.name, vm.host, t, f"cv {cv:.2f} -> {new:.2f}",
                                      gain=cv - new))
        if best is None:
            return []
        self.count = 0
        return [best[1]]

    def moved(self, move: Move, ok: bool, now: float) -> None:
        pass


class ProxLB:
    """ProxLB memory/used mode: while max-min memory usage gap > balanciness, move the largest fitting VM."""

    name = "proxlb"

    def __init__(self, balanciness: float = 0.10, max_moves: int = 10) -> None:
        self.balanciness, self.max_moves = balanciness, max_moves

    def plan(self, state: ClusterState, rules: Rules) -> list[Move]:
        cpu, mem = _used(state)
        loads = Loads.of(state, rules, cpu, mem)
        out = evacuate(state, rules, loads, state.now, lambda v: v.mem_used)
        moved = {mv.vm for mv in out} | set(state.in_flight)
        for _ in range(self.max_moves):
            share = loads.memu / loads.mem
            hi, lo = int(np.argmax(share)), int(np.argmin(share))
            gap = share[hi] - share[lo]
            if gap <= self.balanciness:
                break
            src, dst = loads.names[hi], loads.names[lo]
            vms = sorted((v for v in state.on(src)
                          if v.uuid not in moved and v.name not in rules.ignore and not in_a_group(v, rules)),
                         key=lambda v: -v.mem_used)
            pick = None
            for v in vms:  # greedy largest first that narrows the gap
                after_hi = (loads.memu[hi] - v.mem_used) / loads.mem[hi]
                after_lo = (loads.memu[lo] + v.mem_used) / loads.mem[lo]
                if dst in allowed_targets(v, state, rules) and abs(after_hi - after_lo) < gap:
                    pick = v
                    break
            if pick is None:
                break
            loads.shift(src, dst, pick.cpu_used, pick.mem_used)
            moved.add(pick.uuid)
            out.append(Move(pick.uuid, pick.name, src, dst, f"memory gap {gap:.0%} > {self.balanciness:.0%}"))
        return out

    def moved(self, move: Move, ok: bool, now: float) -> None:
        pass


#: the seed's AHP preference matrix over (cpu pressure, memory pressure, memory size): pressure first
SEED_PAIRWISE = np.array([[1.0, 1.0, 5.0], [1.0, 1.0, 5.0], [0.2, 0.2, 1.0]])


class Derumier:
    """The seed's rules (DESIGN 11): bad VMs by pressure or host memory, TOPSIS/AHP, one move a minute."""

    name = "derumier"

    def __init__(self, cpu_pressure: float = 0.75, mem_high: float = 0.85, interval: float = 60.0) -> None:
        self.cpu_pressure, self.mem_high, self.interval = cpu_pressure, mem_high, interval
        self.last_change = -np.inf
        self.last_vm: str | None = None
        self.w, _ = ahp.weights(SEED_PAIRWISE)

    def plan(self, state: ClusterState, rules: Rules) -> list[Move]:
        if state.in_flight or state.now - self.last_change < self.interval:
            return []
        cpu, mem = _used(state)
        loads = Loads.of(state, rules, cpu, mem)
        ev = evacuate(state, rules, loads, state.now, lambda v: v.mem_used)
        if ev:
            return first_unit(ev, rules)
        c, m = loads.shares()
        bad = []
        for h in state.hosts:
            i = loads.index[h.name]
            for v in candidates(state, rules, h.name, state.now):
                if v.uuid == self.last_vm or in_a_group(v, rules):
                    continue
                cp = v.cpu_unserved / max(v.vcpus, 1)  # steal share as CPU pressure
                pseudo = v.mem_used / max(v.memory_mib, 1.0) if m[i] > self.mem_high else 0.0
                if cp > self.cpu_pressure or m[i] > self.mem_high:
                    bad.append((v, cp, pseudo))
        if not bad:
            return []
        matrix = np.array([[cp, ps, v.mem_used] for v, cp, ps in bad])
        order = topsis.rank(matrix + 1e-9, [self.w[0], self.w[1], -self.w[2]])
        for k in order:
            v = bad[k][0]
            targets = [t for t in allowed_targets(v, state, rules)
                       if m[loads.index[t]] + v.mem_used / loads.mem[loads.index[t]] <= self.mem_high]
            if not targets:
                continue
            rows = [[c[loads.index[t]] + v.cpu_used / loads.cpus[loads.index[t]],
                     m[loads.index[t]] + v.mem_used / loads.mem[loads.index[t]]] for t in targets]
            t = targets[topsis.rank(np.array(rows) + 1e-9, [-0.5, -0.5])[0]]
            return [Move(v.uuid, v.name, v.host, t, "pressure or host memory high")]
        return []

    def moved(self, move: Move, ok: bool, now: float) -> None:
        self.last_change, self.last_vm = now, move.vm
