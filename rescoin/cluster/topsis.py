"""TOPSIS: rank alternatives (rows) over criteria (columns) by closeness to the ideal.

Kept pure and vectorised (DESIGN 14: scoring math in a small module tested
against worked examples); balancers rank up to thousands of rows per round.
Weights are signed: positive = benefit (higher is better), negative = cost
(lower is better), so one vector says both how much and which way.
"""
from __future__ import annotations

import numpy as np


def _check(matrix: np.ndarray, weights: np.ndarray) -> None:
    if matrix.ndim != 2 or weights.ndim != 1 or matrix.shape[1] != weights.shape[0]:
        raise ValueError(f"TOPSIS needs an m x n matrix and n weights, got shapes {matrix.shape} and {weights.shape}")
    if not np.isfinite(matrix).all():
        raise ValueError("TOPSIS matrix holds NaN or infinity")
    if not np.isfinite(weights).all():
        raise ValueError("TOPSIS weights hold NaN or infinity")
    if not np.abs(weights).sum() > 0:
        raise ValueError("TOPSIS weights are all zero: nothing to rank by")


def closeness(matrix: np.ndarray | list, weights: np.ndarray | list) -> np.ndarray:
    """Each row's closeness d-/(d+ + d-) in [0, 1] (1 = the ideal); 0.5 where both distances are 0."""
    m = np.asarray(matrix, dtype=float)
    w = np.asarray(weights, dtype=float)
    _check(m, w)
    if m.shape[0] == 0:
        return np.zeros(0)
    w = w / np.abs(w).sum()
    norms = np.sqrt((m * m).sum(axis=0))
    v = np.divide(m, norms, out=np.zeros_like(m), where=norms > 0) * np.abs(w)  # an all-zero column stays 0
    benefit = w >= 0
    ideal = np.where(benefit, v.max(axis=0), v.min(axis=0))
    anti = np.where(benefit, v.min(axis=0), v.max(axis=0))
    d_plus = np.sqrt(((v - ideal) ** 2).sum(axis=1))
    d_minus = np.sqrt(((v - anti) ** 2).sum(axis=1))
    total = d_plus + d_minus
    return np.divide(d_minus, total, out=np.full_like(total, 0.5), where=total > 0)


def rank(matrix: np.ndarray | list, weights: np.ndarray | list) -> list[int]:
    """Row indices best first; ties keep input order (stable sort)."""
    scores = closeness(matrix, weights)
    return [int(i) for i in np.argsort(-scores, kind="stable")]


__all__ = ["closeness", "rank"]
