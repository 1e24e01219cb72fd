"""Option fields: a default with its one-line description, unit and bounds, kept next to the field.

Every configuration dataclass declares its fields with ``opt`` so that
``rescoin config default`` prints a documented file and a bad value gets
one message naming the key and what is allowed (``rescoin.ops.config``).
"""
from __future__ import annotations

from dataclasses import field
from typing import Any


def opt(default: Any, doc: str, unit: str = "", choices: tuple[Any, ...] | None = None, low: float | None = None,
        high: float | None = None) -> Any:
    meta = {"doc": doc, "unit": unit, "choices": choices, "low": low, "high": high}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)
