"""Rollout engines: token ids in, token ids and logprobs out.

`types.py` holds the records every engine returns and `RolloutEngine`, the base class that declares
what the loop calls; `jax_sampler.py` is the in-process JAX engine and the `vllm/` package the vLLM
ones (colocated and server). Engines never see text: tokenization lives in `jaxmath.data`.
"""

from jaxmath.rollout.types import Rollout, RolloutEngine, SamplingParams

__all__ = ["Rollout", "RolloutEngine", "SamplingParams"]
