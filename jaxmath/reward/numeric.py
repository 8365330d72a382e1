"""In-process equality of LaTeX expressions by evaluation: exact rationals where possible, else complex floats.

Most answers that plain-number comparison cannot settle (`\\frac{x}{7}+\\frac{2}{7}` against `\\frac{x+2}{7}`,
`\\sin(30°)` against `\\frac12`, `i(2-i)` against `1+2i`) are settled here in well under a millisecond, without
sympy and without a worker process, so the first grading of a cold process is as fast as the rest.

A small recursive-descent parser reads a LaTeX subset into a tree: numbers, single-letter and subscripted
variables, Greek letters, `+ - * / ^ !`, implicit multiplication, `\\frac`, `\\sqrt[n]{}`, `\\binom`, `|x|`,
trigonometric, hyperbolic, `\\ln`, `\\log` (base 10, or `\\log_b`), `\\exp`, `\\pi`, `e` (Euler's number) and
`i` (the imaginary unit). Anything else raises `Unsupported` and the caller falls back to the sympy worker.
Constants are compared exactly when both sides stay rational, else to 1e-9 relative. Expressions with
variables are compared at fixed pseudo-random points (three with positive values, one with mixed signs):
a disagreement at a positive point is a proof of inequality; agreement everywhere is taken as equality
(a polynomial identity that holds at random points holds everywhere with overwhelming probability);
agreement only at the positive points is left undecided.

Bounded cost: inputs are capped by the caller (`normalize.within_caps`); exponents above `MAX_EXACT_EXPONENT`
and rationals above `MAX_EXACT_BITS` bits leave exact arithmetic for floats, which overflow to an
"unusable point" rather than growing. Nothing here evaluates text as code.
"""

from __future__ import annotations

import cmath
import math
import random
import re
from fractions import Fraction

MAX_EXACT_BITS = 4096
MAX_EXACT_EXPONENT = 512
MAX_FACTORIAL = 170
MAX_NODES = 400
REL_TOL = 1e-9


class Unsupported(Exception):
    """The text uses notation this evaluator does not read; the caller decides another way."""


class _BadPoint(Exception):
    """The expression is undefined or not finite at this point (division by zero, overflow)."""


_TOKEN = re.compile(r"\s*(?:(?P<num>\d+(?:\.\d*)?|\.\d+)|(?P<cmd>\\[a-zA-Z]+)|(?P<chr>[a-zA-Z])|(?P<op>[-+*/^_!(){}\[\]|,]))")
_FUNCTIONS = {
    "sin": cmath.sin, "cos": cmath.cos, "tan": cmath.tan, "sec": lambda z: 1 / cmath.cos(z),
    "csc": lambda z: 1 / cmath.sin(z), "cot": lambda z: cmath.cos(z) / cmath.sin(z),
    "arcsin": cmath.asin, "arccos": cmath.acos, "arctan": cmath.atan, "sinh": cmath.sinh, "cosh": cmath.cosh,
    "tanh": cmath.tanh, "ln": cmath.log, "log": cmath.log10, "exp": cmath.exp,
}
_INVERSES = {"sin": "arcsin", "cos": "arccos", "tan": "arctan"}
_GREEK = {
    "alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta", "vartheta", "kappa",
    "lambda", "mu", "nu", "xi", "rho", "sigma", "tau", "upsilon", "phi", "varphi", "chi", "psi", "omega",
    "Gamma", "Delta", "Theta", "Lambda", "Xi", "Sigma", "Phi", "Psi", "Omega",
}
_MULTIPLY = {"\\cdot", "\\times", "*"}
_DIVIDE = {"\\div", "/"}


def _tokens(text: str) -> list[str]:
    tokens, position = [], 0
    text = text.rstrip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if not match:
            raise Unsupported(text[position:position + 10])
        tokens.append(match.group(match.lastgroup))
        position = match.end()
    if len(tokens) > MAX_NODES:
        raise Unsupported("too long")
    return tokens


class _Parser:
    """Tokens -> tree of tuples: ("num", Fraction) ("var", name) ("const", name) ("neg", a) ("add", a, b)
    ("mul", a, b) ("div", a, b) ("pow", a, b) ("fact", a) ("abs", a) ("root", a, n) ("binom", n, k)
    ("fn", name, a) ("log", base, a)."""

    def __init__(self, tokens: list[str]):
        self.tokens = tokens
        self.position = 0
        self.abs_depth = 0

    def peek(self) -> str | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        token = self.peek()
        if token is None or (expected is not None and token != expected):
            raise Unsupported(f"expected {expected!r}, got {token!r}")
        self.position += 1
        return token

    def parse(self):
        tree = self.expression()
        if self.peek() is not None:
            raise Unsupported(f"trailing {self.peek()!r}")
        return tree

    def expression(self):
        tree = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            right = self.term()
            tree = ("add", tree, right if op == "+" else ("neg", right))
        return tree

    def _starts_factor(self, token: str | None) -> bool:
        if token is None:
            return False
        if token == "|":
            return self.abs_depth == 0
        if token in ("(", "{") or token[0].isdigit() or token[0] == "." or token.isalpha():
            return True
        return token.startswith("\\") and token not in _MULTIPLY and token not in _DIVIDE

    def term(self):
        tree = self.signed()
        while True:
            token = self.peek()
            if token in _MULTIPLY:
                self.take()
                tree = ("mul", tree, self.signed())
            elif token in _DIVIDE:
                self.take()
                tree = ("div", tree, self.signed())
            elif self._starts_factor(token):
                factor = self.postfix()
                # `2\frac{1}{5}` is the mixed number 2 1/5: an integer then a proper numeric fraction.
                mixed = (tree[0] == "num" and tree[1].denominator == 1 and token == "\\frac" and factor[0] == "div"
                         and factor[1][0] == factor[2][0] == "num" and 0 <= factor[1][1] < factor[2][1])
                tree = ("add", tree, factor) if mixed else ("mul", tree, factor)
            else:
                return tree

    def signed(self):
        if self.peek() == "-":
            self.take()
            return ("neg", self.signed())
        if self.peek() == "+":
            self.take()
            return self.signed()
        return self.postfix()

    def postfix(self, allow_functions: bool = True):
        tree = self.atom(allow_functions)
        while self.peek() in ("^", "!"):
            if self.take() == "!":
                tree = ("fact", tree)
            else:
                tree = ("pow", tree, self.power_argument())
        return tree

    def power_argument(self):
        token = self.peek()
        if token == "{":
            return self.group()
        if token == "-":
            self.take()
            return ("neg", self.atom(False))
        return self.atom(False)

    def group(self, opening: str = "{", closing: str = "}"):
        self.take(opening)
        tree = self.expression()
        self.take(closing)
        return tree

    def argument(self):
        """A `\\frac`/`\\sqrt` argument: `{...}` or a single token (`\\frac12` after cleaning is rare)."""
        if self.peek() == "{":
            return self.group()
        token = self.take()
        if token[0].isdigit():
            return ("num", Fraction(token[0])) if len(token) == 1 else self._split_digits(token)
        self.position -= 1
        return self.atom(False)

    def _split_digits(self, token: str):
        self.tokens[self.position - 1:self.position] = [token[0], token[1:]]
        return ("num", Fraction(token[0]))

    def atom(self, allow_functions: bool = True):
        token = self.take()
        if token[0].isdigit() or token[0] == ".":
            return ("num", Fraction(token))
        if token.isalpha() and len(token) == 1:
            return self.subscripted(token)
        if token == "(":
            return self.group_after("(", ")")
        if token == "{":
            self.position -= 1
            return self.group()
        if token == "|":
            self.abs_depth += 1
            inner = self.expression()
            self.take("|")
            self.abs_depth -= 1
            return ("abs", inner)
        if not token.startswith("\\"):
            raise Unsupported(token)
        name = token[1:]
        if name == "frac":
            return ("div", self.argument(), self.argument())
        if name == "sqrt":
            index = None
            if self.peek() == "[":
                index = self.group("[", "]")
            radicand = self.argument()
            return ("root", radicand, index if index is not None else ("num", Fraction(2)))
        if name == "binom":
            return ("binom", self.argument(), self.argument())
        if name == "pi":
            return ("const", "pi")
        if name in _GREEK:
            if self.peek() == "(":
                raise Unsupported("function application")  # `\Gamma(5)` is the gamma function
            return self.subscripted(name)
        if name in ("lfloor", "lceil"):
            inner = self.expression()
            self.take("\\r" + name[1:])
            return ("fn", name[1:], inner)
        if name in _FUNCTIONS and allow_functions:
            return self.function(name)
        raise Unsupported(token)

    def group_after(self, opening: str, closing: str):
        tree = self.expression()
        self.take(closing)
        return tree

    def subscripted(self, name: str):
        if self.peek() == "_":
            self.take()
            if self.peek() == "{":
                self.take()
                parts = []
                while self.peek() not in ("}", None):
                    parts.append(self.take())
                self.take("}")
                subscript = "".join(parts)
            else:
                subscript = self.take()
            if not re.fullmatch(r"[A-Za-z0-9]+", subscript):
                raise Unsupported("subscript")
            return ("var", f"{name}_{subscript}")
        if name == "e":
            return ("const", "e")
        if name == "i":
            return ("const", "i")
        return ("var", name)

    def function(self, name: str):
        power = None
        base = None
        if name == "log" and self.peek() == "_":
            self.take()
            base = self.argument()
        if self.peek() == "^":
            self.take()
            power = self.power_argument()
            if power == ("neg", ("num", Fraction(1))) and name in _INVERSES:
                name, power = _INVERSES[name], None
        if self.peek() == "(":
            self.take()
            argument = self.group_after("(", ")")
        else:
            # `\sin 2x` is sin(2x); `\sin x \cos x` is sin(x) cos(x): the argument is a product without functions.
            argument = self.postfix(allow_functions=False)
            while self._starts_factor(self.peek()) and not (self.peek() or "").lstrip("\\") in _FUNCTIONS:
                argument = ("mul", argument, self.postfix(allow_functions=False))
        tree = ("log", base, argument) if base is not None else ("fn", name, argument)
        return ("pow", tree, power) if power is not None else tree


def parse(text: str):
    """Tree for a cleaned LaTeX expression; raises Unsupported for notation outside the subset."""
    try:
        return _Parser(_tokens(text)).parse()
    except (IndexError, ValueError, ZeroDivisionError) as error:
        raise Unsupported(str(error)) from error


def free_variables(tree) -> set[str]:
    if tree[0] == "var":
        return {tree[1]}
    found = set()
    for child in tree[1:]:
        if isinstance(child, tuple):
            found |= free_variables(child)
    return found


def _exact(value) -> bool:
    return isinstance(value, Fraction)


def _checked(value: Fraction):
    if value.numerator.bit_length() > MAX_EXACT_BITS or value.denominator.bit_length() > MAX_EXACT_BITS:
        return _finite(complex(float(value)))
    return value


def _finite(value: complex) -> complex:
    if not (math.isfinite(value.real) and math.isfinite(value.imag)):
        raise _BadPoint()
    return value


def _integer(value) -> int | None:
    if _exact(value) and value.denominator == 1:
        return value.numerator
    return None


def _exact_root(value: Fraction, degree: int):
    """`value ** (1/degree)` exactly when it is rational (and real), else None."""
    if degree <= 0 or degree > 12 or (value < 0 and degree % 2 == 0):
        return None
    sign = -1 if value < 0 else 1
    roots = []
    for part in (abs(value.numerator), value.denominator):
        if part.bit_length() > 512:
            return None
        root = round(part ** (1.0 / degree)) if part.bit_length() < 1000 else None
        if root is None:
            return None
        for candidate in (root - 1, root, root + 1):
            if candidate >= 0 and candidate ** degree == part:
                roots.append(candidate)
                break
        else:
            return None
    return Fraction(sign * roots[0], roots[1])


def _power(base, exponent):
    exponent_int = _integer(exponent)
    if _exact(base) and exponent_int is not None and abs(exponent_int) <= MAX_EXACT_EXPONENT:
        if base == 0 and exponent_int < 0:
            raise _BadPoint()
        size = max(base.numerator.bit_length(), base.denominator.bit_length()) * abs(exponent_int)
        if size <= MAX_EXACT_BITS:
            return base ** exponent_int
    if _exact(base) and _exact(exponent) and exponent.numerator == 1:
        root = _exact_root(base, exponent.denominator)
        if root is not None:
            return root
    try:
        if base == 0:
            return Fraction(0) if complex(exponent).real > 0 else _raise_bad()
        real_base = complex(base)
        if _exact(exponent) and exponent.denominator % 2 == 1 and real_base.imag == 0 and real_base.real < 0:
            # (-8)^{1/3} = -2: a rational power with an odd denominator of a negative real is real,
            # the same convention as the real odd root `\sqrt[3]{-8}`.
            magnitude = (-real_base.real) ** float(exponent)
            return _finite(complex(-magnitude if exponent.numerator % 2 else magnitude))
        return _finite(real_base ** complex(exponent))
    except (OverflowError, ZeroDivisionError) as error:
        raise _BadPoint() from error


def _raise_bad():
    raise _BadPoint()


def _evaluate(tree, point: dict):
    kind = tree[0]
    if kind == "num":
        return tree[1]
    if kind == "var":
        return point[tree[1]]
    if kind == "const":
        return {"pi": complex(math.pi), "e": complex(math.e), "i": 1j}[tree[1]]
    if kind == "neg":
        return -_evaluate(tree[1], point)
    if kind in ("add", "mul", "div"):
        a, b = _evaluate(tree[1], point), _evaluate(tree[2], point)
        try:
            if kind == "add":
                value = a + b
            elif kind == "mul":
                value = a * b
            else:
                value = a / b
        except (ZeroDivisionError, OverflowError) as error:
            raise _BadPoint() from error
        return _checked(value) if _exact(value) else _finite(complex(value))
    if kind == "pow":
        return _power(_evaluate(tree[1], point), _evaluate(tree[2], point))
    if kind == "root":
        radicand, degree = _evaluate(tree[1], point), _integer(_evaluate(tree[2], point))
        if degree is None or degree <= 0:
            raise Unsupported("root degree")
        if _exact(radicand):
            root = _exact_root(radicand, degree)
            if root is not None:
                return root
        value = complex(radicand)
        if value.imag == 0 and value.real < 0 and degree % 2 == 1:
            return complex(-((-value.real) ** (1.0 / degree)))  # the real odd root, as answers mean it
        return _finite(value ** (1.0 / degree))
    if kind == "fact":
        n = _integer(_evaluate(tree[1], point))
        if n is None or n < 0 or n > MAX_FACTORIAL:
            raise Unsupported("factorial")
        return Fraction(math.factorial(n))
    if kind == "binom":
        n, k = _integer(_evaluate(tree[1], point)), _integer(_evaluate(tree[2], point))
        if n is None or k is None or n > 2000 or n < 0:
            raise Unsupported("binomial")
        return Fraction(math.comb(n, k) if 0 <= k <= n else 0)
    if kind == "abs":
        value = _evaluate(tree[1], point)
        return abs(value) if _exact(value) else complex(abs(value))
    if kind == "log":
        base, value = complex(_evaluate(tree[1], point)), complex(_evaluate(tree[2], point))
        try:
            return _finite(cmath.log(value) / cmath.log(base))
        except (ValueError, ZeroDivisionError) as error:
            raise _BadPoint() from error
    if kind == "fn":
        name, value = tree[1], _evaluate(tree[2], point)
        if name in ("floor", "ceil"):
            real = complex(value)
            if real.imag:
                raise _BadPoint()
            return Fraction(math.floor(real.real) if name == "floor" else math.ceil(real.real))
        if name in ("sin", "tan", "arcsin", "arctan", "sinh", "tanh") and value == 0:
            return Fraction(0)
        if name in ("cos", "cosh", "exp") and value == 0:
            return Fraction(1)
        try:
            return _finite(_FUNCTIONS[name](complex(value)))
        except (ValueError, ZeroDivisionError, OverflowError) as error:
            raise _BadPoint() from error
    raise Unsupported(kind)


def _points(names: list[str]) -> list[dict]:
    rng = random.Random(20240601)
    points = []
    for index in range(4):
        point = {}
        for name_index, name in enumerate(names):
            value = rng.uniform(0.6, 2.9)
            if index == 3 and name_index % 2 == 0:
                value = -value
            point[name] = complex(value)
        points.append(point)
    return points


def close(a, b) -> bool:
    """Equal exactly (two rationals) or to REL_TOL relative (1e-12 absolute near zero)."""
    if _exact(a) and _exact(b):
        return a == b
    a, b = complex(a), complex(b)
    difference = abs(a - b)
    return difference <= 1e-12 or difference <= REL_TOL * max(abs(a), abs(b))


def values(tree, points: list[dict]) -> list:
    """The tree's value at each point, None where it is undefined there."""
    out = []
    for point in points:
        try:
            out.append(_evaluate(tree, point))
        except _BadPoint:
            out.append(None)
    return out


def constant_value(text: str):
    """The exact (Fraction) or complex value of a constant expression; None when it has variables, is
    undefined, or uses unsupported notation."""
    try:
        tree = parse(text)
        if free_variables(tree):
            return None
        return values(tree, [{}])[0]
    except Unsupported:
        return None


def expressions_equal(pred: str, gold: str) -> bool | None:
    """True / False when evaluation settles it, None when it cannot (unsupported notation, or agreement
    only where the variables are positive)."""
    try:
        a, b = parse(pred), parse(gold)
    except Unsupported:
        return None
    names = sorted(free_variables(a) | free_variables(b))
    try:
        if not names:
            x, y = values(a, [{}])[0], values(b, [{}])[0]
            if x is None or y is None:
                # An undefined constant (`4 + 4/0`) equals nothing; two undefined ones are left to sympy.
                return None if x is None and y is None else False
            return close(x, y)
        points = _points(names)
        xs, ys = values(a, points), values(b, points)
    except Unsupported:
        return None
    usable = [(x, y) for x, y in zip(xs[:3], ys[:3]) if x is not None and y is not None]
    if len(usable) < 2:
        return None
    if not all(close(x, y) for x, y in usable):
        return False
    x, y = xs[3], ys[3]
    if x is not None and y is not None and not close(x, y):
        return None
    return True


def differences_proportional(pred_parts: list[tuple[str, str]], gold_parts: list[tuple[str, str]],
                             positive: bool) -> bool | None:
    """Relations as differences `left - right`: True when every pred difference is one constant (positive,
    for inequalities) times the matching gold difference, at every point; None when unsupported."""
    try:
        trees = [(("add", parse(l), ("neg", parse(r))), ("add", parse(gl), ("neg", parse(gr))))
                 for (l, r), (gl, gr) in zip(pred_parts, gold_parts)]
    except Unsupported:
        return None
    names = sorted(set().union(*(free_variables(p) | free_variables(g) for p, g in trees)))
    points = _points(names) if names else [{}]
    ratio = None
    usable = 0
    try:
        for pred_tree, gold_tree in trees:
            for p, g in zip(values(pred_tree, points), values(gold_tree, points)):
                if p is None or g is None:
                    continue
                usable += 1
                if close(g, 0):
                    if not close(p, 0):
                        return False
                    continue
                r = complex(p) / complex(g)
                if ratio is None:
                    ratio = r
                elif not close(r, ratio):
                    return False
    except Unsupported:
        return None
    if usable < min(2, len(points)):
        return None
    if ratio is None:
        return True
    if abs(ratio) < 1e-12 or abs(ratio.imag) > 1e-9 * abs(ratio):
        return False
    return ratio.real > 0 if positive else True
