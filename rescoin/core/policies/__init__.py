"""Allocation policies, selectable by name (DESIGN section 7)."""
from __future__ import annotations

from rescoin.core.policies.base import Policy, PolicyInput, entitlement
from rescoin.core.policies.peers import DRFPolicy, MomPolicy, OraclePolicy, StaticPolicy
from rescoin.core.policies.rescoin import RescoinPaperPolicy, RescoinPolicy
from rescoin.core.policies.seeds import KvmSchedulingPolicy, VmBalancerPolicy

POLICIES: dict[str, type] = {
    "rescoin": RescoinPolicy,
    "rescoin-paper": RescoinPaperPolicy,
    "static": StaticPolicy,
    "drf": DRFPolicy,
    "mom": MomPolicy,
    "vm-balancer": VmBalancerPolicy,
    "kvmscheduling": KvmSchedulingPolicy,
    "oracle": OraclePolicy,
}


def make_policy(name: str) -> Policy:
    """A fresh policy by name; an unknown name says which exist."""
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}") from None


__all__ = ["POLICIES", "Policy", "PolicyInput", "entitlement", "make_policy"]
