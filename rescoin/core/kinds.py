"""The control kinds: one row each, read by the model, guard, hosts, evaluation and CLI.

Adding a kind is one row here (plus, in the guard, the function that computes
its target, and in each real host the call that applies it). Everything that
lists, copies, counts or reports kinds iterates ``KINDS``; read it as
``kinds.KINDS`` at call time so a test can add a row.
"""
from __future__ import annotations

from dataclasses import dataclass

from rescoin.core.resources import CPU, DISK, MEMORY, NET


@dataclass(frozen=True)
class Kind:
    """One control kind: what it sets, in what unit, how the guard damps it, how it is counted."""

    name: str  # the key in Plan.changed and in action counts
    field: str  # the Controls attribute holding its values
    resource: int  # the resource it controls; evaluation counts its changes there
    unit: str
    deadband: str  # "relative": kept within GuardConfig.weight_deadband; "mib": the balloon's own; "exact"
    per_vm: bool = True  # one value per VM (False: one per vCPU, pins)
    doc: str = ""


KINDS: tuple[Kind, ...] = (
    Kind("shares", "shares", CPU, "cpu.shares (1024 = one core)", "relative",
         doc="CPU weight, never below the VM's entitlement"),
    Kind("quota", "quota", CPU, "cores", "relative", doc="CPU cap (vcpu_quota), NaN = uncapped"),
    Kind("balloon", "balloon", MEMORY, "MiB", "mib", doc="balloon target"),
    Kind("blkio", "blkio", DISK, "weight 10..1000", "relative", doc="disk weight, never below the entitlement's"),
    Kind("diskcap", "diskcap", DISK, "KiB/s", "relative", doc="disk throughput cap, NaN = uncapped"),
    Kind("netcap", "netcap", NET, "KiB/s", "relative", doc="interface cap, NaN = uncapped"),
    Kind("pin", "pins", CPU, "pCPU set", "exact", per_vm=False, doc="vCPU pinning"),
)


def names() -> tuple[str, ...]:
    """Every kind's name, in the order the guard reports them."""
    return tuple(k.name for k in KINDS)


def per_vm_fields() -> tuple[str, ...]:
    """The Controls attributes with one value per VM (what a host copies row by row)."""
    return tuple(k.field for k in KINDS if k.per_vm)


def of_resource(resource: int) -> tuple[str, ...]:
    """The per-VM kinds that control ``resource`` (evaluation counts their changes per VM-hour)."""
    return tuple(k.name for k in KINDS if k.per_vm and k.resource == resource)
