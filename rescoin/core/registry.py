"""Every policy with the predictor and placement it runs with: the one place they are wired.

The loop takes the objects ``build`` returns; nothing downstream chooses a
component by name. Adding a policy is one row of ``RECIPES``.

Each recipe names its guard profile: rescoin runs with rescoin's guard, the
peers with only the host's physical limits (``rescoin.core.guard``). The
variant ``"<peer>+guard"`` (e.g. ``"mom+guard"``) is a peer run with rescoin's
guard, to show what a peer gains from it; it resolves for every peer but is
not in the default order.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from rescoin.core.placement import BalancePlacement, KvmSchedulingPlacement, Placement, VmBalancerPlacement
from rescoin.core.policies import Policy
from rescoin.core.policies.peers import DRFPolicy, MomPolicy, NonePolicy, OraclePolicy, StaticPolicy
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
    guard: str = "physical"  # the guard profile: "physical" for peers, "rescoin" for rescoin

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
    guard: str = "rescoin"  # the guard profile the loop runs this policy with

    def with_predictor(self, predictor: Predictor | None) -> Components:
        return replace(self, predictor=predictor)


RECIPES: dict[str, Recipe] = {
    "none": Recipe(NonePolicy, _none),
    "static": Recipe(StaticPolicy, _none),
    "mom": Recipe(MomPolicy, LastValue),
    "drf": Recipe(DRFPolicy, default_predictor),
    "vm-balancer": Recipe(VmBalancerPolicy, LastValue, VmBalancerPlacement),
    "kvmscheduling": Recipe(KvmSchedulingPolicy, LastValue, KvmSchedulingPlacement),
    "rescoin-paper": Recipe(RescoinPaperPolicy, ewma),
    "rescoin": Recipe(RescoinPolicy, default_predictor, BalancePlacement, guard="rescoin"),
    "oracle": Recipe(OraclePolicy, _none),
}
#: rescoin with one part taken out, to measure what that part is worth; resolvable by name, not in the default order
ABLATIONS: dict[str, Recipe] = {
    "rescoin-nocredit": Recipe(lambda: RescoinPolicy(name="rescoin-nocredit", credits="off"), default_predictor,
                               BalancePlacement, guard="rescoin"),
    "rescoin-coins": Recipe(lambda: RescoinPolicy(name="rescoin-coins", credits="coins"), default_predictor,
                            BalancePlacement, guard="rescoin"),
    "rescoin-nopin": Recipe(lambda: RescoinPolicy(name="rescoin-nopin"), default_predictor, _none, guard="rescoin"),
}
GUARDED = "+guard"  # suffix of a peer run with rescoin's guard


def recipe(name: str) -> Recipe:
    """The recipe of a policy by name (``"<peer>+guard"`` too); an unknown name says which exist."""
    if name in ABLATIONS:
        return ABLATIONS[name]
    base = name[: -len(GUARDED)] if name.endswith(GUARDED) else name
    r = RECIPES.get(base)
    if r is None or (base != name and r.guard != "physical"):
        known = ", ".join([*RECIPES, *ABLATIONS])
        raise ValueError(f"unknown policy {name!r}; choose from {known} (or a peer with {GUARDED!r})")
    return replace(r, guard="rescoin") if base != name else r


#: policy names, in the order simulations run them
POLICIES: tuple[str, ...] = tuple(RECIPES)


def make_policy(name: str) -> Policy:
    """A fresh policy by name (without its predictor and placement: see ``build``)."""
    return recipe(name).policy()


def build(name: str) -> Components:
    """Fresh components of the policy ``name``."""
    r = recipe(name)
    return Components(r.policy(), r.predictor(), r.placement(), r.guard)


__all__ = ["ABLATIONS", "GUARDED", "Components", "POLICIES", "RECIPES", "Recipe", "build", "make_policy", "recipe"]
