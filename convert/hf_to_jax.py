"""Moved to `python -m jaxmath.convert.hf_to_jax` (HF-format Qwen3 directory -> jaxmath orbax checkpoint).
This script forwards to it, so `python convert/hf_to_jax.py --hf_dir=... --out=...` keeps working."""

from absl import app

from jaxmath.convert.hf_to_jax import main

if __name__ == "__main__":
    app.run(main)
