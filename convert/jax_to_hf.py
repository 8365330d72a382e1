"""jaxmath checkpoint -> HF-format Qwen3 directory that transformers and vLLM load.

    # a checkpoint written by convert.hf_to_jax
    python -m convert.jax_to_hf --ckpt=/ckpt/qwen3-4b --out=/models/qwen3-4b-hf [--dtype=bfloat16]
    # a training run (newest step) or one step of it; LoRA adapters merged into the base weights
    python -m convert.jax_to_hf --ckpt=runs/grpo/checkpoints --out=/models/grpo-merged --merge_lora \
        [--base_model=/models/Qwen3-4B-Instruct-2507] [--lora_alpha=128]

A run checkpoint stores only what was trained, so the base model comes from the run config's
`model.path` unless --base_model names it. Tokenizer files are copied from the converted checkpoint
or the base model directory.
"""

import json
import sys

from absl import app, flags, logging

from convert.common import ConvertError, export_hf

flags.DEFINE_string("ckpt", None, "convert.hf_to_jax output, or a training run directory or one of its steps")
flags.DEFINE_string("out", None, "output HF directory (created; existing files are overwritten)")
flags.DEFINE_enum("dtype", "", ["", "float32", "bfloat16", "float16"],
                  "dtype of the exported weights; empty keeps the checkpoint's (or the base model's) dtype")
flags.DEFINE_bool("merge_lora", False, "fold LoRA adapters of a run checkpoint into the base weights")
flags.DEFINE_string("base_model", "", "HF directory of the run's base model; default: model.path of the run config")
flags.DEFINE_float("lora_alpha", None, "LoRA alpha, when the run config does not record lora.alpha")
flags.mark_flags_as_required(["ckpt", "out"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; all options are --flags")
    f = flags.FLAGS
    try:
        summary = export_hf(f.ckpt, f.out, dtype=f.dtype, merge_lora=f.merge_lora, base_model=f.base_model,
                           lora_alpha=f.lora_alpha)
    except (ConvertError, FileNotFoundError, ValueError) as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    logging.info("exported %s", summary)
    print(json.dumps(summary))


if __name__ == "__main__":
    app.run(main)
