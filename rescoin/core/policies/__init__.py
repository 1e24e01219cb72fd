"""Allocation policies; ``rescoin.core.registry`` wires each to its predictor and placement."""
from __future__ import annotations

from rescoin.core.policies.base import Policy, PolicyInput, entitlement

__all__ = ["Policy", "PolicyInput", "entitlement"]
