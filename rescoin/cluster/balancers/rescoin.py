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
"""
from __future__ import annotations

import numpy as np

from rescoin.cluster import ahp, topsis
from rescoin.cluster.balancers.base import Loads, candidates, evacuate
from rescoin.cluster.migration import duration_s
from rescoin.cluster.model import ClusterState, Move, Rules, VmInfo
from rescoin.cluster.rules import allowed_targets, group_of

#: criteria: unserved demand, relief (forecast MiB), copy cost (MiB x dirty factor); unserved matters most
PAIRWISE = np.array([[1.0, 3.0, 5.0], [1 / 3, 1.0, 3.0], [0.2, 1 / 3, 1.0]])


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
        fc = {v.uuid: (c, m) for v, c, m in zip(state.vms, cpu, mem, strict=True)}
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
            move = self._one(state, rules, loads, src, float(problem[i]), fc)
            if move is not None:
                out.append(move)
                budget -= 1
        return out

    def _one(self, state: ClusterState, rules: Rules, loads: Loads, src: str, need: float, fc) -> Move | None:
        vms = [v for v in candidates(state, rules, src, state.now)
               if state.now - self.last.get(v.uuid, -np.inf) > self.window and len(group_of(v.name, rules)) == 1]
        if not vms:
            return None
        cost = np.array([v.mem_used * duration_s(v, state.link_mib_s) / max(v.mem_used / state.link_mib_s, 1e-9)
                         for v in vms])
        matrix = np.array([[v.mem_unserved + v.cpu_unserved * 1024, min(fc[v.uuid][1], need), c]
                           for v, c in zip(vms, cost, strict=True)]) + 1e-9
        for k in topsis.rank(matrix, [self.w[0], self.w[1], -self.w[2]]):
            v = vms[k]
            c_mem, m_mem = fc[v.uuid][1], fc[v.uuid][1]
            target = self._target(state, rules, loads, v, fc[v.uuid][0], m_mem)
            if target is None:
                continue
            gain = min(m_mem, need) + v.mem_unserved
            cost_mib = self.cost_weight * cost[k]
            if gain <= cost_mib * (1 + self.margin):
                continue
            loads.shift(src, target, fc[v.uuid][0], c_mem)
            self.last[v.uuid] = state.now
            return Move(v.uuid, v.name, src, target, f"host over by {need:.0f} MiB; gain/cost in MiB",
                        gain=gain, cost=cost_mib)
        return None

    def _target(self, state: ClusterState, rules: Rules, loads: Loads, v: VmInfo, cpu: float, mem: float
                ) -> str | None:
        targets = allowed_targets(v, state, rules)
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
