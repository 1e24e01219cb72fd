"""The ``[balance]`` config section: cluster hosts, rate limits and placement rules, checked one key at a time.

Apart from ``rescoin.ops.config`` because its values are lists and tables
of names, which the flat option fields there do not take. ``rules_from``
turns it into the ``Rules`` every balancer reads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from rescoin.cluster.model import Rules
from rescoin.errors import RescoinError


class BalanceConfigError(RescoinError, ValueError):
    """A bad ``[balance]`` value, said in one line naming the key."""


@dataclass(frozen=True)
class BalanceConfig:
    hosts: tuple[str, ...] = ()
    balancer: str = "rescoin"
    interval: float = 60.0
    hold: int = 3
    margin: float = 0.1
    max_in_flight: int = 1
    min_uptime: float = 300.0
    no_repeat: float = 3600.0
    affinity: tuple[tuple[str, ...], ...] = ()
    anti_affinity: tuple[tuple[str, ...], ...] = ()
    pin: dict[str, tuple[str, ...]] = field(default_factory=dict)
    ignore: tuple[str, ...] = ()
    maintenance: tuple[str, ...] = ()
    reserve_mib: dict[str, float] = field(default_factory=dict)  # host -> MiB; key "default" for all hosts


DOCS = {
    "hosts": ('[]', "libvirt URIs of the cluster's hosts, e.g. [\"qemu+ssh://h1/system\"]"),
    "balancer": ('"rescoin"', "balancer name"),
    "interval": ("60", "seconds between balancer rounds (s)"),
    "hold": ("3", "rounds an imbalance must persist before a move"),
    "margin": ("0.1", "minimum relative improvement a move must bring"),
    "max_in_flight": ("1", "migrations running at once at most"),
    "min_uptime": ("300", "never move a VM up less than this (s)"),
    "no_repeat": ("3600", "never move the same VM twice within this window (s)"),
    "affinity": ("[]", "groups of VM names kept on one host, e.g. [[\"web\", \"cache\"]]"),
    "anti_affinity": ("[]", "groups of VM names never sharing a host"),
    "pin": ("{}", "VM name -> host names it may run on, e.g. { db = [\"h1\", \"h2\"] }"),
    "ignore": ("[]", "VM names never moved"),
    "maintenance": ("[]", "host names to evacuate"),
    "reserve_mib": ("{}", "host -> memory kept free (MiB); \"default\" applies to every other host"),
}


def _names(where: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise BalanceConfigError(f"{where} = {value!r}: must be a list of names")
    return tuple(value)


def _number(where: str, value: Any, whole: bool, low: float) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BalanceConfigError(f"{where} = {value!r}: must be a finite number")
    if whole and not float(value).is_integer():
        raise BalanceConfigError(f"{where} = {value!r}: must be a whole number")
    if value < low:
        raise BalanceConfigError(f"{where} = {value!r}: must be at least {low:g}")
    return int(value) if whole else float(value)


def _groups(where: str, value: Any) -> tuple[tuple[str, ...], ...]:
    if not isinstance(value, list):
        raise BalanceConfigError(f"{where} = {value!r}: must be a list of lists of VM names")
    out = []
    for i, g in enumerate(value):
        names = _names(f"{where}[{i}]", g)
        if len(set(names)) < 2:
            raise BalanceConfigError(f"{where}[{i}]: a group needs at least two VMs")
        out.append(names)
    return tuple(out)


def parse_balance(table: Any) -> BalanceConfig:
    """The section from its TOML table; a BalanceConfigError names the first bad key."""
    if not isinstance(table, dict):
        raise BalanceConfigError("[balance] must be a table")
    unknown = sorted(set(table) - set(DOCS))
    if unknown:
        raise BalanceConfigError(f"[balance] unknown key {unknown[0]!r}; allowed: {', '.join(DOCS)}")
    v: dict[str, Any] = {}
    for key, value in table.items():
        where = f"balance.{key}"
        if key in ("hosts", "ignore", "maintenance"):
            v[key] = _names(where, value)
        elif key == "balancer":
            if not isinstance(value, str) or not value:
                raise BalanceConfigError(f"{where} = {value!r}: must be a balancer name")
            v[key] = value
        elif key in ("hold", "max_in_flight"):
            v[key] = _number(where, value, True, 1)
        elif key in ("interval", "margin", "min_uptime", "no_repeat"):
            v[key] = _number(where, value, False, 1.0 if key == "interval" else 0.0)
        elif key in ("affinity", "anti_affinity"):
            v[key] = _groups(where, value)
        elif key == "pin":
            if not isinstance(value, dict):
                raise BalanceConfigError(f"{where} must be a table of VM name -> list of hosts")
            pins = {name: _names(f"{where}.{name}", hosts) for name, hosts in value.items()}
            for name, hosts in pins.items():
                if not hosts:
                    raise BalanceConfigError(f"{where}.{name}: a pin to no hosts; name at least one host")
            v[key] = pins
        elif key == "reserve_mib":
            if not isinstance(value, dict):
                raise BalanceConfigError(f"{where} must be a table of host -> MiB")
            v[key] = {h: _number(f"{where}.{h}", mib, False, 0.0) for h, mib in value.items()}
    cfg = BalanceConfig(**v)
    for i, anti in enumerate(cfg.anti_affinity):
        for group in cfg.affinity:
            both = sorted(set(anti) & set(group))
            if len(both) >= 2:
                raise BalanceConfigError(f"balance.anti_affinity[{i}]: {both[0]} and {both[1]} are also in one "
                                         "affinity group; they cannot be both together and apart")
    return cfg


def rules_from(cfg: BalanceConfig, host_names: tuple[str, ...] = ()) -> Rules:
    """The balancers' ``Rules``; ``reserve_mib.default`` is spread over ``host_names`` not named themselves."""
    reserve = {h: mib for h, mib in cfg.reserve_mib.items() if h != "default"}
    if "default" in cfg.reserve_mib:
        reserve.update({h: cfg.reserve_mib["default"] for h in host_names if h not in reserve})
    return Rules(affinity=tuple(frozenset(g) for g in cfg.affinity),
                 anti_affinity=tuple(frozenset(g) for g in cfg.anti_affinity),
                 pins={vm: frozenset(h) for vm, h in cfg.pin.items()}, ignore=frozenset(cfg.ignore),
                 maintenance=frozenset(cfg.maintenance), reserve_mib=reserve)


def default_lines() -> list[str]:
    """The section for ``rescoin config default``, commented out (no cluster unless asked for)."""
    out = ["# Cluster balancing (uncomment to use):", "# [balance]"]
    for key, (default, doc) in DOCS.items():
        out += [f"# {key} = {default}    # {doc}"]
    return out
