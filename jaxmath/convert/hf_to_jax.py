"""HF-format Qwen3 directory -> jaxmath orbax checkpoint.

    python -m jaxmath.convert.hf_to_jax --hf_dir=/models/Qwen3-4B-Instruct-2507 --out=/ckpt/qwen3-4b [--dtype=bfloat16]

Writes OUT/params/ (orbax PyTree of the model's parameters), OUT/model_config.json (the HF config,
so `jaxmath.convert.jax_to_hf` can rebuild the model) and the tokenizer files. Without --dtype the weights
keep the dtype they are stored in, so HF -> orbax -> HF is bit-exact.
"""

import json
import sys

from absl import app, flags, logging

from jaxmath.convert.common import ConvertError, hf_to_orbax

flags.DEFINE_string("hf_dir", None, "HF-format Qwen3 directory (config.json + *.safetensors)")
flags.DEFINE_string("out", None, "output checkpoint directory; must not exist")
flags.DEFINE_enum("dtype", "", ["", "float32", "bfloat16", "float16"],
                  "parameter dtype of the checkpoint; empty keeps the stored dtype")
flags.mark_flags_as_required(["hf_dir", "out"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; all options are --flags")
    try:
        summary = hf_to_orbax(flags.FLAGS.hf_dir, flags.FLAGS.out, flags.FLAGS.dtype)
    except (ConvertError, FileNotFoundError, ValueError) as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    logging.info("wrote %s: %s", flags.FLAGS.out, summary)
    print(json.dumps({"out": flags.FLAGS.out, **summary}))


if __name__ == "__main__":
    app.run(main)
