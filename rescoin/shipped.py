"""Files that ship inside the package: predictor models, the guest agent, the sample trace.

Read through ``importlib.resources`` so that an installed wheel finds them as a
checkout does (``models/`` and ``guest_agent/`` at the top of the repository are
links to these directories). The package is installed as plain files, not
zipped, so each is an ordinary path.
"""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def _shipped(*parts: str) -> Path:
    return Path(str(files("rescoin").joinpath(*parts)))


#: predictor parameter files (default.toml, hand-tuned.toml)
MODELS_DIR = _shipped("models")
#: the guest agent, its load generator and their unit and init files
GUEST_AGENT_DIR = _shipped("guest_agent")
#: the Bitbrains sample trace (24 VMs, 7 days) the demo replays
SAMPLE_TRACE_DIR = _shipped("data", "bitbrains_sample")
