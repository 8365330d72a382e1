"""`python -m jaxmath.bench grader_bound`: the grader's wall-clock bound under load, measured.

Starts two CPU-burning processes beside the grader (on top of whatever the machine runs), then reports the
worst `grade(..., timeout=T)` over hostile and ordinary inputs (the same ones `tests/test_reward_bounds.py`
asserts on), the first calls of a cold process, and one `correctness_rewards` batch holding degenerate
completions. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# The two: an unclosed math environment repeated (quadratic for a backtracking pattern), and an
# unclosed box that takes the rest of a long text. The last one is long but well formed, and correct.
HOSTILE = [
    ("\\[ " * 63000, "42"),
    ("\\boxed{" + "\\( " * 8000, "42"),
    ("\\Gamma(1000001)", "42"),  # sympy works on it for seconds: only the deadline stops it
    ("9^{9^{9^9}}", "5"),
    ("1000000!", "5"),
    ("{" * 2000 + "1" + "}" * 2000, "5"),
    ("\\boxed{" + "{" * 2000 + "x" + "}" * 2000 + "}", "x^2"),
    ("1" * 100_000, "5"),
    ("\\frac{1}{2}+" * 10_000, "5"),
    ("(" * 3000 + "x" + ")" * 3000, "5"),
    ("2^{2^{2^{2^{2^{2}}}}}", "5"),
    ("10^{10^{10}}", "5"),
    ("\\binom{100000}{50000}", "5"),
    ("$" * 50_000 + "1", "5"),
    ("\\sqrt{" * 500 + "2" + "}" * 500, "5"),
    ("\\boxed{" * 100_000, "5"),
    ("answer: " * 20_000 + "$" * 20_000, "5"),
    ("x = " * 30_000, "5"),
    ("The final answer is " * 10_000, "5"),
    ("\\text{" * 30_000 + "m", "5"),
    ("1, 2, " * 50_000, "1"),
    ("a" * 150_000 + "\\boxed{5}", "5"),
]
ORDINARY = [
    ("x^2 + 2*x + 1", "x^2+2x+1"), ("\\frac{x}{7}+\\frac{2}{7}", "\\frac{x+2}{7}"), ("\\sec^2 y", "\\tan^2 y+1"),
    ("\\sum_{k=1}^{4} k", "10"), ("so the answer is \\boxed{\\frac{14}{3}}.", "\\frac{14}{3}"),
    ("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}"), ("(1, 2)", "(2, 1)"),
]
DEGENERATE_COMPLETIONS = ["\\boxed{" + "\\( " * 8000, "\\[ " * 63000, "so \\boxed{4}", "\\boxed{\\frac{8}{2}}"] * 4
BURN = "import time\nend = time.time() + 300\nwhile time.time() < end: pass\n"
COLD = """
import json, sys, time
from jaxmath.reward import grade
timeout = float(sys.argv[1])
durations = []
for pred, gold in [("\\\\sum_{k=1}^{4} k", "10"), ("\\\\[ " * 63000, "42"), ("x^2+2x+1", "(x+1)^2")]:
    start = time.monotonic()
    grade(pred, gold, timeout=timeout)
    durations.append(time.monotonic() - start)
print(json.dumps(durations))
"""


def start_burners(count: int = 2) -> list[subprocess.Popen]:
    burners = [subprocess.Popen([sys.executable, "-c", BURN]) for _ in range(count)]
    time.sleep(0.3)
    return burners


def cold_first_calls(timeout: float) -> list[float]:
    """Durations of the first three `grade` calls of a fresh process (its import not counted)."""
    out = subprocess.run([sys.executable, "-c", COLD, str(timeout)], capture_output=True, text=True, timeout=300,
                         cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="python -m jaxmath.bench grader_bound", description=__doc__)
    parser.add_argument("--timeout", type=float, default=0.5, help="grade's bound, seconds")
    args = parser.parse_args(argv)
    from jaxmath.reward import correctness_rewards, grade, warmup

    warmup()
    burners = start_burners()
    try:
        durations = {}
        for pred, gold in HOSTILE + ORDINARY:
            start = time.monotonic()
            grade(pred, gold, timeout=args.timeout)
            durations[pred[:30]] = time.monotonic() - start
        start = time.monotonic()
        correctness_rewards(DEGENERATE_COMPLETIONS, ["4"] * len(DEGENERATE_COMPLETIONS), timeout=args.timeout)
        rewards_s = time.monotonic() - start
        cold = cold_first_calls(args.timeout)
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    worst = max(durations, key=durations.get)
    result = {"timeout_s": args.timeout, "worst_grade_s": round(durations[worst], 3), "worst_input": worst,
              "correctness_rewards_16_s": round(rewards_s, 3), "cold_first_calls_s": [round(d, 3) for d in cold],
              "load_average": round(os.getloadavg()[0], 1)}
    print(f"worst grade(timeout={args.timeout}) beside two CPU burners: {durations[worst]:.3f} s ({worst!r}); "
          f"cold process first calls {[round(d, 3) for d in cold]} s; load average {result['load_average']}")
    return result
