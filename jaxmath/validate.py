"""Every setting a run uses, checked before any work: `check(cfg)` is what `python -m jaxmath.main` runs
before it touches a device or a file (and all `--check` runs).

Each key's range or allowed values (`jaxmath.config.RULES`, `check_settings`), each section built as its
dataclass (types, unknown keys, the dataclasses' own rules across fields), rules across sections
(micro-batches that divide the step, a KL term that needs LoRA), and the paths the run reads (the model,
the data folder and the training set's file). Raises ConfigError naming the key.
"""

from __future__ import annotations

import os

from jaxmath.sections import distill_config, eval_config, grpo_configs, sft_config, vllm_config

# huggingface_hub's download command, as its current releases name it
HF_DOWNLOAD = "hf download Qwen/Qwen3-4B-Instruct-2507"
NO_MODEL = ("config.model.path is empty: pass --config.model.path=DIR, an HF-format Qwen3 folder "
            f"(e.g. `{HF_DOWNLOAD} --local-dir DIR`)")


def check(cfg) -> None:
    """Everything a run checks before any work: its mode, then every setting (`validate`)."""
    from jaxmath.config import MODES, ConfigError

    mode = cfg.get("mode")
    if mode not in MODES:
        raise ConfigError(f"config.mode {mode!r} is not one of {sorted(MODES)}")
    validate(cfg)


def validate(cfg) -> None:
    """Every setting the mode uses, checked before any work: each key's range (`check_settings`), each
    section built as its dataclass (types, unknown keys, the dataclasses' own rules), and the paths
    the run reads. Raises ConfigError naming the key."""
    from jaxmath.config import (ConfigError, DataConfig, InitConfig, MeshConfig, ModelConfig, PromptConfig,
                                RolloutConfig, build, check_settings)

    check_settings(cfg)
    mode = cfg.mode
    if "mesh" in cfg:
        build(MeshConfig, cfg.mesh, prefix="mesh")
    if mode in ("grpo", "demo"):
        grpo_cfg, loss_cfg, _ = grpo_configs(cfg)
        rows, micro = grpo_cfg.prompts_per_step * grpo_cfg.num_generations, loss_cfg.micro_batch_rows
        if 0 < micro < rows and rows % micro:
            raise ConfigError(f"loss.micro_batch_rows={micro} does not divide the step's {rows} rows "
                              f"(rl.prompts_per_step x rl.num_generations); use a divisor of {rows}, or 0 to fit it")
    if mode == "demo":
        from jaxmath.demo import DemoConfig

        build(DemoConfig, cfg.demo, prefix="demo")
        if loss_cfg.beta > 0:  # the demo trains every parameter: no LoRA reference policy
            raise ConfigError("loss.beta > 0 (a KL term) needs LoRA, which the demo does not use; set loss.beta=0")
    if mode == "sft":
        sft_config(cfg)
    if mode == "distill":
        distill_config(cfg)
    needs_model = mode in ("grpo", "sft") or (mode == "eval" and eval_config(cfg).backend != "file")
    lora_cfg = None
    if mode == "grpo":
        from jaxmath.model.lora import LoRAConfig

        lora_cfg = build(LoRAConfig, cfg.lora, prefix="lora")
        if loss_cfg.beta > 0 and not lora_cfg.enabled:
            raise ConfigError("loss.beta > 0 (a KL term) needs LoRA (lora.rank > 0): the reference policy is the "
                              "base model with adapters off; full-parameter KL is not supported")
        build(PromptConfig, cfg.prompt, prefix="prompt")
        init = build(InitConfig, cfg.init, prefix="init")
        engine = build(RolloutConfig, cfg.rollout, prefix="rollout").engine
        if engine == "vllm" and grpo_cfg.rollout_devices:
            raise ConfigError("rl.rollout_devices places the JAX sampler; vLLM is placed by its own settings: "
                              "set rl.rollout_devices=0")
        if engine == "vllm" and grpo_cfg.max_staleness and cfg.vllm.mode == "colocated":
            raise ConfigError("rl.max_staleness=1 cannot overlap a colocated vLLM, which shares the device and "
                              "sleeps through the train phase: set rl.max_staleness=0 or vllm.mode=server")
        eval_config(cfg, progress=False)  # checked even where rl.eval_every=0 leaves it unused
        if init.checkpoint and not os.path.isdir(init.checkpoint):
            raise ConfigError(f"init.checkpoint {init.checkpoint} is not a directory; point it at the earlier "
                              "run's workdir")
    if mode == "eval":
        engine = eval_config(cfg).backend
    if needs_model:
        model = build(ModelConfig, cfg.model, prefix="model")
        if not model.path and not model.preset:
            raise ConfigError(NO_MODEL)
        if model.path and not os.path.isdir(model.path):
            what = "is a file" if os.path.exists(model.path) else "does not exist"
            raise ConfigError(f"model.path {model.path} {what}; download Qwen3-4B-Instruct-2507 in HF format "
                              f"({HF_DOWNLOAD} --local-dir DIR) and pass --config.model.path=DIR")
    if mode in ("grpo", "eval"):
        from jaxmath.rollout.jax_sampler import SamplerConfig

        build(SamplerConfig, cfg.get("sampler", {}), prefix="sampler")
        if engine == "vllm":
            require_vllm(cfg)
            vllm_config(cfg, lora_cfg)
        else:  # unused by this run, yet a bad value is still one the user should hear about now
            vllm_config(cfg, lora_cfg, fit=False, model_path=cfg.model.path or "(no model: vLLM unused)")
    if mode in ("grpo", "sft", "eval") and not os.path.isdir(cfg.data.dir):
        raise ConfigError(f"data.dir {cfg.data.dir} is not a directory; write the data with "
                          "`python -m jaxmath.data.datasets --out DIR` and pass --config.data.dir=DIR")
    if mode == "grpo":
        from jaxmath.data.datasets import FILES

        data = build(DataConfig, cfg.data, prefix="data")
        path = os.path.join(data.dir, FILES[data.train])
        if not os.path.isfile(path):
            raise ConfigError(f"data.train={data.train} reads {path}, which does not exist; write the data with "
                              f"`python -m jaxmath.data.datasets --out {data.dir}` or choose another data.train")


def require_vllm(cfg) -> None:
    """A run on vLLM stops before any work where vllm is not installed, naming the extra and the
    override that runs it on JAX instead."""
    import importlib.util

    from jaxmath.config import ConfigError

    if cfg.get("vllm", {}).get("mode", "colocated") == "server" or importlib.util.find_spec("vllm") is not None:
        return
    key = "rollout.engine" if cfg.mode == "grpo" else "eval.backend"
    raise ConfigError(f"{key}=vllm needs vLLM, which is not installed: pip install -e '.[vllm]' (vLLM's CPU build; "
                      "on a CUDA machine '.[vllm-cuda]'), or run on JAX with --config."
                      f"{key}=jax")
