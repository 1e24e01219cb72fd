"""The values that flow through one control step.

``Observation -> Forecast -> Allocation -> Plan``: each holds numpy arrays
shaped ``(n_vms, N_RES)`` in the row order of its ``VMSet``. Rows are keyed by
UUID; row order may change between periods, so nothing downstream keeps row
indices across steps (History realigns them).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np
from numpy.typing import ArrayLike

from rescoin.core import kinds
from rescoin.core.arrays import fillnan
from rescoin.core.resources import N_RES, HostCapacity

#: actuation kinds, in the order the guard reports them (the table is rescoin.core.kinds)
ACTION_KINDS = kinds.names()


@dataclass(frozen=True)
class VMSet:
    """Identity and configured size of the VMs in one observation."""

    uuids: np.ndarray  # (n,) str
    names: np.ndarray  # (n,) str
    sizes: np.ndarray  # (n, N_RES): vCPUs, max memory MiB, nominal disk/net KiB/s (NaN: none)
    min_memory: np.ndarray  # (n,) MiB the guest must keep (memtune min_guarantee, config)
    weight: np.ndarray  # (n,) per-VM weight from the config, 1.0 by default
    # (n,) the VM's own maximum memory (libvirt) when a per-VM limit lowers sizes' memory below it;
    # None or NaN = as sizes. The guard may exceed the limit, never this, to keep a guest's floor.
    balloon_max: np.ndarray | None = None

    @property
    def n(self) -> int:
        return int(self.uuids.shape[0])

    @cached_property
    def vcpus(self) -> np.ndarray:
        """vCPUs per VM (read-only: computed once per VMSet, which is immutable)."""
        v = fillnan(self.sizes[:, 0], 1.0).astype(np.intp).clip(min=1)
        v.flags.writeable = False
        return v

    def vcpu_owner(self) -> np.ndarray:
        """Row index of the VM that owns each vCPU, VMs' vCPUs contiguous."""
        return np.repeat(np.arange(self.n), self.vcpus)

    @staticmethod
    def build(uuids: ArrayLike, names: ArrayLike, sizes: ArrayLike, min_memory: ArrayLike | None = None,
              weight: ArrayLike | None = None, balloon_max: ArrayLike | None = None) -> VMSet:
        ids = np.asarray(uuids, dtype=str)
        n = ids.shape[0]
        sizes = np.asarray(sizes, dtype=float).reshape(n, N_RES)
        return VMSet(
            uuids=ids,
            names=np.asarray(names, dtype=str),
            sizes=sizes,
            min_memory=np.zeros(n) if min_memory is None else np.asarray(min_memory, dtype=float),
            weight=np.ones(n) if weight is None else np.asarray(weight, dtype=float),
            balloon_max=None if balloon_max is None else np.asarray(balloon_max, dtype=float),
        )


@dataclass
class Controls:
    """The control values a host has applied (or should apply) to each VM.

    NaN means "not set by rescoin": the hypervisor default stands.
    """

    shares: np.ndarray  # (n,) cpu_shares (cgroup v1 cpu.shares scale, 1024 = default)
    quota: np.ndarray  # (n,) cpu cap in cores (vcpu_quota), NaN = uncapped
    balloon: np.ndarray  # (n,) balloon target MiB
    blkio: np.ndarray  # (n,) blkio weight 10..1000
    netcap: np.ndarray  # (n,) interface cap KiB/s, NaN = uncapped
    pins: np.ndarray  # (m,) pCPU set of each vCPU (VMSet.vcpu_owner order), -1 = floating
    pin_width: int = 1  # pCPUs per set: set k is pCPUs k*width .. (k+1)*width - 1
    diskcap: np.ndarray | None = None  # (n,) disk throughput cap KiB/s (setBlockIoTune), NaN = uncapped

    def __post_init__(self) -> None:
        if self.diskcap is None:
            self.diskcap = np.full(self.shares.shape, np.nan)

    @staticmethod
    def defaults(vms: VMSet) -> Controls:
        """What a host without rescoin runs: default weights, full memory, no caps or pins."""
        n = vms.n
        return Controls(
            shares=np.full(n, 1024.0),
            quota=np.full(n, np.nan),
            balloon=vms.sizes[:, 1].copy(),
            blkio=np.full(n, 500.0),
            netcap=np.full(n, np.nan),
            pins=np.full(int(vms.vcpus.sum()), -1, dtype=np.intp),
        )

    def copy(self) -> Controls:
        return Controls(self.shares.copy(), self.quota.copy(), self.balloon.copy(), self.blkio.copy(),
                        self.netcap.copy(), self.pins.copy(), self.pin_width,
                        None if self.diskcap is None else self.diskcap.copy())


@dataclass
class Observation:
    """What the host shows for one period: never true demand (except ``truth``)."""

    ts: float  # seconds
    interval: float  # measured seconds since the previous observation
    host: HostCapacity
    vms: VMSet
    usage: np.ndarray  # (n, N_RES) used or granted, NaN = not known
    signal: np.ndarray  # (n, N_RES) unmet-demand pressure in [0, 1], NaN = not known
    controls: Controls  # what is applied now
    age: np.ndarray  # (n,) periods since the VM was first seen (0 = new this period)
    # (n,) bool: the host's own measurements corroborate the VM's memory usage and signal
    # (agent data is a claim); None = every VM's (a simulated host)
    confirmed: np.ndarray | None = None
    truth: np.ndarray | None = None  # (n, N_RES) true demand of this period: SimHost only, for metrics
    truth_next: np.ndarray | None = None  # (n, N_RES) true demand of the next period: for the oracle only
    # (n,) the guest agent per VM: "ok", "no agent" or why its data was refused; None = no agents (simulated)
    health: list[str] | None = None
    call_errors: dict[str, int] = field(default_factory=dict)  # hypervisor calls that failed while observing
    # (n,) MiB of each VM's memory resident on the host (QEMU RSS); None = not known
    resident: np.ndarray | None = None
    host_swap: float | None = None  # MiB of guest memory the host has swapped out now; None = not known
    # credit ledgers that arrived with VMs first seen this period (domain metadata), by UUID
    carried: dict[str, tuple[float, ...]] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.vms.n


@dataclass
class Forecast:
    point: np.ndarray  # (n, N_RES) predicted demand
    value: np.ndarray  # (n, N_RES) predicted demand with padding and correction: what policies plan on


#: diagnostics a policy may return, with their per-VM shape: ``credit`` is each resource's credit
#: (sum over the policy's window of (entitlement - usage) / capacity), ``combined_credit`` the one
#: signed number per VM the policy weighs by (its p-norm of earned minus spent coins), ``ledger``
#: what travels with a migrating VM (mean entitlement left unused per period, in resource units)
DIAGNOSTICS: dict[str, tuple[int, ...]] = {"credit": (N_RES,), "combined_credit": (), "ledger": (N_RES,)}


@dataclass
class Allocation:
    """A policy's decision, in resource units; NaN = leave this resource alone."""

    amount: np.ndarray  # (n, N_RES)
    pins: np.ndarray | None = None  # (m,) pCPU set per vCPU, or None = leave pins alone
    pin_width: int = 1  # pCPUs per set
    caps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # (N_RES,) cap, not only weight
    # what the policy computed on the way, for reporters: name -> (n,) + DIAGNOSTICS[name];
    # the loop fills a diagnostic a policy does not compute with NaN (drf, mom, ... have no credit)
    diagnostics: dict[str, np.ndarray] = field(default_factory=dict)

    def with_pins(self, pins: np.ndarray | None, width: int = 1) -> Allocation:
        return replace(self, pins=pins, pin_width=width)

    def with_all_diagnostics(self, n: int) -> Allocation:
        """Every diagnostic of ``DIAGNOSTICS`` present: the ones the policy did not compute are NaN."""
        full = {name: np.asarray(self.diagnostics[name], dtype=float) if name in self.diagnostics
                else np.full((n,) + shape, np.nan) for name, shape in DIAGNOSTICS.items()}
        return replace(self, diagnostics=full)


@dataclass
class Plan:
    """Controls to apply and which of them changed, by action kind."""

    controls: Controls
    changed: dict[str, np.ndarray]  # kind -> (n,) bool, or (m,) bool for "pin"
    vms: VMSet

    def counts(self) -> dict[str, int]:
        return {k: int(v.sum()) for k, v in self.changed.items()}

    @property
    def empty(self) -> bool:
        return not any(v.any() for v in self.changed.values())
