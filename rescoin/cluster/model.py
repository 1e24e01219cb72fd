"""What a balancer sees and decides: the cluster's state, the rules, a move, and the Balancer interface.

This is the one contract between the rooms of the cluster half: the
simulator (``rescoin.cluster.sim``) and the libvirt collector
(``rescoin.cluster.collect``) both build a ``ClusterState``; every balancer
(``rescoin.cluster.balancers``) turns one into a list of ``Move``; the
executors (simulated migration, ``migrateToURI3``) carry moves out. A
balancer never reaches into a host: what it needs is here.

Units follow ``rescoin.core.resources``: CPU in cores, memory in MiB,
times in seconds.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class HostInfo:
    """One hypervisor as the balancer sees it (capacities may differ between hosts)."""

    name: str
    cpus: float  # cores
    memory_mib: float
    uri: str = ""  # libvirt URI; empty in the simulator
    reserve_mib: float = 0.0  # memory the balancer never fills (rules: per-host reserve)
    maintenance: bool = False  # evacuate: no VM may stay or arrive
    contention: float = 0.0  # the host daemon's own figure, 0 = serves every VM; 1 = serves none of the excess


@dataclass(frozen=True)
class VmInfo:
    """One VM: where it runs, its size, what it uses, what it is forecast to want, what its host cannot give it."""

    uuid: str
    name: str
    host: str
    vcpus: int
    memory_mib: float  # configured (maximum) memory
    cpu_used: float = 0.0  # cores, last period
    mem_used: float = 0.0  # MiB resident (host footprint), last period
    cpu_forecast: float = 0.0  # cores, padded forecast over the migration horizon
    mem_forecast: float = 0.0  # MiB working set, padded forecast over the migration horizon
    cpu_unserved: float = 0.0  # cores the host could not grant (steal), last periods
    mem_unserved: float = 0.0  # MiB of working set the host could not keep resident (balloon deficit, swap)
    dirty_mib_s: float = 0.0  # page dirtying rate estimated from the VM's activity
    uptime_s: float = 1e9
    credits: tuple[float, ...] = ()  # the VM's coin ledger (per resource); travels with it
    last_moved: float | None = None  # state time of its last migration, None = never


@dataclass(frozen=True)
class ClusterState:
    """A snapshot: hosts, VMs, and the migrations still running (their VMs must not be touched)."""

    now: float  # seconds, on the state's own clock
    hosts: tuple[HostInfo, ...]
    vms: tuple[VmInfo, ...]
    in_flight: tuple[str, ...] = ()  # UUIDs of VMs being migrated
    link_mib_s: float = 1180.0  # migration bandwidth between hosts (10 GbE ~ 1180 MiB/s)

    def host(self, name: str) -> HostInfo:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    def on(self, host: str) -> list[VmInfo]:
        return [v for v in self.vms if v.host == host]


@dataclass(frozen=True)
class Rules:
    """Placement rules (the ``[balance]`` config section), by VM name and host name."""

    affinity: tuple[frozenset[str], ...] = ()  # each group stays on one host and moves together
    anti_affinity: tuple[frozenset[str], ...] = ()  # no two members on one host
    pins: dict[str, frozenset[str]] = field(default_factory=dict)  # VM -> hosts it may run on
    ignore: frozenset[str] = frozenset()  # never moved, still counted on its host
    maintenance: frozenset[str] = frozenset()  # hosts to evacuate
    reserve_mib: dict[str, float] = field(default_factory=dict)  # host -> memory kept free


@dataclass(frozen=True)
class Move:
    """One live migration a balancer proposes, with why and how it scored."""

    vm: str  # UUID
    name: str
    source: str
    target: str
    reason: str  # one line for the plan table and the log
    score: float = 0.0  # the balancer's own score of the chosen target (higher = better)
    gain: float = 0.0  # the improvement the balancer expects (its own unit, stated in reason)
    cost: float = 0.0  # the migration's cost in the same unit


class Balancer(Protocol):
    """One interface for every cluster balancer; stateful across rounds (hold counters, move history)."""

    name: str

    def plan(self, state: ClusterState, rules: Rules) -> list[Move]:
        """The moves to start this round (possibly none). Called once per balancer round."""
        ...

    def moved(self, move: Move, ok: bool, now: float) -> None:
        """Told after a move finished (or failed), so the balancer can keep its history."""
        ...
