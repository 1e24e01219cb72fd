"""The Host protocol: everything the control loop and the daemon need from a hypervisor, real or simulated.

The loop uses ``capacity``, ``observe()`` and ``apply(plan)``; the daemon
adds the life cycle (``start``, ``resume``, ``reconfigure``, ``restore``,
``close``) and reads what it saves or reports from the protocol alone:
per-VM health and failed calls travel in the Observation and the
ApplyResult, never in a host's attributes. ``HostBase`` gives every extra a
no-op default, so a simulated host implements only the three loop members.

``HostUnavailableError`` lives here, beside the protocol: the loop catches it
importing only this module, and every host raises the same one.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from rescoin.core.model import Observation, Plan
from rescoin.core.resources import HostCapacity
from rescoin.hosts.config import HostConfig

RESTORE_TIMEOUT = 30.0  # seconds restore() retries a hypervisor that does not answer


class HostUnavailableError(RuntimeError):
    """Raised by a host that cannot be reached this period; the daemon waits and retries."""


@dataclass
class ApplyResult:
    """What happened to a plan's actions: counts by kind, one line per failure, and per VM what was done.

    ``actions``: by VM UUID, ``(kind, ok)`` per call made; None = the host does
    not say (a simulated host: every planned change took effect).
    ``call_errors``: failed hypervisor calls by call name, made while applying.
    """

    applied: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    actions: dict[str, list[tuple[str, bool]]] | None = None
    call_errors: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.applied.values())

    def count(self, kind: str, ok: bool) -> None:
        bucket = self.applied if ok else self.failed
        bucket[kind] = bucket.get(kind, 0) + 1


@dataclass(frozen=True)
class HostSetup:
    """What the configuration hands a host, at start and on every reload (all or nothing)."""

    config: HostConfig = field(default_factory=HostConfig)
    agents: Any = None  # rescoin.hosts.agent.AgentClient, or None: no guest agents
    tcp_agents: dict[str, str] = field(default_factory=dict)  # VM name -> "host:port" of its TCP agent
    vm_config: Callable[[str, str], Any] | None = None  # (uuid, name) -> config.VMConfig
    managed: Callable[[str, str], bool] | None = None  # (uuid, name) -> manage this VM?


class Host(Protocol):
    """The whole interface; see ``HostBase`` for what each extra does by default."""

    @property
    def capacity(self) -> HostCapacity: ...

    def observe(self) -> Observation | None:
        """The period just ended, or None when there is nothing more to observe (end of a replay)."""

    def apply(self, plan: Plan) -> ApplyResult: ...

    @property
    def period(self) -> float | None:
        """The host's own period (a replayed trace's), or None: the configured one."""

    def start(self) -> None:
        """Begin what runs beside the loop (lifecycle events); never from the constructor."""

    def resume(self, originals: dict[str, dict], unrestored: set[str]) -> None:
        """A previous run's saved originals, and the VMs it could not restore (restored at the next observe)."""

    def originals(self) -> dict[str, dict]:
        """Every VM's settings as found before rescoin touched it, by UUID: what the state file keeps."""

    def unrestored(self) -> set[str]:
        """UUIDs whose originals are still to be put back."""

    def reconfigure(self, setup: HostSetup) -> None:
        """New settings on a reload; the capacity is read again."""

    def restore(self, timeout: float) -> int:
        """Put back every VM's originals, retrying ``timeout`` s; returns how many VMs were restored."""

    def known_vms(self) -> list[tuple[str, str]]:
        """(uuid, name) of every VM the hypervisor knows, managed or not, running or not."""

    def publish_ledger(self, uuids: np.ndarray, ledger: np.ndarray) -> None:
        """Store each VM's credit ledger where it travels with the VM (its domain metadata)."""

    def close(self) -> None: ...


class HostBase:
    """No-op defaults for every member beyond the loop's three: a host with nothing to keep or put back."""

    period: float | None = None

    def start(self) -> None:
        pass

    def resume(self, originals: dict[str, dict], unrestored: set[str]) -> None:
        pass

    def originals(self) -> dict[str, dict]:
        return {}

    def unrestored(self) -> set[str]:
        return set()

    def reconfigure(self, setup: HostSetup) -> None:
        pass

    def restore(self, timeout: float) -> int:
        return 0

    def known_vms(self) -> list[tuple[str, str]]:
        return []

    def publish_ledger(self, uuids: np.ndarray, ledger: np.ndarray) -> None:
        pass

    def close(self) -> None:
        pass
