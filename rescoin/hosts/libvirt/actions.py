"""The calls that change a VM: from a Plan (``apply``) or from its saved originals (``restore``).

Both build the same kind of list and run it the same way (``LibvirtHost``'s
one runner): CPU, blkio and pins through the host's actuator (libvirt or the
cgroup files, ``--actuator``), balloon targets and caps through libvirt,
each call through ``Libvirt.call``. The originals are replayed call by call
rather than squeezed into a Plan: a Plan holds one value per VM and kind and
pins as sets of one width, while an original is per device (disk and net
caps, each direction) and per vCPU map, which an operator may have set by hand.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from rescoin.core.model import Plan
from rescoin.hosts.actuators import Actuator, cores_for_quota_us
from rescoin.hosts.libvirt.discovery import VMState, _cpumap

#: (kind, call name, function, arguments, what to record on success)
Action = tuple[str, str, Callable[..., Any], tuple, Callable[[], None]]
LIVE = 0  # VIR_DOMAIN_AFFECT_CURRENT: the running VM, on every driver


def _nothing() -> None:
    pass


def balloon(dom, kib: int, done: Callable[[], None] = _nothing) -> Action:
    return "balloon", "setMemoryFlags", dom.setMemoryFlags, (int(kib), LIVE), done


def soft_limit(dom, kib: int, kind: str = "balloon") -> Action:
    return kind, "setMemoryParameters", dom.setMemoryParameters, ({"soft_limit": int(kib)}, LIVE), _nothing


def diskcap(dom, dev: str, params: dict, done: Callable[[], None] = _nothing) -> Action:
    return "diskcap", "setBlockIoTune", dom.setBlockIoTune, (dev, dict(params), LIVE), done


def netcap(dom, dev: str, params: dict, done: Callable[[], None] = _nothing) -> Action:
    return "netcap", "setInterfaceParameters", dom.setInterfaceParameters, (dev, dict(params), LIVE), done


def from_plan(plan: Plan, i: int, start: int, state: VMState, dom, actuator: Actuator, pcpus: int,
              soft_limits: bool) -> list[Action]:
    """VM ``i``'s changed controls; each success updates ``state.controls``."""
    c, changed = plan.controls, plan.changed
    todo: list[Action] = []
    if changed["shares"][i] or changed["quota"][i]:
        shares = int(c.shares[i]) if changed["shares"][i] else None
        quota = float(c.quota[i]) if changed["quota"][i] else None
        todo.append(("shares" if shares is not None else "quota", *actuator.cpu(state, dom, shares, quota),
                     lambda: state.controls.update(shares=float(c.shares[i]), quota=float(c.quota[i]))))
    if changed["balloon"][i]:
        kib = int(round(c.balloon[i] * 1024))
        todo.append(balloon(dom, kib, partial(state.controls.update, balloon=float(c.balloon[i]))))
        if soft_limits:  # the host reclaims above the target first
            todo.append(soft_limit(dom, kib))
    if changed["blkio"][i]:
        w = int(c.blkio[i])
        todo.append(("blkio", *actuator.blkio(state, dom, w), partial(state.controls.update, blkio=float(w))))
    if changed["diskcap"][i]:
        assert c.diskcap is not None  # Controls.__post_init__ fills it
        dcap = float(c.diskcap[i])
        bps = int(dcap * 1024) if np.isfinite(dcap) else 0  # 0 removes the cap
        todo += [diskcap(dom, dev, {"total_bytes_sec": bps, "total_bytes_sec_max": bps},
                         lambda: state.controls.update(diskcap=dcap)) for dev in state.disks]
    if changed["netcap"][i]:
        ncap = float(c.netcap[i])
        nkib = int(ncap) if np.isfinite(ncap) else 0  # 0 removes the cap
        todo += [netcap(dom, dev, {"inbound.average": nkib, "outbound.average": nkib},
                        lambda: state.controls.update(netcap=ncap)) for dev in state.interfaces]
    vs = slice(start, start + state.vcpus)
    for v in np.flatnonzero(changed["pin"][vs]):
        group, width = int(c.pins[vs][v]), c.pin_width
        # -1 floats the vCPU again: a map of every pCPU
        cmap = _cpumap(pcpus, group * width, width) if group >= 0 else (True,) * pcpus

        def pinned(v: int = int(v), g: int = group, w: int = width) -> None:
            state.controls["pins"][v] = g
            state.controls["pin_width"] = w

        todo.append(("pin", *actuator.pin(state, dom, int(v), cmap), pinned))
    return todo


def from_originals(state: VMState, dom, o: dict, actuator: Actuator) -> list[Action]:
    """The calls that put back the originals ``o`` of ``state``'s VM, in the order restore has always used."""
    todo: list[Action] = []
    if o["shares"] is not None and state.sched_key:
        quota = o["quota"] if state.sched_key == "cpu_shares" else None
        cores = cores_for_quota_us(quota, state.vcpus) if state.sched_key == "cpu_shares" else None
        todo.append(("shares", *actuator.cpu(state, dom, int(o["shares"]), cores), _nothing))
    if o["blkio"]:
        todo.append(("blkio", *actuator.blkio(state, dom, int(o["blkio"])), _nothing))
    for v, cmap in enumerate(o["pins"]):
        todo.append(("pin", *actuator.pin(state, dom, v, tuple(cmap)), _nothing))
    todo += [diskcap(dom, dev, params) for dev, params in o.get("diskcaps", {}).items()]
    todo += [netcap(dom, dev, params) for dev, params in o.get("netcaps", {}).items()]
    if o.get("soft_limit_kib") is not None:
        todo.append(soft_limit(dom, o["soft_limit_kib"], "soft_limit"))
    if o["balloon"] > 0:
        todo.append(balloon(dom, int(o["balloon"] * 1024)))
    return todo


