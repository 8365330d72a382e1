"""The jitted GRPO step and the logprob pass: the model meets `jaxmath.rl.grpo`'s pure math.

A batch is `rows = num_prompts * num_generations` sequences laid out as
`[left-padded prompt (P) | completion (T)]`. The policy's logprob of completion token j comes from
the hidden state at position P - 1 + j, computed by the chunked LM head (`token_logprobs`), so no
[rows, T, vocab] float32 tensor exists for the batch.

The step splits the rows into micro-batches inside its jit and hands them, with this loss, to
`jaxmath.train_state.accumulate_and_apply` (the update SFT uses too): each micro-batch's loss is its
share of the whole batch's (normalized by whole-batch counts, see `grpo`), so k micro-batches give
the update of one batch. The step donates the trainable state and optimizer state it replaces.

On-policy shortcut: with one policy iteration per batch and no importance correction, the old
policy *is* the current one, so `old_logprobs = stop_gradient(logprobs)` inside the step (TRL does
the same) and no separate logprob pass runs; the logprobs are still returned, so the mismatch with
the rollout engine's logprobs is measured every step.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxmath.model import sharding
from jaxmath.model.head import token_logprobs, weighted_token_logprobs
from jaxmath.model.lora import split_trainable  # noqa: F401  (the step's callers split with it)
from jaxmath.model.qwen3 import Qwen3
from jaxmath.rl import grpo
from jaxmath.train_state import accumulate_and_apply, micro_batches

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The GRPO objective and how the step computes it. Defaults follow the study (TRL's GRPO loss:
    eps 0.2 on both sides, no KL term, loss per sequence then per batch).

    The sampling temperature and Dr. GRPO's constant normalizer (the max completion length) are
    rollout settings (`GRPOConfig.temperature`, `GRPOConfig.max_completion_tokens`); the step
    builders take them as arguments.

    eps_low, eps_high: the clipping range of the policy ratio, [1 - eps_low, 1 + eps_high] (DAPO's
                      clip-higher raises eps_high)
    beta:             weight of the KL penalty against the reference policy (0: none, as the study)
    loss_agg:         how token losses add up: "seq_mean_token_mean" (each sequence's mean, then the
                      batch's; TRL's GRPO), "token_mean" (all tokens at once; DAPO) or "constant"
                      (divided by max_completion_tokens; Dr. GRPO)
    is_level:         the policy ratio per "token" (GRPO) or per "sequence" (GSPO's geometric mean)
    tis_cap:          > 0 enables truncated importance sampling against the engine's logprobs
    micro_batch_rows: rows per micro-batch (0: the whole batch at once; `jaxmath.aot.device` makes 0 "auto"
                      on a GPU, the largest that fits its memory, and refuses a value that does not
                      fit before weights load: `jaxmath.aot.fit`)
    logprob_chunk:    token positions per LM-head chunk
    with_entropy:     also compute the policy's per-token entropy, logged as a metric (costs a little
                      time in the logprob pass)
    """

    eps_low: float = 0.2
    eps_high: float = 0.2
    beta: float = 0.0
    loss_agg: str = "seq_mean_token_mean"
    is_level: str = "token"
    tis_cap: float = 0.0
    micro_batch_rows: int = 0
    logprob_chunk: int = 1024
    with_entropy: bool = True

    def __post_init__(self):
        if self.loss_agg not in grpo.LOSS_AGGS:
            raise ValueError(f"loss_agg must be one of {grpo.LOSS_AGGS}, got {self.loss_agg!r}")
        if self.is_level not in grpo.IS_LEVELS:
            raise ValueError(f"is_level must be one of {grpo.IS_LEVELS}, got {self.is_level!r}")
        if self.tis_cap < 0:
            raise ValueError(f"tis_cap must be >= 0 (0 disables truncated importance sampling), got {self.tis_cap}")


@dataclasses.dataclass
class Batch:
    """One GRPO batch as host or device arrays.

    tokens:          [rows, P + T] int32, left-padded prompts then right-padded completions
    valid:           [rows, P + T] bool, real tokens (prompt tokens and generated tokens)
    completion_mask: [rows, T] bool, tokens that carry loss
    advantages:      [rows] float32
    old_logprobs:    [rows, T] float32, log pi_old (zeros when the on-policy shortcut applies)
    engine_logprobs: [rows, T] float32, the rollout engine's logprobs (for mismatch and TIS)
    ref_logprobs:    [rows, T] float32 or None, the reference policy's (KL term)
    group_size:      static: rows come in runs of this many sharing one prompt (GRPO's K; 1: no
                     grouping known), so the step runs each prompt through the layers once
    """

    tokens: Any
    valid: Any
    completion_mask: Any
    advantages: Any
    old_logprobs: Any
    engine_logprobs: Any
    ref_logprobs: Any = None
    group_size: int = 1

    @property
    def completion_len(self) -> int:
        return self.completion_mask.shape[1]


jax.tree_util.register_dataclass(
    Batch, data_fields=["tokens", "valid", "completion_mask", "advantages", "old_logprobs", "engine_logprobs",
                        "ref_logprobs"], meta_fields=["group_size"])


def shares_prompts(model: Qwen3, rows: int, completion_len: int, group_size: int) -> bool:
    """Whether the step runs each group's prompt through the layers once (`Qwen3.shared_prompt_hidden_states`):
    with groups known, whole groups in the rows, and the XLA attention kernel (cuDNN's takes the
    per-row layout's lengths, where the shared prompt's keys would need a dense mask)."""
    return (group_size > 1 and rows % group_size == 0 and completion_len > 1
            and model.layers.attn.implementation_for(cached=False) != "cudnn")


def _to_start(tokens: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(tokens moved left by each row's left padding, that padding, each row's count of real tokens)."""
    lead = jnp.argmax(valid, axis=1).astype(jnp.int32)
    moved = jax.vmap(lambda row, shift: jnp.roll(row, -shift))(tokens, lead)
    return moved, lead, jnp.sum(valid, axis=1, dtype=jnp.int32)


def _completion_hidden(model: Qwen3, tokens: jax.Array, valid: jax.Array, completion_len: int, *, lora: bool,
                       remat: bool, group_size: int = 1) -> tuple[jax.Array, jax.Array]:
    """(hidden, head) operands of the LM head for the completion tokens (`completion_logprobs`)."""
    width = tokens.shape[1]
    prompt_len = width - completion_len
    if shares_prompts(model, tokens.shape[0], completion_len, group_size):
        # Row 0 of each group holds the group's prompt; its hidden state at the last prompt token
        # predicts completion token 0, the completion's own positions the rest.
        prompts, _, prompt_lengths = _to_start(tokens[::group_size, :prompt_len], valid[::group_size, :prompt_len])
        prompt_hidden, hidden = model.shared_prompt_hidden_states(
            prompts, prompt_lengths, tokens[:, prompt_len:-1], lora=lora, remat=remat)
        last = jnp.take_along_axis(prompt_hidden, (prompt_lengths - 1)[:, None, None], axis=1)
        hidden = jnp.concatenate([jnp.repeat(last, group_size, axis=0), hidden], axis=1)
        return model.head_operands(hidden, lora)
    packed, lead, lengths = _to_start(tokens, valid)  # lead: the left padding of each row's prompt
    # The last position predicts nothing, so the model sees width - 1 of them.
    hidden = model.hidden_states(packed[:, :-1], seq_lengths=jnp.minimum(lengths, width - 1), lora=lora,
                                 remat=remat)
    # Completion token j sits at prompt_len + j - lead; the hidden state one position earlier predicts it.
    hidden = jax.vmap(lambda h, start: jax.lax.dynamic_slice_in_dim(h, start, completion_len))(
        hidden, prompt_len - 1 - lead)
    return model.head_operands(hidden, lora)


def completion_logprobs(model: Qwen3, tokens: jax.Array, valid: jax.Array, completion_len: int, *,
                        temperature: float, chunk: int, with_entropy: bool, lora: bool = True,
                        remat: bool = False, group_size: int = 1) -> tuple[jax.Array, jax.Array]:
    """Logprobs [rows, T] and entropy [rows, T] of the completion tokens under the model.

    tokens, valid [rows, P + T] in the Batch layout; each row's real tokens are one run (its prompt,
    then its completion) holding at least one prompt token. The model sees each row moved left by its
    prompt padding, one right-padded sequence of known length: cuDNN's attention takes the lengths
    (no mask, no dense bias, any length), XLA the equivalent mask. The hidden states before the
    completion tokens are then read at each row's own offset.
    group_size: rows come in runs of this many sharing one prompt; where `shares_prompts`, each
    prompt passes the layers once (`Qwen3.shared_prompt_hidden_states`), the same logprobs up to float
    rounding.
    """
    hidden, head = _completion_hidden(model, tokens, valid, completion_len, lora=lora, remat=remat,
                                      group_size=group_size)
    return token_logprobs(hidden, head, tokens[:, -completion_len:], temperature=temperature,
                          chunk_size=chunk, with_entropy=with_entropy)


def weighted_completion_logprobs(model: Qwen3, tokens: jax.Array, valid: jax.Array, weights: jax.Array, *,
                                 temperature: float, chunk: int, with_entropy: bool, remat: bool = False,
                                 group_size: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`completion_logprobs` with the LM head's gradient taken in its forward pass
    (`jaxmath.model.head.weighted_token_logprobs`): (sum(weights * logprobs), logprobs, entropy), where
    only the first carries a gradient. weights [rows, T] = d loss / d logprob, known in advance."""
    completion_len = weights.shape[1]
    hidden, head = _completion_hidden(model, tokens, valid, completion_len, lora=True, remat=remat,
                                      group_size=group_size)
    return weighted_token_logprobs(hidden, head, tokens[:, -completion_len:], weights, temperature=temperature,
                                   chunk_size=chunk, with_entropy=with_entropy)


def make_logprob_fn(graphdef: nnx.GraphDef, cfg: LossConfig, *, temperature: float = 1.0) -> Callable:
    """Jitted (trainable, frozen, tokens, valid, completion_len, lora, group_size) -> logprobs [rows, T]
    (0 past each completion's end) under softmax(logits / temperature): the 'old policy' pass when
    num_iterations > 1 or importance correction needs it, and the reference policy pass (lora=False) for a KL term. group_size: the
    batch's `Batch.group_size` (its prompts then pass the layers once). Runs under the mesh its
    arguments are on."""

    def logprobs_fn(trainable, frozen, tokens, valid, completion_len: int, lora: bool = True, group_size: int = 1):
        model = nnx.merge(graphdef, trainable, frozen)

        def one(xs):
            return completion_logprobs(model, xs[0], xs[1], completion_len, temperature=temperature,
                                       chunk=cfg.logprob_chunk, with_entropy=False, lora=lora,
                                       group_size=group_size)[0]

        logprobs = jax.lax.map(one, micro_batches((tokens, valid), cfg.micro_batch_rows))
        return jnp.where(valid[:, -completion_len:], logprobs.reshape(tokens.shape[0], completion_len), 0.0)

    return sharding.jit_on_mesh(logprobs_fn, static_argnames=("completion_len", "lora", "group_size"))


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, cfg: LossConfig, *,
                    on_policy: bool, temperature: float = 1.0, max_completion_tokens: int = 0) -> Callable:
    """Jitted (trainable, frozen, opt_state, batch) -> (trainable, opt_state, metrics, logprobs), run
    under the mesh its arguments are on.

    on_policy: old_logprobs = stop_gradient(current logprobs) (the batch's old_logprobs are ignored).
    temperature: the rollouts' sampling temperature; logprobs are of softmax(logits / temperature).
    max_completion_tokens: Dr. GRPO's constant normalizer for loss_agg="constant" (0: the batch's T).
    cfg.tis_cap > 0: truncated importance sampling weights min(exp(old - engine), tis_cap) per token.
    metrics: float32 scalars (loss, clip fractions, ratio stats, KL, entropy, grad_norm, ...).
    logprobs: [rows, T] float32, the trainer's logprobs before the update (for mismatch logging), 0
              past each completion's end.
    """
    if temperature <= 0:
        raise ValueError("training needs temperature > 0 (greedy rollouts have no policy gradient)")

    # On policy, without a KL term or engine weights, the ratio is exactly 1 and d loss / d logprob
    # does not depend on the logprobs: the LM head then takes its gradient in its forward pass.
    fused_head = on_policy and cfg.beta == 0 and cfg.tis_cap == 0

    def micro_loss(trainable, frozen, mb: Batch, normalizer: grpo.Normalizer):
        model = nnx.merge(graphdef, trainable, frozen)

        def loss_of(logprobs, old, entropy):
            tis = None
            if cfg.tis_cap > 0:
                tis = jnp.minimum(jnp.exp(jnp.where(mb.completion_mask, old - mb.engine_logprobs, 0.0)), cfg.tis_cap)
            return grpo.policy_loss(
                logprobs, old, mb.advantages, mb.completion_mask, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                loss_agg=cfg.loss_agg, is_level=cfg.is_level, beta=cfg.beta, ref_logprobs=mb.ref_logprobs,
                normalizer=normalizer, tis_weights=tis, entropy=entropy)

        if fused_head:
            weights = jax.grad(lambda x: loss_of(x, jax.lax.stop_gradient(x), None)[0])(
                jnp.zeros(mb.completion_mask.shape, F32))
            objective, logprobs, entropy = weighted_completion_logprobs(
                model, mb.tokens, mb.valid, weights, temperature=temperature, chunk=cfg.logprob_chunk,
                with_entropy=cfg.with_entropy, remat=True, group_size=mb.group_size)
            loss, metrics = loss_of(logprobs, logprobs, entropy if cfg.with_entropy else None)
            return loss + objective - jax.lax.stop_gradient(objective), (metrics, logprobs)
        logprobs, entropy = completion_logprobs(
            model, mb.tokens, mb.valid, mb.completion_mask.shape[1], temperature=temperature,
            chunk=cfg.logprob_chunk, with_entropy=cfg.with_entropy, remat=True, group_size=mb.group_size)
        old = jax.lax.stop_gradient(logprobs) if on_policy else mb.old_logprobs
        loss, metrics = loss_of(logprobs, old, entropy if cfg.with_entropy else None)
        return loss, (metrics, logprobs)

    def train_step(trainable, frozen, opt_state, batch: Batch):
        rows, completion_len = batch.completion_mask.shape
        normalizer = grpo.loss_normalizer(batch.completion_mask, cfg.loss_agg, max_completion_tokens or completion_len)
        trainable, opt_state, _, (metrics, logprobs), norms = accumulate_and_apply(
            functools.partial(micro_loss, normalizer=normalizer), optimizer, trainable, frozen, opt_state,
            micro_batches(batch, cfg.micro_batch_rows))
        return (trainable, opt_state, {**grpo.finalize(grpo.combine_stacked(metrics)), **norms},
                jnp.where(batch.completion_mask, logprobs.reshape(rows, completion_len), 0.0))

    return sharding.jit_on_mesh(train_step, donate_argnums=(0, 2))


def build_batch(rollout, prompt_len: int, advantages: np.ndarray, old_logprobs: np.ndarray | None = None,
                ref_logprobs: np.ndarray | None = None, pad_id: int = 0, completion_len: int = 0) -> Batch:
    """Host arrays of a `Batch` from a `Rollout` (rows grouped by prompt).

    prompt_len:     the padded prompt width P (>= the longest prompt; a bucket keeps shapes static).
    completion_len: the completion width T (>= the longest completion; `completion_bucket`); 0 keeps the
                    rollout's own width (max_new_tokens). Columns past every row's end are all padding,
                    masked out of every loss and metric, so a narrower T changes no result, only the cost.
    """
    rows, width = rollout.completion_ids.shape
    completion_len = completion_len or width
    longest = int(np.asarray(rollout.completion_mask).sum(axis=1).max(initial=0))
    if not longest <= completion_len <= width:
        raise ValueError(f"completion_len {completion_len} must hold the longest completion ({longest}) and be at "
                         f"most the rollout's width {width}")
    rollout_ids = rollout.completion_ids[:, :completion_len]
    rollout_mask = np.asarray(rollout.completion_mask, bool)[:, :completion_len]
    rollout_logprobs = rollout.logprobs[:, :completion_len]
    tokens = np.full((rows, prompt_len + completion_len), pad_id, np.int32)
    valid = np.zeros((rows, prompt_len + completion_len), bool)
    for row in range(rows):
        prompt = rollout.prompt_ids[int(rollout.prompt_index[row])]
        if len(prompt) > prompt_len:
            raise ValueError(f"prompt of {len(prompt)} tokens exceeds the padded width {prompt_len}")
        tokens[row, prompt_len - len(prompt):prompt_len] = prompt
        valid[row, prompt_len - len(prompt):prompt_len] = True
    mask = rollout_mask
    tokens[:, prompt_len:] = np.where(mask, rollout_ids, pad_id)
    valid[:, prompt_len:] = mask
    engine = np.where(mask, rollout_logprobs, 0.0).astype(np.float32)
    return Batch(tokens=tokens, valid=valid, completion_mask=mask,
                 advantages=np.asarray(advantages, np.float32),
                 old_logprobs=engine if old_logprobs is None else np.asarray(old_logprobs, np.float32),
                 engine_logprobs=engine, ref_logprobs=ref_logprobs,
                 group_size=group_size(np.asarray(rollout.prompt_index)))


def group_size(prompt_index: np.ndarray) -> int:
    """The K of rows laid out in runs of K that each share a prompt (a rollout's groups, whole groups
    selected), or 1 where the rows are not so laid out."""
    rows = len(prompt_index)
    if rows == 0:
        return 1
    starts = np.flatnonzero(np.r_[True, prompt_index[1:] != prompt_index[:-1]])
    runs = np.diff(np.r_[starts, rows])
    if len(set(runs.tolist())) != 1 or len(set(prompt_index[starts].tolist())) != len(starts):
        return 1
    return int(runs[0])


def completion_bucket(longest: int, max_width: int, smallest: int = 64) -> int:
    """The train step's completion width for a rollout whose longest completion has `longest` tokens:
    the next power of two from `smallest` up, at most `max_width` (max_new_tokens). A step whose
    completions all ended early trains on fewer positions, and the step compiles for at most
    log2(max_width / smallest) + 1 widths over a run."""
    width = smallest
    while width < longest:
        width *= 2
    return min(width, max_width)


def bucket(length: int, multiple: int = 64) -> int:
    """Round a prompt width up so jitted shapes repeat across steps."""
    return max(multiple, -(-length // multiple) * multiple)
