"""String normalization of LaTeX answers and exact parsing of plain numbers.

`clean` rewrites an answer into a canonical LaTeX string (no delimiters, spacing, `\\left`, units,
degree marks, percent signs, thousands separators; `\\dfrac` and friends become `\\frac`).
`parse_number` reads the numbers most answers are (integers, decimals, fractions, mixed numbers,
scientific notation) into exact `Fraction`s in microseconds. Everything here is regex and string work
over inputs capped in size by the caller; nothing evaluates the text.
"""

from __future__ import annotations

import re
from fractions import Fraction

_DELIMITERS = re.compile(r"^(?:\$\$|\$|\\\[|\\\()\s*|\s*(?:\$\$|\$|\\\]|\\\))$")
_SIZE_COMMANDS = re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|biggl|biggr|Biggl|Biggr|big|Big|bigg|Bigg)(?![a-zA-Z])\s*\.?")
_SPACING = re.compile(r"(?<!\\)\\(?:[,;:! ]|(?:quad|qquad|displaystyle|textstyle|scriptstyle|limits|nolimits)(?![a-zA-Z]))|~")
_FRAC_VARIANTS = re.compile(r"\\[dtc]frac(?![a-zA-Z])")
_TEXT_COMMANDS = re.compile(r"\\(?:text(?:normal|bf|it|rm|sf|tt)?|mbox|mathrm|mathbf|mathit|mathsf|mathtt|operatorname|textup|hbox)\s*\{([^{}]*)\}")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\^\s*\{\s*\\text\{\s*o\s*\}\s*\}|°|\\degree(?![a-zA-Z])|\\circ(?![a-zA-Z])")
_PERCENT = re.compile(r"\\?%|\s*\b(?:percentage|percent|pct)\b")
# Thousands separators written as `{,}`, `,\!` or a thin space between digit groups.
_BRACED_COMMA = re.compile(r"(?<=\d)\{,\}(?=\d{3})")
_GROUPED_SPACE = re.compile(r"(?<=\d)\s(?=\d{3}(?!\d))")
_UNIT_WORDS = (
    "cm|mm|km|m|kg|g|mg|s|sec|seconds?|minutes?|mins?|hours?|hrs?|days?|weeks?|months?|years?|"
    "meters?|metres?|centimeters?|kilometers?|inches|inch|in|feet|foot|ft|yards?|yd|miles?|mi|"
    "units?|square|sq|cubic|degrees?|radians?|rad|dollars?|cents?|yuan|euros?|pounds?|lbs?|oz|ounces?|"
    "liters?|litres?|l|ml|gallons?|mph|kph|km/h|m/s|students?|people|persons?|points?|ways|times|"
    "meters|grams?|kilograms?|tons?|calories|percent|per|and|each|apples|books|pages|cars|marbles|coins"
)
_TRAILING_UNITS = re.compile(rf"(?:(?:\s+|\s*\\text\{{\s*)(?:{_UNIT_WORDS})\b\}}?(?:\s*\^\s*\{{?\d\}}?)?)+\s*$")
_CURRENCY = re.compile(r"\\\$|\$|€|£|¥|₹|\\euro")


def strip_delimiters(text: str) -> str:
    """Removes one layer of math delimiters around an answer: `$x$`, `\\(x\\)`, `\\[x\\]`, `$$x$$`."""
    text = text.strip()
    previous = None
    while previous != text:
        previous = text
        text = _DELIMITERS.sub("", text).strip()
    return text


def _unwrap_text(match: re.Match) -> str:
    content = match.group(1).strip()
    # `\text{ and }` between list items is a separator, the same as a comma.
    if content in ("and", "or", ", and", ",and"):
        return ", "
    return " " + content + " " if re.fullmatch(r"[a-zA-Z ]{2,}", content) else content


_TRIG = re.compile(r"\\(?:sin|cos|tan|sec|csc|cot)(?![a-zA-Z])")
_DEGREE_NUMBER = re.compile(r"(\d+(?:\.\d+)?)\s*(?:\^\s*\{?\s*\\circ\s*\}?|°|\\degree(?![a-zA-Z]))")
_MIXED_SLASH = re.compile(r"(?<![\d.,/^_])(\d+)\s+(\d+)\s*/\s*(\d+)(?![\d/.])")
_EXPONENT_SPACE = re.compile(r"(\^\s*\{?\d+\}?)\s+(?=\d)")
_LONE_DIGIT_SPACE = re.compile(r"(?<=\d)\s+(?=\d)")
_SINGLE_SCRIPT = re.compile(r"([_^])\{\s*([A-Za-z0-9])\s*\}")
_RELATION_THOUSANDS = re.compile(r"(?<![\d,.])(\d{1,3})((?:,\d{3})+)(?![\d,])")
# A unit: trailing words after a number or expression (`125 miles`, `10\text{ cm}^2`, `3.5 \text{gal}`),
# or a word of three or more letters glued to a number (`10weeks`; `10cm` stays unreadable, as in MARIO_EVAL).
_TRAILING_WORDS = re.compile(r"(?<=[\d})\]])(?:\s+[a-zA-Z]{2,}\.?)+(?:\s*\^\s*\{?\d\}?)?\s*$")
_GLUED_WORD = re.compile(r"(?<=\d)[a-zA-Z]{3,}(?:\s+[a-zA-Z]+)*\s*$")
_UNIT_TEXT = re.compile(r"\\(?:text(?:normal|bf|rm)?|mbox|mathrm)\s*\{\s*([a-zA-Z][a-zA-Z .]*)\}(?:\s*\^\s*\{?\d\}?)?\s*$")


def unit_of(answer: str) -> str | None:
    """The unit words at the end of an answer (`cm`, `gal`, `square units`), lower-cased, or None."""
    text = strip_delimiters(answer).strip().rstrip(".").strip()
    match = _UNIT_TEXT.search(text)
    if match and re.search(r"[\d}]\s*(?:\\[,;! ]|~|\s)*$", text[:match.start()]):
        return match.group(1).strip().lower()
    match = re.search(r"(?<=[\d}])\s+([a-zA-Z]{1,}(?:\s+[a-zA-Z]+)*)\s*$", text)
    return match.group(1).lower() if match else None


def has_percent(answer: str) -> bool:
    """True when the answer is written as a percentage (`28\\%`, `28 percent`)."""
    return bool(re.search(r"%|\bpercent(?:age)?\b|\bpct\b", answer))


# Patterns of `clean`, compiled once.
_GROUPING_BEFORE_THIN_SPACE = re.compile(r"(?<=\d)(?:\{,\}|,\s*\\!)\s*(?=\d{3})")
_DOUBLED_BACKSLASH = re.compile(r"\\\\(?=[a-zA-Z])")
_TRAILING_BACKSLASHES = re.compile(r"\\+\s*$")
_AND_OR_SEPARATOR = re.compile(r"(?:,\s*)?(?<![a-zA-Z\\])\b(?:and|or)\b(?![a-zA-Z])\s*")
_RUN_TOGETHER_OR = re.compile(r"(?<=[\d)}])(?:and|or)(?=[A-Z\\(])")
_COMMA_THIN_SPACE_GROUPING = re.compile(r"(?<=\d),\s*\\!\s*(?=\d{3})")
_GEQ = re.compile(r"\\(?:geq|ge)(?![a-zA-Z])")
_LEQ = re.compile(r"\\(?:leq|le)(?![a-zA-Z])")
_NEQ = re.compile(r"\\(?:neq|ne)(?![a-zA-Z])")
_GT = re.compile(r"\\gt(?![a-zA-Z])")
_LT = re.compile(r"\\lt(?![a-zA-Z])")
_CDOT_TIMES = re.compile(r"\\(?:cdot|times)(?![a-zA-Z])")
_FRAC_TWO_DIGITS = re.compile(r"\\frac\s*(\d)\s*(\d)")
_FRAC_DIGIT_BRACE = re.compile(r"\\frac\s*(\d)\s*\{")
_FRAC_BRACE_DIGIT = re.compile(r"\\frac\s*\{([^{}]*)\}\s*(\d)")
_SQRT_BARE = re.compile(r"\\sqrt\s*(\d+|[a-zA-Z])(?![a-zA-Z])")
_SQRT_INDEX_BARE = re.compile(r"\\sqrt\s*\[\s*(\d+)\s*\]\s*(\d+|[a-zA-Z])(?![a-zA-Z])")
_SQRT_PARENTHESES = re.compile(r"\\sqrt\s*\(([^()]*)\)")
_SPACE_NOT_BETWEEN_WORDS = re.compile(r"(?<![a-zA-Z])\s+|\s+(?![a-zA-Z])")
_SPACES = re.compile(r"\s+")
_REPEATED_COMMAS = re.compile(r",(?:\s*,)+")


def clean(answer: str) -> str:
    """Canonical LaTeX for an answer string.

    Args:
        answer: an extracted answer, e.g. `$\\left( \\dfrac{1}{2}, 3 \\right)$` or `90^\\circ`.
    Returns:
        A normalized string, e.g. `(\\frac{1}{2},3)` and `90`; spaces are removed except between
        words so that `\\text{odd}` and `odd` agree.
    """
    text = strip_delimiters(answer)
    text = text.replace("\n", " ").replace("\t", " ").replace("\r", " ")
    # `12,\! 345` groups thousands; handled before `\!` becomes a space.
    text = _GROUPING_BEFORE_THIN_SPACE.sub("", text)
    if "matrix" not in text and "array" not in text:
        # Solutions stored with doubled backslashes: `\\frac` -> `\frac`.
        text = _DOUBLED_BACKSLASH.sub(r"\\", text)
    # A stray backslash (or LaTeX line break) after the answer: `185\`.
    if "matrix" not in text and "array" not in text and "cases" not in text:
        text = _TRAILING_BACKSLASHES.sub("", text)
    text = _SIZE_COMMANDS.sub("", text)
    text = _SPACING.sub(" ", text)
    text = _FRAC_VARIANTS.sub(r"\\frac", text)
    if _TRIG.search(text):
        # Inside a trigonometric function a degree mark is a unit to convert: sin(30°) = sin(pi/6).
        text = _DEGREE_NUMBER.sub(r"(\1\\pi/180)", text)
    text = _DEGREES.sub("", text)
    unit = _UNIT_TEXT.search(text)
    if unit and re.search(r"\d", text[:unit.start()]) and re.search(r"[\w}).]\s*$", text[:unit.start()]):
        text = text[:unit.start()]
    for _ in range(3):
        text = _TEXT_COMMANDS.sub(_unwrap_text, text)
    text = text.replace("\\dots", "").replace("\\ldots", "").replace("\\cdots", "")
    text = text.replace("²", "^2").replace("³", "^3")
    # "1, 2 and 3", "1 or 2": list separators, turned into commas while spaces still mark words.
    text = _AND_OR_SEPARATOR.sub(", ", text)
    # `W(x)=1orW(x)=-1`: a run-together "or" between a value and the next assignment.
    text = _RUN_TOGETHER_OR.sub(", ", text)
    text = _PERCENT.sub("", text)
    text = _CURRENCY.sub("", text)
    text = _BRACED_COMMA.sub("", text)
    text = _COMMA_THIN_SPACE_GROUPING.sub("", text)
    text = text.replace("\\{", "{").replace("\\}", "}") if text.startswith("\\{") else text
    text = _GEQ.sub(">=", text)
    text = _LEQ.sub("<=", text)
    text = _NEQ.sub("!=", text)
    text = _GT.sub(">", text)
    text = _LT.sub("<", text)
    text = text.replace("≤", "<=").replace("≥", ">=").replace("≠", "!=").replace("÷", "\\div ")
    text = _CDOT_TIMES.sub("*", text) if re.search(r"\d\s*\\(?:cdot|times)\s*10\^", text) else text
    # `\frac12` and `\frac3{3}`: single-token arguments get their braces.
    text = _FRAC_TWO_DIGITS.sub(r"\\frac{\1}{\2}", text)
    text = _FRAC_DIGIT_BRACE.sub(r"\\frac{\1}{", text)
    text = _FRAC_BRACE_DIGIT.sub(r"\\frac{\1}{\2}", text)
    text = _SQRT_BARE.sub(r"\\sqrt{\1}", text)
    text = _SQRT_INDEX_BARE.sub(r"\\sqrt[\1]{\2}", text)
    text = _SQRT_PARENTHESES.sub(r"\\sqrt{\1}", text)
    text = _SINGLE_SCRIPT.sub(r"\1\2", text)
    stripped = _TRAILING_UNITS.sub("", text).strip()
    if stripped and re.search(r"[\d}]", stripped[-1:]) or re.fullmatch(r"[\d.,]+", stripped or "x"):
        text = stripped
    text = text.strip().rstrip(".").strip()
    words = _TRAILING_WORDS.search(text)
    if words and re.search(r"\d", text[:words.start()]) and not re.search(r"[=<>]", text[words.start():]):
        text = text[:words.start()].strip()
    text = _GLUED_WORD.sub("", text) if re.fullmatch(r"-?[\d.,]+[a-zA-Z]{3,}(?:\s+[a-zA-Z]+)*\s*", text) else text
    text = _GROUPED_SPACE.sub("", text)
    # `4 4/9` is a mixed number (a proper fraction after a whole number; `parse_number` checks it).
    text = _MIXED_SLASH.sub(r"\1\\frac{\2}{\3}", text)
    # `2^6 3^5`: a space after an exponent multiplies; other digits split by a space are not one number.
    text = _EXPONENT_SPACE.sub(r"\1*", text)
    text = _LONE_DIGIT_SPACE.sub("¦", text)
    # 7,425,000 is one number, not a list (latex2sympy's and math-verify's reading too); `32, 349`
    # with a space is a list. Inside an equation, comma-grouped numbers are numbers too.
    if _THOUSANDS.match(text.lstrip("-")):
        text = text.replace(",", "")
    elif "=" in text:
        text = _RELATION_THOUSANDS.sub(lambda m: m.group(1) + m.group(2).replace(",", ""), text)
    # Spaces matter only between words (`\text{The midpoints form ...}`).
    text = _SPACE_NOT_BETWEEN_WORDS.sub("", text)
    text = _SPACES.sub(" ", text)
    text = _REPEATED_COMMAS.sub(",", text).strip(", ")
    return text


_INTEGER = r"\d+"
_DECIMAL = r"(?:\d+\.\d*|\.\d+)"
_THOUSANDS = re.compile(r"^\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_SCIENTIFIC = re.compile(r"^(\d+(?:\.\d+)?|\.\d+)(?:[eE]([+-]?\d{1,4})|\*10\^\{?([+-]?\d{1,4})\}?)$")
_FRAC = re.compile(r"^\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}$")
_SLASH = re.compile(r"^(-?[\d.]+)/(-?[\d.]+)$")
_MIXED = re.compile(r"^(\d+)\\frac\{(\d+)\}\{(\d+)\}$|^(\d+) (\d+)/(\d+)$")
MAX_DIGITS = 400


class Number:
    """An exact number read from an answer.

    Attributes:
        value: exact rational value.
        decimals: digits after the decimal point when the answer was written as a decimal (the
            precision the writer committed to), else None.
    """

    __slots__ = ("value", "decimals")

    def __init__(self, value: Fraction, decimals: int | None = None):
        self.value = value
        self.decimals = decimals

    def __repr__(self) -> str:
        return f"Number({self.value}, decimals={self.decimals})"


def _plain_number(text: str) -> Number | None:
    if len(text) > MAX_DIGITS:
        return None
    if re.fullmatch(_INTEGER, text):
        return Number(Fraction(int(text)))
    if re.fullmatch(_DECIMAL, text):
        return Number(Fraction(text), len(text.split(".")[1]))
    if _THOUSANDS.match(text):
        plain = text.replace(",", "")
        decimals = len(plain.split(".")[1]) if "." in plain else None
        return Number(Fraction(plain), decimals)
    scientific = _SCIENTIFIC.match(text)
    if scientific:
        mantissa, exponent = scientific.group(1), scientific.group(2) or scientific.group(3)
        return Number(Fraction(mantissa) * Fraction(10) ** int(exponent))
    return None


def parse_number(text: str, plain_text: bool = False) -> Number | None:
    """Reads a cleaned answer that is a single real number, exactly.

    Args:
        text: output of `clean`.
        plain_text: the answer had no LaTeX at all, so `1,22` and `0,111` are decimal commas (the
            European convention math-verify's suite expects); in LaTeX a comma separates list items.
    Returns:
        A Number, or None when the text is not a plain number (then the caller tries structure or
        symbolic parsing).
    """
    text = text.strip()
    if not text or len(text) > MAX_DIGITS:
        return None
    sign = 1
    while text[:1] in ("-", "+"):
        if text[0] == "-":
            sign = -sign
        text = text[1:].strip()
    if text.startswith("(") and text.endswith(")") and "," not in text:
        inner = parse_number(text[1:-1], plain_text)
        return None if inner is None else Number(sign * inner.value, inner.decimals)
    if plain_text and re.fullmatch(r"\d+,\d+", text):
        head, tail = text.split(",")
        if len(tail) != 3 or head == "0" or len(head) > 3:
            text = head + "." + tail
    number = _plain_number(text)
    if number is not None:
        return Number(sign * number.value, number.decimals)
    fraction = _FRAC.match(text) or _SLASH.match(text)
    if fraction:
        numerator, denominator = _plain_signed(fraction.group(1)), _plain_signed(fraction.group(2))
        if numerator is None or denominator is None or denominator.value == 0:
            return None
        return Number(sign * numerator.value / denominator.value)
    mixed = _MIXED.match(text)
    if mixed:
        whole, numerator, denominator = (int(g) for g in (mixed.groups()[:3] if mixed.group(1) else mixed.groups()[3:]))
        if not 0 <= numerator < denominator:
            return None  # a mixed number's fraction is proper: `11 6/6` and `4 0/0` are not numbers
        return Number(sign * (whole + Fraction(numerator, denominator)))
    return None


def _plain_signed(text: str) -> Number | None:
    negative = text.startswith("-")
    number = _plain_number(text.lstrip("-"))
    if number is None:
        return None
    return Number(-number.value if negative else number.value, number.decimals)


def split_top_level(text: str, separators: str = ",;") -> list[str]:
    """Splits at separators outside any bracket: `(1,2),(3,4)` -> [`(1,2)`, `(3,4)`]."""
    parts, depth, current = [], 0, []
    for char in text:
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        if char in separators and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [part.strip() for part in parts]


def brackets_balanced(text: str) -> bool:
    """True when (), [], {} nest without going negative (mixed pairs allowed: intervals `[0,1)`)."""
    depth = 0
    for char in text:
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
            if depth < 0:
                return False
    return depth == 0


MAX_LATEX_CHARS = 600
MAX_NESTING = 24
MAX_DIGIT_RUN = 80
MAX_EXPONENT = 2000
MAX_FACTORIAL = 500


def within_caps(latex: str) -> bool:
    """False for inputs whose symbolic work could explode: long, deeply nested, huge numbers or powers."""
    if len(latex) > MAX_LATEX_CHARS:
        return False
    depth = 0
    for char in latex:
        if char in "{([":
            depth += 1
            if depth > MAX_NESTING:
                return False
        elif char in "})]":
            depth -= 1
    if any(len(run) > MAX_DIGIT_RUN for run in re.findall(r"\d+", latex)):
        return False
    # A power whose exponent itself holds a power or factorial (`9^{9^{9^9}}`) or a numeric exponent
    # beyond MAX_EXPONENT would make sympy build a giant integer eagerly.
    for match in re.finditer(r"\^\s*(\{(?:[^{}]|\{[^{}]*\})*\}|\d+|\\?[a-zA-Z]+)", latex):
        exponent = match.group(1)
        if ("^" in exponent or "!" in exponent or "\\exp" in exponent) and not re.search(r"[a-zA-Z]", exponent.replace("\\exp", "")):
            return False
        for number in re.findall(r"\d+", exponent):
            if int(number) > MAX_EXPONENT:
                return False
    for match in re.finditer(r"(\d+)\s*!", latex):
        if int(match.group(1)) > MAX_FACTORIAL:
            return False
    for match in re.finditer(r"\\[dt]?binom\s*\{\s*(\d+)", latex):
        if int(match.group(1)) > MAX_FACTORIAL:
            return False
    if "!" in latex and re.search(r"\)\s*!|\}\s*!", latex):
        return False
    return True
