"""How CPU, blkio and pinning actions reach a VM: through libvirt, or its cgroups directly.

An actuator only says which call to make; ``LibvirtHost`` runs every call
(of ``apply`` and of ``restore``) through its one error helper and records the result. Balloon targets
and interface caps are guest/device operations and always go through libvirt.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

Call = tuple[str, Callable[..., Any], tuple]  # (name for logs and counters, function, arguments)

QUOTA_PERIOD_US = 100000


def quota_us(cores: float, vcpus: int) -> int:
    """Per-vCPU CFS quota for a cap of ``cores`` (libvirt's vcpu_quota applies per vCPU); -1 = no cap."""
    if not math.isfinite(cores):
        return -1
    return max(1000, int(cores / max(vcpus, 1) * QUOTA_PERIOD_US))


def cores_for_quota_us(quota: float | None, vcpus: int) -> float:
    """The cap in cores that :func:`quota_us` turns back into the per-vCPU ``quota`` (µs); NaN = no cap.

    Half a microsecond is added so that the float round trip cannot truncate
    to one below: restoring an original quota gives back exactly that quota.
    """
    if quota is None or not quota > 0:
        return math.nan
    return (float(quota) + 0.5) * max(vcpus, 1) / QUOTA_PERIOD_US


class Actuator(Protocol):
    name: str

    def cpu(self, state, dom, shares: int | None, quota: float | None) -> Call:
        """``shares`` None = unchanged; ``quota`` None = unchanged, NaN = remove the cap, else cores."""

    def blkio(self, state, dom, weight: int) -> Call: ...

    def pin(self, state, dom, vcpu: int, cpumap: tuple[bool, ...]) -> Call: ...


class LibvirtActuator:
    """Through libvirt's API: works on any driver, survives libvirt's own bookkeeping."""

    name = "libvirt"

    def __init__(self, flags: int = 0) -> None:
        self.flags = flags  # VIR_DOMAIN_AFFECT_CURRENT: the running VM, on every driver

    def cpu(self, state, dom, shares: int | None, quota: float | None) -> Call:
        params: dict[str, int] = {}
        if shares is not None and state.sched_key:
            params[state.sched_key] = int(shares)
        if quota is not None and state.sched_key == "cpu_shares":
            params["vcpu_period"] = QUOTA_PERIOD_US
            params["vcpu_quota"] = quota_us(quota, state.vcpus)
        if state.sched_key == "cpu_shares":
            return "setSchedulerParameters", dom.setSchedulerParametersFlags, (params, self.flags)
        return "setSchedulerParameters", dom.setSchedulerParameters, (params,)

    def blkio(self, state, dom, weight: int) -> Call:
        return "setBlkioParameters", dom.setBlkioParameters, ({"weight": int(weight)}, self.flags)

    def pin(self, state, dom, vcpu: int, cpumap: tuple[bool, ...]) -> Call:
        return "pinVcpuFlags", dom.pinVcpuFlags, (int(vcpu), cpumap, self.flags)
