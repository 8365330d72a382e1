"""The entry point: `python -m jaxmath.main --config=configs/<name>.py [--config.key=value ...] --workdir=W`.

Parses the locked config (an unknown override is an error), builds the device mesh, and dispatches
on `config.mode`. This is the only module that reads the ConfigDict: each `_run_<mode>` turns its
sections into the typed dataclasses the library takes.
"""

from __future__ import annotations

import json
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
    import jax.numpy as jnp  # noqa: F401  (jax is imported only once a mode needs it)

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
    mesh = _mesh(cfg)
    if eval_cfg.backend == "jax":
        from jaxmath.rollout.jax_sampler import JaxSampler, SamplerConfig

        model, tokenizer = _load_model(cfg, mesh)
        engine = JaxSampler(model, build(SamplerConfig, cfg.get("sampler", {}), prefix="sampler"), mesh=mesh)
    elif eval_cfg.backend == "vllm":
        from jaxmath.rollout.vllm_engine import VLLMConfig, VLLMEngine

        engine = VLLMEngine(build(VLLMConfig, cfg.get("vllm", {}), prefix="vllm", model_path=cfg.model.path))
        tokenizer = engine.tokenizer
    else:
        raise SystemExit(f"eval.backend must be one of jax, vllm, file; got {eval_cfg.backend!r}")
    meta["engine"] = eval_cfg.backend
    return evaluate(engine, tokenizer, eval_cfg, workdir, meta)


MODES = {
    "eval": _run_eval,
}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; pass settings as --config.key=value")
    cfg = _CONFIG.value
    if cfg is None:
        raise app.UsageError("--config is required, e.g. --config=configs/demo.py")
    mode = cfg.get("mode")
    if mode not in MODES:
        raise app.UsageError(f"config.mode {mode!r} is not one of {sorted(MODES)}")
    workdir = _workdir(cfg)
    logging.info("jaxmath %s: workdir %s", mode, workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(cfg.to_json_best_effort(indent=2))
    result = MODES[mode](cfg, workdir)
    if isinstance(result, dict):
        summary = {k: v for k, v in result.items() if k != "meta"}
        logging.info("done: %s", json.dumps(summary, default=str)[:2000])


def run() -> None:
    flags.FLAGS.alsologtostderr = True
    app.run(main)


if __name__ == "__main__":
    sys.exit(run())
