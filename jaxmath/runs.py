"""The runs themselves: `MODES[cfg.mode](cfg, workdir)` builds what the mode needs (the mesh, the model,
the engines) from its sections (`jaxmath.sections`) and calls the library: `jaxmath.eval.run`,
`jaxmath.sft`, `jaxmath.distill`, `jaxmath.rl.loop`, `jaxmath.demo`. Called by `jaxmath.cli` once every
setting has passed `jaxmath.validate` and the device and workdir are prepared.
"""

from __future__ import annotations

import json
import os

from absl import logging

from jaxmath.sections import distill_config, eval_config, grpo_configs, sft_config, vllm_config
from jaxmath.validate import NO_MODEL


def build_meshes(cfg):
    """(trainer mesh, sampler mesh): with rl.rollout_devices=N > 0 the sampler takes the last N devices
    (fsdp over them) and the trainer's mesh.data / fsdp / tp is made of the others; with 0 both are
    the one mesh of build_mesh."""
    import jax

    from jaxmath.config import ConfigError
    from jaxmath.model import sharding

    n = int(cfg.get("rl", {}).get("rollout_devices", 0))
    if not n:
        mesh = build_mesh(cfg)
        jax_engine = cfg.get("rollout", {}).get("engine", "jax") == "jax"
        if cfg.get("rl", {}).get("max_staleness", 0) and jax_engine and mesh.devices.flat[0].platform == "gpu":
            # The sampler's KV cache and the train step's temporaries would be live at once on the same
            # accelerator, which no memory plan (`jaxmath.aot`) covers.
            raise ConfigError("rl.max_staleness=1 with the JAX sampler on the trainer's GPUs would run both at once "
                              "in one device's memory, which is not planned: give the sampler GPUs of its own "
                              "(rl.rollout_devices=N) or set rl.max_staleness=0")
        return mesh, mesh
    devices = jax.devices()
    if jax.process_count() > 1:
        raise ConfigError(f"rl.rollout_devices={n} runs in one process only ({jax.process_count()} here): set "
                          "rl.rollout_devices=0")
    if n >= len(devices):
        raise ConfigError(f"rl.rollout_devices={n} leaves the trainer none of the {len(devices)} devices; set it "
                          f"below {len(devices)}")
    return build_mesh(cfg, devices[:-n]), sharding.make_mesh(1, -1, 1, devices=devices[-n:])


def build_mesh(cfg, devices=None):
    """The device mesh of mesh.data / fsdp / tp (over `devices`, default all); ConfigError when the
    devices cannot make it."""
    import jax

    from jaxmath.config import ConfigError, MeshConfig, build
    from jaxmath.model import sharding

    m = build(MeshConfig, cfg.get("mesh", {}), prefix="mesh")
    count = len(devices) if devices is not None else jax.device_count()
    try:
        mesh = sharding.make_mesh(m.data, m.fsdp, m.tp, devices=devices)
    except ValueError as e:
        raise ConfigError(f"{e}; set --config.mesh.data/fsdp/tp to fit the {count} devices "
                          "(one of them -1 takes the rest)") from e
    if mesh.size < jax.device_count() and jax.process_count() > 1:
        # A process with no device in the mesh could not take part in its programs.
        raise ConfigError(f"mesh data={m.data} fsdp={m.fsdp} tp={m.tp} takes {mesh.size} of the "
                          f"{jax.device_count()} devices of this job's {jax.process_count()} processes; a job of many "
                          "processes needs every device in the mesh: set one of --config.mesh.data/fsdp/tp to -1")
    return mesh


def load_model(cfg, mesh):
    """(model, tokenizer) from config.model: an HF directory, or a random preset for smoke runs."""
    from jaxmath.config import ModelConfig, build
    from jaxmath.model import config as model_config
    from jaxmath.model import from_pretrained, init_model, preset

    m = build(ModelConfig, cfg.model, prefix="model")
    dtype = model_config.dtype_from_name(m.dtype)
    param_dtype = model_config.dtype_from_name(m.param_dtype or m.dtype)
    overrides = dict(remat=m.remat, attention_impl=m.attention_impl or None)
    if m.path:
        model = from_pretrained(m.path, dtype=dtype, param_dtype=param_dtype, mesh=mesh, **overrides)
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(m.path)
        except (OSError, ValueError) as e:
            raise SystemExit(f"model.path {m.path} has weights but no usable tokenizer files ({e}); copy "
                             "tokenizer.json and tokenizer_config.json from the original model") from e
        return model, tokenizer
    if m.preset:
        return init_model(preset(m.preset, dtype=dtype, param_dtype=param_dtype, **overrides), mesh=mesh), None
    raise SystemExit(NO_MODEL)


# huggingface_hub's download command, as its current releases name it


def engines_line(cfg) -> str:
    """Which engine runs each phase of the run, for its first log lines."""
    from jaxmath.aot import run as run_lib

    section = cfg.get("vllm", {})
    sleeps = run_lib.colocated_engine(cfg) and section.get("enable_sleep_mode", True)
    on_vllm = f"vLLM ({section.get('mode', 'colocated')}{', sleeping through the train phase' if sleeps else ''})"
    if cfg.mode == "grpo":
        engine = on_vllm if cfg.rollout.engine == "vllm" else "the JAX sampler (sampler.*)"
        evaluation = f"; evaluation on {engine}" if cfg.rl.eval_every else ""
        return (f"engines: rollouts on {engine}{evaluation}; logprobs and the train step on JAX "
                f"(--config.rollout.engine={'jax' if cfg.rollout.engine == 'vllm' else 'vllm'} switches the rollouts)")
    if cfg.mode == "eval":
        backend = cfg.eval.backend
        engine = {"vllm": on_vllm, "jax": "the JAX sampler (sampler.*)", "file": "no engine (graded files)"}[backend]
        return f"engines: evaluation on {engine}"
    return f"engines: {cfg.mode} on JAX"


def _run_eval(cfg, workdir: str) -> dict:
    from jaxmath.eval.run import evaluate

    eval_cfg = eval_config(cfg)
    meta = {"model": cfg.model.get("path", ""), "config": json.loads(cfg.to_json_best_effort())}
    if eval_cfg.backend == "file":
        return evaluate(None, None, eval_cfg, workdir, meta)
    mesh = build_mesh(cfg)
    if eval_cfg.backend == "jax":
        model, tokenizer = load_model(cfg, mesh)
        engine = _rollout_engine(cfg, "jax", model, mesh)
    else:  # vLLM loads the weights itself, from model.path
        engine = _rollout_engine(cfg, "vllm", None, mesh)
        tokenizer = engine.tokenizer
    meta["engine"] = eval_cfg.backend
    return evaluate(engine, tokenizer, eval_cfg, workdir, meta)


def _run_sft(cfg, workdir: str) -> dict:
    from jaxmath.sft import load_sft_examples, run_sft

    sft_cfg = sft_config(cfg)
    if not sft_cfg.train_files:
        raise SystemExit("sft.train_files is empty; point it at trace files under data.dir "
                         "(e.g. traces.jsonl from configs/distill.py)")
    mesh = build_mesh(cfg)
    model, tokenizer = load_model(cfg, mesh)
    if tokenizer is None:
        raise SystemExit("SFT on chat traces needs the model's tokenizer: set model.path to an HF folder")
    paths = [os.path.join(cfg.data.dir, f) for f in sft_cfg.train_files]
    examples = load_sft_examples(paths, tokenizer, max_trace_chars=sft_cfg.max_trace_chars,
                                 sources=sft_cfg.train_sources)
    logging.info("sft: %d documents from %s", len(examples), paths)
    return run_sft(model, examples, sft_cfg, workdir, tokenizer=tokenizer, mesh=mesh)


def _run_distill(cfg, workdir: str) -> dict:
    from jaxmath.distill import run_distill

    return run_distill(distill_config(cfg), workdir)


def init_from_run(model, run_dir: str, lora_cfg, optim_cfg, seed: int) -> None:
    """Start from the trained weights of an earlier run (GRPO v3 continues v2): the trainable params
    of its latest checkpoint; the optimizer state starts fresh."""
    from flax import nnx

    from jaxmath import checkpoint as ckpt_lib
    from jaxmath import train_state

    # refuse: a damaged latest checkpoint must stop the run, not silently start it from an older step
    # (and rename the other run's files).
    with ckpt_lib.CheckpointManager(os.path.join(run_dir, "checkpoints"), on_damaged="refuse") as manager:
        if manager.latest_step() is None:
            raise SystemExit(f"init.checkpoint={run_dir} has no checkpoints under {manager.directory}; run the "
                             "earlier configuration (e.g. configs/grpo_v2.py) with that workdir first")
        setup = train_state.init_or_restore(model, optim_cfg, lora_cfg=lora_cfg, seed=seed,
                                            total_steps=optim_cfg.total_steps, checkpoints=manager)
    nnx.update(model, setup.state.params)
    logging.info("initialised from %s step %d", manager.directory, setup.state.step)


def _run_grpo(cfg, workdir: str) -> dict:
    from jaxmath.config import DataConfig, InitConfig, PromptConfig, RolloutConfig, build
    from jaxmath.data import datasets, prompts
    from jaxmath.model.lora import LoRAConfig
    from jaxmath.rl import loop

    grpo_cfg, loss_cfg, optim_cfg = grpo_configs(cfg)
    lora_cfg = build(LoRAConfig, cfg.lora, prefix="lora")
    data = build(DataConfig, cfg.data, prefix="data")
    prompt = build(PromptConfig, cfg.prompt, prefix="prompt")
    init = build(InitConfig, cfg.init, prefix="init")
    rollout = build(RolloutConfig, cfg.rollout, prefix="rollout")
    eval_cfg = eval_config(cfg, progress=False) if grpo_cfg.eval_every else None
    from jaxmath.aot.device import fit_micro_batch_rows

    loss_cfg = fit_micro_batch_rows(cfg, loss_cfg)
    mesh, sampler_mesh = build_meshes(cfg)
    model, tokenizer = load_model(cfg, mesh)
    if tokenizer is None:
        raise SystemExit("GRPO on math problems needs the model's tokenizer: set model.path to an HF folder")
    if init.checkpoint:
        init_from_run(model, init.checkpoint, lora_cfg, optim_cfg, grpo_cfg.seed)
    examples = datasets.load(data.train, data.dir, limit=data.limit)

    def encode(batch):
        return prompts.encode_prompts(batch, tokenizer, grpo_cfg.max_prompt_tokens, few_shot=prompt.few_shot,
                                      system=prompt.system or None, enable_thinking=prompt.enable_thinking)

    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=True)

    # vLLM syncs LoRA runs through its own adapter support, full runs through in-memory weights
    engine = _rollout_engine(cfg, rollout.engine, model, sampler_mesh, lora_cfg)
    stop = tuple(dict.fromkeys(prompts.stop_token_ids(tokenizer) + model.config.stop_token_ids))
    evaluate = None
    if eval_cfg is not None:
        from jaxmath.eval.run import evaluate as run_eval

        def evaluate(_, step):
            results = run_eval(engine, tokenizer, eval_cfg, os.path.join(workdir, f"eval_step_{step}"), {"step": step})
            first = next(k for k in results if k != "meta")
            return {"eval_accuracy": results[first]["accuracy"]}

    return loop.train(model, examples, encode=encode, decode=decode, cfg=grpo_cfg, loss_cfg=loss_cfg,
                      optim_cfg=optim_cfg, lora_cfg=lora_cfg, workdir=workdir, engine=engine, stop_token_ids=stop,
                      evaluate=evaluate, run_config=json.loads(cfg.to_json_best_effort()))


def _rollout_engine(cfg, kind: str, model, mesh, lora_cfg=None):
    """The rollout engine `kind` ("jax" or "vllm") with its config section (sampler / vllm)."""
    import jax

    from jaxmath.config import build

    if kind == "jax":
        from jaxmath.rollout.jax_sampler import JaxSampler, SamplerConfig

        return JaxSampler(model, build(SamplerConfig, cfg.get("sampler", {}), prefix="sampler"), mesh=mesh)
    if jax.process_count() > 1:
        from jaxmath.config import ConfigError

        raise ConfigError("a vLLM engine in a job of many processes is not supported: use the JAX sampler "
                          "(--config.rollout.engine=jax for GRPO, --config.eval.backend=jax for evaluation)")
    from jaxmath.rollout.vllm import make_engine

    from jaxmath.aot.device import current_plan

    return make_engine(vllm_config(cfg, lora_cfg, current_plan()))


def _run_demo(cfg, workdir: str) -> dict:
    from jaxmath.config import build
    from jaxmath.demo import DemoConfig, run_demo

    grpo_cfg, loss_cfg, optim_cfg = grpo_configs(cfg)
    mesh, sampler_mesh = build_meshes(cfg)
    return run_demo(build(DemoConfig, cfg.demo, prefix="demo"), grpo_cfg, loss_cfg, optim_cfg, workdir,
                    seed=cfg.seed, mesh=mesh, sampler_mesh=sampler_mesh,
                    run_config=json.loads(cfg.to_json_best_effort()))


MODES = {
    "eval": _run_eval,
    "sft": _run_sft,
    "distill": _run_distill,
    "grpo": _run_grpo,
    "demo": _run_demo,
}
