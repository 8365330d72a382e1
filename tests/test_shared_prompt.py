"""GRPO groups share their prompt: the step runs each prompt through the layers once
(`Qwen3.shared_prompt_hidden_states`), not once per completion, and gets what the per-row layout gets."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmath.rl import step as step_lib
from tests.grpo_fixtures import random_rollout, tiny_model

VOCAB = 128


def _model(with_lora: bool = True):
    return tiny_model(vocab=VOCAB, seed=7, with_lora=with_lora)


def test_shared_prompt_hidden_states_equal_each_whole_sequences():
    model = _model()
    rng = np.random.RandomState(0)
    prompt_lengths = np.array([1, 5, 3])  # one token, the whole width, and between
    group, width, t = 2, 5, 4
    prompts = np.where(np.arange(width)[None] < prompt_lengths[:, None], rng.randint(2, VOCAB, (3, width)), 0)
    continuations = rng.randint(2, VOCAB, (3 * group, t))
    prompt_hidden, hidden = model.shared_prompt_hidden_states(jnp.asarray(prompts), jnp.asarray(prompt_lengths),
                                                              jnp.asarray(continuations))
    # each whole sequence [prompt | continuation], right-padded into one batch
    lengths = np.repeat(prompt_lengths, group) + t
    seqs = np.zeros((3 * group, width + t), np.int32)
    for row in range(3 * group):
        n = prompt_lengths[row // group]
        seqs[row, :n + t] = np.concatenate([prompts[row // group, :n], continuations[row]])
    whole = np.asarray(model.hidden_states(jnp.asarray(seqs), seq_lengths=jnp.asarray(lengths)))
    for row in range(3 * group):
        n = prompt_lengths[row // group]
        np.testing.assert_allclose(np.asarray(hidden[row]), whole[row, n:n + t], atol=2e-5)
        np.testing.assert_allclose(np.asarray(prompt_hidden[row // group, :n]), whole[row, :n], atol=2e-5)


def test_group_size_is_read_from_the_rollouts_layout():
    assert step_lib.group_size(np.array([0, 0, 0, 1, 1, 1])) == 3
    assert step_lib.group_size(np.array([4, 4, 0, 0])) == 2  # whole groups selected, in any order
    assert step_lib.group_size(np.array([0, 1, 0, 1])) == 1  # interleaved
    assert step_lib.group_size(np.array([0, 0, 1, 1, 1])) == 1  # unequal runs
    assert step_lib.group_size(np.array([0, 0, 1, 1, 0, 0])) == 1  # a prompt in two runs
    assert step_lib.group_size(np.array([], np.int32)) == 1
    batch = step_lib.build_batch(random_rollout(vocab=VOCAB, rows=8, group=4, prompt_lens=(3, 6), completion_len=5),
                                 prompt_len=8, advantages=np.zeros(8, np.float32))
    assert batch.group_size == 4


def test_the_step_shares_prompts_only_with_whole_groups_and_xla_attention():
    model = _model()
    assert step_lib.shares_prompts(model, rows=8, completion_len=5, group_size=4)
    assert not step_lib.shares_prompts(model, rows=2, completion_len=5, group_size=4)  # a micro-batch of half a group
    assert not step_lib.shares_prompts(model, rows=8, completion_len=5, group_size=1)
    assert not step_lib.shares_prompts(model, rows=8, completion_len=1, group_size=4)
    model.layers.attn.implementation = "cudnn"
    assert not step_lib.shares_prompts(model, rows=8, completion_len=5, group_size=4)


def _batch(seed=0, prompt_lens=(3, 8), group=4, completion_len=6):
    rollout = random_rollout(vocab=VOCAB, rows=group * len(prompt_lens), group=group, prompt_lens=prompt_lens,
                             completion_len=completion_len, seed=seed)
    advantages = np.random.RandomState(seed + 1).randn(group * len(prompt_lens)).astype(np.float32)
    return step_lib.build_batch(rollout, prompt_len=8, advantages=advantages)


# Off policy, shared against per-row also runs in tests/test_grpo_step.py (micro-batches of half a group).
@pytest.mark.parametrize("on_policy", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_a_step_with_shared_prompts_gives_the_per_row_update(on_policy):
    """The fused head (on policy) and the plain one (off policy, ratios away from 1): the same
    update, metrics and logprobs with each prompt run once as with every row whole."""
    batch = _batch()
    assert batch.group_size == 4
    results = {}
    for group in (4, 1):
        model = _model()
        graphdef, trainable, frozen = step_lib.split_trainable(model)
        opt = optax.sgd(1.0)  # the update is the gradient itself
        train_step = step_lib.make_train_step(graphdef, opt, step_lib.LossConfig(logprob_chunk=5), on_policy=on_policy)
        b = dataclasses.replace(batch, group_size=group, old_logprobs=batch.engine_logprobs + 0.05)
        trainable, _, metrics, logprobs = train_step(trainable, frozen, opt.init(trainable), jax.tree.map(jnp.asarray, b))
        results[group] = (jax.device_get(trainable), jax.device_get(metrics), np.asarray(logprobs))
    (shared, shared_metrics, shared_lp), (rows, rows_metrics, rows_lp) = results[4], results[1]
    for a, b in zip(jax.tree.leaves(shared), jax.tree.leaves(rows), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for key in rows_metrics:
        np.testing.assert_allclose(shared_metrics[key], rows_metrics[key], rtol=1e-5, atol=1e-6, err_msg=key)
    mask = batch.completion_mask  # past a completion's end a logprob is of padding, in either layout
    np.testing.assert_allclose(shared_lp[mask], rows_lp[mask], atol=1e-5)


def test_the_logprob_pass_shares_prompts_and_runs_fewer_flops():
    """The old-policy / reference pass: the same logprobs with group_size, from a program whose
    compiled FLOPs fall as the prompts stop repeating (2 prompts of 8 positions instead of 8 rows)."""
    batch = _batch(seed=3, prompt_lens=(8, 2))
    model = _model(with_lora=False)
    graphdef, trainable, frozen = step_lib.split_trainable(model)
    logprob_fn = step_lib.make_logprob_fn(graphdef, step_lib.LossConfig(logprob_chunk=4))
    args = (trainable, frozen, jnp.asarray(batch.tokens), jnp.asarray(batch.valid), batch.completion_len)
    shared = np.asarray(logprob_fn(*args, group_size=4))
    rows = np.asarray(logprob_fn(*args))
    np.testing.assert_allclose(shared[batch.completion_mask], rows[batch.completion_mask], atol=1e-5)

    def flops(group):
        fn = jax.jit(lambda tr, fr, tok, val: step_lib.completion_logprobs(
            step_lib.nnx.merge(graphdef, tr, fr), tok, val, batch.completion_len, temperature=1.0, chunk=4,
            with_entropy=False, group_size=group)[0])
        return fn.lower(*args[:4]).compile().cost_analysis()["flops"]

    assert flops(4) < 0.8 * flops(1)
