"""Constants, paths and the error of the lab (shared by its modules)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rescoin.errors import RescoinError
from rescoin.shipped import GUEST_AGENT_DIR

LAB_PREFIX = "rescoin-lab-"
LAB_ROOT = Path("/var/lib/rescoin/lab")
IMAGE_DIR = LAB_ROOT / "image"
DISK_DIR = LAB_ROOT / "disks"
LOG_DIR = LAB_ROOT / "logs"
SOCKET_DIR = Path("/run/rescoin/lab")
AGENT_CHANNEL = "org.rescoin.agent.0"
DEFAULT_URI = "qemu:///system"
DISK_MIB = 64
AGENT_TIMEOUT = 120.0          # seconds lab_up waits for every agent to answer
METADATA_NS = "https://rescoin.invalid/xmlns/lab/1"

AGENT_SOURCE = GUEST_AGENT_DIR / "rescoin_agent.py"
LOADGEN_SOURCE = GUEST_AGENT_DIR / "loadgen.py"

# name -> the load generator spec of each VM (VM i gets specs[i % len(specs)]);
# spec syntax: guest_agent/loadgen.py
SCENARIOS: dict[str, list[str]] = {
    "mixed": ["cpu:0.9", "cpu:0.9", "idle"],
    "cpu": ["cpu:0.9", "cpu:0.5", "cpu:0.2"],
    "memory": ["mem:grow:step=16,max=180,every=5", "idle"],
    "disk": ["disk:write:kibs=1024", "idle"],
    "idle": ["idle"],
}

Progress = Callable[[str], None]


class LabError(RescoinError):
    """A problem the operator can fix; the CLI prints it as one line and exits 2."""


def quiet(msg: str) -> None:
    """The progress callback that says nothing (the default)."""

