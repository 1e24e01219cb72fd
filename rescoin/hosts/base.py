"""The Host protocol: what the control loop needs from a hypervisor, real or simulated."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from rescoin.core.model import Observation, Plan
from rescoin.core.resources import HostCapacity


@dataclass
class ApplyResult:
    """What happened to a plan's actions: counts by kind, and one line per failure."""

    applied: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.applied.values())


class Host(Protocol):
    """``observe()`` one period, ``apply(plan)`` the guard's actions. Nothing else."""

    @property
    def capacity(self) -> HostCapacity: ...

    def observe(self) -> Observation | None:
        """The period just ended, or None when there is nothing more to observe (end of a replay)."""

    def apply(self, plan: Plan) -> ApplyResult: ...
