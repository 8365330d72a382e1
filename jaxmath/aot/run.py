"""A run's plans, read from its config: the `RunPlan` of the programs it executes on the device
(`jaxmath.aot.plan`) and, where its rollouts or evaluation run on a colocated vLLM, the `DevicePlan`
that splits the device between JAX and vLLM (`jaxmath.aot.colocate`). `jaxmath.aot.device` applies them
before any weight loads; `python -m jaxmath.bench memory` reports them for a target.

The ConfigDict is read through the run's typed builders (`jaxmath.sections`), so the plans see exactly the
dataclasses the run builds.
"""

from __future__ import annotations

import dataclasses

DEFAULT_PRESET = "qwen3-4b-instruct-2507"  # the study's model


def model_config(cfg, preset_flag: str = ""):
    """The Qwen3Config the run builds: its preset, or model.path's config.json where that exists."""
    import os

    from jaxmath.model import config as model_lib

    m = cfg.model
    dtype = model_lib.dtype_from_name(m.dtype)
    numerics = dict(dtype=dtype, param_dtype=model_lib.dtype_from_name(m.param_dtype or m.dtype), remat=m.remat,
                    attention_impl=m.get("attention_impl") or None)
    name = preset_flag or m.get("preset")
    if not name and m.get("path") and os.path.isfile(os.path.join(m.path, "config.json")):
        return m.path, model_lib.Qwen3Config.from_dir(m.path, **numerics)
    name = name or DEFAULT_PRESET
    return name, model_lib.preset(name, **numerics)


def run_plan(cfg, model_cfg, *, micro_batch_rows: int = 0, sampler_rows: int = 0, sft_micro: int = 0):
    """The `jaxmath.aot.plan.RunPlan` of a config (mode grpo, sft or eval), typed as main types it."""
    from jaxmath.aot import plan as plan_lib
    from jaxmath.config import build
    from jaxmath.sections import eval_config, grpo_configs, sft_config
    from jaxmath.model.lora import LoRAConfig
    from jaxmath.rollout.jax_sampler import SamplerConfig
    from jaxmath.train_state import resolve_total_steps

    mode = cfg.get("mode")
    if mode == "grpo":
        grpo, loss, optimizer = grpo_configs(cfg)
        lora = build(LoRAConfig, cfg.lora, prefix="lora")
        sampler = build(SamplerConfig, cfg.get("sampler", {}), prefix="sampler") \
            if cfg.rollout.engine == "jax" else None
        evaluation = None
        if grpo.eval_every:
            e = eval_config(cfg, progress=False)
            evaluation = plan_lib.Generation(e.batch_size, e.num_samples, e.max_prompt_tokens, e.max_new_tokens,
                                             e.temperature, e.top_p)
        plan = plan_lib.grpo_plan(
            model_cfg, lora=lora, optimizer=optimizer, loss=loss, prompts=grpo.prompts_per_step,
            rollout_prompts=grpo.prompts_sampled, num_generations=grpo.num_generations,
            max_prompt_tokens=grpo.max_prompt_tokens, max_completion_tokens=grpo.max_completion_tokens,
            prompt_bucket=grpo.prompt_bucket, temperature=grpo.temperature,
            on_policy=grpo.num_iterations == 1 and loss.tis_cap == 0.0, sampler=sampler,
            evaluation=evaluation, overlap=grpo.max_staleness > 0)
    elif mode == "sft":
        s = sft_config(cfg)
        # The schedule's length changes no buffer; any length past the warmup compiles the same program.
        optimizer = resolve_total_steps(s.optimizer, max(s.steps, s.optimizer.warmup_steps + 1))
        plan = plan_lib.sft_plan(model_cfg, lora=s.lora, optimizer=optimizer,
                                 batch=s.batch_size, micro=s.micro, seq=s.max_seq_len, chunk=s.chunk_size,
                                 remat=s.remat, packed=s.pack)
    elif mode == "eval":
        e = eval_config(cfg)
        generation = plan_lib.Generation(e.batch_size, e.num_samples, e.max_prompt_tokens, e.max_new_tokens,
                                         e.temperature, e.top_p)
        if e.backend == "jax":
            sampler = build(SamplerConfig, cfg.get("sampler", {}), prefix="sampler")
            plan = plan_lib.eval_plan(model_cfg, sampler=sampler, evaluation=generation)
        else:  # vLLM (or graded files): no program of jaxmath's on the device
            plan = plan_lib.RunPlan(model=model_cfg, evaluation=generation)
    else:
        raise SystemExit(f"memory: config.mode {mode!r} runs no model program; use a grpo, sft or eval config")
    phases = dict(plan.phases)
    for name in phases:
        kind = name.split("/", 1)[1]
        if micro_batch_rows and kind in ("step", "logprobs"):
            phases[name] = micro_batch_rows
        if sampler_rows and kind in ("prefill", "decode"):
            phases[name] = sampler_rows
        if sft_micro and kind in ("sft_step", "sft_loss"):
            phases[name] = sft_micro
    return dataclasses.replace(plan, phases=phases)


def colocated_engine(cfg) -> bool:
    """Whether the run generates on a vLLM in its own process: GRPO with rollout.engine=vllm, or an
    evaluation with eval.backend=vllm, and vllm.mode=colocated."""
    mode = cfg.get("mode")
    if mode == "grpo":
        engine = cfg.rollout.engine
    elif mode == "eval":
        engine = cfg.eval.backend
    else:
        return False
    return engine == "vllm" and cfg.get("vllm", {}).get("mode", "colocated") == "colocated"


def vllm_side(cfg, model_cfg):
    """What the run asks of its colocated vLLM (`colocate.VLLMSide`): the model in vLLM's dtype, the
    longest request, and the most requests one generate call makes (GRPO's rollout: prompts x K;
    evaluation: a batch of prompts x samples)."""
    from jaxmath.aot import colocate
    from jaxmath.sections import eval_config, grpo_configs, longest_request, vllm_dtype
    from jaxmath.model.config import dtype_from_name

    calls = []  # (requests, longest prompt, samples per prompt)
    if cfg.mode == "grpo":
        grpo, _, _ = grpo_configs(cfg)
        calls.append((grpo.prompts_sampled * grpo.num_generations, grpo.max_prompt_tokens, grpo.num_generations))
        if grpo.eval_every:
            e = eval_config(cfg, progress=False)
            calls.append((e.batch_size * e.num_samples, e.max_prompt_tokens, e.num_samples))
    else:
        e = eval_config(cfg)
        calls.append((e.batch_size * e.num_samples, e.max_prompt_tokens, e.num_samples))
    requests, prompt_tokens, samples = max(calls)
    longest = cfg.get("vllm", {}).get("max_model_len", 0) or longest_request(cfg)[0]  # as fit_context fits it
    return colocate.VLLMSide.of(model_cfg, dtype=dtype_from_name(vllm_dtype(cfg)), max_model_len=longest,
                                requests=requests,
                                prompt_tokens=prompt_tokens, samples=samples)


def device_plan(cfg, target, model_cfg=None):
    """The `colocate.DevicePlan` of a run whose vLLM is colocated, for `target`; None for any other run
    (the JAX engine, a vLLM server, SFT). Nothing is allocated: JAX's resident state is counted from
    abstract shapes. Raises colocate.PlanError (a ConfigError) when the split cannot fit."""
    from jaxmath.aot import colocate
    from jaxmath.aot import plan as plan_lib

    if not colocated_engine(cfg):
        return None
    if model_cfg is None:
        model_cfg = model_config(cfg)[1]
    trains = cfg.mode == "grpo"
    resident = 0
    if trains:
        state = plan_lib._abstract_state(run_plan(cfg, model_cfg), model_cfg, None)
        resident = plan_lib._trainer_bytes(state)
    section = cfg.get("vllm", {})
    side = vllm_side(cfg, model_cfg)
    sync = colocate.sync_working_bytes(model_cfg, side.itemsize, merges_lora=trains and cfg.lora.rank > 0,
                                       bucket_bytes=int(section.get("sync_bucket_mb", 256)) << 20) if trains else 0
    return colocate.device_plan(target, vllm_side=side, jax_resident_bytes=resident,
                                sleep=bool(section.get("enable_sleep_mode", True)), jax_programs=trains,
                                gpu_memory_utilization=float(section.get("gpu_memory_utilization", 0.0)),
                                sync_bytes=sync)
