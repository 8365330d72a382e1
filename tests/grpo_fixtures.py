"""A tiny in-memory Qwen3 (with LoRA adapters that carry gradients) and a random GRPO rollout for it,
shared by the tests of the jitted GRPO step (tests/test_grpo_step.py, tests/test_long_completions.py).

No files: the model is `jaxmath.model.preset("tiny")` at a small vocabulary, float32, random weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jaxmath.model as jm
from jaxmath.model import lora
from jaxmath.rollout.types import Rollout


def tiny_model(*, vocab: int, seed: int, remat: str = "full", with_lora: bool = True) -> jm.Qwen3:
    """The tiny preset at `vocab` tokens, float32; with LoRA rank 4 whose B matrices are non-zero, so
    the A matrices get gradients too (fresh adapters have B = 0)."""
    model = jm.init_model(jm.preset("tiny", vocab_size=vocab, dtype=jnp.float32, param_dtype=jnp.float32,
                                    remat=remat), seed=seed)
    if with_lora:
        lora.apply_lora(model, lora.LoRAConfig(rank=4, alpha=8), seed=1)
        for i, (_, dense) in enumerate(lora.projections(model)):
            dense.lora_b.set_value(0.02 * jax.random.normal(jax.random.key(i), dense.lora_b.get_value().shape))
    return model


def random_rollout(*, vocab: int, rows: int, group: int, prompt_lens: tuple[int, ...], completion_len: int,
                   seed: int = 0) -> Rollout:
    """`rows` completions of random lengths 1..completion_len (ids 2..vocab-1, engine logprobs in
    (-3, 0]) for len(prompt_lens) random prompts, `group` rows per prompt in order."""
    rng = np.random.RandomState(seed)
    prompts = [list(rng.randint(2, vocab, n)) for n in prompt_lens]
    lengths = rng.randint(1, completion_len + 1, rows)
    mask = np.arange(completion_len)[None] < lengths[:, None]
    return Rollout(prompt_ids=prompts, completion_ids=np.where(mask, rng.randint(2, vocab, (rows, completion_len)), 0),
                   logprobs=np.where(mask, -rng.rand(rows, completion_len) * 3, 0).astype(np.float32),
                   completion_mask=mask, finish_reason=np.zeros(rows, np.int8),
                   prompt_index=np.repeat(np.arange(len(prompts)), group).astype(np.int32))
