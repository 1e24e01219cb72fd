"""AHP weights from a pairwise comparison matrix (minimal stand-in; replaced at merge)."""
from __future__ import annotations

import numpy as np

RANDOM_INDEX = (0.0, 0.0, 0.58, 0.9, 1.12, 1.24, 1.32, 1.41, 1.45, 1.49)


def weights(pairwise) -> tuple[np.ndarray, float]:
    """Principal eigenvector (normalised to sum 1) and the consistency ratio."""
    a = np.asarray(pairwise, dtype=float)
    n = a.shape[0]
    if a.shape != (n, n) or not np.isfinite(a).all() or (a <= 0).any():
        raise ValueError("AHP pairwise matrix must be square, finite and positive")
    vals, vecs = np.linalg.eig(a)
    i = int(np.argmax(vals.real))
    w = np.abs(vecs[:, i].real)
    w = w / w.sum()
    ci = (vals[i].real - n) / (n - 1) if n > 1 else 0.0
    ri = RANDOM_INDEX[min(n, len(RANDOM_INDEX)) - 1] if n >= 1 else 0.0
    return w, float(ci / ri) if ri > 0 else 0.0
