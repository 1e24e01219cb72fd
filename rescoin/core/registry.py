"""Every policy with the predictor and placement it runs with: the one place they are wired.

The loop takes the objects ``build`` returns; nothing downstream chooses a
component by name. Adding a policy is one row of ``RECIPES``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from rescoin.core.placement import BalancePlacement, KvmSchedulingPlacement, Placement, VmBalancerPlacement
from rescoin.core.policies import Policy
from rescoin.core.policies.peers import DRFPolicy, MomPolicy, OraclePolicy, StaticPolicy
from rescoin.core.policies.rescoin import RescoinPaperPolicy, RescoinPolicy
from rescoin.core.policies.seeds import KvmSchedulingPolicy, VmBalancerPolicy
from rescoin.core.predict import LastValue, Predictor, default_predictor, ewma


def _none() -> None:
    return None


@dataclass(frozen=True)
class Recipe:
    """How to build one policy's components (fresh objects each time: they keep state)."""

    policy: Callable[[], Policy]
    predictor: Callable[[], Predictor | None]
    placement: Callable[[], Placement | None] = _none

    @property
    def default_model(self) -> bool:
        """Runs on the default predictor, which a fitted model file may replace."""
        return self.predictor is default_predictor


@dataclass(frozen=True)
class Components:
    """What the control loop runs: a policy, its predictor (or None) and its placement (or None)."""

    policy: Policy
    predictor: Predictor | None
    placement: Placement | None

    def with_predictor(self, predictor: Predictor | None) -> Components:
        return replace(self, predictor=predictor)


RECIPES: dict[str, Recipe] = {
    "rescoin": Recipe(RescoinPolicy, default_predictor, BalancePlacement),
    "rescoin-paper": Recipe(RescoinPaperPolicy, ewma),
    "static": Recipe(StaticPolicy, _none),
    "drf": Recipe(DRFPolicy, default_predictor),
    "mom": Recipe(MomPolicy, LastValue),
    "vm-balancer": Recipe(VmBalancerPolicy, LastValue, VmBalancerPlacement),
    "kvmscheduling": Recipe(KvmSchedulingPolicy, LastValue, KvmSchedulingPlacement),
    "oracle": Recipe(OraclePolicy, _none),
}


def recipe(name: str) -> Recipe:
    """The recipe of a policy by name; an unknown name says which exist."""
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(RECIPES)}") from None


#: policy names, in the order simulations run them
POLICIES: tuple[str, ...] = tuple(RECIPES)


def make_policy(name: str) -> Policy:
    """A fresh policy by name (without its predictor and placement: see ``build``)."""
    return recipe(name).policy()


def build(name: str) -> Components:
    """Fresh components of the policy ``name``."""
    r = recipe(name)
    return Components(r.policy(), r.predictor(), r.placement())


__all__ = ["Components", "POLICIES", "RECIPES", "Recipe", "build", "make_policy", "recipe"]
