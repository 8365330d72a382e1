"""Answer extraction from model completions and reference solutions.

Finds the span of text that holds the final answer: the last `\\boxed{...}` (or `\\fbox{...}`) with
brace balancing, neighbouring boxes joined when only a short separator lies between them (the rule
math-verify uses, so `\\boxed{1} and \\boxed{2}` is the answer "1, 2"), then opt-in fallbacks. All
scans are linear in the text length; nothing here evaluates the text.
"""

from __future__ import annotations

import re

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_VALID_SEPARATOR = re.compile(r"\b(?:and|or)\b|,|;")
# Math-verify's multi-box rule: boxes closer than 10 characters, or closer than 70 with an and/or/,/;
# between them and a different content, form one answer.
_NEAR_CHARS = 10
_SEPARATED_CHARS = 70


def _box_spans(text: str) -> list[tuple[int, int, str]]:
    """All boxed answers in `text`, left to right.

    Returns a list of (start, end, content): start is the index of the backslash, end one past the
    closing brace. An unclosed box takes the rest of the text (a truncated completion still names its
    answer); `\\boxed 5` without braces takes the next whitespace-free token.
    """
    spans = []
    position = 0
    while True:
        starts = [(text.find(command, position), command) for command in _BOX_COMMANDS]
        starts = [(index, command) for index, command in starts if index >= 0]
        if not starts:
            return spans
        start, command = min(starts)
        cursor = start + len(command)
        # `\boxed` must not be the prefix of a longer command name such as `\boxedx`.
        if cursor < len(text) and text[cursor].isalpha():
            position = cursor
            continue
        while cursor < len(text) and text[cursor] in " \t":
            cursor += 1
        if cursor < len(text) and text[cursor] == "{":
            depth = 0
            end = None
            for index in range(cursor, len(text)):
                char = text[index]
                if char == "{":
                    depth += 1
                elif char == "}":
                    depth -= 1
                    if depth == 0:
                        end = index
                        break
            if end is None:
                spans.append((start, len(text), text[cursor + 1:].strip()))
                return spans
            spans.append((start, end + 1, text[cursor + 1:end].strip()))
            position = end + 1
        else:
            match = re.match(r"[^\s$]+", text[cursor:])
            if match and cursor > start + len(command):
                token = match.group(0).rstrip(".,;")
                spans.append((start, cursor + match.end(), token))
                position = cursor + match.end()
            else:
                position = cursor
    return spans


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` in `text`, or None when there is none.

    Braces are balanced, so `\\boxed{\\frac{1}{2}}` gives `\\frac{1}{2}`; `\\boxed 5` gives `5`.
    """
    spans = _box_spans(text)
    return spans[-1][2] if spans else None


def extract_boxed_group(text: str) -> str | None:
    """The last box together with the boxes just before it that form one multi-part answer.

    `\\boxed{1} and \\boxed{2}` gives "1, 2"; `\\boxed{1} no no no no no \\boxed{2}` gives "2"; the
    same content boxed twice in a row counts once. None when the text has no box.
    """
    spans = _box_spans(text)
    if not spans:
        return None
    parts = [spans[-1][2]]
    for (_, end, content), (next_start, _, next_content) in zip(reversed(spans[:-1]), reversed(spans[1:])):
        between = text[end:next_start]
        near = len(between) < _NEAR_CHARS
        separated = (
            content != next_content and len(between) < _SEPARATED_CHARS and _VALID_SEPARATOR.search(between)
        )
        if not (near or separated):
            break
        if content != parts[-1]:
            parts.append(content)
    return ", ".join(reversed(parts))


_GSM8K_HASHES = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_ANSWER_IS = re.compile(r"(?i)answer\s*(?:is|:)\s*:?\s*")


def _last_number(text: str) -> str | None:
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    return numbers[-1].rstrip(",").replace(",", "")


def _answer_is(text: str) -> str | None:
    """The phrase after the last "answer is" / "answer:", up to the end of its sentence or line."""
    matches = list(_ANSWER_IS.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end():]
    math = re.match(r"\s*(\$\$?|\\\(|\\\[)(.+?)(\$\$?|\\\)|\\\])", rest, re.DOTALL)
    if math:
        return math.group(2).strip()
    # A sentence ends at a full stop followed by a space or the end, not at a decimal point.
    phrase = re.split(r"\.(?:\s|$)|\n", rest, maxsplit=1)[0].strip()
    return phrase.rstrip(".") or None


def extract_answer(text: str, fallback: str | None = None) -> str | None:
    """The final answer in a completion: boxed first, then the fallback named, if any.

    Args:
        text: model completion or reference solution.
        fallback: None (boxed only), "gsm8k" ("#### N", then the last number in the text) or
            "answer_is" (the phrase after the last "the answer is" / "answer:").
    Returns:
        The answer as a LaTeX / plain string, or None when nothing was found.
    """
    if fallback not in (None, "gsm8k", "answer_is"):
        raise ValueError(f"fallback must be None, 'gsm8k' or 'answer_is', got {fallback!r}")
    boxed = extract_boxed_group(text)
    if boxed is not None:
        return boxed
    if fallback == "gsm8k":
        hashes = _GSM8K_HASHES.findall(text)
        if hashes:
            return hashes[-1].replace(",", "")
        return _last_number(text)
    if fallback == "answer_is":
        return _answer_is(text)
    return None


# Text that needs extraction before grading when it holds no box: the markers math-verify's suite
# treats as answers, strongest first. Each alternative is a math environment or an anchored number.
_ENV = (
    r"(?<!\\)\$\$(?P<a>(?:[^$]|\$(?!\$))+?)\$\$"
    r"|(?<!\\)\\\[(?P<b>(?:[^\\]|\\(?!\]))+?)\\\]"
    r"|(?<![\\\d])\$(?P<c>(?:\\\$|[^\n$])+?)(?<!\\)\$"
    r"|(?<!\\)\\\((?P<d>(?:[^\\\n]|\\(?!\)))+?)\\\)"
)
# A number must follow the start, a space, `=`, `:` or a currency sign, so "AZYUK2A" holds none.
_NUM = r"(?:(?<=^)|(?<=[\s=:$€£(]))(?P<n>-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:[.,]\d+)?(?:/\d+)?|-?\.\d+)(?P<p>\s*(?:%|percent\b|pct\b))?"
_ENV_OR_NUM = f"(?:{_ENV}|{_NUM})"
_MATH_ENVIRONMENT = re.compile(_ENV, re.DOTALL)
_ANCHORED_NUMBER = re.compile(_NUM)
_JOINER = re.compile(r"\s*(?:,?\s*and|,?\s*or|,)\s*")
_MARKERS = [
    re.compile(rf"(?i:final answer is):?\s*{_ENV_OR_NUM}\.?\s?I hope", re.DOTALL),
    re.compile(rf"(?i:final answer.{{0,100}}?)\s+is:?\s*{_ENV_OR_NUM}", re.DOTALL),
    re.compile(rf"(?i:answer):.{{0,50}}?{_ENV_OR_NUM}"),
    re.compile(rf"(?i:answer).{{0,50}}?{_ENV_OR_NUM}"),
]


def _found(match: re.Match) -> str:
    groups = match.groupdict()
    for name in "abcd":
        if groups.get(name) is not None:
            return groups[name].strip()
    return groups["n"] + ("%" if groups.get("p") else "")


def last_number(text: str) -> str | None:
    """The last number in prose, anchored so that digits inside words do not count."""
    matches = list(_ANCHORED_NUMBER.finditer(text))
    return _found(matches[-1]) if matches else None


def answer_candidates(text: str) -> list[str]:
    """Answers to try, best first, for a completion, a reference solution or a bare answer.

    Boxes win; then "final answer is X", "answer: X", "answer ... X" (X a math environment or number,
    the rightmost such marker); then the whole text when it is one math environment or short; then
    the last math environment; the last number comes last, for short answers written in prose.
    """
    boxed = extract_boxed_group(text)
    if boxed is not None:
        # "The final answer is X. I hope it is correct." after the last box overrides it (a model
        # that boxed an intermediate result and then stated its answer).
        finals = list(_MARKERS[0].finditer(text))
        if finals and finals[-1].start() > _box_spans(text)[-1][1]:
            return [_found(finals[-1])]
        return [boxed]
    for marker in _MARKERS:
        matches = list(marker.finditer(text))
        if matches:
            return [_found(matches[-1])]
    stripped = text.strip()
    if _MATH_ENVIRONMENT.fullmatch(stripped):
        return [_found(_MATH_ENVIRONMENT.fullmatch(stripped))]
    # Otherwise the rightmost math environment (with any joined to it) or number, as math-verify.
    found = []  # (end position, answer)
    environments = list(_MATH_ENVIRONMENT.finditer(text))
    if environments:
        # `$1$, $2$ and $3$` is one answer: environments joined by commas, "and" or "or".
        group = [environments[-1]]
        for previous in reversed(environments[:-1]):
            if not _JOINER.fullmatch(text[previous.end():group[-1].start()]):
                break
            group.append(previous)
        found.append((environments[-1].end(), ", ".join(_found(match) for match in reversed(group))))
    numbers = list(_ANCHORED_NUMBER.finditer(text))
    # A short answer that is math, not prose (`\pm 2021`), or has delimiters but no well-formed
    # environment (`$ \n 9 \n $`), is graded as written: a number inside it is not the answer.
    delimited = text.count("$") >= 2 or "\\(" in text or "\\[" in text
    short_math = len(stripped) <= 80 and not environments and (
        delimited or not re.search(r"(?<![\\a-zA-Z])[a-zA-Z]{3,}", stripped))
    if numbers and not short_math:
        found.append((numbers[-1].end(), _found(numbers[-1])))
    candidates = [answer for _, answer in sorted(found, key=lambda item: -item[0])]
    if not environments and len(stripped) <= 80:
        candidates.insert(0, stripped)
    return candidates or [stripped]
