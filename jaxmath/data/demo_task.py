"""The demo's synthetic task: seeded arithmetic problems with `\\boxed{}` answers, and a built-in
character-level tokenizer, so the whole pipeline (SFT warm-up, GRPO, evaluation) runs on a CPU in
minutes with nothing downloaded.

A problem reads `12+5=` and its answer is `17`. The reward, as in the real runs, is 1 only for a
correct answer inside `\\boxed{}`. The warm-up "teacher" is deliberately flawed the way real teacher
traces are: it writes `\\boxed{17}` only for a `boxed_fraction` of problems and a bare ` 17` for the
rest (the leading space makes "box or not" one decision at the first token, as a habit would be). SFT imitates the teacher, flaw included, so its greedy answers are mostly unboxed and score 0;
GRPO optimizes the verifiable reward itself and learns to box. That is the study's finding in
miniature: imitation inherits the teacher's habits, RL with a checkable reward does not.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Sequence

import numpy as np

from jaxmath.data.datasets import Example

PAD, EOS = 0, 1
_CHARS = "0123456789+-*=\\boxed{} "


class CharTokenizer:
    """Characters to ids: 0 is padding, 1 the stop token, then one id per character of `_CHARS`.

    Text outside the alphabet is an error (it cannot come from this task)."""

    pad_token_id = PAD
    eos_token_id = EOS

    def __init__(self):
        self.vocab = {c: i + 2 for i, c in enumerate(_CHARS)}
        self.inverse = {i: c for c, i in self.vocab.items()}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab) + 2

    def encode(self, text: str) -> list[int]:
        try:
            return [self.vocab[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e} is not in the demo alphabet {_CHARS!r}") from e

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.inverse.get(int(i), "") for i in ids if int(i) not in (PAD, EOS))


@dataclasses.dataclass(frozen=True)
class ArithmeticTask:
    """Additions a + b with `digits`-digit a and `second_digits`-digit b (and subtractions with a
    non-negative result when `with_subtraction`), split into disjoint train and held-out sets by a
    seeded permutation."""

    digits: int = 2
    second_digits: int = 1
    with_subtraction: bool = False
    seed: int = 0

    def all_problems(self) -> list[Example]:
        out = []
        for a in range(10 ** self.digits):
            for b in range(10 ** self.second_digits):
                out.append(Example(id=f"{a}+{b}", problem=f"{a}+{b}=", answer=str(a + b), meta={}))
                if self.with_subtraction and a >= b:
                    out.append(Example(id=f"{a}-{b}", problem=f"{a}-{b}=", answer=str(a - b), meta={}))
        return out

    def split(self, num_eval: int) -> tuple[list[Example], list[Example]]:
        """(train, held_out): held-out problems never appear in training."""
        problems = self.all_problems()
        order = np.random.default_rng(self.seed).permutation(len(problems))
        held = [problems[i] for i in order[:num_eval]]
        train = [problems[i] for i in order[num_eval:]]
        return train, held


def completion_text(answer: str) -> str:
    return f"\\boxed{{{answer}}}"


def teacher_boxes(example: Example, boxed_fraction: float, seed: int = 0) -> bool:
    """Whether the flawed teacher boxes this problem's answer (a fixed, seeded choice per problem)."""
    # crc32, not hash(): Python salts str hashes per process, and the choice must repeat across runs
    return np.random.default_rng([seed, zlib.crc32(example.id.encode())]).random() < boxed_fraction


def sft_example(tokenizer: CharTokenizer, example: Example, boxed: bool = True) -> tuple[list[int], list[bool]]:
    """(input_ids, loss_mask) for supervised warm-up: loss on the completion and its stop token.
    `boxed=False` writes the teacher's bare answer (` 17`) instead of `\\boxed{17}`."""
    prompt = tokenizer.encode(example.problem)
    completion = tokenizer.encode(completion_text(example.answer) if boxed else " " + example.answer) + [EOS]
    return prompt + completion, [False] * len(prompt) + [True] * len(completion)
