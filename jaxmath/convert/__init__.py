"""Converters between HF-format Qwen3 directories and jaxmath checkpoints:
`python -m jaxmath.convert.hf_to_jax` and `python -m jaxmath.convert.jax_to_hf` (thin CLIs over
`common`, which reads checkpoints through `jaxmath.model.hf_io` and `jaxmath.checkpoint`). The scripts
in the repository's top-level convert/ forward to them."""
