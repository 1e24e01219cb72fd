"""Resources, their units, and the descriptors of VMs and hosts.

Every array in rescoin that is shaped ``(n_vms, N_RES)`` uses the column order
of :class:`Resource`, and every value is in the unit given by :data:`UNITS`.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np


class Resource(IntEnum):
    CPU = 0
    MEMORY = 1
    DISK = 2
    NET = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, name: str) -> Resource:
        try:
            return cls[name.strip().upper()]
        except KeyError:
            raise ValueError(
                f"unknown resource {name!r}; use one of {', '.join(r.label for r in cls)}"
            ) from None


RESOURCES: tuple[Resource, ...] = tuple(Resource)
N_RES = len(RESOURCES)
CPU, MEMORY, DISK, NET = (int(r) for r in RESOURCES)

#: the service objective's line: a VM granted less than this share of its demand in a period is
#: in violation (scored by rescoin.offline.evaluate, aimed at by the oracle)
VIOLATION = 0.95

#: unit of each resource column, for tables, CSV and the config reference
UNITS: dict[Resource, str] = {
    Resource.CPU: "cores",
    Resource.MEMORY: "MiB",
    Resource.DISK: "KiB/s",
    Resource.NET: "KiB/s",
}


@dataclass(frozen=True)
class HostCapacity:
    """What the host can hand out per resource, after the host reserve."""

    name: str
    capacity: np.ndarray  # (N_RES,) in UNITS
    pcpus: int  # physical CPUs that vCPUs can be pinned to

    def __post_init__(self) -> None:
        cap = np.asarray(self.capacity, dtype=float)
        if cap.shape != (N_RES,):
            raise ValueError(f"host capacity must have {N_RES} values, got shape {cap.shape}")
        object.__setattr__(self, "capacity", cap)
