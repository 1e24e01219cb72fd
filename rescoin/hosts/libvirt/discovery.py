"""Finding the VMs: what rescoin keeps per VM, read once at first sight, with the settings to restore.

At first sight of a VM the host saves what it found (CPU shares and quota,
blkio weight, pins, balloon target, disk and interface caps, memtune soft
limit: everything ``apply`` may change); after a restart the originals saved
by the previous run win, since rescoin may have changed the VM since.
Field names and types of the originals: ``rescoin.ops.state.ORIGINAL_FIELDS``.
"""
from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rescoin.hosts.claims import HostMemory
from rescoin.hosts.libvirt.connection import Libvirt

log = logging.getLogger("rescoin.libvirt")

DISKCAP_KEYS = ("total_bytes_sec", "total_bytes_sec_max")  # what apply() sets on a disk cap
NETCAP_KEYS = ("inbound.average", "outbound.average")  # what apply() sets on an interface cap
AGENT_CHANNEL = "org.rescoin.agent.0"


@dataclass
class VMState:
    """What rescoin keeps per VM between periods."""

    uuid: str
    name: str
    vcpus: int
    max_mib: float
    min_mib: float
    first_seen: int
    sched_key: str | None  # "cpu_shares" (QEMU) or "weight" (other drivers)
    original: dict[str, Any]  # settings found at first sight, for --restore-on-exit
    controls: dict[str, Any]  # what rescoin applied (or found)
    agent: str | None = None  # agent endpoint, e.g. "unix:/run/...sock"
    interfaces: list[str] = field(default_factory=list)
    disks: list[str] = field(default_factory=list)
    last: dict[str, float] = field(default_factory=dict)  # counters at the previous sample
    last_agent: Any = None
    mem: HostMemory | None = None  # the host's own view of the VM's memory, this period and the one before
    mem_before: HostMemory | None = None
    agent_doubt: str = ""  # what the last cross-check discounted (logged when it starts)


def _cpumap(pcpus: int, first: int, width: int) -> tuple[bool, ...]:
    """A CPU map of any length (the seeds' single-byte masks stopped at 8 CPUs)."""
    return tuple(first <= c < first + width for c in range(pcpus))


def _first_set(cpumap: tuple[bool, ...]) -> tuple[int, int]:
    """(first pCPU, how many) of a CPU map; (-1, 1) when it allows every pCPU (floating)."""
    on = [i for i, b in enumerate(cpumap) if b]
    if not on or len(on) == len(cpumap):
        return -1, 1
    return on[0], len(on)


def _pin_group(cpumap: tuple[bool, ...], width: int) -> int:
    """The pin-set index a CPU map stands for (-1 = floating), for sets of ``width`` pCPUs."""
    first, _ = _first_set(cpumap)
    return first // max(1, width) if first >= 0 else -1


def _key_of(sched: dict) -> str | None:
    """Which scheduler parameter holds a VM's CPU weight: "cpu_shares" (QEMU), "weight" or None."""
    return "cpu_shares" if "cpu_shares" in sched else ("weight" if "weight" in sched else None)


def sched_key(lv: Libvirt, name: str, dom) -> str | None:
    """``_key_of`` a VM's scheduler parameters, read now (a VM left unrestored by the last run)."""
    _, sched = lv.call("schedulerParameters", name, dom.schedulerParameters, default={})
    return _key_of(sched)


def _agent_endpoint(root: ET.Element) -> str | None:
    for ch in root.iter("channel"):
        target, source = ch.find("target"), ch.find("source")
        if (ch.get("type") == "unix" and target is not None and source is not None
                and target.get("name") == AGENT_CHANNEL):
            return "unix:" + source.get("path", "")
    return None


def _devices(root: ET.Element, tag: str) -> list[str]:
    """The target device names of ``tag`` elements; one without a name cannot be asked for its counters."""
    targets = (d.find("target") for d in root.iter(tag))
    return [dev for t in targets if t is not None and (dev := t.get("dev")) is not None]


def adopt(lv: Libvirt, dom, stats: dict, t: int, saved: dict[str, dict]) -> VMState | None:
    """A VM at first sight: identity, size, devices, agent channel and its settings now; None if unreadable."""
    uuid, name = dom.UUIDString(), dom.name()
    ok, info = lv.call("info", name, dom.info)
    if not ok:
        return None
    ok, xml = lv.call("XMLDesc", name, dom.XMLDesc, 0)
    root = ET.fromstring(xml) if ok else ET.Element("domain")
    _, sched = lv.call("schedulerParameters", name, dom.schedulerParameters, default={})
    key = _key_of(sched)
    _, blkio = lv.call("blkioParameters", name, dom.blkioParameters, 0, default={})
    _, pins = lv.call("vcpuPinInfo", name, dom.vcpuPinInfo, 0, default=[])
    vcpus = int(stats.get("vcpu.current", info[3]))
    min_kib = root.findtext("memtune/min_guarantee")
    found = {"shares": sched.get(key), "quota": sched.get("vcpu_quota"), "balloon": info[2] / 1024.0,
             "blkio": blkio.get("weight"), "pins": [tuple(p) for p in pins]}
    state = VMState(
        uuid=uuid, name=name, vcpus=max(vcpus, 1), max_mib=info[1] / 1024.0,
        min_mib=float(min_kib) / 1024.0 if min_kib else 0.0, first_seen=t, sched_key=key,
        # after a restart, the settings found before rescoin first touched the VM are the originals
        original=saved.get(uuid, found), controls={}, agent=_agent_endpoint(root),
        interfaces=_devices(root, "interface"), disks=_devices(root, "disk"),
    )
    if uuid not in saved:  # after ``state``: it knows the disks and interfaces
        found.update(original_caps(lv, dom, state))
    state.controls = _controls_found(found, pins, state.vcpus)
    log.info("managing VM %s (%s): %d vCPUs, %.0f MiB max, agent %s", name, uuid, state.vcpus,
             state.max_mib, state.agent or "none")
    return state


def _controls_found(st: dict, pins: list, vcpus: int) -> dict[str, Any]:
    """The controls a VM has at first sight, in the units a Plan uses."""
    pin0 = _first_set(tuple(pins[0])) if pins else (-1, 1)
    return {"shares": float(st["shares"]) if st["shares"] is not None else np.nan,
            "quota": np.nan, "balloon": st["balloon"],
            "blkio": float(st["blkio"]) if st["blkio"] else np.nan, "netcap": np.nan, "diskcap": np.nan,
            "pins": [_pin_group(tuple(p), pin0[1]) for p in pins] or [-1] * vcpus, "pin_width": pin0[1]}


def original_caps(lv: Libvirt, dom, state: VMState) -> dict[str, Any]:
    """Disk and interface caps and the memtune soft limit as found at first sight of ``state``'s VM."""
    name = state.name
    _, mem = lv.call("memoryParameters", name, dom.memoryParameters, 0, default={})
    out: dict[str, Any] = {"soft_limit_kib": mem.get("soft_limit"), "diskcaps": {}, "netcaps": {}}
    for dev in state.disks:
        ok, tune = lv.call("blockIoTune", name, dom.blockIoTune, dev, 0, default={})
        if ok:
            out["diskcaps"][dev] = {k: int(tune.get(k, 0)) for k in DISKCAP_KEYS}
    for dev in state.interfaces:
        ok, params = lv.call("interfaceParameters", name, dom.interfaceParameters, dev, 0, default={})
        if ok:
            out["netcaps"][dev] = {k: int(params.get(k, 0)) for k in NETCAP_KEYS}
    return out


def known_vms(lv: Libvirt) -> list[tuple[str, str]]:
    """(uuid, name) of every domain libvirt knows, running or not, managed or not."""
    _, doms = lv.call("listAllDomains", None, lv.connect().listAllDomains, 0, default=[])
    return [(d.UUIDString(), d.name()) for d in doms]
