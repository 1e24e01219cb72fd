"""The ``rescoin`` balancer: host first, TOPSIS/AHP on forecasts, a move only when its gain beats its cost.

A host is a problem only when it cannot serve its VMs: its VMs report
unserved demand or the host reports contention; how much it must shed is
the larger of that unserved demand and its forecast memory (plus reserve)
over its capacity. A host that is full but serves every VM is left alone. The
problem must persist ``hold`` rounds. Candidates on a problem host are ranked
by TOPSIS with AHP weights (unserved demand and relief up, migration cost down);
the target by TOPSIS over the cluster after the move, in shares of each host's
own capacity. Gain (MiB of overload relieved) must beat cost (MiB copied,
scaled by ``cost_weight``) by ``margin``. No VM moves twice within ``window``.

Affinity groups move together. A candidate in a group is its members on the
problem host, ranked and placed as one: summed forecasts, unserved demand
and copy cost; a target allowed for every member with the summed memory
under ``headroom``; every member movable and outside its window. It becomes
one move per member, all to one target. A group already split over hosts
(a failed move, a hand migration) may only join the host holding most of
its other members, healing the split; if that host is not allowed or has no
room, the group stays: it is never scattered further and never half-moved.

Budget: a group takes as many of the ``max_in_flight`` slots as it has
members. A group larger than ``max_in_flight`` could never fit, so it may go
alone: only when nothing is in flight and nothing else was planned this
round (evacuations included); then it fills the round. So it waits for a
quiet round, never for a free slot count it could never reach.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from rescoin.cluster import ahp, topsis
from rescoin.cluster.balancers.base import Loads, candidates, evacuate, unit, unit_reason, unit_targets
from rescoin.cluster.migration import duration_s
from rescoin.cluster.model import ClusterState, Move, Rules, VmInfo

#: criteria: unserved demand, relief (forecast MiB), copy cost (MiB x dirty factor); unserved matters most
PAIRWISE = np.array([[1.0, 3.0, 5.0], [1 / 3, 1.0, 3.0], [0.2, 1 / 3, 1.0]])

Forecasts = dict[str, tuple[float, float]]  # VM uuid -> (cpu cores, memory MiB) over the horizon


class RescoinBalancer:
    name = "rescoin"

    def __init__(self, hold: int = 2, margin: float = 0.5, max_in_flight: int = 2, window: float = 3600.0,
                 cost_weight: float = 0.05, headroom: float = 0.97) -> None:
        self.hold, self.margin, self.max_in_flight = hold, margin, max_in_flight
        self.window, self.cost_weight, self.headroom = window, cost_weight, headroom
        self.w, _ = ahp.weights(PAIRWISE)
        self.streak: dict[str, int] = {}
        self.last: dict[str, float] = {}  # VM uuid -> time of its last move

    def forecasts(self, state: ClusterState) -> tuple[np.ndarray, np.ndarray]:
        """Per VM: padded CPU and memory forecasts over the horizon (the host loop's predictor)."""
        cpu = np.array([max(v.cpu_forecast, v.cpu_used) for v in state.vms], float)
        mem = np.array([max(v.mem_forecast, v.mem_used) for v in state.vms], float)
        return cpu, mem

    def _problem(self, state: ClusterState, loads: Loads) -> np.ndarray:
        unserved = np.zeros(len(loads.names))
        for v in state.vms:
            unserved[loads.index[v.host]] += v.mem_unserved
        over = loads.memu + loads.reserve - self.headroom * loads.mem
        contention = np.array([h.contention for h in state.hosts])
        # host first: a forecast overload counts only on a host that already fails to serve a VM
        troubled = (contention > 0) | (unserved > 0)
        return np.where(troubled, np.maximum(np.maximum(over, 0.0), unserved), 0.0)

    def plan(self, state: ClusterState, rules: Rules) -> list[Move]:
        cpu, mem = self.forecasts(state)
        fc = {v.uuid: (float(c), float(m)) for v, c, m in zip(state.vms, cpu, mem, strict=True)}
        loads = Loads.of(state, rules, cpu, mem)
        out = evacuate(state, rules, loads, state.now, lambda v: fc[v.uuid][1])
        budget = self.max_in_flight - len(state.in_flight) - len(out)
        problem = self._problem(state, loads)
        for h in loads.names:
            self.streak[h] = self.streak.get(h, 0) + 1 if problem[loads.index[h]] > 0 else 0
        for i in np.argsort(-problem):
            src = loads.names[i]
            if budget <= 0 or problem[i] <= 0 or self.streak[src] < self.hold:
                continue
            idle = not state.in_flight and not out
            moves = self._one(state, rules, loads, src, float(problem[i]), fc, budget, idle)
            out += moves
            budget -= len(moves)
        return out

    def _fits_budget(self, size: int, budget: int, idle: bool) -> bool:
        """A unit takes one slot per member; one larger than the whole cap goes only into a quiet round."""
        return size <= budget or (size > self.max_in_flight and idle)

    def _units(self, state: ClusterState, rules: Rules, src: str, budget: int, idle: bool
               ) -> list[tuple[list[VmInfo], list[VmInfo]]]:
        """Movable units on ``src``: (members here, members elsewhere), each member movable and outside its window."""
        ok = {v.uuid for v in candidates(state, rules, src, state.now)
              if state.now - self.last.get(v.uuid, -np.inf) > self.window}
        out, seen = [], set()
        for v in state.on(src):
            if v.name in seen:
                continue
            members, rest = unit(v, state, rules)
            seen |= {m.name for m in members}
            if (all(m.uuid in ok for m in members) and not any(m.uuid in state.in_flight for m in rest)
                    and self._fits_budget(len(members), budget, idle)):
                out.append((members, rest))
        return out

    def _one(self, state: ClusterState, rules: Rules, loads: Loads, src: str, need: float, fc: Forecasts,
             budget: int, idle: bool) -> list[Move]:
        """The best unit to shed from ``src`` as its moves (one per member, one target), or none."""
        units = self._units(state, rules, src, budget, idle)
        if not units:
            return []
        link = state.link_mib_s
        cost = {v.uuid: v.mem_used * duration_s(v, link) / max(v.mem_used / link, 1e-9)
                for members, _ in units for v in members}
        figures = [(sum(fc[v.uuid][0] for v in members), sum(fc[v.uuid][1] for v in members),
                    sum(v.mem_unserved for v in members), sum(cost[v.uuid] for v in members))
                   for members, _ in units]
        matrix = np.array([[sum(v.mem_unserved + v.cpu_unserved * 1024 for v in members), min(mem, need), c]
                           for (members, _), (_, mem, _, c) in zip(units, figures, strict=True)]) + 1e-9
        for k in topsis.rank(matrix, [self.w[0], self.w[1], -self.w[2]]):
            (members, rest), (cpu, mem, unserved, c) = units[k], figures[k]
            target = self._target(state, rules, loads, members, rest, cpu, mem)
            if target is None:
                continue
            gain = min(mem, need) + unserved
            cost_mib = self.cost_weight * c
            if gain <= cost_mib * (1 + self.margin):
                continue
            why = f"host over by {need:.0f} MiB; gain/cost in MiB" + unit_reason(members, rules)
            if len(members) > 1:
                why += f" (group gain {gain:.0f}, cost {cost_mib:.0f})"
            out = []
            for v in members:
                loads.shift(src, target, *fc[v.uuid])
                self.last[v.uuid] = state.now
                share = fc[v.uuid][1] / mem if mem > 0 else 1 / len(members)
                out.append(Move(v.uuid, v.name, src, target, why, gain=gain * share,
                                cost=self.cost_weight * cost[v.uuid]))
            return out
        return []

    def _target(self, state: ClusterState, rules: Rules, loads: Loads, members: list[VmInfo],
                rest: list[VmInfo], cpu: float, mem: float) -> str | None:
        """Where the unit fits best after the move; a split group only where most of its other members are."""
        targets = unit_targets(members, state, rules)
        if rest:
            home = sorted(Counter(v.host for v in rest).items(), key=lambda hc: (-hc[1], hc[0]))[0][0]
            targets = [t for t in targets if t == home]
        idx = np.array([loads.index[t] for t in targets], dtype=np.intp)
        if idx.size == 0:
            return None
        mem_after = (loads.memu[idx] + loads.reserve[idx] + mem) / loads.mem[idx]
        cpu_after = (loads.cpu[idx] + cpu) / loads.cpus[idx]
        fits = mem_after <= self.headroom
        if not fits.any():
            return None
        idx, matrix = idx[fits], np.column_stack([mem_after[fits], cpu_after[fits]]) + 1e-9
        return loads.names[idx[topsis.rank(matrix, [-0.7, -0.3])[0]]]

    def moved(self, move: Move, ok: bool, now: float) -> None:
        if ok:
            self.last[move.vm] = now


class Hindsight(RescoinBalancer):
    """The upper bound: rescoin's rules on the true peak demand over the horizon (set by the simulator).

    Same migration budget as rescoin (same in-flight cap and per-VM window), no hold: it knows.
    """

    name = "hindsight"

    def __init__(self, **options) -> None:
        options.setdefault("hold", 1)
        super().__init__(**options)
        self.truth: dict[str, tuple[float, float]] = {}  # uuid -> (cpu, mem) peak over the horizon

    def forecasts(self, state: ClusterState) -> tuple[np.ndarray, np.ndarray]:
        got = [self.truth.get(v.uuid, (v.cpu_used, v.mem_used)) for v in state.vms]
        # the future working set, but never below what is resident now: a VM arrives with its footprint
        mem = np.array([max(g[1], v.mem_used) for g, v in zip(got, state.vms, strict=True)], float)
        return np.array([g[0] for g in got], float), mem
