"""The GRPO host loop on the demo task: exact resume, the metrics contract, filtering, early stopping."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmath import demo, optim
from jaxmath.data import demo_task
from jaxmath.model import init_model
from jaxmath.model.lora import LoRAConfig
from jaxmath.rl import loop
from jaxmath.rl import step as step_lib
from jaxmath.rollout.jax_sampler import JaxSampler, SamplerConfig

TOKENIZER = demo_task.CharTokenizer()
TRAIN, HELD_OUT = demo_task.AdditionTask(digits=1, seed=0).split(num_eval=20)
SMALL = demo.DemoConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                        head_dim=16)


def _run(workdir, steps, *, lora_rank=0, **overrides):
    model = init_model(demo.model_config(SMALL, TOKENIZER.vocab_size), seed=0)
    cfg = loop.GRPOConfig(**{**dict(steps=steps, prompts_per_step=2, num_generations=4, max_completion_tokens=6,
                                    checkpoint_every=2, plot_every=0, prompt_bucket=8, warn_zero_std=1.0,
                                    seed=1), **overrides})
    engine = JaxSampler(model, SamplerConfig(min_bucket=8, vocab_chunk=0))
    result = loop.train(model, TRAIN, encode=lambda batch: [TOKENIZER.encode(e.problem) for e in batch],
                        decode=TOKENIZER.decode, cfg=cfg, loss_cfg=step_lib.LossConfig(logprob_chunk=64),
                        optim_cfg=optim.OptimizerConfig(learning_rate=3e-3), lora_cfg=LoRAConfig(rank=lora_rank),
                        workdir=str(workdir), engine=engine, stop_token_ids=(demo_task.EOS,))
    return model, result


def _metrics(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


@pytest.mark.slow  # four GRPO runs per case
@pytest.mark.parametrize("lora_rank", [0, 4])
def test_resume_is_exact(tmp_path, lora_rank):
    straight, _ = _run(tmp_path / "straight", 4, lora_rank=lora_rank)
    _run(tmp_path / "resumed", 2, lora_rank=lora_rank)
    resumed, _ = _run(tmp_path / "resumed", 4, lora_rank=lora_rank)  # picks up the step-2 checkpoint
    for a, b in zip(jax.tree.leaves(nnx.state(straight)), jax.tree.leaves(nnx.state(resumed))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ref, got = _metrics(tmp_path / "straight"), _metrics(tmp_path / "resumed")
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    for a, b in zip(ref, got):
        for key in ("loss", "reward_mean", "grad_norm", "ratio_mean", "completion_len_mean"):
            assert a[key] == b[key], (key, a["step"])


@pytest.mark.slow  # a GRPO run, ~14 s
def test_metrics_contract_and_plots(tmp_path):
    _, result = _run(tmp_path, 2)
    rows = _metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("step", "loss", "reward_mean", "grad_norm", "step_seconds", "frac_all_correct", "frac_all_wrong",
                "frac_mixed", "completion_len_mean", "completion_len_max", "truncation_rate", "ratio_min",
                "ratio_mean", "ratio_max", "clip_frac", "kl_old", "entropy", "lr", "time/rollout", "time/train",
                "time/sync", "tokens_per_s/rollout", "mismatch/abs_mean"):
        assert key in rows[0], key
    # the JAX sampler and the trainer compute the same logprobs for the same weights
    assert rows[0]["mismatch/abs_max"] < 1e-4
    assert os.path.isfile(tmp_path / "plots" / "summary.png")
    assert result["stopped_early"] == ""


@pytest.mark.slow  # a GRPO run
def test_group_filtering_keeps_shapes_and_counts(tmp_path):
    _run(tmp_path, 2, filter_groups=True, oversample=2.0)
    rows = _metrics(tmp_path)
    assert all(0 <= r["informative_groups"] <= 2 for r in rows)


@pytest.mark.slow  # a GRPO run
def test_early_stop_on_gradient_floor(tmp_path):
    _, result = _run(tmp_path, 6, early_stop_grad_norm=1e9, early_stop_patience=2)
    assert "grad_norm" in result["stopped_early"]
    assert len(_metrics(tmp_path)) == 2


def test_each_early_stop_signal_at_the_studys_thresholds():
    """The study's signals (section 5.5) on synthetic metrics: reward ~0.95, grad norm ~1e-7, the
    engine/trainer ratio ~0.1; each stops the run after `patience` consecutive steps, a step off the
    signal resets its count, and a step without the ratio metric does not count."""
    cfg = loop.GRPOConfig(early_stop_reward=0.95, early_stop_grad_norm=1e-7, early_stop_ratio=0.1,
                          early_stop_patience=3)
    calm = {"reward_mean": 0.6, "grad_norm": 0.02, "mismatch/seq_min_ratio_median": 0.8}
    for metric, saturated, reason in (("reward_mean", 0.96, "reward_mean >= 0.95"),
                                      ("grad_norm", 5e-8, "grad_norm <= 1e-07"),
                                      ("mismatch/seq_min_ratio_median", 0.08,
                                       "mismatch/seq_min_ratio_median <= 0.1")):
        streak: dict = {}
        steps = [saturated, saturated, calm[metric], saturated, saturated, saturated]
        reasons = [loop.early_stop_reason({**calm, metric: v}, cfg, streak) for v in steps]
        assert reasons[:5] == [""] * 5, metric
        assert reasons[5].startswith(reason), reasons[5]
    # Just short of each threshold nothing stops; without mismatch metrics the ratio never counts.
    near = {"reward_mean": 0.94, "grad_norm": 2e-7, "mismatch/seq_min_ratio_median": 0.11}
    streak = {}
    assert [loop.early_stop_reason(near, cfg, streak) for _ in range(5)] == [""] * 5
    streak = {}
    no_tokens = {"reward_mean": 0.5, "grad_norm": 0.1}
    assert [loop.early_stop_reason(no_tokens, cfg, streak) for _ in range(5)] == [""] * 5
    with pytest.raises(ValueError, match="early_stop"):
        loop.GRPOConfig(early_stop_ratio=-0.1)


@pytest.mark.slow  # 8-17 s: out of the fast subset's 10 minutes (the whole suite runs it)
def test_the_loop_stops_on_the_ratio_with_a_log_line_and_a_final_checkpoint(tmp_path, caplog):
    """The ratios of the JAX sampler vs the trainer are ~1, so a threshold of 2 holds from step 1."""
    import logging

    with caplog.at_level(logging.WARNING):
        _, result = _run(tmp_path, 6, early_stop_ratio=2.0, early_stop_patience=3, checkpoint_every=5)
    assert result["stopped_early"].startswith("mismatch/seq_min_ratio_median <= 2"), result["stopped_early"]
    assert len(_metrics(tmp_path)) == 3
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]  # saved at the stop, not only every 5
    assert any("stopping early at step 3: mismatch/seq_min_ratio_median" in r.getMessage() for r in caplog.records)


class _OneOutlierToken:
    """The JAX sampler, except that every rollout's first completion token gets an engine logprob 10
    nats above the trainer's: one token per step whose ratio pi_trainer / pi_engine is e^-10."""

    def __init__(self, engine):
        self.engine = engine

    def generate(self, prompts, params):
        import dataclasses

        rollout = self.engine.generate(prompts, params)
        logprobs = np.array(rollout.logprobs)
        logprobs[0, 0] += 10.0
        return dataclasses.replace(rollout, logprobs=logprobs)

    def __getattr__(self, name):
        return getattr(self.engine, name)


@pytest.mark.slow  # a GRPO run; the ratio signal's rule is tested alone below
def test_one_outlier_token_does_not_stop_a_run(tmp_path):
    """The early-stop option at the study's ratio threshold (0.1, patience 3) on a run whose every step
    has one token at ratio e^-10: the smallest token ratio of each step is below 0.1 (the old signal,
    which stopped this run at step 3), the median over completions of their smallest ratio is not, and
    the run goes its 4 steps."""
    model = init_model(demo.model_config(SMALL, TOKENIZER.vocab_size), seed=0)
    cfg = loop.GRPOConfig(steps=4, prompts_per_step=2, num_generations=4, max_completion_tokens=6, checkpoint_every=0,
                          plot_every=0, prompt_bucket=8, warn_zero_std=1.0, seed=1, early_stop_ratio=0.1,
                          early_stop_patience=3)
    engine = _OneOutlierToken(JaxSampler(model, SamplerConfig(min_bucket=8, vocab_chunk=0)))
    result = loop.train(model, TRAIN, encode=lambda batch: [TOKENIZER.encode(e.problem) for e in batch],
                        decode=TOKENIZER.decode, cfg=cfg, loss_cfg=step_lib.LossConfig(logprob_chunk=64),
                        optim_cfg=optim.OptimizerConfig(learning_rate=3e-3), lora_cfg=LoRAConfig(rank=0),
                        workdir=str(tmp_path), engine=engine, stop_token_ids=(demo_task.EOS,))
    rows = _metrics(tmp_path)
    assert result["stopped_early"] == ""
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["mismatch/ratio_min"] < 1e-4 for r in rows)  # the outlier is there every step
    assert all(r["mismatch/seq_min_ratio_median"] > 0.5 for r in rows)


def test_the_ratio_signal_needs_half_the_completions():
    """The statistic itself: one token (or a minority of completions) at a tiny ratio leaves it near 1;
    once half the completions hold such a token it falls to their level."""
    from jaxmath.rollout.mismatch import logprob_mismatch

    engine = np.zeros((8, 5), np.float32)
    mask = np.ones((8, 5), bool)
    for bad_rows, expected in ((0, 1.0), (1, 1.0), (3, 1.0), (5, np.exp(-5.0))):
        trainer = np.zeros_like(engine)
        trainer[:bad_rows, 2] = -5.0
        stats = logprob_mismatch(engine, trainer, mask)
        np.testing.assert_allclose(stats["mismatch/seq_min_ratio_median"], expected, rtol=1e-6)
        np.testing.assert_allclose(stats["mismatch/ratio_min"], np.exp(-5.0) if bad_rows else 1.0, rtol=1e-6)


@pytest.mark.slow  # a GRPO run, ~18 s
def test_kl_reference_several_iterations_and_importance_correction(tmp_path):
    """LoRA with a KL term (reference = adapters off), 2 policy updates per batch (old logprobs from a
    separate pass) and truncated importance sampling: the run completes and logs each term."""
    import dataclasses

    model = init_model(demo.model_config(SMALL, TOKENIZER.vocab_size), seed=0)
    cfg = loop.GRPOConfig(steps=2, prompts_per_step=2, num_generations=4, max_completion_tokens=6, checkpoint_every=2,
                          plot_every=0, prompt_bucket=8, warn_zero_std=1.0, num_iterations=2)
    loss_cfg = dataclasses.replace(step_lib.LossConfig(logprob_chunk=64), beta=0.05, tis_cap=2.0)
    loop.train(model, TRAIN, encode=lambda batch: [TOKENIZER.encode(e.problem) for e in batch], decode=TOKENIZER.decode,
               cfg=cfg, loss_cfg=loss_cfg, optim_cfg=optim.OptimizerConfig(learning_rate=3e-3),
               lora_cfg=LoRAConfig(rank=4, alpha=8), workdir=str(tmp_path),
               engine=JaxSampler(model, SamplerConfig(min_bucket=8, vocab_chunk=0)), stop_token_ids=(demo_task.EOS,))
    rows = _metrics(tmp_path)
    assert len(rows) == 2
    for r in rows:
        assert r["kl_ref"] >= 0 and r["tis_weight_mean"] > 0 and "time/logprob" in r
        assert r["mismatch/abs_max"] < 1e-4  # old-policy pass and engine agree before the updates


def test_kl_without_lora_is_refused(tmp_path):
    import dataclasses

    model = init_model(demo.model_config(SMALL, TOKENIZER.vocab_size), seed=0)
    with pytest.raises(ValueError, match="needs LoRA"):
        loop.train(model, TRAIN, encode=lambda b: [], decode=TOKENIZER.decode, cfg=loop.GRPOConfig(steps=1),
                   loss_cfg=dataclasses.replace(step_lib.LossConfig(), beta=0.1),
                   optim_cfg=optim.OptimizerConfig(learning_rate=1e-3), lora_cfg=LoRAConfig(rank=0),
                   workdir=str(tmp_path), engine=JaxSampler(model, SamplerConfig(min_bucket=8, vocab_chunk=0)))


class _SleepingSampler(JaxSampler):
    """The JAX sampler answering as a colocated vLLM with sleep mode does, recording the loop's calls."""

    def __init__(self, model, config, calls):
        self.calls = []  # the sampler's own first sync is not the loop's
        super().__init__(model, config)
        self.calls = calls

    def generate(self, prompts, params):
        self.calls.append("generate")
        return super().generate(prompts, params)

    def sleep(self):
        self.calls.append("sleep")
        return True

    def wake_up(self):
        self.calls.append("wake_up")
        return True

    def update_weights(self, model):
        self.calls.append("update_weights")
        return super().update_weights(model)


@pytest.mark.slow  # a GRPO run of two steps, ~15 s
def test_the_engine_sleeps_through_every_jax_program(tmp_path, monkeypatch):
    """A colocated engine is put to sleep before the old-policy logprob pass and the train step, and
    woken only to take the new weights: the device plan (jaxmath.aot.colocate) counts on JAX's programs
    running while vLLM holds neither weights nor KV cache."""
    calls = []

    def recorded(make, name):
        def build(*args, **kwargs):
            fn = make(*args, **kwargs)

            def run(*a, **k):
                calls.append(name)
                return fn(*a, **k)
            return run
        return build

    monkeypatch.setattr(step_lib, "make_logprob_fn", recorded(step_lib.make_logprob_fn, "logprobs"))
    monkeypatch.setattr(step_lib, "make_train_step", recorded(step_lib.make_train_step, "train"))
    model = init_model(demo.model_config(SMALL, TOKENIZER.vocab_size), seed=0)
    cfg = loop.GRPOConfig(steps=2, prompts_per_step=2, num_generations=4, max_completion_tokens=6, checkpoint_every=0,
                          plot_every=0, prompt_bucket=8, warn_zero_std=1.0, seed=1)
    engine = _SleepingSampler(model, SamplerConfig(min_bucket=8, vocab_chunk=0), calls)
    loop.train(model, TRAIN, encode=lambda batch: [TOKENIZER.encode(e.problem) for e in batch], decode=TOKENIZER.decode,
               cfg=cfg, loss_cfg=step_lib.LossConfig(logprob_chunk=64, tis_cap=2.0),  # off-policy: a logprob pass
               optim_cfg=optim.OptimizerConfig(learning_rate=3e-3), lora_cfg=LoRAConfig(rank=0), workdir=str(tmp_path),
               engine=engine, stop_token_ids=(demo_task.EOS,))
    step = ["generate", "sleep", "logprobs", "train", "wake_up", "update_weights"]
    assert calls == ["update_weights"] + step + step
