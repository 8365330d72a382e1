"""Answer extraction from model completions and reference solutions, in time linear in the text.

Finds the span of text that holds the final answer: the last `\\boxed{...}` (or `\\fbox{...}`) with brace
balancing, with the boxes just before it when a separator joins them (`\\boxed{1} and \\boxed{2}` is the
answer "1, 2"), then opt-in fallbacks. Nothing here evaluates the text.

Length rules (why no input can make extraction slow):
  - a box holds at most MAX_BOX_CHARS characters; an unclosed `\\boxed{` takes the rest of the text only when
    that rest is shorter than that (a truncated completion still names its answer), else it is no answer;
  - only the last MAX_BOX_COMMANDS box commands are read (found with `str.rfind`, from the end);
  - without a box, only the last MAX_SCAN_CHARS characters are searched for an answer statement, a math
    environment or a number, with patterns that are linear (delimiters are paired by one scan, not by a
    backtracking pattern).
"""

from __future__ import annotations

import bisect
import re

MAX_BOX_CHARS = 2_000
MAX_BOX_COMMANDS = 64
MAX_SCAN_CHARS = 4_000

_BOX_COMMANDS = ("\\boxed", "\\fbox")
# Boxes form one answer when nothing but spaces lies between them, or a list separator within 70
# characters, or fewer than 10 characters with no math delimiter (math-verify's nearness rule; a `$$`
# between two boxes puts them in separate formulas: `$$\boxed{20}$$ \boxed{143}` answers 143).
_JOINING_SEPARATOR = re.compile(r"\b(?:and|or)\b|,|;")
_JOIN_CHARS = 70
_NEAR_CHARS = 10
_MATH_DELIMITER = re.compile(r"\$|\\[\[\]()]")
_BRACE = re.compile(r"[{}]")


def _read_box(text: str, start: int, command: str) -> tuple[int, int, str] | None:
    """(start, end, content) of the box whose command begins at `start`, or None."""
    cursor = start + len(command)
    if cursor < len(text) and text[cursor].isalpha():
        return None  # `\boxedx` is another command
    while cursor < len(text) and text[cursor] in " \t":
        cursor += 1
    if cursor < len(text) and text[cursor] == "{":
        depth = 0
        window_end = min(len(text), cursor + MAX_BOX_CHARS + 2)
        for brace in _BRACE.finditer(text, cursor, window_end):
            depth += 1 if brace.group() == "{" else -1
            if depth == 0:
                return start, brace.end(), text[cursor + 1:brace.start()].strip()
        if len(text) - cursor <= MAX_BOX_CHARS:
            return start, len(text), text[cursor + 1:].strip()
        return None
    if cursor == start + len(command):
        return None
    token = re.match(r"[^\s$]{1,100}", text[cursor:cursor + 100])
    if not token:
        return None
    return start, cursor + token.end(), token.group(0).rstrip(".,;")


def _box_spans(text: str) -> list[tuple[int, int, str]]:
    """The boxed answers in `text` among its last MAX_BOX_COMMANDS box commands, left to right.

    Returns (start, end, content) triples: start is the backslash, end one past the closing brace. A box
    nested in another counts as part of the outer one.
    """
    spans: list[tuple[int, int, str]] = []  # right to left while collecting
    position = len(text)
    for _ in range(MAX_BOX_COMMANDS):
        start, command = max((text.rfind(c, 0, position), c) for c in _BOX_COMMANDS)
        if start < 0:
            break
        position = start
        span = _read_box(text, start, command)
        if span is None:
            continue
        while spans and spans[-1][0] < span[1]:
            spans.pop()  # inner box of this one
        spans.append((span[0], span[1], _unwrap_nested(span[2])))
    return spans[::-1]


def _unwrap_nested(content: str) -> str:
    """`\\boxed{\\boxed{5}}` answers 5: a box whose whole content is another box holds that box's content."""
    for _ in range(MAX_BOX_COMMANDS):
        command = next((c for c in _BOX_COMMANDS if content.startswith(c)), None)
        inner = _read_box(content, 0, command) if command else None
        if inner is None or inner[1] != len(content):
            return content
        content = inner[2]
    return content


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` in `text`, or None when there is none.

    Braces are balanced, so `\\boxed{\\frac{1}{2}}` gives `\\frac{1}{2}`; `\\boxed 5` gives `5`.
    """
    spans = _box_spans(text)
    return spans[-1][2] if spans else None


def extract_boxed_group(text: str) -> str | None:
    """The last box together with the boxes just before it that form one multi-part answer.

    `\\boxed{1} and \\boxed{2}` gives "1, 2"; `\\boxed{20}$$ \\boxed{143}` gives "143" (no separator); the same
    content boxed twice in a row counts once. None when the text has no box.
    """
    spans = _box_spans(text)
    if not spans:
        return None
    parts = [spans[-1][2]]
    for (_, end, content), (next_start, _, _) in zip(reversed(spans[:-1]), reversed(spans[1:])):
        between = text[end:next_start]
        joined = (not between.strip() or (len(between) < _JOIN_CHARS and _JOINING_SEPARATOR.search(between))
                  or (len(between) < _NEAR_CHARS and not _MATH_DELIMITER.search(between)))
        if not joined:
            break
        if content != parts[-1]:
            parts.append(content)
    return ", ".join(reversed(parts))


_GSM8K_HASHES = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_ANSWER_IS = re.compile(r"(?i)answer\s*(?:is|:)\s*:?\s*")


def _last_number(text: str) -> str | None:
    numbers = _NUMBER.findall(text[-MAX_SCAN_CHARS:])
    if not numbers:
        return None
    return numbers[-1].rstrip(",").replace(",", "")


def _answer_is(text: str) -> str | None:
    """The phrase after the last "answer is" / "answer:", up to the end of its sentence or line."""
    text = text[-MAX_SCAN_CHARS:]
    matches = list(_ANSWER_IS.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end():]
    environment = _first_environment(rest)
    if environment is not None and not rest[:environment[0]].strip():
        return environment[2]
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
        hashes = _GSM8K_HASHES.findall(text[-MAX_SCAN_CHARS:])
        if hashes:
            return hashes[-1].replace(",", "")
        return _last_number(text)
    if fallback == "answer_is":
        return _answer_is(text)
    return None


# ---- unboxed answers: math environments, answer statements, anchored numbers ----

_DELIMITER = re.compile(r"\\\$|\$\$|\$|\\\[|\\\]|\\\(|\\\)")
_CLOSER = {"$$": "$$", "$": "$", "\\[": "\\]", "\\(": "\\)"}
_INLINE = ("$", "\\(")


def _environments(text: str) -> list[tuple[int, int, str]]:
    """Math environments `$..$`, `$$..$$`, `\\[..\\]`, `\\(..\\)` as (start, end, content), left to right.

    One scan pairs each opener with the next closer of its kind (inline ones may not span a line), so an
    unclosed `\\[` costs one step, not a scan of the rest of the text.
    """
    tokens = [(match.start(), match.end(), match.group()) for match in _DELIMITER.finditer(text)]
    following: list[dict] = [{}] * len(tokens)
    upcoming: dict = {}
    for index in range(len(tokens) - 1, -1, -1):
        following[index] = upcoming
        kind = tokens[index][2]
        if kind in ("$$", "$", "\\]", "\\)"):
            upcoming = {**upcoming, kind: index}
    found = []
    index = 0
    while index < len(tokens):
        start, end, kind = tokens[index]
        closer = _CLOSER.get(kind)
        if closer is None or (kind == "$" and start > 0 and text[start - 1].isdigit()):
            index += 1
            continue
        match_index = following[index].get(closer)
        if match_index is None:
            index += 1
            continue
        content = text[end:tokens[match_index][0]]
        if not content.strip() or (kind in _INLINE and "\n" in content):
            index += 1
            continue
        found.append((start, tokens[match_index][1], content.strip()))
        index = match_index + 1
    return found


def _first_environment(text: str):
    environments = _environments(text[:MAX_SCAN_CHARS])
    return environments[0] if environments else None


# A number must not follow a letter, digit, `.` or `_`, so "AZYUK2A" holds none; CJK text before it is fine.
# `4 4/9` is one mixed number; `1 000` groups thousands with a space.
_NUMBER_BODY = (r"-?(?:\d{1,3}(?:,\d{3})+|\d{1,3}(?: \d{3})+(?!\d)|\d+)(?:[.,]\d+)?"
                r"(?:(?: \d+)?/\d+)?|-?\.\d+")
_NUM = re.compile(rf"(?<![A-Za-z0-9._\\])(?P<n>{_NUMBER_BODY})(?!\d)(?P<p>\s*(?:\\?%|percent\b|pct\b))?")
_JOINER = re.compile(r"\s*(?:,?\s*and|,?\s*or|,)\s*")
_ANSWER_WORD = r"(?:answer|réponse|respuesta|risposta|resposta|antwort|答案|答)"
_FINAL_IS = re.compile(r"(?i)final answer is:?\s*")
_FINAL_SOMETHING_IS = re.compile(r"(?i)final answer.{0,100}?\s+is:?\s*", re.DOTALL)
_ANSWER_COLON = re.compile(rf"(?i){_ANSWER_WORD}\s*[:：]")
_ANSWER_ANY = re.compile(rf"(?i){_ANSWER_WORD}")
_I_HOPE = re.compile(r"\.?\s?I hope")


def _number_text(match: re.Match) -> str:
    return match.group("n") + ("%" if match.group("p") else "")


class _Scan:
    """Environments and numbers of one text window, for answer statements to point into."""

    def __init__(self, text: str):
        self.text = text
        self.environments = _environments(text)
        self.starts = [start for start, _, _ in self.environments]

    def at(self, position: int) -> tuple[int, str] | None:
        """The environment or number starting exactly at `position` (after spaces): (end, answer)."""
        while position < len(self.text) and self.text[position] in " \t":
            position += 1
        index = bisect.bisect_left(self.starts, position)
        if index < len(self.starts) and self.starts[index] == position:
            return self.environments[index][1], self.environments[index][2]
        number = _NUM.match(self.text, position)
        return (number.end(), _number_text(number)) if number else None

    def within(self, position: int, reach: int) -> tuple[int, str] | None:
        """The first environment or number starting in [position, position + reach], on the same line."""
        line_end = self.text.find("\n", position)
        if line_end >= 0:
            reach = min(reach, line_end - position)
        index = bisect.bisect_left(self.starts, position)
        environment = self.environments[index] if index < len(self.starts) and self.starts[index] <= position + reach else None
        number = _NUM.search(self.text, position, min(len(self.text), position + reach + 40))
        if number and number.start() > position + reach:
            number = None
        if environment and (not number or environment[0] <= number.start()):
            return environment[1], environment[2]
        return (number.end(), _number_text(number)) if number else None


def _stated_answer(scan: _Scan) -> tuple[int, str] | None:
    """The answer of the strongest answer statement, the rightmost of its kind: "final answer is X. I
    hope", "final answer ... is X", "answer: X", "answer ... X" (X a math environment or a number)."""
    text = scan.text
    finals = [hit for match in _FINAL_IS.finditer(text) if (hit := scan.at(match.end()))
              and _I_HOPE.match(text, hit[0])]
    if finals:
        return finals[-1]
    for marker, reach in ((_FINAL_SOMETHING_IS, 0), (_ANSWER_COLON, 50), (_ANSWER_ANY, 50)):
        hits = [hit for match in marker.finditer(text) if (hit := (scan.at(match.end()) if reach == 0
                                                                    else scan.within(match.end(), reach)))]
        if hits:
            return hits[-1]
    return None


def last_number(text: str) -> str | None:
    """The last number in prose, anchored so that digits inside words do not count."""
    matches = list(_NUM.finditer(text[-MAX_SCAN_CHARS:]))
    return _number_text(matches[-1]) if matches else None


def answer_candidates(text: str) -> list[str]:
    """Answers to try, best first, for a completion, a reference solution or a bare answer.

    Boxes win, unless "The final answer is X. I hope it is correct." follows the last box; then "final
    answer is X", "answer: X", "answer ... X" (X a math environment or number, the rightmost such
    statement); then the whole text when it is one math environment or short; then the last math
    environment; the last number comes last, for short answers written in prose.
    """
    boxed = extract_boxed_group(text)
    window_start = max(0, len(text) - MAX_SCAN_CHARS)
    window = text[window_start:]
    if boxed is not None:
        last_box_end = _box_spans(text)[-1][1]
        if "I hope" in window and last_box_end < len(text):
            scan = _Scan(text[max(last_box_end, window_start):])
            finals = [hit for match in _FINAL_IS.finditer(scan.text) if (hit := scan.at(match.end()))
                      and _I_HOPE.match(scan.text, hit[0])]
            if finals:
                return [finals[-1][1]]
        return [boxed]
    scan = _Scan(window)
    stated = _stated_answer(scan)
    if stated is not None:
        return [stated[1]]
    stripped = window.strip()
    environments = scan.environments
    if len(environments) == 1 and not window[:environments[0][0]].strip() and not window[environments[0][1]:].strip():
        return [environments[0][2]]
    found = []  # (end position, answer)
    if environments:
        # `$1$, $2$ and $3$` is one answer: environments joined by commas, "and" or "or".
        group = [environments[-1]]
        for previous in reversed(environments[:-1]):
            if not _JOINER.fullmatch(window[previous[1]:group[-1][0]]):
                break
            group.append(previous)
        found.append((environments[-1][1], ", ".join(content for _, _, content in reversed(group))))
    numbers = list(_NUM.finditer(window))
    # A short answer that is math, not prose (`\pm 2021`), or has delimiters but no well-formed
    # environment (`$ \n 9 \n $`), is graded as written: a number inside it is not the answer.
    delimited = window.count("$") >= 2 or "\\(" in window or "\\[" in window
    prose = re.search(r"(?<![\\a-zA-Z])[a-zA-Z]{3,}|[^\x00-\x7f]{2,}", stripped)
    short_math = len(stripped) <= 80 and not environments and (delimited or not prose)
    if numbers and not short_math:
        found.append((numbers[-1].end(), _number_text(numbers[-1])))
    candidates = [answer for _, answer in sorted(found, key=lambda item: -item[0])]
    if not environments and len(stripped) <= 80:
        candidates.insert(0, stripped)
    return candidates or [stripped]


# ---- multiple choice ----

_CHOICE_GOLD = re.compile(r"^\s*\(?([A-Z])\)?(?:\s*$|[.:)]\s*|\s+\S)")
_CHOICE_LEADING = re.compile(r"^\s*\(?([A-Z])\)?(?:\s*$|[.:)。，,]|\s|(?=[^\x00-\x7f]))")
_CHOICE_STATED = re.compile(rf"(?i:{_ANSWER_WORD}(?:\s+(?:is|est|es|è|ist))?(?:\s+for\s+sure)?)\s*[:：]?\s*\(?([A-Z])\)?(?![A-Za-z])")
_CHOICE_ANY = re.compile(r"(?<![A-Za-z])\(?([A-Z])\)?(?![A-Za-z'’])")


def gold_choice(gold: str) -> str | None:
    """The letter of a multiple-choice gold (`C`, `(D) Alina`, `C. x = 42`, `C Cecile`), else None.

    A gold that is a whole sentence ending in its choice ("... the answer is\\n(C) Cecile") counts too.
    """
    text = gold.strip().replace("$", "")
    boxed = extract_boxed(text)
    if boxed is not None:
        text = boxed
    text = re.sub(r"^\\text\{\s*\(?([A-Z])\)?\s*\}$", r"\1", text)
    match = _CHOICE_GOLD.match(text)
    if match and len(text) <= 60:
        return match.group(1)
    stated = list(_CHOICE_STATED.finditer(text))
    if stated and len(text) <= 200:
        return stated[-1].group(1)
    return None


def choice_answer(text: str) -> str | None:
    """The choice letter a completion gives: boxed, leading (`D. because`), stated ("the answer is D"),
    else the last standalone letter (`... therefore I think it's B`)."""
    window = text[-MAX_SCAN_CHARS:]
    boxed = extract_boxed(window)
    if boxed is not None:
        letter = gold_choice(boxed)
        return letter
    leading = _CHOICE_LEADING.match(window)
    if leading:
        return leading.group(1)
    stated = list(_CHOICE_STATED.finditer(window))
    if stated:
        return stated[-1].group(1)
    letters = list(_CHOICE_ANY.finditer(window))
    return letters[-1].group(1) if letters else None
