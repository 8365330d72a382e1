"""The entry point: `python -m jaxmath.main --config=configs/<name>.py [--config.key=value ...] --workdir=W`.

Parses the locked config (an unknown override is an error), builds the device mesh, and dispatches
on `config.mode`. This is the only module that reads the ConfigDict: each `_run_<mode>` turns its
sections into the typed dataclasses the library takes.
"""

from __future__ import annotations

import dataclasses
import json
import logging as pylogging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "A config file from configs/, e.g. configs/demo.py.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory for checkpoints, metrics and results "
                                                "(default: config.workdir).")


def _workdir(cfg) -> str:
    workdir = _WORKDIR.value or cfg.get("workdir") or os.path.join("runs", cfg.mode)
    os.makedirs(workdir, exist_ok=True)
    return workdir


def _mesh(cfg):
    from jaxmath.config import MeshConfig, build
    from jaxmath.model import sharding

    m = build(MeshConfig, cfg.get("mesh", {}), prefix="mesh")
    return sharding.make_mesh(m.data, m.fsdp, m.tp)


def _load_model(cfg, mesh):
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
    raise SystemExit("config.model.path is empty: pass --config.model.path=DIR, an HF-format Qwen3 folder "
                     "(e.g. `huggingface-cli download Qwen/Qwen3-4B-Instruct-2507 --local-dir DIR`)")


def _run_eval(cfg, workdir: str) -> dict:
    from jaxmath.config import build
    from jaxmath.eval.run import EvalConfig, evaluate

    eval_cfg = build(EvalConfig, cfg.eval, prefix="eval", data_dir=cfg.data.dir)
    meta = {"model": cfg.model.get("path", ""), "config": json.loads(cfg.to_json_best_effort())}
    if eval_cfg.backend == "file":
        return evaluate(None, None, eval_cfg, workdir, meta)
    if eval_cfg.backend not in ("jax", "vllm"):
        raise SystemExit(f"eval.backend must be one of jax, vllm, file; got {eval_cfg.backend!r}")
    mesh = _mesh(cfg)
    if eval_cfg.backend == "jax":
        model, tokenizer = _load_model(cfg, mesh)
        engine = _rollout_engine(cfg, "jax", model, mesh)
    else:  # vLLM loads the weights itself, from model.path
        engine = _rollout_engine(cfg, "vllm", None, mesh)
        tokenizer = engine.tokenizer
    meta["engine"] = eval_cfg.backend
    return evaluate(engine, tokenizer, eval_cfg, workdir, meta)


def sft_config_from(cfg):
    """SFTConfig from the config's top-level seed / steps / checkpoint_every and its sft, lora and
    optimizer sections (the optimizer's total_steps comes from the data, so it is not a key)."""
    from jaxmath.config import build
    from jaxmath.model.lora import LoRAConfig
    from jaxmath.sft import SFTConfig

    lora = build(LoRAConfig, cfg.get("lora", {}), prefix="lora")
    optimizer, section = cfg.optimizer.to_dict(), cfg.sft.to_dict()
    clash = sorted(set(optimizer) & set(section))
    if clash:
        raise SystemExit(f"{clash} are set in both sft and optimizer; keep them in optimizer")
    return build(SFTConfig, {**section, **optimizer}, prefix="sft/optimizer", seed=cfg.seed,
                 steps=cfg.get("steps", 0), checkpoint_every=cfg.get("checkpoint_every", 0),
                 lora=dataclasses.asdict(lora))


def _run_sft(cfg, workdir: str) -> dict:
    from jaxmath.sft_loop import load_sft_examples, run_sft

    sft_cfg = sft_config_from(cfg)
    if not sft_cfg.train_files:
        raise SystemExit("sft.train_files is empty; point it at trace files under data.dir "
                         "(e.g. traces.jsonl from configs/distill.py)")
    mesh = _mesh(cfg)
    model, tokenizer = _load_model(cfg, mesh)
    if tokenizer is None:
        raise SystemExit("SFT on chat traces needs the model's tokenizer: set model.path to an HF folder")
    paths = [os.path.join(cfg.data.dir, f) for f in sft_cfg.train_files]
    examples = load_sft_examples(paths, tokenizer, max_trace_chars=sft_cfg.max_trace_chars,
                                 sources=sft_cfg.train_sources)
    logging.info("sft: %d documents from %s", len(examples), paths)
    return run_sft(model, examples, sft_cfg, workdir, tokenizer=tokenizer, mesh=mesh)


def _run_distill(cfg, workdir: str) -> dict:
    from jaxmath.config import build
    from jaxmath.distill import DistillConfig, run_distill

    return run_distill(build(DistillConfig, cfg.distill, prefix="distill", data_dir=cfg.data.dir), workdir)


def _grpo_configs(cfg):
    """(GRPOConfig, LossConfig, OptimizerConfig) from the rl, loss and optimizer sections."""
    from jaxmath.config import build
    from jaxmath.optim import OptimizerConfig
    from jaxmath.rl.loop import GRPOConfig
    from jaxmath.rl.step import LossConfig

    grpo_cfg = build(GRPOConfig, cfg.rl, prefix="rl", steps=cfg.steps, seed=cfg.seed,
                     checkpoint_every=cfg.checkpoint_every)
    loss_cfg = build(LossConfig, cfg.get("loss", {}), prefix="loss", temperature=grpo_cfg.temperature,
                     max_completion_tokens=grpo_cfg.max_completion_tokens)
    optim_cfg = build(OptimizerConfig, cfg.optimizer, prefix="optimizer", total_steps=cfg.steps)
    return grpo_cfg, loss_cfg, optim_cfg


def _init_from_run(model, run_dir: str, lora_cfg, optim_cfg, seed: int) -> None:
    """Start from the trained weights of an earlier run (GRPO v3 continues v2): the trainable params
    of its latest checkpoint; the optimizer state starts fresh."""
    import jax
    from flax import nnx

    from jaxmath import checkpoint as ckpt_lib
    from jaxmath.model import lora as lora_lib
    from jaxmath.optim import make_optimizer
    from jaxmath.rl.step import split_trainable

    if lora_cfg.enabled and not lora_lib.has_lora(model):
        lora_lib.apply_lora(model, lora_cfg, seed=seed)
    graphdef, trainable, frozen = split_trainable(model)
    manager = ckpt_lib.CheckpointManager(os.path.join(run_dir, "checkpoints"))
    if manager.latest_step() is None:
        raise SystemExit(f"init.checkpoint={run_dir} has no checkpoints under {manager.directory}; run the "
                         "earlier configuration (e.g. configs/grpo_v2.py) with that workdir first")
    target = ckpt_lib.TrainState(trainable, make_optimizer(optim_cfg).init(trainable), 0, {},
                                 jax.random.key(seed), {})
    restored = manager.restore(target=target)
    nnx.update(model, restored.params)
    logging.info("initialised from %s step %d", manager.directory, restored.step)


def _run_grpo(cfg, workdir: str) -> dict:
    from jaxmath.config import build
    from jaxmath.data import datasets, prompts
    from jaxmath.model.lora import LoRAConfig
    from jaxmath.rl import loop

    grpo_cfg, loss_cfg, optim_cfg = _grpo_configs(cfg)
    lora_cfg = build(LoRAConfig, cfg.lora, prefix="lora")
    mesh = _mesh(cfg)
    model, tokenizer = _load_model(cfg, mesh)
    if tokenizer is None:
        raise SystemExit("GRPO on math problems needs the model's tokenizer: set model.path to an HF folder")
    if cfg.init.checkpoint:
        _init_from_run(model, cfg.init.checkpoint, lora_cfg, optim_cfg, cfg.seed)
    examples = datasets.load(cfg.data.train, cfg.data.dir, limit=cfg.data.limit)
    few_shot, system = cfg.prompt.few_shot, cfg.prompt.system or None

    def encode(batch):
        return prompts.encode_prompts(batch, tokenizer, grpo_cfg.max_prompt_tokens, few_shot=few_shot, system=system,
                                      enable_thinking=cfg.prompt.enable_thinking)

    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=True)

    # vLLM syncs LoRA runs through its own adapter support, full runs through in-memory weights
    engine = _rollout_engine(cfg, cfg.rollout.engine, model, mesh,
                             enable_lora=lora_cfg.enabled, max_lora_rank=max(lora_cfg.rank, 1))
    stop = tuple(dict.fromkeys(prompts.stop_token_ids(tokenizer) + model.config.stop_token_ids))
    evaluate = None
    if grpo_cfg.eval_every:
        from jaxmath.eval.run import EvalConfig
        from jaxmath.eval.run import evaluate as run_eval

        eval_cfg = build(EvalConfig, cfg.eval, prefix="eval", data_dir=cfg.data.dir, progress=False)

        def evaluate(_, step):
            results = run_eval(engine, tokenizer, eval_cfg, os.path.join(workdir, f"eval_step_{step}"), {"step": step})
            first = next(k for k in results if k != "meta")
            return {"eval_accuracy": results[first]["accuracy"]}

    return loop.train(model, examples, encode=encode, decode=decode, cfg=grpo_cfg, loss_cfg=loss_cfg,
                      optim_cfg=optim_cfg, lora_cfg=lora_cfg, workdir=workdir, engine=engine, stop_token_ids=stop,
                      evaluate=evaluate, run_config=json.loads(cfg.to_json_best_effort()))


def _rollout_engine(cfg, kind: str, model, mesh, **vllm_defaults):
    """The rollout engine `kind` ("jax" or "vllm") with its config section (sampler / vllm);
    `vllm_defaults` fill vllm keys the config does not set."""
    from jaxmath.config import build

    if kind == "jax":
        from jaxmath.rollout.jax_sampler import JaxSampler, SamplerConfig

        return JaxSampler(model, build(SamplerConfig, cfg.get("sampler", {}), prefix="sampler"), mesh=mesh)
    if kind == "vllm":
        from jaxmath.rollout.vllm_engine import VLLMConfig, VLLMEngine

        section = {**vllm_defaults, **cfg.get("vllm", {})}
        return VLLMEngine(build(VLLMConfig, section, prefix="vllm", model_path=cfg.model.path))
    raise SystemExit(f"rollout.engine must be 'jax' or 'vllm', got {kind!r}")


def _run_demo(cfg, workdir: str) -> dict:
    from jaxmath.config import build
    from jaxmath.demo import DemoConfig, run_demo

    grpo_cfg, loss_cfg, optim_cfg = _grpo_configs(cfg)
    return run_demo(build(DemoConfig, cfg.demo, prefix="demo"), grpo_cfg, loss_cfg, optim_cfg, workdir,
                    seed=cfg.seed, mesh=_mesh(cfg), run_config=json.loads(cfg.to_json_best_effort()))


MODES = {
    "eval": _run_eval,
    "sft": _run_sft,
    "distill": _run_distill,
    "grpo": _run_grpo,
    "demo": _run_demo,
}


class _QuietLibraries(pylogging.Filter):
    """Keeps orbax's per-save INFO chatter out of the run log; its warnings and errors still show."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def main(argv: list[str]) -> None:
    logging.get_absl_handler().addFilter(_QuietLibraries())
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; pass settings as --config.key=value")
    cfg = _CONFIG.value
    if cfg is None:
        raise app.UsageError("--config is required, e.g. --config=configs/demo.py")
    mode = cfg.get("mode")
    if mode not in MODES:
        raise app.UsageError(f"config.mode {mode!r} is not one of {sorted(MODES)}")
    # A multi-host job joins here, before any jax device is touched (one process: a no-op).
    from jaxmath.distributed import initialize_from_env

    initialize_from_env()
    workdir = _workdir(cfg)
    logging.info("jaxmath %s: workdir %s", mode, workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(cfg.to_json_best_effort(indent=2))
    from jaxmath.config import ConfigError

    try:
        result = MODES[mode](cfg, workdir)
    except (FileNotFoundError, ConfigError) as e:  # bad input from the user: the message says what to do
        raise SystemExit(f"error: {e}") from e
    if isinstance(result, dict):
        summary = {k: v for k, v in result.items() if k != "meta"}
        logging.info("done: %s", json.dumps(summary, default=str)[:2000])


def run() -> None:
    flags.FLAGS.alsologtostderr = True
    app.run(main)


if __name__ == "__main__":
    sys.exit(run())
