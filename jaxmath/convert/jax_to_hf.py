"""jaxmath checkpoint -> HF-format Qwen3 directory that transformers and vLLM load.

    # a checkpoint written by jaxmath.convert.hf_to_jax
    python -m jaxmath.convert.jax_to_hf --ckpt=/ckpt/qwen3-4b --out=/models/qwen3-4b-hf [--dtype=bfloat16]
    # a training run (newest step) or one step of it; LoRA adapters merged into the base weights
    python -m jaxmath.convert.jax_to_hf --ckpt=runs/grpo/checkpoints --out=/models/grpo-merged --merge_lora \
        [--base_model=/models/Qwen3-4B-Instruct-2507] [--lora_alpha=128]
    # the step of a run with the best evaluation (GRPO with rl.keep_best; the study's local LoRA at step 50)
    python -m jaxmath.convert.jax_to_hf --ckpt=runs/local_lora/checkpoints --best --out=/models/local-lora --merge_lora
    # only the adapters of a LoRA run, in PEFT format (vLLM's --lora-modules, peft.PeftModel)
    python -m jaxmath.convert.jax_to_hf --ckpt=runs/grpo/checkpoints --out=/models/grpo-adapter --adapter_only

A run checkpoint stores only what was trained, so the base model comes from the run config's
`model.path` unless --base_model names it. Tokenizer files are copied from the converted checkpoint
or the base model directory.
"""

import json
import sys

from absl import app, flags, logging

from jaxmath.convert import common
from jaxmath.convert.common import ConvertError, export_hf

flags.DEFINE_string("ckpt", None, "jaxmath.convert.hf_to_jax output, or a training run directory or one of its steps")
flags.DEFINE_string("out", None, "output HF directory (created; existing files are overwritten)")
flags.DEFINE_enum("dtype", "", ["", "float32", "bfloat16", "float16"],
                  "dtype of the exported weights; empty keeps the checkpoint's (or the base model's) dtype")
flags.DEFINE_bool("merge_lora", False, "fold LoRA adapters of a run checkpoint into the base weights")
flags.DEFINE_bool("adapter_only", False, "export only the LoRA adapters of a run checkpoint, in PEFT format "
                  "(adapter_model.safetensors + adapter_config.json); no base weights are read")
flags.DEFINE_bool("best", False, "--ckpt is a run's checkpoints directory: export its step with the best "
                  "eval_accuracy (recorded by GRPO runs with rl.keep_best > 0) instead of the newest")
flags.DEFINE_string("base_model", "", "HF directory of the run's base model; default: model.path of the run config")
flags.DEFINE_float("lora_alpha", None, "LoRA alpha, when the run config does not record lora.alpha")
if "allow_unverified" not in flags.FLAGS:  # jaxmath.cli defines the same flag; one process may import both
    flags.DEFINE_bool("allow_unverified", False, "read a checkpoint that carries no digests (written by an older "
                      "jaxmath) instead of refusing it")
flags.mark_flags_as_required(["ckpt", "out"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; all options are --flags")
    f = flags.FLAGS
    if f.allow_unverified:
        from jaxmath import checkpoint

        checkpoint.accept_unverified()
    try:
        ckpt = best_step_dir(f.ckpt) if f.best else f.ckpt
        if f.adapter_only and f.merge_lora:
            raise ConvertError("--adapter_only and --merge_lora exclude each other: pick the adapters alone (PEFT) "
                               "or full weights with the adapters folded in")
        if f.adapter_only:
            summary = export_adapter(ckpt, f.out, dtype=f.dtype, base_model=f.base_model, lora_alpha=f.lora_alpha)
        else:
            summary = export_hf(ckpt, f.out, dtype=f.dtype, merge_lora=f.merge_lora, base_model=f.base_model,
                                lora_alpha=f.lora_alpha)
    except (ConvertError, FileNotFoundError, ValueError) as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    logging.info("exported %s", summary)
    print(json.dumps(summary))


def best_step_dir(run_checkpoints: str, metric: str = "eval_accuracy") -> str:
    """The step directory of `run_checkpoints` (RUN/checkpoints) whose saved `metric` is best (highest)."""
    from pathlib import Path

    from jaxmath.checkpoint import CheckpointManager

    if not Path(run_checkpoints).is_dir():
        raise ConvertError(f"--ckpt {run_checkpoints} does not exist; --best takes a run's checkpoints directory")
    manager = CheckpointManager(run_checkpoints, best_metric=metric)
    try:
        step = manager.best_step()
        value = (manager.metrics(step) or {}).get(metric) if step is not None else None
    finally:
        manager.close()
    if value is None:
        raise ConvertError(f"no step of {run_checkpoints} recorded {metric}; --best needs a GRPO run with "
                           "rl.eval_every and rl.keep_best > 0 (drop --best to export the newest step)")
    logging.info("best step of %s: %d (%s %.4f)", run_checkpoints, step, metric, value)
    return str(Path(run_checkpoints) / str(step))


def export_adapter(ckpt: str, out: str, *, dtype: str = "", base_model: str = "",
                   lora_alpha: float | None = None) -> dict:
    """The LoRA adapters of a run checkpoint as a PEFT adapter directory `out`; returns a summary."""
    from jaxmath.model.config import dtype_from_name
    from jaxmath.model.peft import save_peft_from_tree

    source = common.find_source(ckpt)
    if source.kind != "run":
        raise ConvertError(f"--adapter_only needs a training run checkpoint with LoRA adapters; {ckpt} is a "
                           "converted full model (export it without --adapter_only)")
    run = common.load_run(source.path)
    if not run.lora:
        raise ConvertError(f"{source.path} holds no LoRA adapters (a full-parameter run); export it without "
                           "--adapter_only")
    alpha = lora_alpha if lora_alpha is not None else common.lora_alpha(run.config)
    if alpha is None:
        raise ConvertError(f"the run config of {source.path} has no lora.alpha; pass --lora_alpha=ALPHA as the run "
                           "used it (PEFT scales the update by lora_alpha / r)")
    base = base_model or (run.config.get("model") or {}).get("path", "")
    record = save_peft_from_tree(run.lora, out, alpha=alpha, base_model_name_or_path=base,
                                 dtype=dtype_from_name(dtype) if dtype else None)
    return {"source": "run", "step": run.step, "base_model": base, "adapter_only": True, "out": out, **record}


if __name__ == "__main__":
    app.run(main)
