"""`python -m jaxmath.bench grader --cases FILE`: accuracy and gradings/s of jaxmath's grader, and of
math-verify on the same cases in the same run when it is installed.

Cases are JSONL rows with `gold`, `pred`, `expected` (math-verify's own suite by default). Both graders
run `--passes` times over the cases in one process; the first pass pays one-time costs (sympy's and
ANTLR's lazily built caches, imports), so the rate reported is the mean over the later passes, with
parse-result caches cleared between passes on both sides so repeats cost real work. The first-pass
rates are reported too.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

_SHARED_CASES = Path(__file__).resolve().parents[3] / "shared" / "grader_dev_cases.jsonl"


def _load(path: Path) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _run_passes(grade_one, clear, cases: list[dict], passes: int) -> tuple[float, float, float]:
    """Returns (accuracy of the last pass, first-pass gradings/s, later-passes gradings/s)."""
    rates = []
    correct = 0
    for _ in range(passes):
        clear()
        correct = 0
        start = time.perf_counter()
        for case in cases:
            correct += grade_one(case["pred"], case["gold"]) == case["expected"]
        rates.append(len(cases) / (time.perf_counter() - start))
    later = rates[1:] or rates
    return correct / len(cases), rates[0], sum(later) / len(later)


def _jaxmath(cases: list[dict], passes: int, timeout: float) -> tuple[float, float, float]:
    from jaxmath.reward import grade, pool

    pool.warmup()

    def clear() -> None:
        pool.call_bounded(("clear_caches",), timeout=10.0)

    return _run_passes(lambda pred, gold: grade(pred, gold, timeout=timeout), clear, cases, passes)


def _math_verify(cases: list[dict], passes: int) -> tuple[float, float, float] | None:
    try:
        import math_verify
        from math_verify import parser as mv_parser
        from math_verify import parse, verify
    except ImportError:
        return None
    del math_verify

    def grade_one(pred: str, gold: str) -> bool:
        try:
            return bool(verify(parse(gold), parse(pred)))
        except Exception:
            return False

    def clear() -> None:
        for name in ("parse_latex_cached", "parse_expr_cached", "extract_latex"):
            function = getattr(mv_parser, name, None)
            if hasattr(function, "cache_clear"):
                function.cache_clear()

    # Imports and regex compilation out of the timed passes, as for jaxmath's worker warmup.
    grade_one("1", "1")
    return _run_passes(grade_one, clear, cases, passes)


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="python -m jaxmath.bench grader", description=__doc__)
    parser.add_argument("--cases", type=Path, default=_SHARED_CASES if _SHARED_CASES.exists() else None,
                        help=f"JSONL with gold, pred, expected (default: {_SHARED_CASES})")
    parser.add_argument("--passes", type=int, default=3, help="passes over the cases per grader")
    parser.add_argument("--timeout", type=float, default=1.0, help="jaxmath per-grading bound, seconds")
    parser.add_argument("--no-math-verify", action="store_true", help="skip the math-verify comparison")
    args = parser.parse_args(argv)
    if args.cases is None or not args.cases.exists():
        parser.error(f"--cases: no file at {args.cases}; pass a JSONL with gold, pred, expected")
    cases = _load(args.cases)
    accuracy, first_rate, rate = _jaxmath(cases, args.passes, args.timeout)
    result = {
        "cases": len(cases),
        "passes": args.passes,
        "accuracy": round(accuracy, 4),
        "gradings_per_s": round(rate, 1),
        "first_pass_gradings_per_s": round(first_rate, 1),
    }
    print(f"jaxmath      accuracy {accuracy:.2%}  {rate:8.1f} gradings/s  (first pass {first_rate:.1f})")
    if not args.no_math_verify:
        peer = _math_verify(cases, args.passes)
        if peer is not None:
            mv_accuracy, mv_first, mv_rate = peer
            result.update(
                math_verify_accuracy=round(mv_accuracy, 4),
                math_verify_gradings_per_s=round(mv_rate, 1),
                math_verify_first_pass_gradings_per_s=round(mv_first, 1),
                speedup=round(rate / mv_rate, 2),
            )
            print(f"math-verify  accuracy {mv_accuracy:.2%}  {mv_rate:8.1f} gradings/s  (first pass {mv_first:.1f})")
    return result
