"""jaxmath: post-training small language models for mathematical reasoning in JAX.

GRPO with a verifiable `\\boxed{}` reward, SFT on teacher traces, and the evaluation that tells them
apart, for the dense Qwen3 family. See README.md and docs/.
"""

__version__ = "0.1.0"
