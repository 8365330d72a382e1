"""Reward for math RL: answer extraction and a math-equivalence grader (pure Python, no JAX).

    grade_completion(text, gold)            Graded(correct, answer): THE verdict on one completion, the
                                            answer it read; training, evaluation and distillation use it
    grade_completions(texts, golds)         the same over a batch (optionally on worker processes)
    correctness_rewards(texts, golds)       the study's binary reward, built on grade_completions
    extract_boxed(text)                     last \\boxed{...} / \\fbox{...}, or None
    extract_answer(text, fallback=None)     boxed, then "gsm8k" or "answer_is" fallbacks if asked
    grade(completion_or_answer, gold)       bool, within `timeout` seconds, never evaluates model text
    equivalent(a, b)                        symmetric version, for majority-vote grouping
    grade_batch(pairs, workers=N)           in order, on N worker processes
    warmup(count), shutdown()               start / stop the symbolic workers ahead of need

Conventions are listed in `jaxmath.reward.grade`'s docstring and docs/GRADER.md.
"""

from jaxmath.reward.extract import extract_answer, extract_boxed
from jaxmath.reward.grade import Graded, equivalent, grade, grade_batch, grade_completion, grade_completions
from jaxmath.reward.pool import shutdown, warmup
from jaxmath.reward.score import correctness_rewards

__all__ = ["Graded", "extract_boxed", "extract_answer", "grade", "equivalent", "grade_batch", "grade_completion",
           "grade_completions", "correctness_rewards", "warmup", "shutdown"]
