"""Reward for math RL: answer extraction and a math-equivalence grader (pure Python, no JAX).

    extract_boxed(text)                     last \\boxed{...} / \\fbox{...}, or None
    extract_answer(text, fallback=None)     boxed, then "gsm8k" or "answer_is" fallbacks if asked
    grade(completion_or_answer, gold)       bool, bounded in time, never evaluates model text
    equivalent(a, b)                        symmetric version, for majority-vote grouping
    grade_batch(pairs, workers=N)           in order, on N worker processes
    correctness_rewards(texts, golds)       the study's binary reward (boxed answer equivalent to gold)

Conventions are listed in `jaxmath.reward.grade`'s docstring and docs/GRADER.md.
"""

from jaxmath.reward.extract import extract_answer, extract_boxed
from jaxmath.reward.grade import equivalent, grade, grade_batch
from jaxmath.reward.pool import shutdown, warmup
from jaxmath.reward.score import correctness_rewards

__all__ = ["extract_boxed", "extract_answer", "grade", "equivalent", "grade_batch", "correctness_rewards", "warmup",
           "shutdown"]
