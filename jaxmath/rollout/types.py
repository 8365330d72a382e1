"""The records rollout engines exchange with the trainer and the evaluator.

Rows are grouped by prompt: row `i * num_samples + j` is sample `j` of prompt `i`, so a GRPO group
is a contiguous block of `num_samples` rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

FINISH_STOP = 0  # a stop token was sampled (it is part of the completion and of its mask)
FINISH_LENGTH = 1  # max_new_tokens reached without a stop token


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample. Training rollouts keep top_p=1 and top_k=0 so logprobs stay unbiased.

    temperature == 0 means greedy (argmax); its logprobs are those of the untempered softmax.
    """

    max_new_tokens: int
    num_samples: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")


@dataclasses.dataclass
class Rollout:
    """Completions for a batch of prompts, `num_samples` rows per prompt.

    prompt_ids:      list of num_prompts int lists (unpadded)
    completion_ids:  [rows, max_new_tokens] int32, right-padded with 0 after the finish
    logprobs:        [rows, max_new_tokens] float32, logprob of each sampled token under the sampling
                     distribution actually used (temperature applied), 0 on padding
    completion_mask: [rows, max_new_tokens] bool, True on generated tokens (stop token included)
    finish_reason:   [rows] int8, FINISH_STOP or FINISH_LENGTH
    prompt_index:    [rows] int32, which prompt each row belongs to
    """

    prompt_ids: list[list[int]]
    completion_ids: np.ndarray
    logprobs: np.ndarray
    completion_mask: np.ndarray
    finish_reason: np.ndarray
    prompt_index: np.ndarray

    @property
    def num_rows(self) -> int:
        return int(self.completion_ids.shape[0])

    @property
    def completion_lengths(self) -> np.ndarray:
        """[rows] int32 number of generated tokens per row."""
        return self.completion_mask.sum(axis=1).astype(np.int32)

    def completion_token_lists(self) -> list[list[int]]:
        """Each row's generated tokens as a python list (for detokenization)."""
        return [row[: n].tolist() for row, n in zip(self.completion_ids, self.completion_lengths)]


class RolloutEngine:
    """Everything the GRPO loop and the evaluator call on an engine. Engines inherit from it and
    override what they do; the rest are no-ops.

    generate:       sample `params.num_samples` completions for each prompt (token ids)
    update_weights: generate with `model`'s current weights from now on; returns metrics of the sync
                    (e.g. {"sync/seconds": ...}), {} when there is nothing to report
    sleep, wake_up: free the engine's device memory for the train phase and take it back; True if
                    the engine did (a colocated vLLM with sleep mode), False if it has nothing to free
    """

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> Rollout:
        raise NotImplementedError(f"{type(self).__name__} must implement generate")

    def update_weights(self, model: Any) -> dict[str, float]:
        return {}

    def sleep(self) -> bool:
        return False

    def wake_up(self) -> bool:
        return False
