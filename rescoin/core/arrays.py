"""Small numpy helpers used on the hot path (np.nan_to_num is ~10x slower)."""
from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def fillnan(x: ArrayLike, fill: float = 0.0) -> np.ndarray:
    """``x`` with NaN replaced by ``fill`` (a new array)."""
    a = np.asarray(x, dtype=float)
    out: np.ndarray = np.where(a != a, fill, a)
    return out
