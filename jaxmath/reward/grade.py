"""Grading: is a completion's final answer mathematically equal to the reference answer?

`grade_completion(completion, gold)` is the one entry point that turns a completion and a gold answer
into a verdict and the answer it read (`Graded(correct, answer)`); `correctness_rewards` uses it, and
evaluation and distillation are meant to. `grade`, `equivalent` and `grade_batch` are the answer-level
forms of the same rules.

Order of work (cheap first, so the common case costs microseconds and never leaves the process):
  1. extract the answer (`extract.answer_candidates`; linear in the text, see its length rules);
  2. `normalize.clean` and `structure.parse` into a small tree (lists, intervals, matrices, relations);
  3. compare trees: exact rationals for plain numbers, strings for words, `numeric` evaluation (exact or
     at random points) for expressions and equations;
  4. only what stays undecided goes to the symbolic path (latex2sympy2_extended + sympy) in a worker
     process (`pool.py`), with what is left of the caller's time. A result not had in time is "not equal".

Time bound: `grade(..., timeout=t)` returns within t plus a few milliseconds of scheduling, whatever the
input: every in-process step is bounded by the size caps below and checks the deadline between candidate
pairs, and the worker wait is a `select` on the deadline (workers start and are replaced in the
background, never inside a caller's bound).

Conventions (where peers differ) are listed in docs/GRADER.md; the main ones:
  - Lists: a set or bare list is unordered; a tuple is ordered; a tuple against a set keeps its order.
  - Intervals agree on open/closed ends; an inequality gold `a < x < b` accepts the interval.
  - Decimals: a written decimal of k >= 2 places matches a value not exactly writable in k places when
    it is that value rounded to k places (`0.33`, `2.6667`, `125.664` for 40pi; not `125.663`, truncated).
  - A percentage matches its number and its hundredth (`10\\%` = `10` = `0.1`).
  - A unit on one side only is dropped (`10\\text{ cm}` = `10`); two different units are unequal.
  - `x = 3` matches `3` when the left side is a plain name; equations compare up to a constant factor.
  - A multiple-choice gold (`C`, `(D) Alina`) is matched by the letter the completion chooses.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from fractions import Fraction

from jaxmath.reward import numeric, pool
from jaxmath.reward.extract import answer_candidates, choice_answer, extract_answer, gold_choice
from jaxmath.reward.normalize import clean, has_percent, parse_number, unit_of, within_caps
from jaxmath.reward.structure import Leaf, Relation, compare, parse

MAX_TEXT_CHARS = 200_000
MAX_ANSWER_CHARS = 2_000
# In-process work after the deadline is abandoned; this leaves room for returning on a loaded machine.
_IN_PROCESS_MARGIN_S = 0.0


@dataclass(frozen=True)
class Graded:
    """The verdict on one completion and the answer read from it (None when it has none)."""

    correct: bool
    answer: str | None


class _Late(Exception):
    """The caller's deadline passed during in-process work."""


def _check(deadline: float) -> None:
    if time.monotonic() > deadline:
        raise _Late()


# ---- numbers ----

def _round_half_away(value: Fraction, places: int) -> Fraction:
    scaled = value * 10 ** places
    rounded = math.floor(abs(scaled) + Fraction(1, 2))
    return Fraction(rounded if scaled >= 0 else -rounded, 10 ** places)


def decimal_matches(written: Fraction, places: int | None, value) -> bool:
    """The written-decimal rule: `written` (k >= 2 places) stands for `value` when `value` cannot be
    written exactly in k places and `written` is it rounded to k places (half away from zero)."""
    if places is None or places < 2 or places > 30:
        return False
    if not isinstance(value, Fraction):
        value = complex(value)
        if abs(value.imag) > 1e-12 * max(1.0, abs(value.real)) or not math.isfinite(value.real):
            return False
        value = Fraction(value.real)
        approximate = True
    else:
        approximate = False
        if (value * 10 ** places).denominator == 1:
            return False
    rounded = _round_half_away(value, places)
    return rounded == written or (approximate and abs(rounded - written) * 10 ** places < Fraction(1, 10 ** 6))


def numbers_equal(a, b) -> bool:
    """Exact equality, 1e-9 relative, or the written-decimal rule of the module docstring."""
    if a.value == b.value:
        return True
    if abs(a.value - b.value) <= max(abs(a.value), abs(b.value)) * Fraction(1, 10 ** 9):
        return True
    return decimal_matches(a.value, a.decimals, b.value) or decimal_matches(b.value, b.decimals, a.value)


_CLOCK_MARK = re.compile(r"\d:\d{2}:\d{2}|\d\s*(?:\\text\{\s*)?[ap]\.?m\.?", re.IGNORECASE)
_CLOCK = re.compile(r"^(\d{1,2}):(\d{2})(?::(\d{2}))?(?:\s*([ap])\.?m\.?)?$", re.IGNORECASE)


def _clock_seconds(text: str) -> int | None:
    match = _CLOCK.match(text.replace("\\text", "").replace("{", "").replace("}", "").strip())
    if not match:
        return None
    hours, minutes, seconds = int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)
    if match.group(4):
        hours = hours % 12 + (12 if match.group(4).lower() == "p" else 0)
    return (hours * 60 + minutes) * 60 + seconds


def _word(text: str) -> str | None:
    text = re.sub(r"^\((\w)\)$", r"\1", text)
    return text.lower() if re.fullmatch(r"[a-zA-Z][a-zA-Z ]*", text) else None


def fast_leaf_equal(pred: str, gold: str) -> bool | None:
    """In-process comparison of two leaf strings: True, False, or None when sympy must decide."""
    if pred == gold:
        return True
    if "¦" in pred or "¦" in gold:
        return False  # digits split by a space that groups nothing (`4 2`): not a number
    if "\\infty" in pred or "\\infty" in gold:
        signed = lambda text: text.replace("+\\infty", "\\infty").replace("\\infty", "oo")
        if re.fullmatch(r"-?oo", signed(pred)) or re.fullmatch(r"-?oo", signed(gold)):
            return signed(pred) == signed(gold)
    if ":" in pred and ":" in gold:
        # Clock times with seconds or am/pm compare as times of day; ratios (`7:32`) as written.
        if _CLOCK_MARK.search(pred + " " + gold):
            a, b = _clock_seconds(pred), _clock_seconds(gold)
            return a is not None and a == b
        return pred.replace(" ", "") == gold.replace(" ", "")
    a, b = parse_number(pred), parse_number(gold)
    if a is not None and b is not None:
        return numbers_equal(a, b)
    word_a, word_b = _word(pred), _word(gold)
    if word_a is not None and word_b is not None and (len(word_a) > 1 or len(word_b) > 1):
        return word_a == word_b
    if (a is not None and word_b is not None and len(word_b) > 1) or (b is not None and word_a is not None and len(word_a) > 1):
        return False
    if not (within_caps(pred) and within_caps(gold)):
        return False
    # A written decimal against a constant expression: exact, 1e-9, or the written-decimal rule.
    for number, other in ((a, gold), (b, pred)):
        if number is not None:
            value = numeric.constant_value(other)
            if value is not None:
                return numeric.close(number.value, value) or decimal_matches(number.value, number.decimals, value)
    return numeric.expressions_equal(pred, gold)


def _normalized_relation(relation: Relation):
    ops = list(relation.ops)
    parts = list(relation.parts)
    if all(op in (">", ">=") for op in ops):
        parts, ops = parts[::-1], [{">": "<", ">=": "<="}[op] for op in ops[::-1]]
    return parts, ops


def relation_equal_in_process(pred: Relation, gold: Relation) -> bool | None:
    """Equations equal up to a constant factor; inequalities and chains (`1 < 2x <= 3`) up to a positive one,
    with the same strictness in the same places. None when evaluation cannot say."""
    pred_parts, pred_ops = _normalized_relation(pred)
    gold_parts, gold_ops = _normalized_relation(gold)
    if len(pred_parts) != len(gold_parts):
        return False
    if any(op in (">", ">=") for op in pred_ops + gold_ops):
        return None  # mixed directions (`a < b > c`): leave to sympy
    if pred_ops != gold_ops:
        return False
    if len(pred_parts) == 2 and pred_ops[0] in ("=", "!="):
        return numeric.differences_proportional([tuple(pred_parts)], [tuple(gold_parts)], positive=False)
    pairs = lambda parts: [(parts[i + 1], parts[i]) for i in range(len(parts) - 1)]
    return numeric.differences_proportional(pairs(pred_parts), pairs(gold_parts), positive=True)


# ---- candidates ----

def _trees(answer: str, keep_names: bool, plain: bool, cleaned: str | None = None) -> list:
    """Trees for one candidate answer: none when too large, more than one when it reads two ways."""
    if len(answer) > MAX_ANSWER_CHARS:
        return []
    stripped = answer.strip()
    cleaned = clean(stripped) if cleaned is None else cleaned
    trees = [parse(cleaned, keep_names=keep_names)]
    if not keep_names and "=" in cleaned:
        # `p = 15n - 5` is both the value `15n - 5` and the equation, and matches as either.
        as_relation = parse(cleaned, keep_names=True)
        if as_relation != trees[0]:
            trees.append(as_relation)
    if has_percent(stripped):
        number = parse_number(cleaned)
        if number is not None:
            trees.append(Leaf(str(number.value / 100)))
    if plain and re.fullmatch(r"-?\d+,\d+", stripped):
        head, tail = stripped.split(",")
        if len(tail) != 3 or head.lstrip("-") == "0":
            trees.append(parse(clean(head + "." + tail), keep_names=keep_names))
    return trees


def _gold_candidates(gold_text: str) -> list[str]:
    """A short gold without a box is an answer as written, its `$` delimiters dropped
    (`$1$ and $2$`, OlympiadBench's `$221,$8$`); a longer one is a solution to extract from."""
    stripped = gold_text.strip()
    if "\\boxed" not in stripped and "\\fbox" not in stripped and len(stripped) <= 120 and "$" in stripped:
        return [stripped.replace("\\$", "").replace("$", "")]
    return answer_candidates(gold_text)[:1]


def _is_plain(text: str) -> bool:
    return "\\" not in text and text.count("$") < 2


def _units_differ(pred: str, gold: str) -> bool:
    a, b = unit_of(pred), unit_of(gold)
    singular = lambda unit: unit.rstrip("s") if unit else unit
    return a is not None and b is not None and singular(a) != singular(b)


def _candidate_pairs(pred_text: str, gold_text: str):
    golds, keep_names = [], False
    for candidate in _gold_candidates(gold_text):
        trees = _trees(candidate, False, _is_plain(gold_text))
        # An equation gold (`2x+4y-3=0`, not `x = 3`) is compared with the pred's equation, `y = ...` included.
        keep_names = keep_names or bool(trees) and isinstance(trees[0], Relation)
        golds += [(candidate, tree) for tree in trees]
    plain = _is_plain(pred_text)
    for pred_candidate in answer_candidates(pred_text):
        for pred_tree in _trees(pred_candidate, keep_names, plain):
            for gold_candidate, gold_tree in golds:
                if not _units_differ(pred_candidate, gold_candidate):
                    yield pred_tree, gold_tree


def _compare_both_ways(pred, gold, leaf_equal, relation_equal, symmetric: bool):
    verdict = compare(pred, gold, leaf_equal, relation_equal)
    if verdict is False and symmetric and isinstance(pred, Relation) != isinstance(gold, Relation):
        verdict = compare(gold, pred, leaf_equal, relation_equal)
    return verdict


def _looks_like_choice(pred_text: str) -> bool:
    """A completion that answers a multiple-choice gold in words or with a bare letter, not with math."""
    if re.match(r"\s*\(?[A-Z]\)?(?:[.:)。]|\s+[a-z])", pred_text):
        return True
    cleaned = clean(answer_candidates(pred_text)[0])
    if re.fullmatch(r"\(?[A-Z]\)?[.:)]?", cleaned) or re.search(r"[^\x00-\x7f]", cleaned):
        return True
    return bool(re.search(r"[A-Za-z]{3,}", cleaned)) and not re.search(r"[=^*/+<>]|\\frac|\\sqrt", cleaned)


def _fast_verdict(pred_text: str, gold_text: str, symmetric: bool, deadline: float):
    """(True/False, []) when settled in this process, else (None, undecided tree pairs for sympy)."""
    if len(pred_text) > MAX_TEXT_CHARS or len(gold_text) > MAX_TEXT_CHARS:
        return False, []
    if pred_text.strip() == gold_text.strip() and len(pred_text) <= MAX_ANSWER_CHARS:
        return True, []
    undecided = []
    for pred, gold in _candidate_pairs(pred_text, gold_text):
        _check(deadline)
        verdict = _compare_both_ways(pred, gold, fast_leaf_equal, relation_equal_in_process, symmetric)
        if verdict:
            return True, []
        if verdict is None:
            undecided.append((pred, gold, symmetric))
    choice = gold_choice(gold_text)
    if choice is not None and _looks_like_choice(pred_text):
        return choice_answer(pred_text) == choice, []
    return (None, undecided) if undecided else (False, [])


# ---- the symbolic side (runs in the worker process) ----

def _symbolic_leaf_equal(pred: str, gold: str) -> bool:
    fast = fast_leaf_equal(pred, gold)
    if fast is not None:
        return fast
    from jaxmath.reward import symbolic

    return symbolic.leaf_equal(pred, gold)


def _symbolic_relations_equal(pred: Relation, gold: Relation) -> bool:
    fast = relation_equal_in_process(pred, gold)
    if fast is not None:
        return fast
    from jaxmath.reward import symbolic

    if not all(within_caps(part) for part in pred.parts + gold.parts):
        return False
    return symbolic.relations_equal(pred, gold)


def symbolic_verdict_local(undecided: list) -> bool:
    """Symbolic comparison of undecided tree pairs, in this process (the worker's side)."""
    for pred, gold, symmetric in undecided:
        if _compare_both_ways(pred, gold, _symbolic_leaf_equal, _symbolic_relations_equal, symmetric):
            return True
    return False


def grade_local(pred_text: str, gold_text: str, symmetric: bool = False) -> bool:
    """A whole grading in this process, with no time bound (callers bound it from outside)."""
    verdict, undecided = _fast_verdict(pred_text, gold_text, symmetric, deadline=math.inf)
    if verdict is not None:
        return verdict
    return symbolic_verdict_local(undecided)


# ---- public API ----

def _bounded(pred_text: str, gold_text: str, timeout: float, symmetric: bool) -> bool:
    deadline = time.monotonic() + timeout
    try:
        verdict, undecided = _fast_verdict(pred_text, gold_text, symmetric, deadline)
    except _Late:
        return False
    except Exception:
        return False
    if verdict is not None:
        return verdict
    return bool(pool.call(("symbolic", undecided), deadline, default=False))


def grade(completion_or_answer: str, gold: str, *, timeout: float = 1.0) -> bool:
    """True when the completion's final answer equals the gold answer.

    Args:
        completion_or_answer: a model completion (its last `\\boxed{}` group is the answer; without a
            box, "final answer is ...", "answer: ...", a lone math environment or the last number)
            or a bare answer string.
        gold: reference answer, bare (`\\frac{1}{2}`, `$(1, 2)$`) or a solution with a box.
        timeout: wall-clock bound in seconds for the whole call; past it the answer is wrong.
    Returns:
        bool. Never raises on malformed input; never evaluates the text as code.
    """
    return _bounded(completion_or_answer, gold, timeout, symmetric=False)


def equivalent(a: str, b: str, *, timeout: float = 1.0) -> bool:
    """Symmetric answer equality, for grouping sampled answers in majority voting.

    Same rules as `grade`, except that conversions allowed only from the gold side (an inequality
    gold accepting an interval) are allowed both ways, so `equivalent(a, b) == equivalent(b, a)`.
    """
    return _bounded(a, b, timeout, symmetric=True)


def grade_batch(pairs: list[tuple[str, str]], workers: int = 0, timeout: float = 1.0) -> list[bool]:
    """`grade` over (completion, gold) pairs, in order.

    Args:
        pairs: list of (completion_or_answer, gold).
        workers: 0 grades one pair after another, each within `timeout`; N > 0 settles the cheap
            pairs here and runs the symbolic ones on N worker processes at once, each within `timeout`
            from when its worker takes it. A pair's verdict never depends on another's timing.
        timeout: per-grading bound in seconds.
    Returns:
        list[bool], one per pair, in the order given. A worker crash or timeout makes that one
        grading False; the batch goes on. With N pairs needing the worker and w workers it returns
        within ceil(N / w) * timeout + 1 s (after the in-process part, microseconds a pair); pairs still
        waiting for a worker then (workers slow to start) are graded False.
    """
    if workers <= 0:
        return [grade(pred, gold, timeout=timeout) for pred, gold in pairs]
    results: list[bool] = [False] * len(pairs)
    requests, slots = [], []
    for index, (pred, gold) in enumerate(pairs):
        try:
            verdict, undecided = _fast_verdict(pred, gold, False, time.monotonic() + timeout)
        except Exception:
            verdict, undecided = False, []
        if verdict is not None:
            results[index] = verdict
        else:
            requests.append(("symbolic", undecided))
            slots.append(index)
    if requests:
        budget = math.ceil(len(requests) / workers) * timeout + 1.0
        for index, reply in zip(slots, pool.run_batch(requests, workers, timeout, default=False, budget=budget)):
            results[index] = bool(reply)
    return results


def grade_completion(completion: str, gold: str, *, fallback: str | None = None, timeout: float = 1.0) -> Graded:
    """The study's verdict on one completion: the answer it gives (its last `\\boxed{}` group, or the named
    fallback) and whether that answer equals the gold. A completion without an answer is wrong.

    Args:
        completion: model output text.
        gold: reference answer, bare or a solution with a box.
        fallback: None (boxed answers only, as in the study), "gsm8k" or "answer_is"
            (see `extract_answer`).
        timeout: wall-clock bound in seconds for the whole call.
    """
    deadline = time.monotonic() + timeout
    answer = extract_answer(completion, fallback) if len(completion) <= MAX_TEXT_CHARS else None
    if answer is None:
        return Graded(False, None)
    return Graded(grade(f"\\boxed{{{answer}}}", gold, timeout=max(0.0, deadline - time.monotonic())), answer)


def grade_completions(completions, golds, *, fallback: str | None = None, workers: int = 0,
                      timeout: float = 1.0) -> list[Graded]:
    """`grade_completion` over a batch, in order; `workers` as in `grade_batch`."""
    if len(completions) != len(golds):
        raise ValueError(f"{len(completions)} completions but {len(golds)} gold answers")
    answers = [extract_answer(text, fallback) if len(text) <= MAX_TEXT_CHARS else None for text in completions]
    todo = [index for index, answer in enumerate(answers) if answer is not None]
    verdicts = grade_batch([(f"\\boxed{{{answers[index]}}}", golds[index]) for index in todo],
                           workers=workers, timeout=timeout)
    graded = [Graded(False, answer) for answer in answers]
    for index, verdict in zip(todo, verdicts):
        graded[index] = Graded(bool(verdict), answers[index])
    return graded


__all__ = ["Graded", "grade", "equivalent", "grade_batch", "grade_completion", "grade_completions"]
