"""The study's binary reward, shared by GRPO training and the demo's evaluation so both judge alike."""

from __future__ import annotations

from typing import Sequence

from jaxmath.reward.extract import extract_answer
from jaxmath.reward.grade import grade_batch


def correctness_rewards(completions: Sequence[str], golds: Sequence[str], *, fallback: str | None = None,
                        workers: int = 0, timeout: float = 1.0) -> tuple[list[float], list[str | None]]:
    """1.0 where an answer can be extracted from the completion (the last `\\boxed{}`, or the named
    fallback) and it is equivalent to the gold answer, else 0.0. An unboxed correct number scores 0,
    as in the study. Returns (rewards, extracted answers)."""
    if len(completions) != len(golds):
        raise ValueError(f"{len(completions)} completions but {len(golds)} gold answers")
    answers = [extract_answer(text, fallback) for text in completions]
    todo = [i for i, a in enumerate(answers) if a is not None]
    verdicts = grade_batch([(answers[i], golds[i]) for i in todo], workers=workers, timeout=timeout)
    rewards = [0.0] * len(completions)
    for i, ok in zip(todo, verdicts):
        rewards[i] = 1.0 if ok else 0.0
    return rewards, answers
