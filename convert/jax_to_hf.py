"""Moved to `python -m jaxmath.convert.jax_to_hf` (jaxmath checkpoint -> HF-format Qwen3 directory).
This script forwards to it, so `python convert/jax_to_hf.py --ckpt=... --out=...` keeps working."""

from absl import app

from jaxmath.convert.jax_to_hf import main

if __name__ == "__main__":
    app.run(main)
