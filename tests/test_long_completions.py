"""Long completions (issue 27): the update does not depend on how the sequence is cut up.

Everything that grows with the completion length is computed in pieces: the LM head over chunks of
token positions and vocabulary tiles (`jaxmath.model.head.token_logprobs`), the layers' activations
recomputed per layer (`model.remat`), the batch in micro-batches. These tests hold the chunked loss
and gradients equal to those of full [rows, T, vocab] logits computed in one piece without remat,
for GRPO and SFT, and run a GRPO step at 4,096 completion tokens on the tiny Qwen3 of
tests/tiny_qwen.py (the real vocabulary of 151,936) on this CPU. The memory side (the plan choosing
the rows that fit at 32K-128K tokens on an H100) is in tests/test_aot.py.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxmath.model as jm
from jaxmath.model import lora
from jaxmath.model.head import token_logprobs, weighted_token_logprobs
from jaxmath.rl import grpo
from jaxmath.rl import step as step_lib
from jaxmath.rollout.types import Rollout
from jaxmath.sft import step as sft_step
from tests.grpo_fixtures import random_rollout, tiny_model


def test_token_logprobs_at_any_chunking_equal_the_full_log_softmax():
    """Logprobs and their gradients (hidden and head) at position chunks that do and do not divide the
    tokens, and vocabulary tiles that do and do not divide the vocabulary, equal log_softmax of the
    full logits."""
    rng = np.random.RandomState(0)
    hidden = jnp.asarray(rng.randn(3, 11, 16), jnp.float32)
    head = jnp.asarray(0.3 * rng.randn(300, 16), jnp.float32)
    targets = jnp.asarray(rng.randint(0, 300, (3, 11)), jnp.int32)
    weights = jnp.asarray(rng.randn(3, 11), jnp.float32)

    def full(h, w):
        logits = jnp.einsum("btd,vd->btv", h, w) / 0.7
        return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1)[..., 0]

    def chunked(h, w, chunk, vocab_chunk):
        return token_logprobs(h, w, targets, temperature=0.7, chunk_size=chunk, vocab_chunk=vocab_chunk)[0]

    want = full(hidden, head)
    want_grads = jax.grad(lambda h, w: jnp.sum(weights * full(h, w)), argnums=(0, 1))(hidden, head)
    for chunk, vocab_chunk in ((1, 4096), (4, 64), (7, 128), (33, 300), (1024, 96)):
        got = chunked(hidden, head, chunk, vocab_chunk)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"chunk {chunk}/{vocab_chunk}")
        grads = jax.grad(lambda h, w: jnp.sum(weights * chunked(h, w, chunk, vocab_chunk)), argnums=(0, 1))(hidden, head)
        for g, w in zip(grads, want_grads):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=f"chunk {chunk}/{vocab_chunk}")


def _head_dots(loss, argnums, *args) -> int:
    """Matmuls in the compiled gradient program of `loss` (XLA's CPU HLO keeps them as `dot`)."""
    text = jax.jit(jax.grad(loss, argnums=argnums)).lower(*args).compile().as_text()
    return sum(1 for line in text.splitlines() if re.search(r"\bdot\(", line))


@pytest.mark.slow  # 8-17 s: out of the fast subset's 10 minutes (the whole suite runs it)
def test_weighted_logprobs_take_the_head_gradient_in_the_forward_pass():
    """`weighted_token_logprobs` (SFT's NLL, on-policy GRPO): its objective sum(w * logprob) and the
    objective's gradient in the hidden states and the head equal those through `token_logprobs` at
    chunkings that do and do not divide the tokens and the vocabulary; its logprobs and entropy are
    token_logprobs'. Its gradient program runs three logits-sized matmuls per vocabulary tile (logits,
    d hidden, d head) where token_logprobs' runs four (logits, their recomputation, d hidden, d head),
    and two with a frozen head (LoRA), where the recomputation's three remain."""
    rng = np.random.RandomState(0)
    hidden = jnp.asarray(rng.randn(3, 11, 16), jnp.float32)
    head = jnp.asarray(0.3 * rng.randn(300, 16), jnp.float32)
    targets = jnp.asarray(rng.randint(0, 300, (3, 11)), jnp.int32)
    weights = jnp.asarray(rng.randn(3, 11), jnp.float32)

    def through_logprobs(h, w, chunk, vocab_chunk):
        return jnp.sum(weights * token_logprobs(h, w, targets, temperature=0.7, chunk_size=chunk,
                                                vocab_chunk=vocab_chunk)[0])

    def fused(h, w, chunk, vocab_chunk):
        return weighted_token_logprobs(h, w, targets, weights, temperature=0.7, chunk_size=chunk,
                                       vocab_chunk=vocab_chunk, with_entropy=True)

    for chunk, vocab_chunk in ((1, 4096), (4, 64), (7, 128), (1024, 96)):
        want, want_grads = jax.value_and_grad(through_logprobs, argnums=(0, 1))(hidden, head, chunk, vocab_chunk)
        got, got_grads = jax.value_and_grad(lambda h, w: fused(h, w, chunk, vocab_chunk)[0], argnums=(0, 1))(
            hidden, head)
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=f"chunk {chunk}/{vocab_chunk}")
        for g, w in zip(got_grads, want_grads):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6, err_msg=f"chunk {chunk}/{vocab_chunk}")
        got_h = jax.grad(lambda h: fused(h, head, chunk, vocab_chunk)[0])(hidden)  # a frozen head
        np.testing.assert_allclose(got_h, want_grads[0], rtol=1e-4, atol=1e-6)
        logprobs, entropy = token_logprobs(hidden, head, targets, temperature=0.7, chunk_size=chunk,
                                           vocab_chunk=vocab_chunk, with_entropy=True)
        _, got_logprobs, got_entropy = fused(hidden, head, chunk, vocab_chunk)
        np.testing.assert_allclose(got_logprobs, logprobs, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got_entropy, entropy, rtol=1e-5, atol=1e-6)

    def chunked(h, w):
        return through_logprobs(h, w, 8, 64)

    def one_pass(h, w):
        return fused(h, w, 8, 64)[0]

    assert _head_dots(chunked, (0, 1), hidden, head) == 4
    assert _head_dots(one_pass, (0, 1), hidden, head) == 3
    assert _head_dots(lambda h: chunked(h, head), 0, hidden) == 3
    assert _head_dots(lambda h: one_pass(h, head), 0, hidden) == 2


def _model(remat: str = "full", with_lora: bool = True):
    return tiny_model(vocab=320, seed=5, remat=remat, with_lora=with_lora)


def _rollout(rows=6, group=3, prompt_lens=(4, 7), completion_len=9, seed=0) -> Rollout:
    return random_rollout(vocab=320, rows=rows, group=group, prompt_lens=prompt_lens, completion_len=completion_len,
                          seed=seed)


def _full_logits_grpo_loss(graphdef, frozen, batch, cfg: step_lib.LossConfig, temperature: float,
                           on_policy: bool = False):
    """The GRPO loss from full [rows, P + T, vocab] logits of the model's plain forward (no remat, no
    chunks, no row shift: left padding masked), as a reference; on_policy: against the logprobs
    themselves (under stop_gradient) instead of the batch's old_logprobs."""
    from flax import nnx

    completion_len = batch.completion_mask.shape[1]
    prompt_len = batch.tokens.shape[1] - completion_len
    normalizer = grpo.loss_normalizer(batch.completion_mask, cfg.loss_agg, completion_len)

    def loss(trainable):
        model = nnx.merge(graphdef, trainable, frozen)
        logits = model(batch.tokens, attention_mask=batch.valid) / temperature
        logprobs = jax.nn.log_softmax(logits[:, prompt_len - 1:-1], -1)
        logprobs = jnp.take_along_axis(logprobs, batch.tokens[:, prompt_len:, None], -1)[..., 0]
        old = jax.lax.stop_gradient(logprobs) if on_policy else batch.old_logprobs
        value, _ = grpo.policy_loss(logprobs, old, batch.advantages, batch.completion_mask,
                                    eps_low=cfg.eps_low, eps_high=cfg.eps_high, loss_agg=cfg.loss_agg,
                                    is_level=cfg.is_level, beta=cfg.beta, normalizer=normalizer)
        return value

    return loss


@pytest.mark.parametrize("loss_agg,on_policy", [pytest.param("seq_mean_token_mean", False, marks=pytest.mark.slow),
                                               pytest.param("seq_mean_token_mean", True, marks=pytest.mark.slow),
                                               pytest.param("token_mean", False, marks=pytest.mark.slow)])
def test_grpo_chunked_loss_and_gradients_equal_unchunked(loss_agg, on_policy):
    """The train step's gradient (its SGD update at learning rate 1) with the LM head in chunks of 4
    positions, remat of every layer and micro-batches of 2 rows equals the gradient of the same loss
    from full logits in one piece; and its logprobs equal the full log-softmax's. On policy the step's
    LM head takes its gradient in its forward pass (`weighted_token_logprobs`); off policy (some
    ratios clipped) it does not."""
    from flax import nnx

    rollout = _rollout()
    advantages = np.random.RandomState(1).randn(6).astype(np.float32)
    batch = jax.tree.map(jnp.asarray, step_lib.build_batch(rollout, prompt_len=8, advantages=advantages))
    batch = step_lib.Batch(**{**vars(batch), "old_logprobs": batch.engine_logprobs + 0.05})  # some clipped
    cfg = step_lib.LossConfig(loss_agg=loss_agg, micro_batch_rows=2, logprob_chunk=4, with_entropy=False)
    graphdef, trainable, frozen = step_lib.split_trainable(_model())
    reference = _full_logits_grpo_loss(graphdef, frozen, batch, cfg, temperature=0.8, on_policy=on_policy)
    want = jax.grad(reference)(trainable)
    opt = optax.sgd(1.0)
    step = step_lib.make_train_step(graphdef, opt, cfg, on_policy=on_policy, temperature=0.8)
    before = jax.device_get(trainable)
    after, _, metrics, logprobs = step(jax.tree.map(jnp.copy, trainable), frozen, opt.init(trainable), batch)
    got = jax.tree.map(lambda b, a: b - a, before, jax.device_get(after))
    leaves = jax.tree.leaves(want)
    assert leaves and max(float(jnp.max(jnp.abs(g))) for g in leaves) > 1e-4  # gradients to compare
    for g, w in zip(jax.tree.leaves(got), leaves):
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], reference(trainable), rtol=1e-5, atol=1e-6)
    model = nnx.merge(graphdef, trainable, frozen)
    logits = model(batch.tokens, attention_mask=batch.valid)[:, 7:-1] / 0.8
    full = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), batch.tokens[:, 8:, None], -1)[..., 0]
    mask = np.asarray(batch.completion_mask)
    np.testing.assert_allclose(np.asarray(logprobs)[mask], np.asarray(full)[mask], atol=2e-5)


@pytest.mark.slow  # ~20 s; the head's chunking stays in the fast subset (the weighted and token_logprobs tests)
def test_sft_chunked_loss_and_gradients_equal_unchunked():
    """SFT's summed NLL and its gradient with the LM head in chunks of 5 positions and remat ("full",
    and "offload": each layer's saved input in host memory) equal those of full logits in one piece
    without remat."""
    from flax import nnx

    rng = np.random.RandomState(2)
    rows, seq = 3, 13
    lengths = np.array([13, 9, 4])
    real = np.arange(seq)[None] < lengths[:, None]
    ids = np.where(real, rng.randint(2, 320, (rows, seq)), 0).astype(np.int32)
    batch = {"input_ids": ids, "targets": np.roll(ids, -1, axis=1), "segment_ids": real.astype(np.int32),
             "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (rows, seq)).copy(),
             "loss_mask": real & (np.arange(seq)[None] >= 2) & (np.arange(seq)[None] < lengths[:, None] - 1)}
    batch = jax.tree.map(jnp.asarray, batch)
    graphdef, trainable, frozen = step_lib.split_trainable(_model(with_lora=False))
    # model.remat "offload": each layer's saved input in host memory, the same gradient
    offload_graphdef, _, _ = step_lib.split_trainable(_model(remat="offload", with_lora=False))

    def chunked(t, graphdef=graphdef):
        return sft_step.token_nll(graphdef, t, frozen, batch, chunk_size=5, remat=True, one_document_per_row=True)[0]

    def full(t):
        model = nnx.merge(graphdef, t, frozen)
        logits = model(batch["input_ids"], attention_mask=real)
        logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), batch["targets"][..., None], -1)[..., 0]
        return -jnp.sum(jnp.where(batch["loss_mask"], logprobs, 0.0))

    np.testing.assert_allclose(chunked(trainable), full(trainable), rtol=1e-5)
    want = jax.tree.leaves(jax.grad(full)(trainable))
    for remat_graphdef in (graphdef, offload_graphdef):
        got = jax.grad(lambda t: chunked(t, remat_graphdef))(trainable)
        for g, w in zip(jax.tree.leaves(got), want):
            np.testing.assert_allclose(g, w, rtol=2e-4, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory):
    from tests.tiny_qwen import write_tiny_qwen3

    return write_tiny_qwen3(tmp_path_factory.mktemp("tiny_qwen3"))


@pytest.mark.slow  # two train steps over 4 rows of ~4,100 positions and the full vocabulary
def test_a_grpo_step_at_4096_completion_tokens_trains(tiny_qwen3):
    """A GRPO step at 4,096 completion tokens on the tiny Qwen3 (151,936-token vocabulary), one row
    per micro-batch as the plan picks at long lengths, with LoRA as the study's LoRA rows train: the
    logprob of every rewarded completion goes up and of every penalized one goes down."""
    model = jm.from_pretrained(str(tiny_qwen3), dtype=jnp.float32, param_dtype=jnp.float32)
    lora.apply_lora(model, lora.LoRAConfig(rank=8, alpha=16), seed=1)
    rng = np.random.RandomState(3)
    completion = 4096
    prompts = [list(rng.randint(10, 5000, 30)), list(rng.randint(10, 5000, 21))]
    lengths = np.array([completion, 3000, completion, 1800])  # two rows run to the limit
    mask = np.arange(completion)[None] < lengths[:, None]
    rollout = Rollout(prompt_ids=prompts, completion_ids=np.where(mask, rng.randint(10, 150000, (4, completion)), 0),
                      logprobs=np.zeros((4, completion), np.float32), completion_mask=mask,
                      finish_reason=np.zeros(4, np.int8), prompt_index=np.array([0, 0, 1, 1], np.int32))
    advantages = np.array([1, -1, 1, -1], np.float32)
    batch = jax.tree.map(jnp.asarray, step_lib.build_batch(rollout, prompt_len=64, advantages=advantages))
    assert batch.tokens.shape == (4, 64 + completion)
    graphdef, trainable, frozen = step_lib.split_trainable(model)
    opt = optax.adam(1e-3)
    cfg = step_lib.LossConfig(micro_batch_rows=1, logprob_chunk=1024, loss_agg="token_mean")
    step = step_lib.make_train_step(graphdef, opt, cfg, on_policy=True)
    trainable, opt_state, metrics, before = step(trainable, frozen, opt.init(trainable), batch)
    _, _, _, after = step(trainable, frozen, opt_state, batch)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    change = ((np.asarray(after) - np.asarray(before)) * mask).sum(1)
    assert (change[advantages > 0] > 0).all() and (change[advantages < 0] < 0).all(), change
