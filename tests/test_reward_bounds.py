"""Time bounds, pathological inputs, batch grading, and properties of `equivalent`."""

import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxmath.reward import equivalent, grade, grade_batch, pool, warmup

BOUND_S = 1.0
# Slack over the bound for process kill and scheduling on a loaded 2-core machine.
SLACK_S = 1.0

PATHOLOGICAL = [
    "9^{9^{9^9}}",
    "1000000!",
    "{" * 2000 + "1" + "}" * 2000,
    "\\boxed{" + "{" * 2000 + "x" + "}" * 2000 + "}",
    "1" * 100_000,
    "\\frac{1}{2}+" * 10_000,
    "(" * 3000 + "x" + ")" * 3000,
    "2^{2^{2^{2^{2^{2}}}}}",
    "10^{10^{10}}",
    "\\binom{100000}{50000}",
    "$" * 50_000 + "1",
    "\\sqrt{" * 500 + "2" + "}" * 500,
]


@pytest.fixture(scope="module", autouse=True)
def started_worker():
    warmup()
    yield


@pytest.mark.parametrize("text", PATHOLOGICAL, ids=range(len(PATHOLOGICAL)))
def test_pathological_inputs_are_wrong_within_bound(text):
    for pred, gold in ((text, "5"), ("5", text), (f"\\boxed{{{text}}}", "x^2")):
        start = time.monotonic()
        assert grade(pred, gold, timeout=BOUND_S) is False
        assert time.monotonic() - start < BOUND_S + SLACK_S


def test_pathological_inputs_off_the_main_thread():
    results, durations = [], []

    def work():
        for text in PATHOLOGICAL:
            start = time.monotonic()
            results.append(grade(text, "5", timeout=BOUND_S))
            durations.append(time.monotonic() - start)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=len(PATHOLOGICAL) * (BOUND_S + SLACK_S))
    assert not thread.is_alive()
    assert results == [False] * len(PATHOLOGICAL)
    assert max(durations) < BOUND_S + SLACK_S


# Equal, but the symbolic path needs about half a second for it on this machine: with a small
# bound the only way to get False is the deadline.
SLOW_EQUAL = ("(x+y+1)^{30}", "(x+y+1)^{15}(x+y+1)^{15}")


def test_symbolic_work_past_the_deadline_is_killed():
    # Bounded call first: sympy's caches would make a repeat fast.
    start = time.monotonic()
    assert grade(*SLOW_EQUAL, timeout=0.05) is False
    assert time.monotonic() - start < 0.05 + SLACK_S
    assert grade(*SLOW_EQUAL, timeout=60.0) is True
    # The killed worker is replaced: the next grading is right again.
    assert grade("\\frac{x}{7}+\\frac{2}{7}", "\\frac{x+2}{7}", timeout=60.0) is True


def test_concurrent_threads_get_their_own_answers():
    pairs = [("\\sqrt{117}", "3\\sqrt{13}", True), ("\\sec^2 y", "\\tan^2 y+1", True),
             ("x^2+1", "(x+1)^2", False), ("\\frac{x}{7}+\\frac{2}{7}", "\\frac{x+2}{7}", True)] * 3
    results = [None] * len(pairs)

    def work(index):
        pred, gold, _ = pairs[index]
        results[index] = grade(pred, gold, timeout=30.0)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(pairs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [expected for _, _, expected in pairs]


def test_grade_batch_keeps_order_and_matches_in_process():
    pairs = [("\\boxed{\\frac12}", "0.5"), ("\\sqrt{117}", "3\\sqrt{13}"), ("3", "4"), ("9^{9^{9^9}}", "1"),
             ("\\sec^2 y", "\\tan^2 y+1"), ("x^2+1", "(x+1)^2"), ("(1,2)", "(1,2)")] * 3
    expected = [True, True, False, False, True, False, True] * 3
    assert grade_batch(pairs, workers=0, timeout=30.0) == expected
    assert grade_batch(pairs, workers=2, timeout=30.0) == expected


def test_run_batch_survives_a_worker_crash():
    requests = [("grade", "\\sqrt{117}", "3\\sqrt{13}"), ("crash",), ("grade", "2", "3"),
                ("grade", "\\frac{x}{7}+\\frac{2}{7}", "\\frac{x+2}{7}"), ("crash",), ("grade", "1", "1")]
    assert pool.run_batch(requests, workers=2, timeout=30.0, default=False) == [True, False, False, True, False, True]


def test_run_batch_times_out_one_request_not_the_batch():
    requests = [("grade", *SLOW_EQUAL), ("grade", "1", "1"), ("grade", "\\sqrt{8}", "2\\sqrt{2}")]
    start = time.monotonic()
    assert pool.run_batch(requests, workers=2, timeout=0.1, default=None) == [None, True, True]
    assert time.monotonic() - start < 30


# Generated answers: integers, fractions, decimals, tuples, sets, intervals, roots, simple expressions.
_integer = st.integers(-10**6, 10**6).map(str)
_fraction = st.tuples(st.integers(-99, 99), st.integers(1, 99)).map(lambda t: f"\\frac{{{t[0]}}}{{{t[1]}}}")
_decimal = st.tuples(st.integers(0, 9999), st.integers(0, 999)).map(lambda t: f"{t[0]}.{t[1]:03d}")
_root = st.integers(2, 200).map(lambda n: f"\\sqrt{{{n}}}")
_expression = st.sampled_from(["x^2+1", "2x-3", "\\frac{x+1}{x-1}", "\\pi r^2", "\\sin x", "a+b"])
_atom = st.one_of(_integer, _fraction, _decimal, _root, _expression)
_answer = st.one_of(
    _atom,
    st.lists(_atom, min_size=2, max_size=3).map(lambda xs: "(" + ", ".join(xs) + ")"),
    st.lists(_atom, min_size=2, max_size=3).map(lambda xs: "\\{" + ", ".join(xs) + "\\}"),
    st.tuples(_integer, _integer, st.sampled_from(["[]", "()", "[)", "(]"])).map(
        lambda t: f"{t[2][0]}{t[0]}, {t[1]}{t[2][1]}"),
)
_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_SETTINGS
@given(_answer)
def test_reflexive(answer):
    assert equivalent(answer, answer, timeout=10.0)


@_SETTINGS
@given(_answer, _answer)
def test_symmetric(a, b):
    assert equivalent(a, b, timeout=10.0) == equivalent(b, a, timeout=10.0)


def _reformat(answer: str) -> str:
    out = answer.replace("\\frac", "\\dfrac").replace(", ", " ,  ")
    out = out.replace("(", "\\left( ").replace(")", " \\right)")
    out = out.replace("[", "\\left[ ").replace("]", " \\right]")
    return f"$ {out} $"


@_SETTINGS
@given(_answer, _answer)
def test_formatting_never_changes_the_verdict(a, b):
    assert equivalent(_reformat(a), b, timeout=10.0) == equivalent(a, b, timeout=10.0)
    assert grade(f"so \\boxed{{{_reformat(a)}}}", b, timeout=10.0) == grade(a, b, timeout=10.0)
