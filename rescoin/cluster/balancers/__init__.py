"""Cluster balancers by name: ``build("rescoin", hold=3)``."""
from __future__ import annotations

from collections.abc import Callable

from rescoin.cluster.balancers.rescoin import Hindsight, RescoinBalancer
from rescoin.cluster.balancers.simple import Derumier, NoBalancer, ProxLB, PveDynamic
from rescoin.cluster.model import Balancer
from rescoin.errors import RescoinError

BALANCERS: dict[str, Callable[..., Balancer]] = {
    "rescoin": RescoinBalancer,
    "derumier": Derumier,
    "pve-dynamic": PveDynamic,
    "proxlb": ProxLB,
    "none": NoBalancer,
    "hindsight": Hindsight,
}


class UnknownBalancerError(RescoinError):
    """A balancer name not in BALANCERS."""


def build(name: str, **options) -> Balancer:
    try:
        factory = BALANCERS[name]
    except KeyError:
        raise UnknownBalancerError(f"unknown balancer {name!r}; choose from {', '.join(BALANCERS)}") from None
    return factory(**options)
