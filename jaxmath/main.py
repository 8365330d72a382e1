"""The entry point: `python -m jaxmath.main --config=configs/<name>.py [--config.key=value ...] --workdir=W`.

Parses the locked config (an unknown override is an error), builds the device mesh, and dispatches
on `config.mode`. This is the only module that reads the ConfigDict: each `_run_<mode>` turns its
sections into the typed dataclasses the library takes (`jaxmath.config.MODES` says which), filling
the few fields that come from another setting (`eval.data_dir` from `data.dir`, ...) itself.
"""

from __future__ import annotations

import json
import logging as pylogging
import os
import sys

# A run's GPU memory plan (docs/BENCHMARKS.md, "Memory on one H100") counts on ~95% of the device; JAX
# preallocates 75% unless told otherwise. Read when jax creates its GPU client, so set before any jax
# work; a fraction the user set (under either name: jax refuses both at once) is kept.
if not (os.environ.get("XLA_CLIENT_MEM_FRACTION") or os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")):
    os.environ["XLA_CLIENT_MEM_FRACTION"] = "0.95"

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "A config file from configs/, e.g. configs/demo.py.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory for checkpoints, metrics and results "
                                                "(default: config.workdir).")


def _workdir(cfg) -> str:
    from jaxmath.config import RunConfig, build

    run = build(RunConfig, {"mode": cfg.mode, "workdir": cfg.get("workdir", "")}, prefix="config")
    workdir = _WORKDIR.value or run.workdir or os.path.join("runs", run.mode)
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


# --- typed configs: each mode's sections as the dataclasses of jaxmath.config.MODES -----------------


def eval_config(cfg, **derived):
    """EvalConfig from the eval section; data_dir comes from data.dir."""
    from jaxmath.config import build
    from jaxmath.eval.run import EvalConfig

    return build(EvalConfig, cfg.eval, prefix="eval", data_dir=cfg.data.dir, **derived)


def vllm_config(cfg, lora_cfg=None):
    """VLLMConfig from the vllm section; vLLM loads model.path, and takes LoRA syncs when lora.rank > 0."""
    from jaxmath.config import build
    from jaxmath.rollout.vllm import VLLMConfig

    lora = {} if lora_cfg is None else dict(enable_lora=lora_cfg.enabled, max_lora_rank=max(lora_cfg.rank, 1))
    return build(VLLMConfig, cfg.get("vllm", {}), prefix="vllm", model_path=cfg.model.path, **lora)


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


def fit_micro_batch_rows(cfg, loss_cfg, target=None):
    """loss_cfg with loss.micro_batch_rows fitted to the device, before any weight loads: 0 (auto)
    becomes the largest that fits, a value that cannot fit is refused (ConfigError naming the knob
    and the largest value that fits; `jaxmath.aot.fit`). target: the device (default: this process's
    GPU); on a CPU, or over a mesh of several devices (one device's plan would overstate a sharded
    step), loss_cfg is returned as it is (0: the whole batch at once)."""
    import dataclasses

    import jax

    from jaxmath.aot import fit
    from jaxmath.bench import memory

    target = target or fit.local_target()
    if target is None or (target.name == "local" and jax.device_count() > 1):
        return loss_cfg
    _, model_cfg = memory.model_config(cfg)
    plan = memory.run_plan(cfg, model_cfg)
    rows = fit.micro_batch_rows(plan, target, loss_cfg.micro_batch_rows)
    if rows != loss_cfg.micro_batch_rows:
        logging.info("loss.micro_batch_rows: %d rows per micro-batch fit %s", rows, target.description)
    return dataclasses.replace(loss_cfg, micro_batch_rows=rows)


def _run_eval(cfg, workdir: str) -> dict:
    from jaxmath.eval.run import evaluate

    eval_cfg = eval_config(cfg)
    meta = {"model": cfg.model.get("path", ""), "config": json.loads(cfg.to_json_best_effort())}
    if eval_cfg.backend == "file":
        return evaluate(None, None, eval_cfg, workdir, meta)
    mesh = _mesh(cfg)
    if eval_cfg.backend == "jax":
        model, tokenizer = _load_model(cfg, mesh)
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
    from jaxmath.distill import run_distill

    return run_distill(distill_config(cfg), workdir)


def _init_from_run(model, run_dir: str, lora_cfg, optim_cfg, seed: int) -> None:
    """Start from the trained weights of an earlier run (GRPO v3 continues v2): the trainable params
    of its latest checkpoint; the optimizer state starts fresh."""
    from flax import nnx

    from jaxmath import checkpoint as ckpt_lib
    from jaxmath import train_state

    manager = ckpt_lib.CheckpointManager(os.path.join(run_dir, "checkpoints"))
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
    loss_cfg = fit_micro_batch_rows(cfg, loss_cfg)
    mesh = _mesh(cfg)
    model, tokenizer = _load_model(cfg, mesh)
    if tokenizer is None:
        raise SystemExit("GRPO on math problems needs the model's tokenizer: set model.path to an HF folder")
    if init.checkpoint:
        _init_from_run(model, init.checkpoint, lora_cfg, optim_cfg, grpo_cfg.seed)
    examples = datasets.load(data.train, data.dir, limit=data.limit)

    def encode(batch):
        return prompts.encode_prompts(batch, tokenizer, grpo_cfg.max_prompt_tokens, few_shot=prompt.few_shot,
                                      system=prompt.system or None, enable_thinking=prompt.enable_thinking)

    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=True)

    # vLLM syncs LoRA runs through its own adapter support, full runs through in-memory weights
    engine = _rollout_engine(cfg, rollout.engine, model, mesh, lora_cfg)
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
    from jaxmath.config import build

    if kind == "jax":
        from jaxmath.rollout.jax_sampler import JaxSampler, SamplerConfig

        return JaxSampler(model, build(SamplerConfig, cfg.get("sampler", {}), prefix="sampler"), mesh=mesh)
    from jaxmath.rollout.vllm import make_engine

    return make_engine(vllm_config(cfg, lora_cfg))


def _run_demo(cfg, workdir: str) -> dict:
    from jaxmath.config import build
    from jaxmath.demo import DemoConfig, run_demo

    grpo_cfg, loss_cfg, optim_cfg = grpo_configs(cfg)
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
