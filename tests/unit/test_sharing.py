"""Weighted max-min water-filling (rescoin.core.sharing)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rescoin.core.sharing import water_fill, water_fill_columns

# -- hand-computed cases -------------------------------------------------------------------


def test_equal_weights_small_demand_served_first():
    # cap 10: the 2 is met, the other two split the remaining 8 -> 4 each
    got = water_fill(np.array([2.0, 5.0, 8.0]), np.ones(3), 10.0)
    np.testing.assert_allclose(got, [2.0, 4.0, 4.0])


def test_equal_weights_all_capped():
    got = water_fill(np.array([10.0, 10.0, 10.0, 10.0]), np.ones(4), 6.0)
    np.testing.assert_allclose(got, [1.5, 1.5, 1.5, 1.5])


def test_unequal_weights_split_in_proportion():
    # both want more than the level: 12 split 1:2
    got = water_fill(np.array([10.0, 10.0]), np.array([1.0, 2.0]), 12.0)
    np.testing.assert_allclose(got, [4.0, 8.0])


def test_unequal_weights_satisfied_item_releases_its_share():
    # level 12/3 = 4 would give item 0 4 > 3: it gets 3, item 1 the other 9
    got = water_fill(np.array([3.0, 10.0]), np.array([1.0, 2.0]), 12.0)
    np.testing.assert_allclose(got, [3.0, 9.0])


def test_three_weights_hand_computed():
    # weights 1,1,2, cap 10, demands 1, 6, 20:
    # level L: 1 + L + 2L = 10 with item 0 met (L=3 >= 1): L = 3 -> item1 3 (<6), item2 6
    got = water_fill(np.array([1.0, 6.0, 20.0]), np.array([1.0, 1.0, 2.0]), 10.0)
    np.testing.assert_allclose(got, [1.0, 3.0, 6.0])


def test_demand_below_capacity_is_returned():
    d = np.array([0.5, 1.25, 3.0])
    got = water_fill(d, np.array([1.0, 5.0, 0.1]), 100.0)
    np.testing.assert_allclose(got, d)


def test_zero_weight_items_get_only_the_leftover_equally():
    # weighted item takes its 5, the two zero-weight items share the 2 left
    got = water_fill(np.array([5.0, 5.0, 4.0]), np.array([1.0, 0.0, 0.0]), 7.0)
    np.testing.assert_allclose(got, [5.0, 1.0, 1.0])


def test_zero_weight_items_get_nothing_when_weighted_use_it_all():
    got = water_fill(np.array([5.0, 5.0, 4.0]), np.array([1.0, 0.0, 0.0]), 4.0)
    np.testing.assert_allclose(got, [4.0, 0.0, 0.0])


def test_zero_weight_leftover_is_max_min_among_them():
    # 10 left after the weighted item; zero-weight demands 1 and 20: 1 and 9
    got = water_fill(np.array([2.0, 1.0, 20.0]), np.array([3.0, 0.0, 0.0]), 12.0)
    np.testing.assert_allclose(got, [2.0, 1.0, 9.0])


def test_nan_and_negative_demand_count_as_zero():
    got = water_fill(np.array([np.nan, -3.0, 4.0, 4.0]), np.ones(4), 6.0)
    np.testing.assert_allclose(got, [0.0, 0.0, 3.0, 3.0])


def test_nan_weight_counts_as_zero():
    got = water_fill(np.array([4.0, 4.0]), np.array([np.nan, 1.0]), 5.0)
    np.testing.assert_allclose(got, [1.0, 4.0])


def test_groups_have_separate_capacities():
    d = np.array([3.0, 3.0, 3.0, 3.0, 10.0])
    w = np.array([1.0, 1.0, 1.0, 1.0, 1.0])
    g = np.array([0, 0, 1, 1, 2])
    got = water_fill(d, w, np.array([4.0, 10.0, 2.5]), g)
    np.testing.assert_allclose(got, [2.0, 2.0, 3.0, 3.0, 2.5])


def test_groups_given_out_of_order():
    d = np.array([10.0, 1.0, 10.0, 1.0])
    g = np.array([1, 0, 0, 1])
    got = water_fill(d, np.ones(4), np.array([3.0, 5.0]), g)
    # group 0: items 1 (1) and 2 (10) share 3 -> 1, 2; group 1: items 0 (10), 3 (1) share 5 -> 4, 1
    np.testing.assert_allclose(got, [4.0, 1.0, 2.0, 1.0])


def test_zero_capacity_gives_nothing():
    got = water_fill(np.array([1.0, 2.0]), np.array([1.0, 0.0]), 0.0)
    np.testing.assert_allclose(got, [0.0, 0.0])


def test_empty_input():
    assert water_fill(np.zeros(0), np.zeros(0), 5.0).shape == (0,)


def test_columns_are_independent_problems():
    d = np.array([[4.0, 1.0], [4.0, 9.0]])
    w = np.array([[1.0, 1.0], [3.0, 1.0]])
    got = water_fill_columns(d, w, np.array([4.0, 6.0]))
    # column 0: weights 1:3 of 4 -> 1, 3; column 1: 1 met, 5 to the other
    np.testing.assert_allclose(got, [[1.0, 1.0], [3.0, 5.0]])


# -- properties -----------------------------------------------------------------------------

amount = st.floats(0.0, 100.0, allow_nan=False, allow_subnormal=False)
weights = st.one_of(st.just(0.0), st.floats(0.05, 10.0, allow_subnormal=False))


@st.composite
def problems(draw):
    n = draw(st.integers(1, 10))
    groups = draw(st.integers(1, 3))
    d = np.array(draw(st.lists(st.one_of(amount, st.just(np.nan), st.floats(-5.0, 0.0)), min_size=n, max_size=n)))
    w = np.array(draw(st.lists(weights, min_size=n, max_size=n)))
    g = np.array(draw(st.lists(st.integers(0, groups - 1), min_size=n, max_size=n)))
    cap = np.array(draw(st.lists(st.floats(0.0, 300.0, allow_subnormal=False), min_size=groups, max_size=groups)))
    return d, w, g, cap


def _check(d_raw, w, g, cap, got):
    d = np.where(np.isnan(d_raw), 0.0, np.maximum(d_raw, 0.0))
    tol = 1e-9 * max(1.0, float(cap.max(initial=0.0)), float(d.sum()))
    assert got.shape == d.shape
    assert np.all(got >= -tol)
    assert np.all(got <= d + tol)
    for k in range(cap.shape[0]):
        m = g == k
        total = got[m].sum()
        assert total <= cap[k] + tol
        if d[m].sum() >= cap[k]:
            assert total == pytest.approx(cap[k], abs=1e-7 * max(1.0, cap[k]))  # work-conserving
        else:
            np.testing.assert_allclose(got[m], d[m], atol=tol)
        pos = m & (w > 0)
        zero = m & ~(w > 0)
        eps = 1e-7 * max(1.0, cap[k])
        if pos.any():
            ratio = got[pos] / w[pos]
            for i in np.flatnonzero(pos):
                if got[i] < d[i] - eps:
                    # max-min: nobody else sits above this VM's level
                    assert got[i] / w[i] >= ratio.max() - eps
        if zero.any() and (got[zero] > eps).any():
            # zero-weight items are served only after every weighted item is satisfied
            np.testing.assert_allclose(got[pos], d[pos], atol=eps)
        for i in np.flatnonzero(zero):
            if got[i] < d[i] - eps:
                assert got[i] >= got[zero].max() - eps


@settings(max_examples=100, deadline=None)
@given(problems())
def test_water_fill_properties(p):
    d, w, g, cap = p
    got = water_fill(d, w, cap, g)
    _check(d, w, g, cap, got)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 4), st.data())
def test_water_fill_columns_properties(n, k, data):
    d = np.array(data.draw(st.lists(amount, min_size=n * k, max_size=n * k))).reshape(n, k)
    w = np.array(data.draw(st.lists(weights, min_size=n * k, max_size=n * k))).reshape(n, k)
    cap = np.array(data.draw(st.lists(st.floats(0.0, 300.0, allow_subnormal=False), min_size=k, max_size=k)))
    got = water_fill_columns(d, w, cap)
    assert got.shape == (n, k)
    g = np.broadcast_to(np.arange(k), (n, k))
    _check(d.ravel(), w.ravel(), g.ravel(), cap, got.ravel())


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0.1, 50.0), min_size=2, max_size=8), st.floats(0.5, 100.0), st.floats(0.1, 10.0))
def test_scaling_weights_changes_nothing(d, cap, c):
    d = np.array(d)
    w = np.linspace(1.0, 3.0, d.size)
    np.testing.assert_allclose(water_fill(d, w, cap), water_fill(d, w * c, cap), rtol=1e-9, atol=1e-9)


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 30), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_columns_fast_path_equals_the_sorted_algorithm(n, k, seed):
    """The rounds of proportional filling give exactly the sorted water-filling result."""
    from rescoin.core.sharing import _sorted_columns, water_fill_columns

    rng = np.random.default_rng(seed)
    d = rng.exponential(1.0, (n, k)) * (rng.random((n, k)) > 0.2)
    w = rng.exponential(1.0, (n, k)) + 0.01
    cap = rng.random(k) * d.sum(axis=0)
    np.testing.assert_allclose(water_fill_columns(d, w, cap), _sorted_columns(d, w, cap), rtol=1e-9, atol=1e-9)
