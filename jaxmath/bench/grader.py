"""`python -m jaxmath.bench grader --cases FILE`: accuracy, precision and recall of jaxmath's grader at first
sight, and math-verify's same figures in the same run.

Cases are JSONL rows with `gold`, `pred`, `expected` (tests/grader_cases/: math-verify's suite, the cases mined
from other projects, and the held-out set). "At first sight" is how a GRPO step meets its completions: each
grader is warmed up on other inputs (imports, sympy's and ANTLR's lazily built tables, jaxmath's worker
started), its parse caches are cleared, then every case is graded once. The positive class is "equivalent":
precision is the share of "equal" verdicts that are right (a false "equal" rewards a wrong answer: a reward
hack), recall the share of equivalent pairs found equal (a false "not equal" is a lost reward). Reported per
grader: accuracy, precision, recall, the confusion counts, gradings per second over the pass, and the worst
single call (which for jaxmath is bounded by `--timeout`).

math-verify is called as its documentation says, with its default extraction config: LaTeX inside `$...$`
or `\\boxed{}`. A text holding no `$`, `\\(`, `\\[` or `\\boxed` is wrapped in `$...$`, any other is passed as
written, and the verdict is `verify(parse(gold), parse(pred))`, once (`math_verify_text` below).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

_CASES = Path(__file__).resolve().parents[2] / "tests" / "grader_cases"
# Warm-up inputs, none of them in the case files: one of each kind the graders take different paths for.
_WARMUP = [
    ("3", "3"), ("\\frac{3}{6}", "0.5"), ("x^3 - 1", "(x-1)(x^2+x+1)"), ("\\sum_{j=1}^{6} j", "21"),
    ("(3, 5]", "(3,5]"), ("\\{7, 8\\}", "\\{8,7\\}"), ("y = 3x - 2", "3x - y - 2 = 0"), ("so \\boxed{17}.", "17"),
    ("\\begin{pmatrix}5\\\\6\\end{pmatrix}", "\\begin{pmatrix}5\\\\6\\end{pmatrix}"), ("The answer is (B).", "B"),
]


def _load(path: Path) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _first_sight(grade_one, cases: list[dict]) -> dict:
    """One pass, each case once: accuracy, precision and recall of "equivalent", the confusion counts,
    gradings/s, worst single call (s), ids graded wrong."""
    wrong, worst = [], 0.0
    counts = {"true_equal": 0, "false_equal": 0, "true_not_equal": 0, "false_not_equal": 0}
    start = time.perf_counter()
    for case in cases:
        call_start = time.perf_counter()
        verdict = bool(grade_one(case["pred"], case["gold"]))
        worst = max(worst, time.perf_counter() - call_start)
        counts[("true_" if verdict == case["expected"] else "false_") + ("equal" if verdict else "not_equal")] += 1
        if verdict != case["expected"]:
            wrong.append(case.get("id"))
    elapsed = time.perf_counter() - start
    said_equal = counts["true_equal"] + counts["false_equal"]
    equivalent = counts["true_equal"] + counts["false_not_equal"]
    return {"accuracy": round(1 - len(wrong) / len(cases), 4),
            "precision": round(counts["true_equal"] / said_equal, 4) if said_equal else None,
            "recall": round(counts["true_equal"] / equivalent, 4) if equivalent else None,
            **counts, "gradings_per_s": round(len(cases) / elapsed, 1), "worst_call_s": round(worst, 3),
            "wrong": wrong}


def _summary(name: str, figures: dict) -> str:
    rate = lambda key: "n/a" if figures[key] is None else f"{figures[key]:.2%}"  # noqa: E731
    return (f"{name:<12} accuracy {figures['accuracy']:.2%}  precision {rate('precision')}  recall {rate('recall')}  "
            f"(false equal {figures['false_equal']}, false not-equal {figures['false_not_equal']})  "
            f"{figures['gradings_per_s']:.1f} gradings/s at first sight  worst call {figures['worst_call_s']:.3f} s")


def _jaxmath(cases: list[dict], timeout: float) -> dict:
    from jaxmath.reward import grade, pool

    pool.warmup()
    for pred, gold in _WARMUP:
        grade(pred, gold, timeout=30.0)
    pool.call_bounded(("clear_caches",), timeout=30.0)
    return _first_sight(lambda pred, gold: grade(pred, gold, timeout=timeout), cases)


_DELIMITED = re.compile(r"\$|\\\(|\\\[|\\boxed")


def math_verify_text(text: str) -> str:
    """The text as math-verify's documentation asks for it: LaTeX inside `$...$` (or `\\boxed{}`). A text
    holding no `$`, `\\(`, `\\[` or `\\boxed` is wrapped in `$...$`; any other is passed as written."""
    return text if _DELIMITED.search(text) else f"${text}$"


def _math_verify(cases: list[dict]) -> dict | None:
    try:
        from math_verify import parse, verify
        from math_verify import parser as mv_parser
    except ImportError:
        return None

    def grade_one(pred: str, gold: str) -> bool:
        try:
            return bool(verify(parse(math_verify_text(gold)), parse(math_verify_text(pred))))
        except Exception:
            return False

    for pred, gold in _WARMUP:
        grade_one(pred, gold)
    for name in dir(mv_parser):
        function = getattr(mv_parser, name)
        if hasattr(function, "cache_clear"):
            function.cache_clear()
    return _first_sight(grade_one, cases)


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="python -m jaxmath.bench grader", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=Path, default=_CASES / "mathverify_suite.jsonl",
                        help="JSONL with gold, pred, expected (default: tests/grader_cases/mathverify_suite.jsonl)")
    parser.add_argument("--timeout", type=float, default=1.0, help="jaxmath per-grading bound, seconds")
    parser.add_argument("--no-math-verify", action="store_true", help="skip the math-verify comparison")
    args = parser.parse_args(argv)
    if not args.cases.exists():
        parser.error(f"--cases: no file at {args.cases}; pass a JSONL with gold, pred, expected "
                     f"(tests/grader_cases/ has three)")
    cases = _load(args.cases)
    ours = _jaxmath(cases, args.timeout)
    result = {"cases": len(cases), "equivalent": sum(bool(case["expected"]) for case in cases),
              "file": str(args.cases), "timeout_s": args.timeout,
              **{key: value for key, value in ours.items() if key != "wrong"}}
    print(_summary("jaxmath", ours))
    print(f"             wrong: {ours['wrong']}")
    if not args.no_math_verify:
        peer = _math_verify(cases)
        if peer is not None:
            result.update({f"math_verify_{key}": value for key, value in peer.items() if key != "wrong"})
            result["math_verify_call"] = ("verify(parse(gold), parse(pred)), each text in $...$ unless it holds "
                                          "$, \\(, \\[ or \\boxed")
            result["accuracy_points_over_math_verify"] = round(100 * (ours["accuracy"] - peer["accuracy"]), 2)
            result["speedup"] = round(ours["gradings_per_s"] / peer["gradings_per_s"], 2)
            print(_summary("math-verify", peer))
            print(f"             wrong: {peer['wrong']}")
            print(f"             called as {result['math_verify_call']}")
    return result
