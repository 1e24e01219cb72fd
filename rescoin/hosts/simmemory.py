"""The simulated host's memory model: guest footprints, balloon reclaim and host swap.

SKELETON (issue 10): the parameters and presets are fixed here; the model itself is
being written (docs/simulator.md will hold its rules).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

from rescoin.core.options import opt


@dataclass(frozen=True)
class MemoryModel:
    """How a guest's host footprint grows and shrinks, and what host swap costs (one set for every policy)."""

    io_growth: float = opt(1.0, "footprint growth per MiB of disk I/O (page cache), MiB/MiB", low=0.0)
    idle_growth: float = opt(0.01, "footprint growth per hour, share of the gap to the memory limit", low=0.0)
    reclaim_mib_s: float = opt(256.0, "most a balloon takes back per second per VM", "MiB/s", low=0.0)
    swap_penalty: float = opt(1.0, "CPU progress lost per share of the working set not resident", low=0.0)
    enabled: bool = opt(True, "False: the footprint is the working set (no growth, no reclaim latency, no swap)")

    @staticmethod
    def preset(name: str) -> MemoryModel:
        """A named setting of the sensitivity sweep: ``off``, ``default`` or ``fast``."""
        try:
            return PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown memory model {name!r}; choose from {', '.join(PRESETS)}") from None

    def with_options(self, **values: float) -> MemoryModel:
        known = {f.name for f in fields(self)}
        bad = sorted(set(values) - known)
        if bad:
            raise ValueError(f"unknown memory model option(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")
        return replace(self, **values)


PRESETS: dict[str, MemoryModel] = {
    "off": MemoryModel(enabled=False),
    "default": MemoryModel(),
    "fast": MemoryModel(io_growth=4.0, idle_growth=0.04),
}
