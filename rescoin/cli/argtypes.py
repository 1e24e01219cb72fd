"""argparse value types shared by the sub-commands: numbers with a clear message when out of range."""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def number(kind: type = float, low: float | None = None, strict: bool = False) -> Callable[[str], float]:
    """A parser for finite ``kind`` values at least ``low`` (above it when ``strict``)."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not math.isfinite(v):  # NaN passes every comparison, and no option means infinity
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if low is not None and (v <= low if strict else v < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low:g}, got {text}")
        return v

    return parse


#: the keys of a per-resource ``--overcommit`` (rescoin.core.resources labels)
OVERCOMMIT_KEYS = ("cpu", "memory", "disk", "net")


def overcommit(text: str) -> float | dict[str, float]:
    """``1.5`` (every resource) or ``cpu=4,memory=1.5`` (per resource; the others keep the default).

    Checked with the simulator's own ``overcommit_factors``, so the CLI and SimHost agree on what is valid.
    """
    from rescoin.hosts.sim import overcommit_factors

    text = text.strip()
    value: float | dict[str, float]
    if "=" not in text:
        value = number(float, 0, strict=True)(text)
    else:
        value = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, num = (s.strip() for s in part.partition("="))
            if not sep or key not in OVERCOMMIT_KEYS:
                raise argparse.ArgumentTypeError(
                    f"{part!r}: expected RESOURCE=FACTOR with RESOURCE one of {', '.join(OVERCOMMIT_KEYS)}")
            if key in value:
                raise argparse.ArgumentTypeError(f"{key} given twice in {text!r}")
            try:
                value[key] = number(float, 0, strict=True)(num)
            except argparse.ArgumentTypeError as e:
                raise argparse.ArgumentTypeError(f"{key}: {e}") from None
        if not value:
            raise argparse.ArgumentTypeError(f"{text!r}: no RESOURCE=FACTOR given")
    try:
        overcommit_factors(value)
    except (ValueError, KeyError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def overcommit_text(value: float | dict[str, float]) -> str:
    """How a parsed ``--overcommit`` reads in a table title: ``1.5`` or ``cpu=4,memory=1.5``."""
    if isinstance(value, dict):
        return ",".join(f"{k}={v:g}" for k, v in value.items())
    return f"{value:g}"
