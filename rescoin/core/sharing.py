"""Weighted max-min sharing (water-filling), vectorised.

One routine serves the simulated host (how CFS, blkio and a shared link split
capacity), the oracle (the fair split of true demand) and rescoin's excess
sharing. It solves many independent problems at once: every item belongs to a
group, and each group has its own capacity.
"""
from __future__ import annotations

import numpy as np

from rescoin.core.arrays import fillnan


def _fill_positive(d: np.ndarray, w: np.ndarray, g: np.ndarray, cap: np.ndarray) -> np.ndarray:
    """Water-fill items with strictly positive weight; returns the grants."""
    n_groups = cap.shape[0]
    grant: np.ndarray = np.zeros_like(d)
    if d.size == 0:
        return grant
    total_d = np.bincount(g, weights=d, minlength=n_groups)
    short = total_d > cap  # groups where demand exceeds capacity
    if not short.any():
        return d.copy()
    ratio = d / w
    order = np.lexsort((ratio, g))
    ds, ws, gs, rs = d[order], w[order], g[order], ratio[order]
    cd = np.cumsum(ds)
    cw = np.cumsum(ws)
    # cumulative sums restarted at each group boundary
    starts = np.flatnonzero(np.r_[True, gs[1:] != gs[:-1]])
    counts = np.diff(np.r_[starts, gs.size])
    base_d = np.repeat(np.r_[0.0, cd[starts[1:] - 1]], counts)
    base_w = np.repeat(np.r_[0.0, cw[starts[1:] - 1]], counts)
    cd -= base_d
    cw -= base_w
    total_w = np.bincount(gs, weights=ws, minlength=n_groups)
    # capacity consumed if the water level stood at this item's ratio
    cost = cd + rs * (total_w[gs] - cw)
    hit = np.flatnonzero((cost >= cap[gs]) & short[gs])
    level = np.full(n_groups, np.inf)
    if hit.size:
        grp, first = np.unique(gs[hit], return_index=True)
        k = hit[first]
        used_before = cd[k] - ds[k]
        weight_left = total_w[grp] - (cw[k] - ws[k])
        level[grp] = (cap[grp] - used_before) / weight_left
    grant = np.minimum(d, level[g] * w)
    return grant


def water_fill(
    demand: np.ndarray,
    weight: np.ndarray,
    capacity: np.ndarray | float,
    group: np.ndarray | None = None,
) -> np.ndarray:
    """Weighted max-min split of each group's capacity among its items.

    Each item gets ``min(demand, level * weight)`` with the level chosen so the
    group's capacity is used up (or every demand met). Items of weight zero
    are served last, equally, from whatever the weighted items leave. NaN or
    negative demand counts as zero. The result never exceeds the demand, and
    a group's grants never exceed its capacity.
    """
    d: np.ndarray = fillnan(demand, 0.0)
    d = np.maximum(d, 0.0)
    w = fillnan(np.asarray(weight, dtype=float), 0.0)
    w = np.maximum(w, 0.0)
    if group is None:
        g = np.zeros(d.shape[0], dtype=np.intp)
        cap = np.atleast_1d(np.asarray(capacity, dtype=float))
    else:
        g = np.asarray(group, dtype=np.intp)
        cap = np.asarray(capacity, dtype=float)
    cap = np.maximum(fillnan(cap, 0.0), 0.0)
    total = d.sum() if group is None else np.bincount(g, weights=d, minlength=cap.shape[0])[:cap.shape[0]]
    if np.all(total <= cap):
        return d  # every demand fits: nothing to share out (the common, uncontended case)
    grant: np.ndarray = np.zeros_like(d)
    pos = w > 0
    if pos.any():
        grant[pos] = _fill_positive(d[pos], w[pos], g[pos], cap)
    zero = ~pos & (d > 0)
    if zero.any():
        left = np.maximum(cap - np.bincount(g, weights=grant, minlength=cap.shape[0]), 0.0)
        grant[zero] = _fill_positive(d[zero], np.ones(int(zero.sum())), g[zero], left)
    return grant


def water_fill_columns(demand: np.ndarray, weight: np.ndarray, capacity: np.ndarray,
                       rounds: int = 8) -> np.ndarray:
    """Water-fill each column of an ``(n, k)`` array against ``capacity[k]``.

    Usually a few rounds of "split the rest by weight, saturate who needs
    less" settle it with whole-array operations; if not, the exact sorted
    algorithm finishes from where the rounds left off.
    """
    # NaN > 0 is False: one pass turns NaN and negatives into 0 (this runs several times a step)
    d: np.ndarray = np.asarray(demand, dtype=float)
    d = np.where(d > 0, d, 0.0)
    cap = np.asarray(capacity, dtype=float)
    cap = np.where(cap > 0, cap, 0.0)
    if (d.sum(axis=0) <= cap).all():
        return d
    w = np.asarray(weight, dtype=float)
    w = np.where(w > 0, w, 0.0)
    if not (w > 0).all():
        return _sorted_columns(d, w, cap)
    grant: np.ndarray = np.zeros_like(d)
    active = d > 0
    left = cap.copy()
    for _ in range(rounds):
        wa = np.where(active, w, 0.0)
        wsum = wa.sum(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            level = np.where(wsum > 0, left / wsum, 0.0)
        offer: np.ndarray = level * wa
        need = d - grant
        full = active & (need <= offer)
        if not full.any():  # nobody saturates: the level holds for everyone still active
            result: np.ndarray = grant + offer
            return result
        grant = np.where(full, d, grant)
        left = cap - grant.sum(axis=0)
        active &= ~full
        if not active.any():
            return grant
    rest: np.ndarray = _sorted_columns(np.where(active, d - grant, 0.0), w, np.maximum(left, 0.0))
    granted: np.ndarray = grant + rest
    return granted


def _sorted_columns(d: np.ndarray, w: np.ndarray, cap: np.ndarray) -> np.ndarray:
    n, k = d.shape
    group = np.broadcast_to(np.arange(k), (n, k)).ravel()
    return water_fill(d.ravel(), w.ravel(), cap, group).reshape(n, k)
