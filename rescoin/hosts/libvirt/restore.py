"""Putting a VM's original settings back (``--restore-on-exit``), even while libvirtd is away.

``Restorer.all`` replays every VM's originals (``actions.from_originals``)
through the host's one runner, so the calls go through the configured
actuator exactly as ``apply``'s do, over one connection, retrying with
backoff for a bounded time. The VMs it could not reach are returned; the
daemon saves them in its state file, and the next start restores them first
(``Restorer.pending``, from the first observe).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

from rescoin.hosts.actuators import Actuator
from rescoin.hosts.base import RESTORE_TIMEOUT, ApplyResult, HostUnavailableError
from rescoin.hosts.libvirt import actions
from rescoin.hosts.libvirt.connection import Libvirt
from rescoin.hosts.libvirt.discovery import VMState, sched_key

log = logging.getLogger("rescoin.libvirt")

Runner = Callable[[VMState, list, ApplyResult], bool]  # LibvirtHost.run
Todo = dict[str, tuple["VMState | None", dict]]  # uuid -> (its state, or None: left by the last run; originals)

__all__ = ["RESTORE_TIMEOUT", "Restorer"]


class Restorer:
    """Restores through ``run`` (the host's call runner) on ``lv``'s connection."""

    def __init__(self, lv: Libvirt, actuator: Actuator, run: Runner) -> None:
        self.lv, self.actuator, self.run = lv, actuator, run

    def all(self, todo: Todo, timeout: float = RESTORE_TIMEOUT) -> tuple[int, set[str]]:
        """Restore every VM in ``todo``; returns (how many were restored, UUIDs that could not be reached)."""
        todo = dict(todo)
        restored, delay, why = 0, 0.5, ""
        deadline = time.monotonic() + timeout
        while todo:
            try:
                conn = self.lv.connect_now()  # restoring keeps its own pace, not the per-period backoff
            except HostUnavailableError as e:
                why = str(e)
            else:
                for uuid, (state, original) in list(todo.items()):
                    outcome = self.one(conn, uuid, state, original)
                    if outcome == "retry":
                        why = f"the connection to {self.lv.uri} was lost"
                        break
                    del todo[uuid]
                    restored += outcome == "restored"
            if not todo or time.monotonic() + delay > deadline:
                break
            time.sleep(delay)
            delay = min(delay * 2, 8.0)
        if todo:
            names = sorted(s.name if s is not None else u for u, (s, _) in todo.items())
            log.error("could not restore the original settings of %d VMs (%s) within %.0f s: %s; they stay in the "
                      "state file and the next start restores them", len(todo), ", ".join(names), timeout, why)
        return restored, set(todo)

    def pending(self, conn, pending: set[str], originals: dict[str, dict]) -> set[str]:
        """Restore the VMs a previous run could not; returns those still pending (the connection failed)."""
        left = set(pending)
        for uuid in sorted(pending):
            o = originals.get(uuid)
            outcome = "gone" if o is None else self.one(conn, uuid, None, o)
            if outcome == "retry":
                break
            left.discard(uuid)
            if outcome == "restored":
                log.info("restored the original settings of VM %s, which the last run could not restore", uuid)
        return left

    def one(self, conn, uuid: str, state: VMState | None, o: dict) -> str:
        """"restored", "gone" (no such VM: nothing to restore) or "retry" (the connection failed)."""
        name = state.name if state is not None else uuid
        ok, dom = self.lv.call("lookupByUUIDString", name, conn.lookupByUUIDString, uuid)
        if not ok:
            return "gone" if self.lv.alive() else "retry"
        if state is None:  # a VM left by the last run: what rescoin needs to know to address it
            state = VMState(uuid=uuid, name=dom.name(), vcpus=max(len(o["pins"]), 1), max_mib=0.0, min_mib=0.0,
                            first_seen=0, sched_key=sched_key(self.lv, uuid, dom), original=o, controls={})
        ok = self.run(state, actions.from_originals(state, dom, o, self.actuator), ApplyResult())
        return "restored" if ok or self.lv.alive() else "retry"
