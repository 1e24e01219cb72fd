"""TOPSIS ranking (minimal stand-in; the shared version replaces it at merge).

Rows are alternatives, columns criteria; signed weights (negative = lower is
better) normalised by the sum of magnitudes; vector normalisation per column.
"""
from __future__ import annotations

import numpy as np


def closeness(matrix: np.ndarray, weights) -> np.ndarray:
    """Relative closeness to the ideal per row (1 = ideal on every criterion)."""
    m = np.asarray(matrix, dtype=float)
    w = np.asarray(weights, dtype=float)
    if m.ndim != 2 or m.shape[1] != w.size:
        raise ValueError(f"matrix must be (n, {w.size}), got {m.shape}")
    if not (np.isfinite(m).all() and np.isfinite(w).all()):
        raise ValueError("TOPSIS input has NaN or inf")
    total = np.abs(w).sum()
    if total == 0:
        raise ValueError("TOPSIS weights are all zero")
    norm = np.sqrt(np.square(m).sum(axis=0))
    v = np.divide(m, norm, out=np.zeros_like(m), where=norm > 0) * (np.abs(w) / total)
    best = np.where(w >= 0, v.max(axis=0), v.min(axis=0))
    worst = np.where(w >= 0, v.min(axis=0), v.max(axis=0))
    dp = np.sqrt(np.square(v - best).sum(axis=1))
    dm = np.sqrt(np.square(v - worst).sum(axis=1))
    s = dp + dm
    return np.divide(dm, s, out=np.full(m.shape[0], 0.5), where=s > 0)


def rank(matrix: np.ndarray, weights) -> list[int]:
    """Row indices best first; ties keep their order."""
    c = closeness(matrix, weights)
    return [int(i) for i in np.argsort(-c, kind="stable")]
