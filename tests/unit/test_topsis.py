"""TOPSIS against worked examples, signed weights, zero columns, ties and bad input."""
from __future__ import annotations

import numpy as np
import pytest

from rescoin.cluster.topsis import closeness, rank

PHONES = [[250, 16, 12, 5], [200, 16, 8, 3], [300, 32, 16, 4], [275, 32, 8, 4], [225, 16, 16, 2]]


def test_seed_node_example_reproduces_its_published_scores():
    """Derumier, "[PATCH pve-ha-manager 1/8] add AHP && Topsis Math Helpers", pve-devel, 27 Apr 2022
    (https://lists.proxmox.com/pipermail/pve-devel/2022-April/052779.html): nodes (cpu, mem) = (80, 100),
    (79, 99), (90, 102), lower cpu and higher mem better, mem twice cpu (AHP weights 1/3, 2/3); published scores
    0.745400652669653, 0.688707427881571, 0.311292572118429."""
    scores = closeness([[80, 100], [79, 99], [90, 102]], [-1 / 3, 2 / 3])
    assert scores == pytest.approx([0.745400652669653, 0.688707427881571, 0.311292572118429], abs=1e-12)
    assert rank([[80, 100], [79, 99], [90, 102]], [-1, 2]) == [0, 1, 2]


def test_textbook_phone_example():
    """The mobile-phone TOPSIS example (price cost; storage, camera, looks benefit; equal weights 0.25) as worked
    in https://github.com/mycr0ft/MultiComponentDecisionTheory: its weighted normalised price column is
    0.1107, 0.0886, 0.1328, 0.1218, 0.0996 and the ideal price and storage 0.0886 and 0.1508. Phone 3 comes first
    and phone 2 last; the middle order 4, 1, 5 is our own computation (the cited page shows the steps)."""
    m = np.array(PHONES, dtype=float)
    weighted_price = m[:, 0] / np.sqrt((m[:, 0] ** 2).sum()) / 4
    assert weighted_price == pytest.approx([0.11070186, 0.08856149, 0.13284223, 0.12177205, 0.09963167], abs=1e-8)
    order = rank(PHONES, [-1, 1, 1, 1])
    assert order[0] == 2 and order[-1] == 1
    assert order == [2, 3, 0, 4, 1]


def test_weights_are_normalised_by_magnitude():
    assert closeness(PHONES, [-1, 1, 1, 1]) == pytest.approx(closeness(PHONES, [-0.25, 0.25, 0.25, 0.25]))


def test_the_sign_of_a_weight_turns_the_criterion_around():
    m = [[1.0], [2.0], [3.0]]
    assert rank(m, [1]) == [2, 1, 0]
    assert rank(m, [-1]) == [0, 1, 2]


def test_a_zero_column_stays_zero_and_gives_no_nan():
    m = [[1.0, 0.0], [3.0, 0.0], [2.0, 0.0]]
    scores = closeness(m, [1, 1])
    assert np.isfinite(scores).all()
    assert rank(m, [1, 1]) == [1, 2, 0]


def test_identical_rows_score_one_half_and_keep_their_order():
    scores = closeness([[5, 5], [5, 5], [5, 5]], [1, -1])
    assert scores == pytest.approx([0.5, 0.5, 0.5])
    tied = rank([[2, 1], [1, 2], [2, 1], [1, 2]], [1, 1])  # rows 0/2 and 1/3 tie with each other
    assert tied.index(0) < tied.index(2) and tied.index(1) < tied.index(3)


@pytest.mark.parametrize("matrix, weights, words", [
    ([[1, float("nan")]], [1, 1], "NaN"),
    ([[1, float("inf")]], [1, 1], "NaN or infinity"),
    ([[1, 2]], [1, float("nan")], "weights hold NaN"),
    ([[1, 2]], [0, 0], "all zero"),
    ([[1, 2]], [1, 1, 1], "shapes"),
    ([1, 2], [1, 1], "shapes"),
])
def test_bad_input_is_a_value_error_in_one_line(matrix, weights, words):
    with pytest.raises(ValueError, match=words) as e:
        rank(matrix, weights)
    assert len(str(e.value).splitlines()) == 1


def test_thousands_of_rows_rank_consistently_with_scores():
    rng = np.random.default_rng(1)
    m = rng.random((5000, 4))
    w = [-1.0, 2.0, 0.5, -3.0]
    order = rank(m, w)
    s = closeness(m, w)
    assert sorted(order) == list(range(5000)) and (np.diff(s[order]) <= 0).all()
