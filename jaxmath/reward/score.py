"""The study's binary reward, shared by GRPO training and the demo's evaluation so both judge alike."""

from __future__ import annotations

from typing import Sequence

from jaxmath.reward.grade import grade_completions
from jaxmath.reward.pool import warmup


def correctness_rewards(completions: Sequence[str], golds: Sequence[str], *, fallback: str | None = None,
                        workers: int = 0, timeout: float = 1.0) -> tuple[list[float], list[str | None]]:
    """1.0 where an answer can be extracted from the completion (the last `\\boxed{}`, or the named
    fallback) and it is equivalent to the gold answer, else 0.0. An unboxed correct number scores 0,
    as in the study. Returns (rewards, extracted answers).

    Each completion costs at most `timeout` seconds however degenerate it is (extraction is linear with
    length caps, see `jaxmath.reward.extract`). The first call starts the symbolic worker(s) in the
    background, so later steps find them ready.
    """
    warmup(max(1, workers), wait=False)
    graded = grade_completions(completions, golds, fallback=fallback, workers=workers, timeout=timeout)
    return [1.0 if item.correct else 0.0 for item in graded], [item.answer for item in graded]
