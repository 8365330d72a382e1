"""The rollout engine protocol: what the GRPO loop calls is declared once (`RolloutEngine`), with no-op
defaults, and only jaxmath/rollout/vllm/ imports vllm; the JAX sampler does what it promises."""

import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np

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
    """What the protocol promises, observed: generate gives `num_samples` rows per prompt, grouped by
    prompt, within `max_new_tokens`; after update_weights the sampler generates with the new weights
    (greedy output follows the model, and returns to the first model's when it is handed back)."""
    config = jm.preset("tiny", vocab_size=128, dtype=jnp.float32, param_dtype=jnp.float32)
    first, second = jm.init_model(config, seed=0), jm.init_model(config, seed=1)
    sampler = JaxSampler(first, SamplerConfig(vocab_chunk=0))
    prompts = [[5, 6, 7], [9, 10]]
    greedy = SamplingParams(max_new_tokens=6, num_samples=2, temperature=0.0)
    rollout = sampler.generate(prompts, greedy)
    assert rollout.completion_ids.shape == (4, 6) and rollout.prompt_index.tolist() == [0, 0, 1, 1]
    assert rollout.prompt_ids == prompts and rollout.completion_mask.sum(axis=1).max() <= 6
    assert sampler.update_weights(second) == {}  # arrays are shared: nothing to report
    moved = sampler.generate(prompts, greedy)
    assert not np.array_equal(moved.completion_ids, rollout.completion_ids)
    sampler.update_weights(first)
    np.testing.assert_array_equal(sampler.generate(prompts, greedy).completion_ids, rollout.completion_ids)
    # sleep frees its copy of the layers for a train phase; the next update_weights makes it again
    assert sampler.sleep() is True and sampler.wake_up() is True
    sampler.update_weights(first)
    np.testing.assert_array_equal(sampler.generate(prompts, greedy).completion_ids, rollout.completion_ids)


def test_what_the_loop_calls_is_declared_on_the_protocol():
    """Every method called on an engine in the training loop, the evaluator and the demo is declared on
    RolloutEngine, so any engine that follows it can run them."""
    called = set()
    for path in ("rl/loop.py", "eval/run.py", "demo.py"):
        called |= set(re.findall(r"\bengine\.([a-z_]+)\(", (ROOT / "jaxmath" / path).read_text()))
    assert called >= {"generate", "update_weights"}
    assert {name for name in called if not callable(getattr(RolloutEngine, name, None))} == set()


def test_only_the_vllm_package_imports_vllm():
    importing = re.compile(r"^\s*(import vllm|from vllm[ .])", re.MULTILINE)
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "jaxmath").rglob("*.py")
                 if importing.search(p.read_text()) and "rollout/vllm/" not in p.as_posix()]
    assert not offenders, offenders
    assert importing.search((ROOT / "jaxmath" / "rollout" / "vllm" / "colocated.py").read_text())
