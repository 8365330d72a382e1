"""Answers as small trees, and their comparison with a pluggable leaf comparison.

An answer string (after `normalize.clean`) becomes one of:
    Leaf(text)                         a single expression or word
    Items(items, ordered, brackets)    tuple, interval, set or bare list ("1, 2 and 3")
    Union(parts)                       intervals joined by \\cup
    Matrix(rows)                       pmatrix / bmatrix / array
    Relation(parts, ops)               x = 3 kept only when the left side is not a plain name

`compare(pred, gold, leaf_equal)` walks both trees; `leaf_equal(a, b)` returns True, False or None
(undecided). The main process passes a cheap numeric leaf test, the symbolic worker a sympy one, so
the same structural rules hold on both paths.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Callable

from jaxmath.reward.normalize import brackets_balanced, split_top_level


@dataclass(frozen=True)
class Leaf:
    text: str


@dataclass(frozen=True)
class Items:
    items: tuple
    ordered: bool
    brackets: str  # "()", "[)", "{}", "" for a bare list


@dataclass(frozen=True)
class Union:
    parts: tuple


@dataclass(frozen=True)
class Matrix:
    rows: tuple
    text: str = field(default="", compare=False)  # as written, for matrix arithmetic on the other side


@dataclass(frozen=True)
class Relation:
    parts: tuple  # expressions as strings, left to right
    ops: tuple  # "=", "<", "<=", ">", ">=", "!="


Node = Leaf | Items | Union | Matrix | Relation

_MATRIX = re.compile(r"^\\begin\{([pbBvV]?matrix|array)\}(?:\{[^{}]*\})?((?:(?!\\end\{).)*)\\end\{\1\}$", re.DOTALL)
_RELATION = re.compile(r"(<=|>=|!=|(?<![<>!])=|<|>)")
# A name the answer is assigned to: x, x_1, f(x), |AB|, A:B, \frac{NO}{BO}, S_{MBCN}:S, (p,q).
_NAME = re.compile(
    r"^(?:\\?[a-zA-Z]+(?:_\{?[a-zA-Z0-9,]+\}?)?(?:\([a-zA-Z,]*\))?|\|[a-zA-Z]+\||\\frac\{[a-zA-Z]+\}\{[a-zA-Z]+\}"
    r"|\([a-zA-Z,]+\))(?::\\?[a-zA-Z]+(?:_\{?[a-zA-Z0-9]+\}?)?)?$|^[a-zA-Z]_?\{?[a-zA-Z0-9]*\}?:[a-zA-Z]_?\{?[a-zA-Z0-9]*\}?$"
)
_FUNCTION_NAME = re.compile(r"^\\(?:sin|cos|tan|sec|csc|cot|arc\w+|sinh|cosh|tanh|log|ln|exp|sqrt|det|max|min|gcd)(?![a-zA-Z])")
MAX_ITEMS = 64
MAX_DEPTH = 12


def is_name(text: str) -> bool:
    """True for the left side of an assignment-style answer (`x`, `f(x)`, `|AB|`, `A:B`)."""
    return bool(_NAME.match(text)) and text not in ("e", "\\pi", "i") and not _FUNCTION_NAME.match(text)


def _wrapped(text: str) -> bool:
    """True when the first bracket of `text` closes at its last character."""
    depth = 0
    for index, char in enumerate(text):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
            if depth == 0 and index != len(text) - 1:
                return False
    return depth == 0


def _expand_pm(text: str) -> list[str] | None:
    if text.count("\\pm") != 1 or "\\mp" in text:
        return None
    plus, minus = text.replace("\\pm", "+"), text.replace("\\pm", "-")
    # `\pm 3` alone gives "+3" / "-3"; a leading `+` is dropped.
    return [plus.lstrip("+"), minus]


def parse(text: str, depth: int = 0, keep_names: bool = False) -> Node:
    """Tree for a cleaned answer string. Inputs are bounded by the caller (size, nesting)."""
    text = text.strip()
    if depth > MAX_DEPTH:
        return Leaf(text)
    text = re.sub(r"(?:^|(?<=[^a-zA-Z\\]))(?:,?\s*\b(?:and|or)\b\s*)(?=[^a-zA-Z]|$)", ",", text)
    text = text.strip(",")
    if text.startswith("\\{") and text.endswith("\\}"):
        text = "{" + text[2:-2] + "}"
    matrix = _MATRIX.match(text)
    if matrix:
        rows = [row for row in re.split(r"\\\\", matrix.group(2)) if row.strip()]
        cells = tuple(tuple(parse(cell, depth + 1) for cell in row.split("&")) for row in rows)
        return Matrix(cells, text)
    parts = split_top_level(text, ",;")
    if len(parts) > 1 and brackets_balanced(text):
        items = tuple(parse(part, depth + 1, keep_names) for part in parts[:MAX_ITEMS] if part)
        return _flatten_bare(items)
    if "\\cup" in text:
        pieces = text.split("\\cup")
        if all(brackets_balanced(piece) for piece in pieces):
            return Union(tuple(parse(piece, depth + 1) for piece in pieces))
    if len(text) >= 2 and text[0] in "([{" and text[-1] in ")]}" and _wrapped(text):
        inner = split_top_level(text[1:-1], ",;")
        brackets = text[0] + text[-1]
        if len(inner) == 1:
            if brackets == "{}":
                return Items((parse(inner[0], depth + 1),), False, "{}")
            if brackets == "()" or (brackets == "[]" and inner[0].startswith("\\begin")):
                # `(x)` is x; `\left[\begin{array}...\right]` is the matrix inside.
                return parse(inner[0], depth + 1)
        elif brackets == "{}":
            return Items(tuple(parse(item, depth + 1) for item in inner[:MAX_ITEMS]), False, "{}")
        else:
            return Items(tuple(parse(item, depth + 1) for item in inner[:MAX_ITEMS]), True, brackets)
    pm = _expand_pm(text)
    if pm is not None:
        return Items(tuple(parse(item, depth + 1) for item in pm), False, "")
    if "\\in" in text:
        name, _, value = text.partition("\\in")
        if is_name(name.strip()) and value.strip():
            return parse(value, depth + 1)
    if "\\approx" in text:
        before, _, after = text.partition("\\approx")
        before = before.strip()
        return parse(after if not before or is_name(before) else before, depth + 1)
    pieces = _split_relations(text)
    if len(pieces) > 1:
        expressions = tuple(piece.strip() for piece in pieces[0::2])
        ops = tuple(pieces[1::2])
        if all(op == "=" for op in ops):
            # `x = 5+5 = 10` and `\frac12 = 0.5` keep the last part; `x = 3` its value.
            left = expressions[0]
            numeric_left = not re.search(r"[a-zA-Z]", left.replace("\\frac", "")) and re.search(r"[-+*/^]|\\frac", left.lstrip("-"))
            if len(expressions) == 2 and numeric_left and is_name(expressions[1]):
                return parse(expressions[0], depth + 1)  # `\frac{50}{3} = x`
            if len(expressions) > 2 or numeric_left or (is_name(expressions[0]) and not keep_names):
                return parse(expressions[-1], depth + 1)
        if all(expressions):
            return Relation(expressions, ops)
    return Leaf(text)


def _split_relations(text: str) -> list[str]:
    """`_RELATION.split` at brace depth 0 only: `\\sum_{k=1}^{4} k` holds no relation."""
    if "{" not in text:
        return _RELATION.split(text)
    pieces, depth, start = [], 0, 0
    for match in re.finditer(r"[{}]|<=|>=|!=|(?<![<>!])=|<|>", text):
        token = match.group()
        if token == "{":
            depth += 1
        elif token == "}":
            depth -= 1
        elif depth == 0:
            pieces += [text[start:match.start()], token]
            start = match.end()
    return pieces + [text[start:]]


def _flatten_bare(items: tuple) -> Items:
    # "1, 2 and 3" with one part itself a bare list: one flat unordered list, repeats counted once.
    flat = []
    for item in items:
        for element in (item.items if isinstance(item, Items) and item.brackets == "" else (item,)):
            if element not in flat:
                flat.append(element)
    return Items(tuple(flat), False, "")


LeafEqual = Callable[[str, str], "bool | None"]


def _all(results) -> bool | None:
    undecided = False
    for result in results:
        if result is False:
            return False
        if result is None:
            undecided = True
    return None if undecided else True


def _unordered(pred: tuple, gold: tuple, leaf_equal: LeafEqual, relation_equal=None) -> bool | None:
    if len(pred) != len(gold):
        return False
    if len(pred) > 8:
        # Greedy matching keeps big lists linear-ish; answers that long are lists of numbers.
        remaining = list(gold)
        undecided = False
        for item in pred:
            for index, candidate in enumerate(remaining):
                result = compare(item, candidate, leaf_equal, relation_equal)
                if result:
                    del remaining[index]
                    break
                if result is None:
                    undecided = True
            else:
                return None if undecided else False
        return True
    table = [[compare(p, g, leaf_equal, relation_equal) for g in gold] for p in pred]
    undecided = False
    for permutation in itertools.permutations(range(len(gold))):
        results = [table[i][j] for i, j in enumerate(permutation)]
        verdict = _all(results)
        if verdict:
            return True
        if verdict is None:
            undecided = True
    return None if undecided else False


def _flip(op: str) -> str:
    return {"<": ">", ">": "<", "<=": ">=", ">=": "<=", "=": "=", "!=": "!="}[op]


def _relation_as_interval(relation: Relation) -> Items | None:
    """`a < x <= b` (or `x > a`) as the interval it describes, when x is a plain name."""
    if len(relation.parts) == 3 and is_name(relation.parts[1]):
        low, name, high = relation.parts
        ops = relation.ops
        if all(op in ("<", "<=") for op in ops):
            return Items((Leaf(low), Leaf(high)), True, ("(" if ops[0] == "<" else "[") + (")" if ops[1] == "<" else "]"))
        if all(op in (">", ">=") for op in ops):
            return Items((Leaf(high), Leaf(low)), True, ("(" if ops[1] == ">" else "[") + (")" if ops[0] == ">" else "]"))
    return None


def compare(pred: Node, gold: Node, leaf_equal: LeafEqual, relation_equal=None) -> bool | None:
    """True / False, or None when a comparison was undecided (needs the symbolic path).

    `relation_equal(pred, gold)`, when given, settles relations the structural rules cannot.
    """
    if pred == gold:
        return True
    if isinstance(pred, Leaf) and isinstance(gold, Leaf):
        return leaf_equal(pred.text, gold.text)
    if isinstance(gold, Relation) and not isinstance(pred, Relation):
        interval = _relation_as_interval(gold)
        if interval is not None and isinstance(pred, Items):
            return compare(pred, interval, leaf_equal, relation_equal)
        return False
    if isinstance(pred, Items) and isinstance(gold, Items):
        if len(pred.items) != len(gold.items):
            return False
        interval_brackets = {"[]", "[)", "(]"}
        if pred.brackets in interval_brackets or gold.brackets in interval_brackets:
            if pred.brackets != gold.brackets:
                return False
        if pred.ordered and gold.ordered:
            if pred.brackets != gold.brackets and "[" in pred.brackets + gold.brackets:
                return False
            return _all(compare(p, g, leaf_equal, relation_equal) for p, g in zip(pred.items, gold.items))
        # Sets and bare lists are unordered; a tuple against a set keeps its order (suite convention:
        # (1,3) matches {1,3}, (3,1) does not).
        if pred.ordered or gold.ordered:
            return _all(compare(p, g, leaf_equal, relation_equal) for p, g in zip(pred.items, gold.items))
        return _unordered(pred.items, gold.items, leaf_equal, relation_equal)
    if isinstance(pred, Items) and len(pred.items) == 1 and not pred.ordered:
        return compare(pred.items[0], gold, leaf_equal, relation_equal)
    if isinstance(pred, Items) and pred.brackets == "" and not isinstance(gold, Items):
        # The same answer stated twice (`\boxed{15\frac{39}{40}}, or \boxed{\frac{639}{40}}`).
        return _all(compare(item, gold, leaf_equal, relation_equal) for item in pred.items)
    if isinstance(gold, Items) and len(gold.items) == 1 and not gold.ordered:
        return compare(pred, gold.items[0], leaf_equal, relation_equal)
    if isinstance(pred, Union) and isinstance(gold, Union):
        return _unordered(pred.parts, gold.parts, leaf_equal, relation_equal)
    if isinstance(pred, Matrix) and isinstance(gold, Matrix):
        if len(pred.rows) != len(gold.rows) or any(len(a) != len(b) for a, b in zip(pred.rows, gold.rows)):
            return False
        return _all(compare(p, g, leaf_equal, relation_equal) for row_p, row_g in zip(pred.rows, gold.rows) for p, g in zip(row_p, row_g))
    if isinstance(pred, Leaf) and isinstance(gold, Matrix) and "\\begin" in pred.text:
        # Matrix arithmetic (`A + B`, `I I`) against a matrix: only the symbolic path can say.
        return leaf_equal(pred.text, gold.text)
    if isinstance(pred, Matrix) and isinstance(gold, Items) and gold.ordered:
        # A column vector written as a tuple.
        if all(len(row) == 1 for row in pred.rows) and len(pred.rows) == len(gold.items):
            return _all(compare(row[0], item, leaf_equal, relation_equal) for row, item in zip(pred.rows, gold.items))
        return False
    if isinstance(pred, Items) and isinstance(gold, Matrix):
        return compare(gold, pred, leaf_equal, relation_equal)
    if isinstance(pred, Relation) and isinstance(gold, Relation):
        verdict = compare_relations(pred, gold, leaf_equal)
        if verdict is None and relation_equal is not None:
            return relation_equal(pred, gold)
        return verdict
    return False


def compare_relations(pred: Relation, gold: Relation, leaf_equal: LeafEqual) -> bool | None:
    if len(pred.parts) != len(gold.parts):
        return None if len(pred.parts) == 2 and len(gold.parts) == 2 else False
    if pred.ops == gold.ops and pred.parts == gold.parts:
        return True
    flipped = Relation(tuple(reversed(pred.parts)), tuple(_flip(op) for op in reversed(pred.ops)))
    if flipped.ops == gold.ops and flipped.parts == gold.parts:
        return True
    # Different but maybe equivalent (`-x > -1` and `x < 1`, `2x+4y-3=0` and `y=...`): symbolic.
    return None
