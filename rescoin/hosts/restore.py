"""Putting a VM's original settings back (``--restore-on-exit``), even while libvirtd is away.

At first sight of a VM, LibvirtHost saves what it found: CPU shares and quota,
blkio weight, pins, balloon target, and (``original_caps``) the disk and
interface caps and the memtune soft limit, all of which ``apply()`` may change.
``restore_vms`` puts them back through one libvirt connection, retrying with
backoff for a bounded time; the VMs it could not reach are returned, the
daemon saves them in its state file, and the next start restores them first
(``restore_pending``). Field names and types: ``rescoin.ops.state.ORIGINAL_FIELDS``.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

from rescoin.core.loop import HostUnavailableError

log = logging.getLogger("rescoin.libvirt")

DISKCAP_KEYS = ("total_bytes_sec", "total_bytes_sec_max")  # what apply() sets on a disk cap
NETCAP_KEYS = ("inbound.average", "outbound.average")  # what apply() sets on an interface cap
RESTORE_TIMEOUT = 30.0  # seconds restore() retries a hypervisor that does not answer

Todo = dict[str, tuple[str, dict, "str | None"]]  # uuid -> (name for logs, originals, scheduler key or None)


def original_caps(lv, dom, state) -> dict[str, Any]:
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


def restore_vms(lv, todo: Todo, timeout: float = RESTORE_TIMEOUT) -> tuple[int, set[str]]:
    """Restore every VM in ``todo``; returns (how many were restored, UUIDs that could not be reached)."""
    todo = dict(todo)
    restored, delay, why = 0, 0.5, ""
    deadline = time.monotonic() + timeout
    while todo:
        lv._next_try = 0.0  # restoring keeps its own pace, not the per-period reconnect backoff
        try:
            conn = lv.connect()
        except HostUnavailableError as e:
            why = str(e)
        else:
            for uuid, (name, original, key) in list(todo.items()):
                outcome = restore_vm(lv, conn, uuid, name, original, key)
                if outcome == "retry":
                    why = f"the connection to {lv.uri} was lost"
                    break
                del todo[uuid]
                restored += outcome == "restored"
        if not todo or time.monotonic() + delay > deadline:
            break
        time.sleep(delay)
        delay = min(delay * 2, 8.0)
    if todo:
        log.error("could not restore the original settings of %d VMs (%s) within %.0f s: %s; they stay in the "
                  "state file and the next start restores them", len(todo),
                  ", ".join(sorted(name for name, _, _ in todo.values())), timeout, why)
    return restored, set(todo)


def restore_pending(lv, conn, pending: set[str], originals: dict[str, dict]) -> set[str]:
    """Restore the VMs a previous run could not; returns those still pending (the connection failed)."""
    left = set(pending)
    for uuid in sorted(pending):
        o = originals.get(uuid)
        outcome = "gone" if o is None else restore_vm(lv, conn, uuid, uuid, o, None)
        if outcome == "retry":
            break
        left.discard(uuid)
        if outcome == "restored":
            log.info("restored the original settings of VM %s, which the last run could not restore", uuid)
    return left


def restore_vm(lv, conn, uuid: str, name: str, o: dict, key: str | None) -> str:
    """"restored", "gone" (no such VM: nothing to restore) or "retry" (the connection failed)."""
    ok, dom = lv.call("lookupByUUIDString", name, conn.lookupByUUIDString, uuid)
    if not ok:
        return "gone" if lv._alive() else "retry"
    if key is None:  # a VM left by the last run: which scheduler parameters does it have?
        _, sched = lv.call("schedulerParameters", name, dom.schedulerParameters, default={})
        key = "cpu_shares" if "cpu_shares" in sched else ("weight" if "weight" in sched else None)
    oks = [lv.call(what, name, fn, *args)[0] for what, fn, args in restore_calls(dom, o, key)]
    return "restored" if all(oks) or lv._alive() else "retry"


def restore_calls(dom, o: dict, key: str | None) -> list[tuple[str, Callable, tuple]]:
    """The libvirt calls that put back the originals ``o``, each as (name, function, arguments)."""
    import libvirt  # noqa: PLC0415 - present: a connection was opened with it

    live = libvirt.VIR_DOMAIN_AFFECT_CURRENT
    calls: list[tuple[str, Callable, tuple]] = []
    if o["shares"] is not None and key:
        params = {key: int(o["shares"])}
        if key == "cpu_shares":
            params.update(vcpu_quota=int(o["quota"]) if o["quota"] is not None else -1)
            calls.append(("setSchedulerParameters", dom.setSchedulerParametersFlags, (params, live)))
        else:
            calls.append(("setSchedulerParameters", dom.setSchedulerParameters, (params,)))
    if o["blkio"]:
        calls.append(("setBlkioParameters", dom.setBlkioParameters, ({"weight": int(o["blkio"])}, live)))
    for v, cmap in enumerate(o["pins"]):
        calls.append(("pinVcpuFlags", dom.pinVcpuFlags, (v, tuple(cmap), live)))
    for dev, params in o.get("diskcaps", {}).items():
        calls.append(("setBlockIoTune", dom.setBlockIoTune, (dev, dict(params), live)))
    for dev, params in o.get("netcaps", {}).items():
        calls.append(("setInterfaceParameters", dom.setInterfaceParameters, (dev, dict(params), live)))
    if o.get("soft_limit_kib") is not None:
        calls.append(("setMemoryParameters", dom.setMemoryParameters, ({"soft_limit": int(o["soft_limit_kib"])}, live)))
    if o["balloon"] > 0:
        calls.append(("setMemoryFlags", dom.setMemoryFlags, (int(o["balloon"] * 1024), live)))
    return calls
