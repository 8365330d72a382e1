"""rl.max_staleness: the next step's rollout generated in the background while this step trains, one
policy version behind; the synchronous default unchanged; the step timeline; exact resume; refusals."""

import threading
import time

import jax
import numpy as np
import pytest
from flax import nnx

from jaxmath.config import ConfigError
from jaxmath.rl import loop
from tests import overlap_helpers as helpers

# The synchronous loop's figures for helpers.run(workdir, 3), recorded with the code before
# rl.max_staleness existed (commit 2eba35d): the default path must still give them. Since each group's
# prompt passes the layers once (tests/test_shared_prompt.py), sums run in another order: step 3's
# grad_norm moved by 4e-6 relative (the per-row layout still gave these figures to 1e-6), hence rel=1e-5.
BEFORE = [
    {"loss": 7.450580596923828e-09, "grad_norm": 1.5902150869369507, "reward_mean": 0.125, "ratio_mean": 1.0,
     "completion_len_mean": 5.125},
    {"loss": 0.0, "grad_norm": 1.7194920778274536, "reward_mean": 0.625, "ratio_mean": 1.0,
     "completion_len_mean": 3.875},
    {"loss": 2.60770320892334e-08, "grad_norm": 2.518738031387329, "reward_mean": 0.5, "ratio_mean": 1.0,
     "completion_len_mean": 3.75},
]


def _overlaps(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def _span(m: dict, phase: str) -> tuple[float, float]:
    return m[f"timeline/{phase}_start"], m[f"timeline/{phase}_end"]


class SlowRecordingEngine:
    """Wraps a JaxSampler: each generate takes at least `delay` seconds, and a weight update that
    arrives while a generate runs is recorded as a race (the loop must never make one)."""

    def __init__(self, engine, delay: float = 0.4):
        self.engine, self.delay = engine, delay
        self.generating = threading.Event()
        self.races: list[str] = []
        self.threads: list[str] = []

    def generate(self, prompts, params):
        self.generating.set()
        self.threads.append(threading.current_thread().name)
        try:
            time.sleep(self.delay)
            return self.engine.generate(prompts, params)
        finally:
            self.generating.clear()

    def update_weights(self, model):
        if self.generating.is_set():
            self.races.append("update_weights during generate")
        return self.engine.update_weights(model)

    def sleep(self):
        return False

    def wake_up(self):
        return False


def test_the_synchronous_default_is_unchanged_and_its_intervals_do_not_overlap(tmp_path):
    _, ms = helpers.run(tmp_path, 3)
    for m, before in zip(ms, BEFORE, strict=True):
        for key, value in before.items():
            assert m[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (key, m["step"])
        assert m["staleness"] == 0
        rollout, train = _span(m, "rollout"), _span(m, "train")
        assert 0 <= rollout[0] < rollout[1] <= train[0] < train[1]
    for m, following in zip(ms, ms[1:]):
        assert _span(m, "train")[1] <= _span(following, "rollout")[0]


@pytest.mark.slow  # 8-17 s: out of the fast subset's 10 minutes (the whole suite runs it)
def test_the_next_rollout_overlaps_this_steps_training_one_version_behind(tmp_path):
    recorder = {}

    def wrap(engine):
        recorder["engine"] = SlowRecordingEngine(engine)
        return recorder["engine"]

    _, ms = helpers.run(tmp_path, 4, max_staleness=1, engine_wrapper=wrap)
    engine = recorder["engine"]
    assert engine.races == []
    # The first rollout is sampled in the loop's thread, the others in the background.
    assert engine.threads[0] == threading.main_thread().name
    assert all(name.startswith("rollout") for name in engine.threads[1:]) and len(engine.threads) == 4
    assert [m["staleness"] for m in ms] == [0, 1, 1, 1]
    # From step 2 on (step 1 has one-time work between the launch and its training: the first grading,
    # compiles), the next step's rollout runs while this step trains.
    for m, following in zip(ms[1:], ms[2:]):
        assert _overlaps(_span(following, "rollout"), _span(m, "train")), m["step"]
    # old_logprobs are the sampling weights' own: the trainer's pass with them agrees with the engine's
    # logprobs to float error, while the updated policy's ratio has moved away from 1.
    for m in ms:
        assert m["mismatch/abs_max"] < 1e-4, m["step"]
    assert ms[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert all(abs(m["ratio_mean"] - 1.0) > 1e-3 for m in ms[1:])


@pytest.mark.slow  # 8-17 s: out of the fast subset's 10 minutes (the whole suite runs it)
def test_a_stale_step_trains_with_the_sampling_policys_logprobs_not_the_current_ones(tmp_path, monkeypatch):
    """The pass that gives an overlapped step its old_logprobs runs on the weights that sampled."""
    calls = []
    make = loop.step_lib.make_logprob_fn

    def recording(*args, **kwargs):
        fn = make(*args, **kwargs)

        def run(trainable, *a, **k):
            calls.append(np.asarray(jax.tree.leaves(trainable)[0]))
            return fn(trainable, *a, **k)
        return run

    monkeypatch.setattr(loop.step_lib, "make_logprob_fn", recording)
    model, ms = helpers.run(tmp_path, 2, max_staleness=1)
    assert len(calls) == 2
    start = helpers.init_model(helpers.demo.model_config(helpers.SMALL, helpers.TOKENIZER.vocab_size), seed=0)
    first_leaf = jax.tree.leaves(nnx.state(start, nnx.Param))[0]
    # step 1 samples with the starting weights and step 2's rollout too (it was in flight during step 1)
    for leaf in calls:
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(first_leaf))
    assert not np.array_equal(np.asarray(jax.tree.leaves(nnx.state(model, nnx.Param))[0]), np.asarray(first_leaf))


@pytest.mark.slow  # three GRPO runs
def test_an_overlapped_run_resumes_exactly(tmp_path):
    straight, ref = helpers.run(tmp_path / "straight", 5, max_staleness=1, checkpoint_every=2)
    helpers.run(tmp_path / "resumed", 2, max_staleness=1, checkpoint_every=2)
    resumed, got = helpers.run(tmp_path / "resumed", 5, max_staleness=1, checkpoint_every=2)
    # a checkpoint drains the pipeline: the step after it samples with the current weights
    assert [m["staleness"] for m in ref] == [0, 1, 0, 1, 0]
    assert [m["step"] for m in got] == [1, 2, 3, 4, 5]
    for a, b in zip(jax.tree.leaves(nnx.state(straight)), jax.tree.leaves(nnx.state(resumed))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(ref, got):
        for key in helpers.KEYS:
            assert a[key] == b[key], (key, a["step"])


def test_settings_that_cannot_overlap_are_refused(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="max_staleness must be 0"):
        loop.GRPOConfig(max_staleness=2)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ConfigError, match="one process only"):
        helpers.run(tmp_path, 1, max_staleness=1)


def test_a_colocated_vllm_is_refused_with_overlap():
    from jaxmath.config import defaults
    from jaxmath.validate import validate

    cfg = defaults("grpo")
    cfg.rollout.engine = "vllm"
    cfg.rl.max_staleness = 1
    cfg.optimizer.learning_rate = 1e-6
    with pytest.raises(ConfigError, match="cannot overlap a colocated vLLM"):
        validate(cfg)


def test_overlap_on_the_trainers_gpus_is_refused(monkeypatch):
    """With the JAX sampler on the trainer's own GPUs, an overlapped step would hold the sampler's KV
    cache and the train step's temporaries at once, which no memory plan covers: refused in one line.
    Synchronous, or on CPU devices, it runs."""
    from jaxmath import runs

    class Device:
        def __init__(self, platform):
            self.platform = platform

    class Mesh:
        def __init__(self, platform):
            self.devices = np.array([Device(platform)], dtype=object)

    for platform in ("gpu", "cpu"):
        monkeypatch.setattr(runs, "build_mesh", lambda cfg, devices=None, platform=platform: Mesh(platform))
        overlapped = {"rl": {"rollout_devices": 0, "max_staleness": 1}, "rollout": {"engine": "jax"}}
        if platform == "gpu":
            with pytest.raises(ConfigError, match=r"^rl.max_staleness=1 with the JAX sampler on the trainer's GPUs"):
                runs.build_meshes(overlapped)
        else:
            runs.build_meshes(overlapped)
        runs.build_meshes({"rl": {"rollout_devices": 0, "max_staleness": 0}, "rollout": {"engine": "jax"}})
