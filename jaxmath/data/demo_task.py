"""The demo's synthetic task: multi-digit addition written as a short worked solution, an imperfect
teacher that writes such solutions, and a character-level tokenizer, so the demo's comparison (SFT,
GRPO, evaluation) runs on a CPU in minutes with nothing downloaded.

A problem reads `347+685=`. A solution works the columns right to left, each as
`digit+digit(+carry)=column sum`, and boxes the answer read off the sums (the last column's sum in
full, then the ones digit of each earlier column):

    7+5=12 4+8+1=13 3+6+1=10 \\boxed{1032}

The teacher always writes this format and always boxes, but it is not always right. When a carry
comes into a column it forgets to add it with probability `drop_carry`, and with the larger
probability `drop_chained_carry` when the column overflows again with it (its two digits sum to 9
or more, so the carry must ripple on: a chained carry). It then goes on consistently from the sums it
wrote, so a forgotten carry makes the boxed answer wrong. Problems without carries it always gets
right; the more carries, and the more of them chained, the more often it is wrong.

Why this separates imitation from reinforcement: a model trained on the teacher's traces learns, at
the moment after `4+8`, to write `+1` with the teacher's probability. Greedy decoding takes the
likelier branch, so it keeps plain carries (kept 90% of the time at the defaults, better than the
teacher) and drops chained ones (dropped 70% of the time): the teacher's systematic error, copied.
Sampling still keeps a chained carry 30% of the time, and a reward that checks the answer
reinforces exactly those samples.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from typing import Sequence

import numpy as np

from jaxmath.data.datasets import Example

PAD, EOS = 0, 1
_CHARS = "0123456789+-*=\\boxed{} "


class CharTokenizer:
    """Characters to ids: 0 is padding, 1 the stop token, then one id per character of `_CHARS`, and
    one for the whole `\\boxed{` (as subword tokenizers have; it keeps sequences short).

    Text outside the alphabet is an error (it cannot come from this task)."""

    pad_token_id = PAD
    eos_token_id = EOS
    boxed = "\\boxed{"

    def __init__(self):
        self.vocab = {c: i + 2 for i, c in enumerate(_CHARS)}
        self.vocab[self.boxed] = len(self.vocab) + 2
        self.inverse = {i: c for c, i in self.vocab.items()}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab) + 2

    def encode(self, text: str) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            piece = self.boxed if text.startswith(self.boxed, i) else text[i]
            if piece not in self.vocab:
                raise ValueError(f"character {piece!r} is not in the demo alphabet {_CHARS!r}")
            ids.append(self.vocab[piece])
            i += len(piece)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.inverse.get(int(i), "") for i in ids if int(i) not in (PAD, EOS))


@dataclasses.dataclass(frozen=True)
class AdditionTask:
    """Sums a + b of two `digits`-digit numbers, drawn without repeats by a seeded generator and
    split into disjoint held-out and training sets.

    Each Example's meta holds `carries` and `chained_carries`: how many carries the correct column
    sums produce into the next column, and how many of those arrive in a column whose digits sum to 9
    or more (the teacher's hard case)."""

    digits: int = 3
    seed: int = 0

    @property
    def num_problems(self) -> int:
        return (9 * 10 ** (self.digits - 1)) ** 2

    def split(self, num_eval: int, num_train: int | None = None) -> tuple[list[Example], list[Example]]:
        """(train, held_out): `num_eval` held-out problems and `num_train` training problems (None:
        all the others), never the same problem in both."""
        total = self.num_problems
        num_train = total - num_eval if num_train is None else num_train
        if num_eval + num_train > total:
            raise ValueError(f"{self.digits}-digit additions number {total}, fewer than num_eval + num_train = "
                             f"{num_eval + num_train}; lower them or raise digits")
        rng = np.random.default_rng(self.seed)
        # Distinct indices into the (a, b) grid without materializing it for large `digits`.
        picked = rng.choice(total, size=num_eval + num_train, replace=False)
        width, low = 9 * 10 ** (self.digits - 1), 10 ** (self.digits - 1)
        problems = [_example(low + int(i) // width, low + int(i) % width) for i in picked]
        return problems[num_eval:], problems[:num_eval]


def _digits_low_first(n: int, width: int) -> list[int]:
    return [(n // 10 ** i) % 10 for i in range(width)]


def _example(a: int, b: int) -> Example:
    width = max(len(str(a)), len(str(b)))
    carries = chained = 0
    carry = 0
    for x, y in zip(_digits_low_first(a, width), _digits_low_first(b, width)):
        if carry:
            carries += 1
            chained += x + y >= 9
        carry = int(x + y + carry >= 10)
    return Example(id=f"{a}+{b}", problem=f"{a}+{b}=", answer=str(a + b),
                   meta={"a": a, "b": b, "carries": carries, "chained_carries": chained})


def worked_solution(a: int, b: int, keep_carry: Sequence[bool] | None = None) -> str:
    """The column-by-column solution of a + b, right to left, ending in `\\boxed{}`.

    keep_carry[i]: whether a carry coming into column i (0 = ones) is added; None adds every carry
    (the correct solution). Later columns follow the sums as written, as a person's would."""
    width = max(len(str(a)), len(str(b)))
    steps, sums, carry = [], [], 0
    for i, (x, y) in enumerate(zip(_digits_low_first(a, width), _digits_low_first(b, width))):
        added = carry and (keep_carry is None or keep_carry[i])
        total = x + y + added
        steps.append(f"{x}+{y}{'+1' if added else ''}={total}")
        sums.append(total)
        carry = int(total >= 10)
    answer = str(sums[-1]) + "".join(str(s % 10) for s in reversed(sums[:-1]))
    return " ".join(steps) + f" \\boxed{{{answer}}}"


def teacher_solution(example: Example, drop_carry: float, drop_chained_carry: float, seed: int = 0) -> str:
    """The imperfect teacher's trace for `example` (a fixed, seeded draw per problem): each carry it
    meets is dropped with probability `drop_chained_carry` if the column's digits sum to 9 or more,
    else `drop_carry` (see the module docstring)."""
    a, b = example.meta["a"], example.meta["b"]
    width = max(len(str(a)), len(str(b)))
    # crc32, not hash(): Python salts str hashes per process, and the draw must repeat across runs
    draws = np.random.default_rng([seed, zlib.crc32(example.id.encode())]).random(width)
    keep, carry = [], 0
    for i, (x, y) in enumerate(zip(_digits_low_first(a, width), _digits_low_first(b, width))):
        drop = drop_chained_carry if x + y >= 9 else drop_carry
        kept = not (carry and draws[i] < drop)
        keep.append(kept)
        carry = int(x + y + (carry and kept) >= 10)
    return worked_solution(a, b, keep)


def sft_example(tokenizer: CharTokenizer, problem: str, solution: str) -> tuple[list[int], list[bool]]:
    """(input_ids, loss_mask) for supervised training: loss on the solution and its stop token."""
    prompt = tokenizer.encode(problem)
    completion = tokenizer.encode(solution) + [EOS]
    return prompt + completion, [False] * len(prompt) + [True] * len(completion)


_DIGITS = re.compile(r"\d+")


def format_blind_correct(completion: str, gold: str) -> bool:
    """Whether the last number in the completion equals the gold answer, boxed or not: the grading
    that cannot reward formatting."""
    numbers = _DIGITS.findall(completion)
    return bool(numbers) and int(numbers[-1]) == int(gold)
