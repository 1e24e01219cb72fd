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
