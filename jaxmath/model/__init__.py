"""The dense Qwen3 family in Flax NNX, its sharding table, LoRA, and HF weights in and out.

    model = jaxmath.model.from_pretrained("/models/Qwen3-4B-Instruct-2507", dtype=jnp.bfloat16)
    logits = model(input_ids)                       # [batch, seq, vocab] float32
"""

from jaxmath.model.config import PRESETS, Qwen3Config, preset
from jaxmath.model.head import token_logprobs
from jaxmath.model.hf_io import from_pretrained, save_pretrained
from jaxmath.model.qwen3 import KVCache, LoRAParam, Qwen3, init_model

__all__ = ["PRESETS", "KVCache", "LoRAParam", "Qwen3", "Qwen3Config", "from_pretrained", "init_model", "preset",
           "save_pretrained", "token_logprobs"]
