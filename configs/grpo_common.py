"""The study's GRPO settings shared by configs/grpo_v1.py, grpo_v2.py, grpo_v3.py, local_full.py,
local_lora.py and sft_then_rl.py, on top of jaxmath's defaults (`jaxmath.config.defaults("grpo")`,
the dataclasses' own: `GRPOConfig`, `LossConfig`, `OptimizerConfig`, `LoRAConfig`, ...). Not a
config to run: each of those files is one row of the study's Table 3 and states what differs.

The defaults follow the study where it speaks (LoRA rank 64 on all seven projections, K=8,
2,048 completion tokens, TRL's GRPO loss). Assumptions where the study is silent, stated here so
nobody mistakes them for the study's:
- prompts per step: 8 (`rl.prompts_per_step`), derived from the local full-parameter run (998 steps
  for 2 epochs of 3,994 problems); used for every row so step counts compare;
- clip epsilon 0.2 on both sides (TRL's default), advantage std is TRL's sample std, eps 1e-4;
- LoRA alpha 128 for rank 64 (scale 2); AdamW betas (0.9, 0.999), no weight decay, grad clip 1.0,
  constant learning rate (Tinker's default);
- sampling temperature 1.0 for training rollouts, no top-p / top-k;
- training prompts are zero-shot (the few-shot prefix is an evaluation convention in the study).

What every row sets on top: 16 rows per train micro-batch, vLLM's context at 8,192 tokens, and the
periodic evaluation (`rl.eval_every`) on MATH-500.
"""

import ml_collections

from jaxmath.config import defaults


def study_row(name: str, *, learning_rate: float) -> ml_collections.ConfigDict:
    """A row's config before its own settings: runs/<name>, the row's learning rate, the shared settings."""
    c = defaults("grpo")
    c.workdir = f"runs/{name}"
    c.optimizer.learning_rate = learning_rate
    c.loss.micro_batch_rows = 16
    c.vllm.max_model_len = 8192
    c.eval.benchmarks = "math500"
    return c
