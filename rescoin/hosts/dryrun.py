"""A host wrapper that plans and reports actions but applies none (``dry_run``, ``run --dry-run``).

The daemon puts it on and takes it off at a reload, so it wraps a host
without owning it: ``host`` is the real one underneath.
"""
from __future__ import annotations

import logging
from typing import Any

from rescoin.hosts.base import ApplyResult

log = logging.getLogger("rescoin.dryrun")

_CONTROLS = ("shares", "quota", "balloon", "blkio", "diskcap", "netcap")


class DryRunHost:
    """Wraps a host so plans are printed (on ``console``, else logged), never applied."""

    def __init__(self, host: Any, console: Any = None) -> None:
        self.host, self.console = host, console

    @property
    def capacity(self):
        return self.host.capacity

    def start_events(self) -> None:
        if hasattr(self.host, "start_events"):
            self.host.start_events()

    def observe(self):
        return self.host.observe()

    def _say(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text)
        else:
            log.info("%s", text)

    def apply(self, plan) -> ApplyResult:
        names = plan.vms.names
        for kind, mask in plan.changed.items():
            if kind not in _CONTROLS or not mask.any():
                continue
            values = getattr(plan.controls, kind)
            for i in mask.nonzero()[0]:
                self._say(f"dry-run (not applied): {names[i]} {kind} -> {values[i]:.6g}")
        counts = plan.counts()
        if counts.get("pin"):
            self._say(f"dry-run (not applied): {counts['pin']} vCPU pin changes")
        return ApplyResult(applied={k: 0 for k in counts})
