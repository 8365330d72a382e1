"""Grading: is a completion's final answer mathematically equal to the reference answer?

Order of work (cheap first, so the common case costs microseconds):
  1. extract the answer (`extract.answer_candidates`), size caps (a 100 kB answer is wrong);
  2. `normalize.clean` and `structure.parse` into a small tree (lists, intervals, matrices, relations);
  3. compare trees with exact rational arithmetic on plain numbers and string equality elsewhere;
  4. only what stays undecided goes to the symbolic path (latex2sympy2_extended + sympy simplify) in
     a worker process with a hard wall-clock bound (`pool.py`); past the bound the answer is wrong.

Conventions (where peers differ):
  - Lists: a gold set `{...}` or bare list `1, 2` is unordered; a tuple `(a, b)` is ordered; a tuple
    against a set compares in written order (math-verify's suite: `(1,3)` matches `{1,3}`).
  - Intervals must agree on open/closed ends; an inequality gold `a < x < b` accepts the interval.
  - Decimals: equal to 1e-9 relative; a written decimal with 2+ places also matches a value that
    rounds to it (`0.33` for 1/3, `2.6667` for 8/3), as in math-verify's suite. One place is not
    enough (`0.3` is not 1/3).
  - Percent signs, degree marks, `\\text{}` units and currency signs are dropped: `28\\%` == `28`,
    `90^\\circ` == `90`; `0.28` is not `28\\%`.
  - `x = 3` matches `3` when the left side is a plain name (`x`, `f(x)`, `|AB|`, `A:B`); chains
    `x = 5+5 = 10` keep the last part; `2x + z = 1` is an equation, compared as one up to a factor.
  - `\\pm` expands to the set of both signs. A comma between digits in plain text (`1,22`, `0,111`)
    is a decimal comma unless it groups thousands; in LaTeX it separates list items.
"""

from __future__ import annotations

import re

from jaxmath.reward import pool
from jaxmath.reward.extract import answer_candidates
from jaxmath.reward.normalize import clean, parse_number, within_caps
from jaxmath.reward.structure import Relation, compare, parse

MAX_TEXT_CHARS = 200_000
MAX_ANSWER_CHARS = 2_000


def _prepare(answer: str, keep_names: bool = False, plain: bool = False) -> list:
    """Trees for one candidate answer: none when it is too large to grade, two when it is ambiguous.

    `plain`: the text it came from has no LaTeX, so `1,22` may be a decimal comma; such an answer
    gets both readings (the number 1.22 and the list 1, 22) and matches if either does.
    """
    if len(answer) > MAX_ANSWER_CHARS:
        return []
    stripped = answer.strip()
    trees = [parse(clean(stripped), keep_names=keep_names)]
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


def _word(text: str) -> str | None:
    text = re.sub(r"^\((\w)\)$", r"\1", text)
    return text.lower() if re.fullmatch(r"[a-zA-Z][a-zA-Z ]*", text) else None


def numbers_equal(a, b) -> bool:
    """Exact equality, or the written-decimal rounding rule of the module docstring."""
    if a.value == b.value:
        return True
    difference = abs(a.value - b.value)
    scale = max(abs(a.value), abs(b.value), 1)
    if difference <= scale * 1e-9:
        return True
    for number in (a, b):
        if number.decimals is not None and number.decimals >= 2 and difference * 2 * 10 ** number.decimals <= 1:
            return True
    return False


def fast_leaf_equal(pred: str, gold: str) -> bool | None:
    """Cheap comparison of two leaf strings: True, False, or None when sympy must decide."""
    if pred == gold:
        return True
    if ":" in pred and ":" in gold:
        # Ratios and clock times (`12:00`) compare as written.
        return pred.replace(" ", "") == gold.replace(" ", "")
    a, b = parse_number(pred), parse_number(gold)
    if a is not None and b is not None:
        return numbers_equal(a, b)
    word_a, word_b = _word(pred), _word(gold)
    if word_a is not None and word_b is not None:
        if len(word_a) > 1 or len(word_b) > 1:
            return word_a == word_b
        # Single letters: answer choices (`(C)` vs `C`); `e` the constant equals `e`.
        return word_a == word_b
    if (a is not None and word_b is not None) or (b is not None and word_a is not None):
        return False
    # A number against a bare token of letters and digits (`AZYUK2A`, `2x`): never equal.
    if (a is not None and re.fullmatch(r"[a-zA-Z0-9.]+", gold)) or (b is not None and re.fullmatch(r"[a-zA-Z0-9.]+", pred)):
        return False
    return None


def _symbolic_leaf_equal(pred: str, gold: str) -> bool:
    fast = fast_leaf_equal(pred, gold)
    if fast is not None:
        return fast
    if not (within_caps(pred) and within_caps(gold)):
        return False
    from jaxmath.reward import symbolic

    return symbolic.leaf_equal(pred, gold)


def _symbolic_relations_equal(pred: Relation, gold: Relation) -> bool:
    from jaxmath.reward import symbolic

    if not all(within_caps(part) for part in pred.parts + gold.parts):
        return False
    return symbolic.relations_equal(pred, gold)


def _compare_both_ways(pred, gold, leaf_equal, relation_equal, symmetric: bool):
    verdict = compare(pred, gold, leaf_equal, relation_equal)
    if verdict is False and symmetric and isinstance(pred, Relation) != isinstance(gold, Relation):
        verdict = compare(gold, pred, leaf_equal, relation_equal)
    return verdict


def _is_plain(text: str) -> bool:
    return "\\" not in text and text.count("$") < 2


def _pairs(pred_text: str, gold_text: str):
    if len(pred_text) > MAX_TEXT_CHARS or len(gold_text) > MAX_TEXT_CHARS:
        return []
    golds = [tree for candidate in _gold_candidates(gold_text) for tree in _prepare(candidate, plain=_is_plain(gold_text))]
    # An equation gold (`2x+4y-3=0`) is compared with the pred's equation, `y = ...` included.
    keep_names = any(isinstance(gold, Relation) for gold in golds)
    plain = _is_plain(pred_text)
    preds = [tree for candidate in answer_candidates(pred_text) for tree in _prepare(candidate, keep_names, plain)]
    return [(p, g) for p in preds for g in golds]


def _fast_verdict(pred_text: str, gold_text: str, symmetric: bool):
    """(True/False, []) when settled cheaply, else (None, undecided tree pairs for the symbolic path)."""
    undecided = []
    for pred, gold in _pairs(pred_text, gold_text):
        verdict = _compare_both_ways(pred, gold, fast_leaf_equal, None, symmetric)
        if verdict:
            return True, []
        if verdict is None:
            undecided.append((pred, gold, symmetric))
    return (None, undecided) if undecided else (False, [])


def symbolic_verdict_local(undecided: list) -> bool:
    """Symbolic comparison of undecided tree pairs, in this process (the worker's side)."""
    for pred, gold, symmetric in undecided:
        if _compare_both_ways(pred, gold, _symbolic_leaf_equal, _symbolic_relations_equal, symmetric):
            return True
    return False


def grade_local(pred_text: str, gold_text: str, symmetric: bool = False) -> bool:
    """A whole grading in this process, with no time bound (callers bound it from outside)."""
    verdict, undecided = _fast_verdict(pred_text, gold_text, symmetric)
    if verdict is not None:
        return verdict
    return symbolic_verdict_local(undecided)


def _bounded(pred_text: str, gold_text: str, timeout: float, symmetric: bool) -> bool:
    verdict, undecided = _fast_verdict(pred_text, gold_text, symmetric)
    if verdict is not None:
        return verdict
    return bool(pool.call_bounded(("symbolic", undecided), timeout, default=False))


def grade(completion_or_answer: str, gold: str, *, timeout: float = 1.0) -> bool:
    """True when the completion's final answer equals the gold answer.

    Args:
        completion_or_answer: a model completion (its last `\\boxed{}` group is the answer; without a
            box, "final answer is ...", "answer: ...", a lone math environment or the last number)
            or a bare answer string.
        gold: reference answer, bare (`\\frac{1}{2}`, `$(1, 2)$`) or a solution with a box.
        timeout: wall-clock bound in seconds for the symbolic part; past it the answer is wrong.
    Returns:
        bool. Never raises on malformed input; never evaluates the text as code.
    """
    try:
        return _bounded(completion_or_answer, gold, timeout, symmetric=False)
    except Exception:
        return False


def equivalent(a: str, b: str, *, timeout: float = 1.0) -> bool:
    """Symmetric answer equality, for grouping sampled answers in majority voting.

    Same rules as `grade`, except that conversions allowed only from the gold side (an inequality
    gold accepting an interval) are allowed both ways, so `equivalent(a, b) == equivalent(b, a)`.
    """
    try:
        return _bounded(a, b, timeout, symmetric=True)
    except Exception:
        return False


def grade_batch(pairs: list[tuple[str, str]], workers: int = 0, timeout: float = 1.0) -> list[bool]:
    """`grade` over (completion, gold) pairs, in order.

    Args:
        pairs: list of (completion_or_answer, gold).
        workers: 0 grades in this process (symbolic parts still in a bounded worker); N > 0 settles
            the cheap cases here and runs the symbolic ones on N worker processes in parallel.
        timeout: per-grading bound in seconds.
    Returns:
        list[bool], one per pair, in the order given. A worker crash or timeout makes that one
        grading False; the batch goes on.
    """
    if workers <= 0:
        return [grade(pred, gold, timeout=timeout) for pred, gold in pairs]
    results: list[bool] = [False] * len(pairs)
    requests, slots = [], []
    for index, (pred, gold) in enumerate(pairs):
        try:
            verdict, undecided = _fast_verdict(pred, gold, symmetric=False)
        except Exception:
            verdict, undecided = False, []
        if verdict is not None:
            results[index] = verdict
        else:
            requests.append(("symbolic", undecided))
            slots.append(index)
    if requests:
        for index, reply in zip(slots, pool.run_batch(requests, workers, timeout, default=False)):
            results[index] = bool(reply)
    return results


__all__ = ["grade", "equivalent", "grade_batch"]
