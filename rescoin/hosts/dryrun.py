"""A host wrapper that plans and reports actions but applies none (``dry_run``, ``run --dry-run``).

It is a whole Host: observations and capacity pass through; plans, a reload's
settings and the restores are reported, never carried out. The daemon puts
it on and takes it off at a reload of ``daemon.dry_run``, so it wraps a host
without owning it (``close`` leaves the real host open). The VMs a previous
run could not restore are held here, not handed to the real host, so that a
dry run leaves them as they are; ``unrestored()`` still names them, and the
daemon hands them back to the real host when the dry run ends.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from rescoin.core import kinds
from rescoin.core.model import Observation, Plan
from rescoin.core.resources import HostCapacity
from rescoin.hosts.base import ApplyResult, Host, HostSetup

log = logging.getLogger("rescoin.dryrun")

class DryRunHost:
    """Wraps ``host`` so plans are printed (on ``console``, else logged), never applied."""

    def __init__(self, host: Host, console: Any = None) -> None:
        self.host, self.console = host, console
        self._pending: set[str] = set()  # a previous run's unrestored VMs: left alone while dry

    # -- passed through --------------------------------------------------------------------------
    @property
    def capacity(self) -> HostCapacity:
        return self.host.capacity

    @property
    def period(self) -> float | None:
        return self.host.period

    def observe(self) -> Observation | None:
        return self.host.observe()

    def start(self) -> None:
        self.host.start()

    def originals(self) -> dict[str, dict]:
        return self.host.originals()

    def unrestored(self) -> set[str]:
        return self._pending | self.host.unrestored()

    def known_vms(self) -> list[tuple[str, str]]:
        return self.host.known_vms()

    # -- reported, not done -------------------------------------------------------------------------
    def resume(self, originals: dict[str, dict], unrestored: set[str]) -> None:
        """The real host learns the originals; the pending restores wait here for a live run."""
        self.host.resume(originals, set())
        self._pending = set(unrestored)

    def reconfigure(self, setup: HostSetup) -> None:
        """Settings are not actions: the real host takes them (capacity and which VMs to watch)."""
        self.host.reconfigure(setup)

    def restore(self, timeout: float) -> int:
        """Nothing is put back: a dry run changed nothing."""
        self._say("dry-run (not restored): the VMs keep their current settings")
        return 0

    def close(self) -> None:
        """The real host is not ours to close."""

    def publish_ledger(self, uuids: np.ndarray, ledger: np.ndarray) -> None:
        """A dry run writes nothing, metadata included."""

    def apply(self, plan: Plan) -> ApplyResult:
        names = plan.vms.names
        for kind, mask in plan.changed.items():
            if kind not in kinds.per_vm_fields() or not mask.any():
                continue
            values = getattr(plan.controls, kind)
            for i in mask.nonzero()[0]:
                self._say(f"dry-run (not applied): {names[i]} {kind} -> {values[i]:.6g}")
        counts = plan.counts()
        if counts.get("pin"):
            self._say(f"dry-run (not applied): {counts['pin']} vCPU pin changes")
        return ApplyResult(applied={k: 0 for k in counts})

    def _say(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text)
        else:
            log.info("%s", text)
