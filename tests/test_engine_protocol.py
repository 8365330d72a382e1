"""The rollout engine protocol: what the GRPO loop calls is declared once (`RolloutEngine`), with no-op
defaults, and only jaxmath/rollout/vllm/ imports vllm. About 10 s."""

import re
from pathlib import Path

import jax.numpy as jnp

import jaxmath.model as jm
from jaxmath.rollout.jax_sampler import JaxSampler, SamplerConfig
from jaxmath.rollout.types import RolloutEngine, SamplingParams

ROOT = Path(__file__).resolve().parents[1]


def test_an_engine_needs_only_generate():
    class Fixed(RolloutEngine):
        def generate(self, prompts, params):
            return ("rollout", len(prompts), params.max_new_tokens)

    engine = Fixed()
    assert engine.generate([[1, 2]], SamplingParams(max_new_tokens=3)) == ("rollout", 1, 3)
    assert engine.update_weights(object()) == {} and engine.sleep() is False and engine.wake_up() is False


def test_jax_sampler_follows_the_protocol():
    model = jm.init_model(jm.preset("tiny", vocab_size=128, dtype=jnp.float32, param_dtype=jnp.float32))
    sampler = JaxSampler(model, SamplerConfig(vocab_chunk=0))
    assert isinstance(sampler, RolloutEngine)
    assert sampler.update_weights(model) == {}  # arrays are shared: nothing to report
    assert sampler.sleep() is False and sampler.wake_up() is False  # nothing to free


def test_only_the_vllm_package_imports_vllm():
    importing = re.compile(r"^\s*(import vllm|from vllm[ .])", re.MULTILINE)
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "jaxmath").rglob("*.py")
                 if importing.search(p.read_text()) and "rollout/vllm/" not in p.as_posix()]
    assert not offenders, offenders
    assert importing.search((ROOT / "jaxmath" / "rollout" / "vllm" / "colocated.py").read_text())
