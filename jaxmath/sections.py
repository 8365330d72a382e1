"""A mode's config sections as the typed dataclasses the library takes.

Each builder turns sections of the ConfigDict into the frozen dataclasses of `jaxmath.config.MODES`,
filling the few fields that come from another setting itself (`eval.data_dir` from `data.dir`, the
optimizer's total_steps from `steps`, vLLM's model path and dtype from the model section). The run
(`jaxmath.runs`), the checks before it (`jaxmath.validate`) and the plans (`jaxmath.aot.run`) build
through these, so all three see the same dataclasses.
"""

from __future__ import annotations


def eval_config(cfg, **derived):
    """EvalConfig from the eval section; data_dir comes from data.dir. In a GRPO run the periodic
    evaluation runs on the rollout engine (backend = rollout.engine), without a progress bar."""
    from jaxmath.config import build
    from jaxmath.eval.run import EvalConfig

    if cfg.get("mode") == "grpo":
        derived = {"backend": cfg.rollout.engine, "progress": False, **derived}

    return build(EvalConfig, cfg.eval, prefix="eval", data_dir=cfg.data.dir, **derived)


def vllm_config(cfg, lora_cfg=None, plan=None, fit=True, model_path=None):
    """VLLMConfig from the vllm section; vLLM loads model.path in model.dtype (unless vllm.dtype says
    otherwise), and takes LoRA syncs when lora.rank > 0. Its max_model_len is fitted to the run's
    longest request (`longest_request`), or refused up front when the model's max_position_embeddings
    cannot hold it (fit=False leaves it as set). model_path: instead of model.path. plan: the run's device plan (`jaxmath.aot.colocate.DevicePlan`), whose memory
    settings vLLM takes."""
    from jaxmath.config import build
    from jaxmath.rollout.vllm import VLLMConfig
    from jaxmath.rollout.vllm.config import fit_context

    section = dict(cfg.get("vllm", {}))
    # A colocated vLLM takes a LoRA run's weights merged, in memory (no adapter files, no LoRA kernels
    # while decoding); a server, or a file sync, takes the adapters through vLLM's LoRA support.
    in_memory = section.get("mode", "colocated") == "colocated" and section.get("sync_method", "auto") != "file"
    # An adapted LM head (lora.train_unembed) always goes merged: vLLM's LoRA layers take none.
    lora = {} if lora_cfg is None else dict(enable_lora=lora_cfg.enabled and not in_memory
                                            and not lora_cfg.train_unembed,
                                            max_lora_rank=max(lora_cfg.rank, 1))
    section["dtype"] = vllm_dtype(cfg)
    if plan is not None:
        section["gpu_memory_utilization"] = plan.gpu_memory_utilization
        lora.update(kv_cache_memory_bytes=plan.kv_cache_bytes, max_num_seqs=plan.max_num_seqs)
    config = build(VLLMConfig, section, prefix="vllm", model_path=cfg.model.path if model_path is None else model_path,
                   **lora)
    return fit_context(config, *longest_request(cfg)) if fit else config


def vllm_dtype(cfg) -> str:
    """The dtype vLLM computes in: vllm.dtype, or model.dtype when that is "auto" (VLLMConfig.dtype says
    why the trainer's)."""
    dtype = cfg.get("vllm", {}).get("dtype", "auto")
    return cfg.model.get("dtype", "auto") if dtype == "auto" else dtype


def longest_request(cfg) -> tuple[int, str]:
    """(tokens, how they add up) of the longest request a run gives its rollout engine: the prompt
    bucket plus the completion budget, of the GRPO rollouts and of the evaluation, whichever is longer."""
    requests = []
    if "rl" in cfg:
        requests.append((cfg.rl.max_prompt_tokens + cfg.rl.max_completion_tokens,
                         f"rl.max_prompt_tokens + rl.max_completion_tokens = {cfg.rl.max_prompt_tokens} + "
                         f"{cfg.rl.max_completion_tokens}"))
    if "eval" in cfg and ("rl" not in cfg or cfg.rl.eval_every):
        requests.append((cfg.eval.max_prompt_tokens + cfg.eval.max_new_tokens,
                         f"eval.max_prompt_tokens + eval.max_new_tokens = {cfg.eval.max_prompt_tokens} + "
                         f"{cfg.eval.max_new_tokens}"))
    return max(requests)


def sft_config(cfg):
    """SFTConfig from the top-level seed / steps / checkpoint_every and the sft, lora and optimizer
    sections (optimizer.total_steps 0: the run's step count, known once the data is planned)."""
    from jaxmath.config import build
    from jaxmath.model.lora import LoRAConfig
    from jaxmath.optim import OptimizerConfig
    from jaxmath.sft import SFTConfig

    defaults = SFTConfig()  # its lora and optimizer are SFT's own defaults for those sections
    lora = build(LoRAConfig, cfg.lora, prefix="lora", base=defaults.lora)
    optimizer = build(OptimizerConfig, cfg.optimizer, prefix="optimizer", base=defaults.optimizer)
    return build(SFTConfig, cfg.sft, prefix="sft", seed=cfg.seed, steps=cfg.steps,
                 checkpoint_every=cfg.checkpoint_every, lora=lora, optimizer=optimizer)


def distill_config(cfg):
    from jaxmath.config import build
    from jaxmath.distill import DistillConfig

    return build(DistillConfig, cfg.distill, prefix="distill", data_dir=cfg.data.dir)


def grpo_configs(cfg):
    """(GRPOConfig, LossConfig, OptimizerConfig) from the top-level seed / steps / checkpoint_every and
    the rl, loss and optimizer sections; the optimizer's total_steps 0 becomes the run's steps."""
    from jaxmath.config import ConfigError, build
    from jaxmath.optim import OptimizerConfig
    from jaxmath.rl.loop import GRPOConfig
    from jaxmath.rl.step import LossConfig
    from jaxmath.train_state import resolve_total_steps

    grpo_cfg = build(GRPOConfig, cfg.rl, prefix="rl", steps=cfg.steps, seed=cfg.seed,
                     checkpoint_every=cfg.checkpoint_every)
    loss_cfg = build(LossConfig, cfg.get("loss", {}), prefix="loss")
    try:  # checked here, before any weights load
        optim_cfg = resolve_total_steps(build(OptimizerConfig, cfg.optimizer, prefix="optimizer"), grpo_cfg.steps)
    except ValueError as e:
        raise ConfigError(f"optimizer: {e}") from e
    return grpo_cfg, loss_cfg, optim_cfg
