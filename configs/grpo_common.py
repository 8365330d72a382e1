"""The study's GRPO settings shared by configs/grpo_v1.py, grpo_v2.py, grpo_v3.py, local_full.py,
local_lora.py and sft_then_rl.py, on top of jaxmath's defaults (`jaxmath.config.defaults("grpo")`,
the dataclasses' own: `GRPOConfig`, `LossConfig`, `OptimizerConfig`, `LoRAConfig`, ...). Not a
config to run: each of those files is one row of the study's Table 3 and states what differs.

The study ran its rows on two frameworks and names neither's optimizer or loss settings, so each row
takes them from the framework it ran on (`FRAMEWORK`), and `SETTINGS` says where each value comes from.

Tinker rows (grpo_v1, grpo_v2, grpo_v3, sft_then_rl): Adam as Tinker's `tinker.types.AdamParams`
defaults it (src/tinker/types/optimizer.py in thinking-machines-lab/tinker, tinker 0.30.4, commit
1e5777e; the same in its API reference, tinker-docs.thinkingmachines.ai/tinker/api-reference/types/
adamparams): beta1 0.9, beta2 0.95, eps 1e-12, weight decay 0.0, grad_clip_norm 0.0 ("0.0 means no
clipping"). The learning rate is passed with every `optim_step`, so it is constant unless the caller
schedules it; the study names no schedule, so constant.
LoRA as Tinker's `create_lora_training_client(base_model, rank)` builds it (`tinker.types.LoraConfig`,
src/tinker/types/lora_config.py in the same repository): train_attn, train_mlp and train_unembed all
default True, so the seven projections AND the LM head (the unembedding) carry adapters
(`lora.train_unembed`). Tinker takes no alpha. Its value is not in the SDK or the cookbook; the
"LoRA Without Regret" post (thinkingmachines.ai/blog/lora, 2025) says their LoRA uses alpha 32, and
tinker-cookbook issue #280 ("What is the default lora_alpha used?", open, 2026-01) got only that
answer from a user, so alpha 32 (scale 32 / 64 = 0.5 at rank 64) is the best-sourced value, not a
confirmed one. The loss is the study's Eq. 3 (`loss.loss_agg = "seq_sum"`): the importance ratio of
whole sequences pi(y|x) / pi_old(y|x), summed over a prompt's K samples, averaged over prompts. One
update per batch (on-policy) makes that ratio 1, and its gradient sum_i A_i sum_t grad log pi(y_it)
is what per-token ratios summed over each sequence's tokens give: token sums, as Tinker's losses are
(docs/losses.mdx in tinker-docs), with no division by the sequence length. "seq_sum" averages over
the K x prompts sequences, Eq. 3 divided by the constant K, which Adam's update does not see. The
advantages are Eq. 2's, std-normalized (the cookbook only centres them). No engine/trainer
correction (Tinker samples and trains on its own service; jaxmath's engines differ: docs/STUDY.md).

TRL rows (local_full, local_lora; TRL + vLLM colocate on one H100): TRL 0.24 (October 2025), a
version with the vLLM colocate mode and sleep mode the study describes, before the sequence-level
importance-sampling modes of TRL PR #4530 (merged 2025-11-25). Its GRPOConfig defaults: loss_type
"dapo" (token losses summed and divided by the active tokens of the whole accumulated batch:
`loss.loss_agg = "token_mean"`), vllm_importance_sampling_correction True with
vllm_importance_sampling_cap 2.0 (token-level truncated importance sampling, pi_trainer / pi_vllm
capped at 2: `loss.tis_cap = 2.0`), epsilon 0.2, beta 0.0; transformers' TrainingArguments
defaults: lr_scheduler_type "linear" with no warmup (lr to 0 over the run: `optimizer.schedule =
"linear"`), AdamW (torch) betas (0.9, 0.999), eps 1e-8, weight decay 0.0, max_grad_norm 1.0.

Assumptions where the study and both frameworks are silent (or where jaxmath chose), stated here so
nobody mistakes them for the study's:
- prompts per step: 8 (`rl.prompts_per_step`), derived from the local full-parameter run (998 steps
  for 2 epochs of 3,994 problems); used for every row so step counts compare;
- advantage std is the sample std, eps 1e-4;
- LoRA alpha 128 for rank 64 (scale 2) on the TRL row local_lora (PEFT's LoraConfig as TRL takes it;
  the study names neither alpha nor targets there), on the seven projections;
- sampling temperature 1.0 for training rollouts, no top-p / top-k;
- training prompts are zero-shot (the few-shot prefix is an evaluation convention in the study).

What every row sets on top: rollouts and the periodic evaluation on vLLM colocated with the JAX trainer
(the design card's path: `rollout.engine = "vllm"`; `--config.rollout.engine=jax` runs them on the
in-process JAX sampler instead, with nothing more to install), the device split between the two by
`jaxmath.aot.colocate`, the rows per train micro-batch chosen by the plan for the device before weights
load (`loss.micro_batch_rows = 0`, `jaxmath.aot.fit`; on an H100 beside the sleeping vLLM: 32 rows for
grpo_v2 at its 4,096 completion tokens, 1 at 131,072, 8 for local_full at 2,048, 1 at 32,768;
docs/BENCHMARKS.md, "Long completions"; results do not depend on them), and the periodic evaluation on
MATH-500.
"""

import dataclasses

import ml_collections

from jaxmath.config import defaults
from jaxmath.model.lora import LoRAConfig
from jaxmath.optim import OptimizerConfig
from jaxmath.rl.step import LossConfig

TINKER = "Tinker AdamParams default (tinker 0.30.4, src/tinker/types/optimizer.py)"
TINKER_LORA = "Tinker LoraConfig default (src/tinker/types/lora_config.py)"
TINKER_ALPHA = ("Tinker takes no alpha; 32 per the LoRA Without Regret post, unconfirmed "
                "(tinker-cookbook issue #280 open)")
EQ3 = "the study's Eq. 3: sequence ratio, summed over K, mean over prompts (token sums; / K)"
TINKER_LR = "Tinker: the learning rate is given per optim_step; the study names no schedule"
TRL = "TRL 0.24 GRPOConfig default"
HF = "transformers TrainingArguments default (TRL 0.24's trainer)"
STUDY = "the study (Eq. 3, beta = 0)"
ASSUMED = "assumption: the study is silent, jaxmath's default"

# Which framework ran each row of Table 3 (study section 3.2 and Table 3's Framework column).
FRAMEWORK = {"grpo_v1": "tinker", "grpo_v2": "tinker", "grpo_v3": "tinker", "sft_then_rl": "tinker",
             "local_full": "trl", "local_lora": "trl"}

# Per framework: {config key: (value, where it comes from)}. Every key here is what the row runs
# with (tests/test_configs.py checks the built dataclasses); `study_row` assigns the values that
# differ from jaxmath's defaults.
SETTINGS = {
    "tinker": {
        "optimizer.b1": (0.9, TINKER),
        "optimizer.b2": (0.95, TINKER),
        "optimizer.eps": (1e-12, TINKER),
        "optimizer.weight_decay": (0.0, TINKER),
        "optimizer.max_grad_norm": (0.0, TINKER + ": grad_clip_norm 0.0, no clipping"),
        "optimizer.schedule": ("constant", TINKER_LR),
        "loss.beta": (0.0, STUDY),
        "loss.eps_low": (0.2, ASSUMED + " (TRL's epsilon)"),
        "loss.eps_high": (0.2, ASSUMED),
        "loss.loss_agg": ("seq_sum", EQ3),
        "loss.tis_cap": (0.0, ASSUMED + " (no engine/trainer correction)"),
        "lora.alpha": (32.0, TINKER_ALPHA),
        "lora.targets": (LoRAConfig.targets, TINKER_LORA + ": train_attn and train_mlp True"),
        "lora.train_unembed": (True, TINKER_LORA + ": train_unembed True"),
    },
    "trl": {
        "optimizer.b1": (0.9, HF),
        "optimizer.b2": (0.999, HF),
        "optimizer.eps": (1e-8, HF),
        "optimizer.weight_decay": (0.0, HF),
        "optimizer.max_grad_norm": (1.0, HF),
        "optimizer.schedule": ("linear", HF + ": lr_scheduler_type linear, warmup 0"),
        "optimizer.end_lr_ratio": (0.0, HF + ": linear decay to 0"),
        "loss.beta": (0.0, STUDY + "; also " + TRL),
        "loss.eps_low": (0.2, TRL + ": epsilon 0.2"),
        "loss.eps_high": (0.2, TRL + ": epsilon_high = epsilon"),
        "loss.loss_agg": ("token_mean", TRL + ": loss_type 'dapo'"),
        "loss.is_level": ("token", TRL + ": token-level truncation (the only mode before PR #4530)"),
        "loss.tis_cap": (2.0, TRL + ": vllm_importance_sampling_correction True, cap 2.0"),
    },
}


def study_row(name: str, *, learning_rate: float) -> ml_collections.ConfigDict:
    """A row's config before its own settings: runs/<name>, the row's learning rate, its framework's
    optimizer and loss settings (`SETTINGS[FRAMEWORK[name]]`), the shared settings."""
    c = defaults("grpo")
    c.workdir = f"runs/{name}"
    c.optimizer.learning_rate = learning_rate
    for key, (value, _) in SETTINGS[FRAMEWORK[name]].items():
        section, field = key.split(".")
        if _dataclass_default(section, field) != value:  # the defaults already hold the rest
            c[section][field] = value
    c.rollout.engine = "vllm"
    c.eval.benchmarks = "math500"
    return c


def _dataclass_default(section: str, field: str):
    """The default of `field` in the dataclass behind config section `section` (loss, optimizer, lora)."""
    cls = {"loss": LossConfig, "optimizer": OptimizerConfig, "lora": LoRAConfig}[section]
    return next(f.default for f in dataclasses.fields(cls) if f.name == field)
