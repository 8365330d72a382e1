"""Metrics against hand-computed values and brute force."""

import itertools
import math
from fractions import Fraction

import pytest
from hypothesis import given, settings, strategies as st

from jaxmath.eval import metrics


def test_accuracy_and_ci95_hand_computed():
    # The study's baseline MATH-500 cell: 397/500 = 79.4% +- 3.5.
    correct = [True] * 397 + [False] * 103
    p = metrics.accuracy(correct)
    assert p == pytest.approx(0.794)
    assert metrics.ci95(p, 500) == pytest.approx(1.96 * math.sqrt(0.794 * 0.206 / 500))
    assert round(100 * metrics.ci95(p, 500), 1) == 3.5
    # AIME: 6/30 = 20.0% +- 14.3, as in Table 4.
    assert round(100 * metrics.ci95(6 / 30, 30), 1) == 14.3
    assert metrics.ci95(1.0, 30) == 0.0 and metrics.accuracy([]) == 0.0


def _brute_pass_at_k(correct, k):
    subsets = list(itertools.combinations(range(len(correct)), k))
    return sum(any(correct[i] for i in s) for s in subsets) / len(subsets)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=9), st.data())
def test_pass_at_k_matches_brute_force(correct, data):
    k = data.draw(st.integers(1, len(correct)))
    assert metrics.pass_at_k(len(correct), sum(correct), k) == pytest.approx(_brute_pass_at_k(correct, k))


def test_pass_at_k_exact_values_and_large_n():
    assert metrics.pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert metrics.pass_at_k(10, 0, 5) == 0.0 and metrics.pass_at_k(10, 6, 5) == 1.0
    exact = 1 - Fraction(math.comb(1000 - 3, 64), math.comb(1000, 64))
    assert metrics.pass_at_k(1000, 3, 64) == pytest.approx(float(exact), rel=1e-12)
    with pytest.raises(ValueError):
        metrics.pass_at_k(4, 5, 1)


def _toy_equivalent(a, b):
    """Stands in for jaxmath.reward.equivalent: compares numbers written as \\frac12, 1/2 or 0.5."""
    def value(s):
        s = s.replace("\\frac12", "1/2").replace("\\frac{1}{2}", "1/2")
        return Fraction(s)
    try:
        return value(a) == value(b)
    except (ValueError, ZeroDivisionError):
        return a == b


def test_equivalent_spellings_vote_together():
    answers = ["3", "\\frac12", "3", "0.5", "1/2"]
    correct = [False, True, False, True, True]  # gold 1/2
    labels = metrics.group_answers(answers, _toy_equivalent)
    assert labels == [0, 1, 0, 1, 1]
    assert metrics.maj_at_k(labels, correct, 5) == 1.0
    # Without equivalence the plain strings "3" would win 2 votes to 1.
    assert metrics.maj_at_k(metrics.group_answers(answers, lambda a, b: a == b), correct, 5) == 0.0


def test_ties_go_to_the_earliest_group_and_none_never_wins():
    assert metrics.majority_index([None, 1, 0, 0, 1]) == 1  # 1 and 0 tie at 2; group 1 appears first
    assert metrics.majority_index([None, None, 2]) == 2
    assert metrics.majority_index([None, None]) is None
    assert metrics.maj_at_k([None, None], [False, False], 2) == 0.0


def test_maj_at_k_averages_disjoint_chunks():
    labels = [0, 0, 1, 1, 1, 0, 2, 2, 9]  # 9th sample unused for k=4 (2 chunks of 4)
    correct = [label == 1 for label in labels]
    # chunk [0,0,1,1] -> tie, earliest group 0 wins (wrong); chunk [1,0,2,2] -> group 2 wins (wrong)
    assert metrics.maj_at_k(labels, correct, 4) == 0.0
    # k=2: [0,0] wrong, [1,1] right, [1,0] right (1 first), [2,2] wrong -> 2/4
    assert metrics.maj_at_k(labels, correct, 2) == 0.5
    assert metrics.maj_at_k(labels, correct, 1) == pytest.approx(3 / 9)


def test_group_answers_calls_equivalent_once_per_distinct_string():
    calls = []

    def counting(a, b):
        calls.append((a, b))
        return False

    metrics.group_answers(["1", "1 ", "2", "1", None, "2"], counting)
    assert calls == [("2", "1")]


def test_default_ks():
    assert metrics.default_ks(1) == [1]
    assert metrics.default_ks(16) == [1, 2, 4, 8, 16]
    assert metrics.default_ks(12) == [1, 2, 4, 8, 12]


def test_summarize_hand_computed():
    correct = [[True, False, True, True], [False, False, False, True]]
    labels = [[0, 1, 0, 0], [0, 0, 1, 2]]
    out = metrics.summarize(correct, labels, [1, 2, 4, 8])
    assert out["n"] == 2 and out["num_samples"] == 4
    assert out["accuracy"] == out["mean_sample_accuracy"] == pytest.approx(4 / 8)
    assert out["ci95"] == pytest.approx(1.96 * math.sqrt(0.25 / 2))
    assert set(out["maj@k"]) == {"1", "2", "4"}  # k=8 > num_samples is skipped
    assert out["maj@k"]["4"] == pytest.approx((1 + 0) / 2)
    # problem 1: chunks [T,F] -> label 0 first (T), [T,T] -> T: 1.0; problem 2: [F,F] F, [F,T] tie -> F: 0.0
    assert out["maj@k"]["2"] == pytest.approx(0.5)
    assert out["pass@k"]["2"] == pytest.approx((1.0 + (1 - 3 / 6)) / 2)
    assert out["pass@k"]["4"] == 1.0
    with pytest.raises(ValueError, match="same number of samples"):
        metrics.summarize([[True], [True, False]], [[0], [0, 1]], [1])
