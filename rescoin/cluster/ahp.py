"""AHP: criterion weights from a pairwise preference matrix (Saaty's principal eigenvector).

A preference ``a[i][j]`` says how much more criterion i matters than j (1..9);
the matrix is reciprocal, so giving its upper triangle is enough. The
consistency ratio says whether the judgements contradict each other
(above 0.1 they do, and a warning says so). Weights feed ``topsis``.
"""
from __future__ import annotations

import warnings

import numpy as np

# Saaty's random consistency index, n = 1 .. 15
RANDOM_INDEX = (0.0, 0.0, 0.58, 0.90, 1.12, 1.24, 1.32, 1.41, 1.45, 1.49, 1.51, 1.48, 1.56, 1.57, 1.59)
CR_LIMIT = 0.1


class AHPConsistencyWarning(UserWarning):
    """The pairwise judgements are inconsistent (consistency ratio above 0.1)."""


def complete(pairwise: np.ndarray | list) -> np.ndarray:
    """The full reciprocal matrix from a full one or its upper triangle (zeros below the diagonal)."""
    a = np.array(pairwise, dtype=float)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"AHP needs a non-empty square matrix, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("AHP matrix holds NaN or infinity")
    n = a.shape[0]
    for i in range(n):
        a[i, i] = 1.0 if a[i, i] == 0 else a[i, i]
        if a[i, i] != 1.0:
            raise ValueError(f"AHP matrix [{i}][{i}] = {a[i, i]:g}: a criterion compared with itself must be 1")
        for j in range(i + 1, n):
            up, low = a[i, j], a[j, i]
            if up < 0 or low < 0 or (up == 0 and low == 0):
                raise ValueError(f"AHP matrix [{i}][{j}] = {up:g}, [{j}][{i}] = {low:g}: preferences must be positive")
            if up == 0:
                a[i, j] = 1.0 / low
            elif low == 0:
                a[j, i] = 1.0 / up
            elif not np.isclose(up * low, 1.0, rtol=1e-3):
                raise ValueError(f"AHP matrix [{i}][{j}] = {up:g} but [{j}][{i}] = {low:g}: not reciprocal")
    return a


def weights(pairwise: np.ndarray | list) -> tuple[np.ndarray, float]:
    """(weights summing to 1, consistency ratio); warns AHPConsistencyWarning when the ratio is above 0.1."""
    a = complete(pairwise)
    n = a.shape[0]
    values, vectors = np.linalg.eig(a)
    k = int(np.argmax(values.real))
    w = np.abs(vectors[:, k].real)  # the Perron vector has one sign; eig may return it negated
    w = w / w.sum()
    lambda_max = float(values[k].real)
    if n <= 2:
        cr = 0.0
    else:
        ri = RANDOM_INDEX[n - 1] if n <= len(RANDOM_INDEX) else RANDOM_INDEX[-1]
        cr = max(0.0, (lambda_max - n) / (n - 1) / ri)
    if cr > CR_LIMIT:
        warnings.warn(f"AHP consistency ratio {cr:.3f} is above {CR_LIMIT}: the preferences contradict each other",
                      AHPConsistencyWarning, stacklevel=2)
    return w, cr


def weights_named(prefs: dict[str, dict[str, float]]) -> tuple[dict[str, float], float]:
    """Weights by criterion name from ``{a: {b: how much a beats b, ...}, ...}`` (one side of each pair is enough)."""
    names: list[str] = []
    for a, row in prefs.items():
        if not isinstance(row, dict):
            raise ValueError(f"AHP preferences[{a!r}] must be a table of criterion -> preference")
        for name in (a, *row):
            if name not in names:
                names.append(name)
    index = {name: i for i, name in enumerate(names)}
    m = np.zeros((len(names), len(names)))
    for a, row in prefs.items():
        for b, value in row.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"AHP preferences[{a!r}][{b!r}] = {value!r}: must be a positive number")
            i, j = index[a], index[b]
            if m[i, j] and not np.isclose(m[i, j], value, rtol=1e-3):
                raise ValueError(f"AHP preferences[{a!r}][{b!r}] given twice, as {m[i, j]:g} and {value:g}")
            m[i, j] = value
    w, cr = weights(m)
    return {name: float(w[index[name]]) for name in names}, cr


__all__ = ["AHPConsistencyWarning", "RANDOM_INDEX", "complete", "weights", "weights_named"]
