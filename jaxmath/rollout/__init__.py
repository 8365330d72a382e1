"""Rollout engines: token ids in, token ids and logprobs out.

`types.py` holds the records every engine returns; `jax_sampler.py` is the in-process JAX engine and
`vllm_engine.py` the vLLM one. Engines never see text: tokenization lives in `jaxmath.data`.
"""

from jaxmath.rollout.types import Rollout, RolloutEngine, SamplingParams

__all__ = ["Rollout", "RolloutEngine", "SamplingParams"]
