"""A simulated cluster: N SimHosts, each with the production control loop, and a balancer moving VMs.

Every host's SimHost holds all cluster VMs; its ``presence`` mask (periods x
VMs) says which run on it. Host memory and CPU are the cluster's (sizes over
the overcommit factor, as SimHost computes them for one host) split by each
host's ``share``. Initial placement: first-fit decreasing by configured memory,
each VM to the host with the lowest configured memory per unit of share.

A balancer round runs every ``every`` periods on a ClusterState built from
what the hosts report (usage, resident memory, the loop's padded forecasts,
unserved demand estimated from PSI/steal, never the true demand). A move ends
within the period (duration is seconds, the period 300 s): presence flips from
the next period, in which the source still holds the VM's resident memory and
spends ``migration.SOURCE_CPU`` cores for the copy's duration (its host swap
and CPU time-weighted by that share of the period). The footprint, balloon
target and credit ledger on arrival are the VM's on the source (not a fresh
boot: the balloon is guest state, the ledger is in its domain metadata), and
the VM loses ``downtime / period`` of its service in the period it moves. A
move fails, leaving the VM on the source, when the target's working sets plus
the VM's exceed its memory (refused before the copy: no cost), or at random
with ``fail_p`` (after the copy: the source's CPU and the target's memory for
its duration are spent). Only ``hindsight`` is
given the true future demand.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rescoin.cluster import migration
from rescoin.cluster.balancers import build
from rescoin.cluster.balancers.rescoin import Hindsight
from rescoin.cluster.model import Balancer, ClusterState, HostInfo, Move, Rules, VmInfo
from rescoin.core.resources import CPU, DISK, MEMORY, HostCapacity
from rescoin.hosts.sim import PRESSURE_GAIN, SimHost
from rescoin.offline.evaluate import Metrics
from rescoin.offline.simulate import SimSettings, build_loop

OSCILLATION_S = 3600.0
HORIZON = 12  # periods the hindsight reference looks ahead (one hour)


def placement(mem_sizes: np.ndarray, shares: np.ndarray) -> np.ndarray:
    """First-fit decreasing by configured memory, balanced by share of host capacity: host index per VM."""
    load = np.zeros(shares.size)
    out = np.zeros(mem_sizes.size, dtype=np.intp)
    for i in np.argsort(-np.nan_to_num(mem_sizes), kind="stable"):
        h = int(np.argmin(load / shares))
        out[i] = h
        load[h] += np.nan_to_num(mem_sizes[i])
    return out


@dataclass(frozen=True)
class ClusterSettings:
    hosts: Sequence[float] = (1.0,) * 8  # relative sizes
    every: int = 1  # periods between balancer rounds
    fail_p: float = 0.0
    seed: int = 0
    policy: str = "rescoin"


DEFAULTS = ClusterSettings()
SIM_DEFAULTS = SimSettings()
NO_RULES = Rules()


class ClusterSim:
    """One balancer over one trace on N hosts."""

    def __init__(self, trace, balancer: Balancer, settings: ClusterSettings = DEFAULTS,
                 sim: SimSettings = SIM_DEFAULTS, rules: Rules = NO_RULES) -> None:
        self.trace, self.balancer, self.cs, self.rules = trace, balancer, settings, rules
        shares = np.asarray(settings.hosts, float) / float(np.sum(settings.hosts))
        self.names = [f"host{i}" for i in range(shares.size)]
        demand = np.asarray(trace.demand, float)
        self.n = demand.shape[1]
        self.at = placement(np.asarray(trace.sizes, float)[:, MEMORY], shares)
        running = np.isfinite(demand).any(axis=2)
        self.loops = []
        self.hosts: list[SimHost] = []
        for h, share in enumerate(shares):
            loop = build_loop(trace, settings.policy, sim, running & (self.at == h)[None, :])
            host = loop.host
            assert isinstance(host, SimHost)
            cap = host.capacity.capacity * share
            pcpus = max(1, int(round(cap[CPU])))
            cap[CPU] = float(pcpus)
            host._capacity = HostCapacity(name=self.names[h], capacity=cap, pcpus=pcpus)
            self.loops.append(loop)
            self.hosts.append(host)
        self.running = running
        self.rng = np.random.default_rng(settings.seed)
        self.metrics = Metrics()
        self.moves = 0
        self.failed = 0
        self.migrated_mib = 0.0
        self.oscillations = 0
        self.left: dict[int, list[tuple[float, str]]] = {}
        self.last_moved: dict[int, float] = {}
        self.pending: dict[tuple[int, int], float] = {}  # (host, row) -> share of a period lost to downtime
        self.period = float(trace.period)
        self.periods = demand.shape[0]
        self.uuids = self.hosts[0].all_vms.uuids
        self.row = {u: i for i, u in enumerate(self.uuids.tolist())}

    def run(self, on_period: Callable[[int], None] | None = None) -> dict:
        for t in range(self.periods):
            seen = [loop.step() for loop in self.loops]
            for h, (loop, step) in enumerate(zip(self.loops, seen, strict=True)):
                if step is not None:
                    self._lose_downtime(h, step)
                    self.metrics.update(step, loop.history)
            if t + 1 < self.periods and t % self.cs.every == 0:
                self._round(t, seen)
            if on_period is not None:
                on_period(t)
        return self.result()

    def state(self, t: int, steps) -> ClusterState:
        """What the hosts report, as the balancer sees it (no true demand)."""
        hosts, vms = [], []
        now = t * self.period
        for name, loop, step in zip(self.names, self.loops, steps, strict=True):
            cap = loop.host.capacity.capacity
            swap = 0.0 if step is None or step.obs.host_swap is None else float(step.obs.host_swap)
            steal = 0.0
            if step is not None and step.obs.n:
                obs = step.obs
                use = np.nan_to_num(obs.usage)
                sig = np.nan_to_num(obs.signal)
                short = np.clip(sig[:, MEMORY] / PRESSURE_GAIN, 0.0, 0.95)
                mem_un = use[:, MEMORY] * short / (1 - short)
                cpu_un = sig[:, CPU] * obs.vms.vcpus
                steal = float(sig[:, CPU].mean())
                fc = loop.history.latest("forecast")
                led = np.nan_to_num(loop.history.latest("ledger"))
                fc = np.nan_to_num(fc) if fc is not None else use
                res = np.nan_to_num(obs.resident) if obs.resident is not None else use[:, MEMORY]
                for i in range(obs.n):
                    r = self.row[obs.vms.uuids[i]]
                    vms.append(VmInfo(
                        uuid=obs.vms.uuids[i], name=obs.vms.names[i], host=name, vcpus=int(obs.vms.vcpus[i]),
                        memory_mib=float(obs.vms.sizes[i, MEMORY]), cpu_used=float(use[i, CPU]),
                        mem_used=float(res[i]), cpu_forecast=float(fc[i, CPU]), mem_forecast=float(fc[i, MEMORY]),
                        cpu_unserved=float(cpu_un[i]), mem_unserved=float(mem_un[i]),
                        dirty_mib_s=migration.dirty_rate(use[i, CPU], use[i, DISK]),
                        uptime_s=float(obs.age[i] * self.period), last_moved=self.last_moved.get(r),
                        credits=tuple(float(x) for x in led[i])))
            hosts.append(HostInfo(name, float(cap[CPU]), float(cap[MEMORY]),
                                  contention=1.0 if swap > 0 or steal > 0.01 else 0.0))
        return ClusterState(now=now, hosts=tuple(hosts), vms=tuple(vms))

    def _round(self, t: int, steps) -> None:
        state = self.state(t, steps)
        if isinstance(self.balancer, Hindsight):
            d = self.hosts[0].demand[t + 1 : t + 1 + HORIZON]
            peak = np.nan_to_num(np.nanmax(np.where(np.isnan(d), -np.inf, d), axis=0), neginf=0.0)
            self.balancer.truth = {u: (float(peak[i, CPU]), float(peak[i, MEMORY]))
                                   for i, u in enumerate(self.uuids.tolist())}
        by = {v.uuid: v for v in state.vms}
        for move in self.balancer.plan(state, self.rules):
            ok = self.migrate(t, move, by[move.vm], state)
            self.balancer.moved(move, ok, state.now)

    def migrate(self, t: int, move: Move, vm: VmInfo, state: ClusterState) -> bool:
        """Carry one move out at the end of period ``t``; False (VM stays) when it fails."""
        r = self.row[move.vm]
        s, d = self.names.index(move.source), self.names.index(move.target)
        src, dst = self.hosts[s], self.hosts[d]
        work = src.demand[t, :, MEMORY]
        there = np.nan_to_num(work[dst.presence[t]]).sum()
        if there + np.nan_to_num(work[r]) > dst.capacity.capacity[MEMORY]:
            self.failed += 1  # refused before the copy starts: costs nothing
            return False
        seconds = migration.duration_s(vm, state.link_mib_s)
        if self.rng.random() < self.cs.fail_p:
            # failed during the copy (counted as at its end): the source spent the CPU, the
            # target held what it received, and the VM stays where it was
            src.burden(0.0, migration.SOURCE_CPU, seconds)
            dst.burden(vm.mem_used, 0.0, seconds)
            self.failed += 1
            return False
        # until the switch-over the VM's memory is resident on both hosts (the target's copy is
        # its footprint there from the next period) and the source spends CPU on the copy
        src.burden(vm.mem_used, migration.SOURCE_CPU, seconds)
        src.presence[t + 1 :, r] = False
        dst.presence[t + 1 :, r] = self.running[t + 1 :, r]
        if src.footprints is not None and dst.footprints is not None:
            dst.footprints.f[r] = src.footprints.f[r]  # arrives with its resident memory, not a fresh boot
        dst.controls.balloon[r] = src.controls.balloon[r]  # the guest's inflated balloon is guest state: it travels
        if vm.credits:  # the credit ledger travels in the domain metadata: the target's loop seeds it
            self.loops[d].history.carry(move.vm, vm.credits)
        self.downtime_loss(d, r, migration.downtime_s(vm, state.link_mib_s))
        now = state.now
        if any(h == move.target and now - when <= OSCILLATION_S for when, h in self.left.get(r, [])):
            self.oscillations += 1
        self.left.setdefault(r, []).append((now, move.source))
        self.last_moved[r] = now
        self.moves += 1
        self.migrated_mib += vm.mem_used * migration.copy_factor(vm.dirty_mib_s, state.link_mib_s)
        return True

    def downtime_loss(self, host: int, row: int, seconds: float) -> None:
        """Book the downtime against the VM's first period on the target."""
        self.pending[(host, row)] = seconds / self.period

    def _lose_downtime(self, host: int, step) -> None:
        """The VM gets no service for the downtime: that share of what it was granted is lost."""
        for (h, r), frac in list(self.pending.items()):
            if h != host:
                continue
            at = np.flatnonzero(step.obs.vms.uuids == self.uuids[r])
            step.obs.usage[at] *= 1.0 - frac
            del self.pending[(h, r)]

    def result(self) -> dict:
        m = self.metrics.result()
        days = max(self.n * self.periods * self.period / 86400.0, 1e-9)
        keys = ("satisfaction", "violations", "worst_off")
        out: dict[str, Any] = {r: {k: m[r][k] for k in keys} for r in ("memory", "cpu")}
        out.update(migrations_per_vm_day=self.moves / days, migrated_gib=self.migrated_mib / 1024.0,
                   oscillations=self.oscillations)
        return out


def simulate_cluster(trace, balancers: Sequence[str], settings: ClusterSettings = DEFAULTS,
                     sim: SimSettings = SIM_DEFAULTS, on_period=None) -> dict:
    """Every balancer over the same trace and placement, in the CLI's JSON shape."""
    out = {}
    for name in balancers:
        cb = (lambda t, _n=name: on_period(_n, t)) if on_period else None
        out[name] = ClusterSim(trace, build(name), settings, sim).run(cb)
    return {"balancers": out, "hosts": len(settings.hosts), "vms": int(np.asarray(trace.demand).shape[1]),
            "periods": int(np.asarray(trace.demand).shape[0])}
