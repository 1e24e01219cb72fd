"""Small numpy helpers used on the hot path (np.nan_to_num is ~10x slower)."""
from __future__ import annotations

import numpy as np


def fillnan(x, fill: float = 0.0) -> np.ndarray:
    """``x`` with NaN replaced by ``fill`` (a new array)."""
    x = np.asarray(x, dtype=float)
    return np.where(x != x, fill, x)
