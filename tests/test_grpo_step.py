"""The jitted GRPO step on a real (tiny) Qwen3: micro-batching is exact, logprobs match the model."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxmath.model as jm
from jaxmath import optim
from jaxmath.rl import step as step_lib
from jaxmath.rollout.types import Rollout
from tests.grpo_fixtures import random_rollout, tiny_model


def _model(with_lora: bool):
    return tiny_model(vocab=128, seed=3, with_lora=with_lora)


def _rollout(rows=8, group=4, prompt_lens=(3, 6), completion_len=5, seed=0) -> Rollout:
    return random_rollout(vocab=128, rows=rows, group=group, prompt_lens=prompt_lens, completion_len=completion_len,
                          seed=seed)


@pytest.mark.parametrize("loss_agg,with_lora", [
    pytest.param("seq_mean_token_mean", True, marks=pytest.mark.slow),
    pytest.param("token_mean", True, marks=pytest.mark.slow),
    pytest.param("constant", True, marks=pytest.mark.slow),
    ("seq_mean_token_mean", False)])
def test_micro_batches_give_the_same_update(loss_agg, with_lora):
    rollout = _rollout()
    advantages = np.random.RandomState(1).randn(8).astype(np.float32)
    batch = jax.tree.map(jnp.asarray, step_lib.build_batch(rollout, prompt_len=8, advantages=advantages))
    results = {}
    for micro in (0, 2):
        model = _model(with_lora)
        graphdef, trainable, frozen = step_lib.split_trainable(model)
        # plain SGD: the update is the gradient itself (Adam's normalization would amplify float noise
        # on near-zero gradients and hide what is being compared)
        opt = optax.sgd(1.0)
        cfg = step_lib.LossConfig(loss_agg=loss_agg, micro_batch_rows=micro, logprob_chunk=7)
        train_step = step_lib.make_train_step(graphdef, opt, cfg, on_policy=False)
        old = batch.engine_logprobs + 0.05  # ratios away from 1, some clipped
        b = step_lib.Batch(**{**vars(batch), "old_logprobs": old})
        trainable, _, metrics, logprobs = train_step(trainable, frozen, opt.init(trainable), b)
        results[micro] = (jax.device_get(trainable), jax.device_get(metrics), np.asarray(logprobs))
    ref_params, ref_metrics, ref_lp = results[0]
    for micro in (2,):
        params, metrics, lp = results[micro]
        for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(params)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        for k in ref_metrics:
            np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-5, atol=1e-6, err_msg=k)
        np.testing.assert_allclose(lp, ref_lp, atol=1e-6)


@pytest.mark.slow  # compiles the step and a teacher-forced pass
def test_step_logprobs_equal_teacher_forced_model_logprobs():
    rollout = _rollout(seed=2)
    batch = step_lib.build_batch(rollout, prompt_len=8, advantages=np.zeros(8, np.float32))
    model = _model(with_lora=True)
    graphdef, trainable, frozen = step_lib.split_trainable(model)
    opt = optim.make_optimizer(optim.OptimizerConfig(learning_rate=0.0))
    train_step = step_lib.make_train_step(graphdef, opt, step_lib.LossConfig(), on_policy=True, temperature=0.7)
    _, _, metrics, logprobs = train_step(trainable, frozen, opt.init(trainable), jax.tree.map(jnp.asarray, batch))
    logprobs = np.asarray(logprobs)
    # reference: each row alone, unpadded, full logits through the public forward (a fresh copy of
    # the same model: the step donated the arrays of the first one)
    model = _model(with_lora=True)
    for row in range(8):
        prompt = rollout.prompt_ids[rollout.prompt_index[row]]
        n = int(rollout.completion_mask[row].sum())
        seq = np.concatenate([prompt, rollout.completion_ids[row, :n]])
        logits = np.asarray(model(jnp.asarray(seq[None])))[0] / 0.7
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
        ref = logp[len(prompt) - 1:len(prompt) - 1 + n][np.arange(n), seq[len(prompt):]]
        np.testing.assert_allclose(logprobs[row, :n], ref, atol=1e-4)
    # on-policy: the ratio is exactly 1 and with zero advantages the loss is 0
    assert metrics["ratio_mean"] == pytest.approx(1.0) and abs(float(metrics["loss"])) < 1e-7


def test_step_logprobs_at_the_edges_of_the_row_layout():
    """A one-token prompt (most left padding) and a prompt that fills the bucket with a full-length
    completion (no padding at all): the model sees each row moved to its start, and the logprobs are
    read back at each row's own offset."""
    rollout = _rollout(rows=4, group=2, prompt_lens=(1, 8), completion_len=5, seed=5)
    rollout.completion_mask[:] = True  # every completion full length
    batch = step_lib.build_batch(rollout, prompt_len=8, advantages=np.zeros(4, np.float32))
    model = _model(with_lora=False)
    graphdef, trainable, frozen = step_lib.split_trainable(model)
    logprob_fn = step_lib.make_logprob_fn(graphdef, step_lib.LossConfig(logprob_chunk=4))
    logprobs = np.asarray(logprob_fn(trainable, frozen, jnp.asarray(batch.tokens), jnp.asarray(batch.valid), 5))
    for row in range(4):
        prompt = rollout.prompt_ids[rollout.prompt_index[row]]
        seq = np.concatenate([prompt, rollout.completion_ids[row]])
        logits = np.asarray(model(jnp.asarray(seq[None])))[0]
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
        ref = logp[len(prompt) - 1:len(prompt) + 4][np.arange(5), seq[len(prompt):]]
        np.testing.assert_allclose(logprobs[row], ref, atol=1e-4)


def test_trainable_split_is_lora_only_when_adapters_exist():
    _, trainable, _ = step_lib.split_trainable(_model(with_lora=True))
    leaves = jax.tree.leaves(trainable, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert leaves and all(isinstance(v, jm.LoRAParam) for v in leaves)
    _, trainable, frozen = step_lib.split_trainable(_model(with_lora=False))
    assert sum(x.size for x in jax.tree.leaves(trainable)) == jm.preset("tiny", vocab_size=128).num_params()


@pytest.mark.slow  # 8-17 s: out of the fast subset's 10 minutes (the whole suite runs it)
def test_a_step_moves_probability_toward_rewarded_completions():
    rollout = _rollout(seed=4)
    advantages = np.array([1, -1, 1, -1, 1, -1, 1, -1], np.float32)
    batch = jax.tree.map(jnp.asarray, step_lib.build_batch(rollout, prompt_len=8, advantages=advantages))
    model = _model(with_lora=False)
    graphdef, trainable, frozen = step_lib.split_trainable(model)
    opt = optax.sgd(0.05)  # small enough that the first-order effect dominates
    train_step = step_lib.make_train_step(graphdef, opt, step_lib.LossConfig(), on_policy=True)
    trainable, opt_state, _, before = train_step(trainable, frozen, opt.init(trainable), batch)
    _, _, _, after = train_step(trainable, frozen, opt_state, batch)
    mask = np.asarray(batch.completion_mask)
    change = ((np.asarray(after) - np.asarray(before)) * mask).sum(1)
    assert (change[advantages > 0] > 0).all() and (change[advantages < 0] < 0).all(), change


@pytest.mark.slow  # two compiled steps, ~18 s
@pytest.mark.parametrize("loss_agg", ["constant", "seq_mean_token_mean"])
def test_a_narrower_completion_width_gives_the_same_update(loss_agg):
    """The loop trains on `completion_bucket(longest, max_new_tokens)` columns, not max_new_tokens: the
    columns past every row's end are padding, so the update, metrics and logprobs are the same."""
    short = _rollout(completion_len=5)
    wide = Rollout(prompt_ids=short.prompt_ids, completion_ids=np.pad(short.completion_ids, ((0, 0), (0, 11))),
                   logprobs=np.pad(short.logprobs, ((0, 0), (0, 11))),
                   completion_mask=np.pad(short.completion_mask, ((0, 0), (0, 11))),
                   finish_reason=short.finish_reason, prompt_index=short.prompt_index)
    advantages = np.random.RandomState(1).randn(8).astype(np.float32)
    longest = int(wide.completion_lengths.max())
    assert step_lib.completion_bucket(longest, 16, smallest=4) == 8
    results = {}
    for width in (16, 8):
        batch = jax.tree.map(jnp.asarray, step_lib.build_batch(wide, prompt_len=8, advantages=advantages,
                                                               completion_len=width))
        graphdef, trainable, frozen = step_lib.split_trainable(_model(True))
        opt = optax.sgd(1.0)
        cfg = step_lib.LossConfig(loss_agg=loss_agg, logprob_chunk=7)
        train_step = step_lib.make_train_step(graphdef, opt, cfg, on_policy=False, max_completion_tokens=16)
        b = step_lib.Batch(**{**vars(batch), "old_logprobs": batch.engine_logprobs + 0.05})
        trainable, _, metrics, logprobs = train_step(trainable, frozen, opt.init(trainable), b)
        results[width] = (jax.device_get(trainable), jax.device_get(metrics), np.asarray(logprobs)[:, :8])
    for a, b in zip(jax.tree.leaves(results[16][0]), jax.tree.leaves(results[8][0])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for k in results[16][1]:
        np.testing.assert_allclose(results[8][1][k], results[16][1][k], rtol=1e-5, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(results[8][2], results[16][2], atol=1e-6)
    with pytest.raises(ValueError, match="must hold the longest completion"):
        step_lib.build_batch(wide, prompt_len=8, advantages=advantages, completion_len=longest - 1)
