"""Chat documents for supervised training: a conversation tokenized by the model's own template, with
the loss mask on the assistant turns only.

The assistant tokens are the content of each assistant turn *and its closing `<|im_end|>`* (the
model must learn to stop), but not the newline the template writes after it (never generated), not
the `<|im_start|>assistant\\n` header and not the empty `<think>\\n\\n</think>\\n\\n` block that the
prompt already contains at inference (`enable_thinking=False`). This is what TRL's
`assistant_only_loss` gives with Qwen's `{% generation %}` templates. The template is rendered by
`jaxmath.data.prompts.render_chat`, the same function that renders evaluation and GRPO prompts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from jaxmath.data.prompts import encode_text, render_chat


@dataclasses.dataclass(frozen=True)
class TokenizedExample:
    """One training document. input_ids: [n] token ids; loss_mask: [n] bool, True where the token is
    predicted by the loss (the token itself, not the position before it)."""

    input_ids: list[int]
    loss_mask: list[bool]

    def __post_init__(self):
        if len(self.input_ids) != len(self.loss_mask):
            raise ValueError(f"input_ids ({len(self.input_ids)}) and loss_mask ({len(self.loss_mask)}) "
                             "must have the same length")


def tokenize_chat(tokenizer: Any, messages: Sequence[dict[str, str]], *, enable_thinking: bool = False,
                  end_token: str = "<|im_end|>") -> TokenizedExample:
    """Token ids of `messages` rendered by the tokenizer's chat template, with the loss mask on the
    assistant turns only.

    For each assistant turn i, the conversation before it is rendered with the generation prompt
    (what the model sees at inference) and its tokens must be a prefix of the full conversation's
    tokens; the turn's loss tokens run from there through the first `end_token`, inclusive. The Qwen3
    hybrid template writes an empty think block into the last assistant turn, which the
    `enable_thinking=False` generation prompt also contains, so it stays out of the loss; earlier
    turns (few-shot) carry no think block and match the plain generation prompt instead.

    Raises ValueError when the template renders an assistant turn in a way no generation prompt is a
    prefix of (e.g. a template that rewrites earlier turns); pass pre-tokenized TokenizedExamples then.
    """
    end_id = tokenizer.convert_tokens_to_ids(end_token)
    if not isinstance(end_id, int) or end_id == tokenizer.unk_token_id:
        raise ValueError(f"end_token {end_token!r} is not a token of this tokenizer; pass the id that closes "
                         "an assistant turn in its chat template")
    ids = encode_text(tokenizer, render_chat(tokenizer, messages, generation_prompt=False,
                                             enable_thinking=enable_thinking))
    mask = [False] * len(ids)
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant_turns:
        raise ValueError("the conversation has no assistant turn, so there is nothing to train on")
    for i in assistant_turns:
        start = None
        # Longest candidate first: the prompt with the empty think block, then the plain header.
        for thinking in dict.fromkeys((enable_thinking, True)):
            prefix = encode_text(tokenizer, render_chat(tokenizer, messages[:i], generation_prompt=True,
                                                        enable_thinking=thinking))
            if ids[:len(prefix)] == prefix:
                start = len(prefix)
                break
        if start is None:
            raise ValueError(f"the chat template's prompt for assistant turn {i} is not a token prefix of the "
                             "rendered conversation, so the assistant tokens cannot be located; tokenize this "
                             "example yourself into a TokenizedExample")
        try:
            end = ids.index(end_id, start) + 1
        except ValueError:
            raise ValueError(f"assistant turn {i} is not closed by {end_token!r} in the rendered conversation; "
                             "pass the template's end-of-turn token as end_token") from None
        mask[start:end] = [True] * (end - start)
    return TokenizedExample(ids, mask)
