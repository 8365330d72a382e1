"""The symbolic path: LaTeX -> sympy through latex2sympy2_extended's ANTLR parser, then simplification.

Imported only inside the grading worker process (`pool.py`), which the caller kills when it runs past
its time bound; sympy can hang inside C big-integer code where no signal or flag reaches it.

Safety: latex2sympy2_extended builds sympy objects from the parse tree. Two places hand strings to
sympy's own parser: `parse_number` (`sympy.Number(token)`, which calls `sympify`) and the module
function `convert_number`. Both receive lexer NUMBER tokens only, but we replace them with versions
that accept `[0-9.,]` alone and build `Integer`/`Rational` directly, so no model text reaches
`sympify`/`parse_expr`. (`variable_values`, which goes through `parse_expr`, is never passed.) Sizes
are capped before parsing: length, brace nesting, digit runs, numeric exponents and factorials.
"""

from __future__ import annotations

import cmath
import random
import re
from fractions import Fraction
from functools import lru_cache

import sympy
from sympy.core.function import AppliedUndef
from latex2sympy2_extended import latex2sympy2 as _l2s
from latex2sympy2_extended.latex2sympy2 import ConversionConfig
from latex2sympy2_extended.math_normalization import NormalizationConfig

from jaxmath.reward.normalize import parse_number, within_caps
from jaxmath.reward.structure import Relation

def _safe_number(text: str) -> sympy.Number:
    text = text.replace(",", "").replace(" ", "")
    if not re.fullmatch(r"\d*\.?\d*", text) or not re.search(r"\d", text):
        raise ValueError(f"not a number token: {text[:20]!r}")
    if "." in text:
        return sympy.Rational(Fraction(text).numerator, Fraction(text).denominator)
    return sympy.Integer(int(text))


class _SafeLatex2Sympy(_l2s._Latex2Sympy):
    def parse_number(self, text):
        return _safe_number(text)


# The module-level helper is called from `parse` for comma-grouped numbers.
_l2s.convert_number = lambda number: _safe_number(number.replace(",", "") if not number.startswith("0,") else number.replace(",", "."))

_NORMALIZATION = NormalizationConfig(basic_latex=True, units=True, malformed_operators=True, nits=True, boxed="none", equations=False)
_CONVERSION = ConversionConfig(interpret_as_mixed_fractions=True, interpret_simple_eq_as_assignment=False)


@lru_cache(maxsize=4096)
def to_sympy(latex: str):
    """sympy object for a LaTeX expression, or None when it does not parse or exceeds the caps."""
    if not within_caps(latex):
        return None
    try:
        converter = _SafeLatex2Sympy(config=_CONVERSION)
        return converter.parse(_l2s.normalize_latex(latex, _NORMALIZATION))
    except Exception:
        return None


def _numeric(expr) -> complex | None:
    try:
        if getattr(expr, "free_symbols", None) or not isinstance(expr, sympy.Expr):
            return None
        value = complex(sympy.N(expr, 30))
        return value
    except Exception:
        return None


def _decimals(text: str) -> int | None:
    number = parse_number(text)
    return number.decimals if number is not None else None


def numbers_close(a: complex, b: complex, decimals: int | None) -> bool:
    """Equal to 1e-9 relative, or, for a written decimal of 2+ places, equal after rounding to it."""
    if not (cmath.isfinite(a) and cmath.isfinite(b)):
        # Values beyond float range (a huge binomial) are never taken as equal to anything.
        return False
    if abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b)):
        return True
    if decimals is not None and decimals >= 2:
        return abs(a - b) <= 0.5 * 10.0 ** (-decimals) * (1 + 1e-9)
    return False


def _probe(expr, points: int = 3) -> bool | None:
    """Evaluates `expr` at random points: False when clearly nonzero somewhere, True when ~0 at all,
    None when it cannot be evaluated. Cheap next to `simplify`, and settles most unequal pairs."""
    symbols = sorted(expr.free_symbols, key=str)
    rng = random.Random(0)
    evaluated = 0
    for _ in range(points):
        values = {symbol: sympy.Rational(rng.randint(11, 97), rng.randint(7, 13)) for symbol in symbols}
        try:
            value = complex(expr.xreplace(values).evalf(20))
        except Exception:
            continue
        if value != value:  # NaN
            continue
        evaluated += 1
        if abs(value) > 1e-8:
            return False
    return True if evaluated == points else None


def _is_zero(expr) -> bool:
    try:
        if expr == 0:
            return True
        probe = _probe(expr)
        if probe is False:
            return False
        if sympy.expand(expr) == 0 or sympy.cancel(sympy.together(expr)) == 0:
            return True
        if expr.atoms(AppliedUndef):
            # f(x) - f(y): unknown functions have no values to probe and nothing to simplify.
            return False
        if probe is True and not expr.atoms(sympy.Function, sympy.Sum, sympy.Integral, sympy.Derivative):
            # Rational expressions (polynomials, roots of rationals) agreeing at three random points.
            return True
        simplified = sympy.simplify(expr)
        if simplified == 0:
            return True
        return sympy.simplify(sympy.expand(sympy.trigsimp(expr))) == 0
    except Exception:
        return False


def sympy_equal(a, b, decimals: int | None = None) -> bool:
    """Mathematical equality of two parsed objects (numbers, expressions, matrices, sets, tuples)."""
    try:
        if a == b:
            return True
        if isinstance(a, sympy.MatrixBase) or isinstance(b, sympy.MatrixBase):
            if not (isinstance(a, sympy.MatrixBase) and isinstance(b, sympy.MatrixBase)) or a.shape != b.shape:
                return False
            return all(sympy_equal(x, y, decimals) for x, y in zip(a, b))
        if isinstance(a, (sympy.Tuple, tuple)) and isinstance(b, (sympy.Tuple, tuple)):
            return len(a) == len(b) and all(sympy_equal(x, y, decimals) for x, y in zip(a, b))
        if isinstance(a, sympy.Set) or isinstance(b, sympy.Set):
            return isinstance(a, sympy.Set) and isinstance(b, sympy.Set) and bool(sympy.Eq(a, b))
        if not (isinstance(a, sympy.Expr) and isinstance(b, sympy.Expr)):
            return False
        x, y = _numeric(a), _numeric(b)
        if x is not None and y is not None:
            return numbers_close(x, y, decimals)
        return _is_zero(a - b)
    except Exception:
        return False


def leaf_equal(pred: str, gold: str) -> bool:
    """Symbolic equality of two leaf expressions (cleaned LaTeX strings)."""
    a, b = to_sympy(pred), to_sympy(gold)
    if a is None or b is None:
        return False
    if isinstance(a, sympy.Eq) or isinstance(b, sympy.Eq):
        return False
    # `A + B`, `A B` of explicit matrices parse as unevaluated matrix expressions.
    a, b = (x.doit() if isinstance(x, sympy.MatrixExpr) else x for x in (a, b))
    if isinstance(a, sympy.MatrixBase) != isinstance(b, sympy.MatrixBase):
        return False
    decimals = _decimals(pred)
    gold_decimals = _decimals(gold)
    if decimals is None or (gold_decimals is not None and gold_decimals < decimals):
        decimals = gold_decimals
    return sympy_equal(a, b, decimals)


def _difference(left: str, right: str):
    a, b = to_sympy(left), to_sympy(right)
    if a is None or b is None or not isinstance(a, sympy.Expr) or not isinstance(b, sympy.Expr):
        return None
    return a - b


_GREATER = {">": ">", ">=": ">=", "<": ">", "<=": ">=", "=": "=", "!=": "!="}


def relations_equal(pred: Relation, gold: Relation) -> bool:
    """`2x+4y-3=0` vs `y=-x/2+3/4`, `-x > -1` vs `x < 1`: sides as one difference, equal up to a
    constant factor (positive for inequalities, which must agree in strictness)."""
    if len(pred.parts) != 2 or len(gold.parts) != 2:
        if len(pred.parts) != len(gold.parts):
            return False
        same = pred.ops == gold.ops and all(leaf_equal(p, g) for p, g in zip(pred.parts, gold.parts))
        return same
    differences = []
    for relation in (pred, gold):
        op = relation.ops[0]
        left, right = relation.parts
        if op in ("<", "<="):
            left, right = right, left
        difference = _difference(left, right)
        if difference is None:
            return False
        differences.append((difference, _GREATER[op]))
    (d_pred, op_pred), (d_gold, op_gold) = differences
    if op_pred != op_gold:
        return False
    try:
        if _is_zero(d_gold):
            return _is_zero(d_pred)
        # The ratio must be one constant: values at random points that differ settle it cheaply.
        symbols = sorted(d_pred.free_symbols | d_gold.free_symbols, key=str)
        rng = random.Random(1)
        samples = []
        for _ in range(3):
            values = {symbol: sympy.Rational(rng.randint(11, 97), rng.randint(7, 13)) for symbol in symbols}
            try:
                samples.append(complex((d_pred / d_gold).xreplace(values).evalf(20)))
            except Exception:
                break
        if len(samples) == 3 and max(abs(a - samples[0]) for a in samples) > 1e-8 * max(1.0, abs(samples[0])):
            return False
        ratio = sympy.simplify(d_pred / d_gold)
        if not ratio.is_number or ratio == 0:
            return False
        if op_pred in (">", ">="):
            return bool(ratio > 0)
        return True
    except Exception:
        return False
