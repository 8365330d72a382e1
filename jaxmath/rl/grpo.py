"""The pure math of a GRPO step: group advantages, the clipped importance-sampled policy loss, and
the bookkeeping that makes gradient accumulation exact.

Everything here is a jittable function of arrays (except `select_groups`, which runs on the host
before the batch is built). The model, the logprob pass and the optimizer live elsewhere; the jitted
step calls `policy_loss` on each micro-batch and sums the results.

Variants are arguments, not subclasses:
  advantage scaling  `scale='group_std'` (GRPO) or `'none'` (Dr. GRPO)
  loss aggregation   `loss_agg='seq_mean_token_mean'` (GRPO / TRL `grpo`), `'token_mean'` (DAPO),
                     `'constant'` (Dr. GRPO), `'seq_sum'` (each sequence's token sum, averaged over
                     sequences: the study's Eq. 3 up to its constant 1 / K; Tinker's losses are sums)
  importance level   `is_level='token'` (PPO/GRPO) or `'sequence'` (GSPO)
  clip bounds        `eps_low`, `eps_high` (DAPO's clip-higher when they differ)
  KL penalty         `beta` with `ref_logprobs` (k3 estimator, as TRL)
  truncated IS       `tis_weights` correcting rollout-engine / trainer logprob mismatch

Gradient accumulation. `loss_normalizer` is computed once from the mask of the WHOLE batch; each
micro-batch's `policy_loss(..., normalizer=...)` then returns its share of the one-batch loss, so the
sum over micro-batches of losses and of gradients equals the one-batch loss and gradient exactly
(up to float summation order). Normalizing each micro-batch by its own token count instead is the
bug in maxtext#3040 and tunix#529.

Metrics convention (`Accumulated`). Every metric is an `Accumulated(value, count, reduce)`:
  reduce='mean': value is a SUM over `count` items (masked tokens); the result is value / count.
  reduce='min' / 'max': value is the min / max over `count` items (+inf / -inf when count is 0).
  reduce='sum': value is already a share of a total (the loss); the result is value.
`combine(a, b)` merges two metric dicts from disjoint micro-batches, `combine_stacked` the metrics
of all micro-batches stacked by a scan (both jittable), and `finalize(metrics)` turns them into
scalars. Combining the micro-batch metrics gives the one-batch metrics exactly. Rows whose mask is
all zero are padding: they count nowhere.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

LossAgg = Literal["seq_mean_token_mean", "token_mean", "constant", "seq_sum"]
ISLevel = Literal["token", "sequence"]
LOSS_AGGS = ("seq_mean_token_mean", "token_mean", "constant", "seq_sum")
IS_LEVELS = ("token", "sequence")


# ----------------------------------------------------------------------------------------------
# Advantages and group statistics


def _groups(rewards: jax.Array, group_size: int) -> jax.Array:
    rows = rewards.shape[0]
    if group_size < 1 or rows % group_size:
        raise ValueError(
            f"rewards has {rows} rows, not a multiple of group_size={group_size}; rows must be "
            "laid out as num_groups contiguous blocks of group_size samples"
        )
    return jnp.asarray(rewards, jnp.float32).reshape(rows // group_size, group_size)


def _constant_groups(grouped: jax.Array) -> jax.Array:
    # Exact equality rather than std == 0: the mean of repeated non-dyadic rewards (0.3, 0.3, ...)
    # is not exactly 0.3, and a 1e-8 residue divided by eps=1e-4 would be a spurious advantage.
    return jnp.all(grouped == grouped[:, :1], axis=-1)


def group_advantages(
    rewards: jax.Array,
    group_size: int,
    *,
    scale: Literal["group_std", "none"] = "group_std",
    std: Literal["population", "sample"] = "sample",
    eps: float = 1e-4,
) -> jax.Array:
    """Group-relative advantages A_i = (r_i - mean_g) / (std_g + eps).

    rewards: [rows] float, rows = num_groups * group_size, group g is rows [g*K, (g+1)*K).
    scale: 'group_std' divides by the group std (GRPO, the study's eq. 2); 'none' only centers
        (Dr. GRPO, which argues the std division up-weights nearly-solved and nearly-hopeless
        prompts; tinker-cookbook, which ran the study's v1-v3, also only centers).
    std: 'sample' (ddof=1) is the default because the study's local runs used TRL, whose
        `torch.std` is the unbiased sample std; 'population' (ddof=0) matches the GRPO paper's
        notation and most JAX ports. For binary rewards with K=8 the two differ by sqrt(8/7).
    eps: added to the std, TRL's 1e-4.
    Returns: [rows] float32. Groups whose rewards are all equal get exactly 0 (no NaN).
    """
    if scale not in ("group_std", "none"):
        raise ValueError(f"scale must be 'group_std' or 'none', got {scale!r}")
    if std not in ("population", "sample"):
        raise ValueError(f"std must be 'population' or 'sample', got {std!r}")
    grouped = _groups(rewards, group_size)
    centered = grouped - grouped.mean(axis=-1, keepdims=True)
    if scale == "group_std":
        if std == "sample" and group_size < 2:
            raise ValueError("std='sample' needs group_size >= 2; use std='population'")
        group_std = grouped.std(axis=-1, ddof=1 if std == "sample" else 0, keepdims=True)
        centered = centered / (group_std + eps)
    advantages = jnp.where(_constant_groups(grouped)[:, None], 0.0, centered)
    return advantages.reshape(-1)


def group_stats(rewards: jax.Array, group_size: int) -> dict[str, jax.Array]:
    """How many groups can teach anything this step (trl#3857: zero-std groups give no gradient).

    rewards: [rows] float, contiguous groups of group_size.
    Returns float32 scalars:
      frac_all_correct / frac_all_wrong: groups whose rewards are all 1 / all 0 (binary rewards);
      frac_mixed: groups with nonzero variance (any reward type);
      frac_zero_std: 1 - frac_mixed, the share of groups that contribute no policy gradient;
      reward_mean, reward_std: over all rows (population std).
    For binary rewards all_correct + all_wrong + mixed = 1.
    """
    grouped = _groups(rewards, group_size)
    constant = _constant_groups(grouped)
    all_correct = constant & (grouped[:, 0] == 1.0)
    all_wrong = constant & (grouped[:, 0] == 0.0)
    return {
        "frac_all_correct": all_correct.mean(dtype=jnp.float32),
        "frac_all_wrong": all_wrong.mean(dtype=jnp.float32),
        "frac_mixed": (~constant).mean(dtype=jnp.float32),
        "frac_zero_std": constant.mean(dtype=jnp.float32),
        "reward_mean": grouped.mean(),
        "reward_std": grouped.std(),
    }


def select_groups(
    rewards: np.ndarray,
    group_size: int,
    num_groups_wanted: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, int]:
    """DAPO dynamic sampling at static shapes: informative groups first, refilled with zero-variance
    ones so the trainer always sees exactly num_groups_wanted groups (no recompilation).

    Host-side numpy: it runs between rollout and batch assembly.
    rewards: [num_groups * group_size] float, contiguous groups.
    rng: picks which groups when there are more candidates than slots.
    Returns (row_indices [num_groups_wanted * group_size] int64, num_informative). The first
    num_informative groups of the output have nonzero reward variance; the refill groups that
    follow are constant, so group_advantages gives them zero advantage and they add no gradient
    (with 'token_mean' or 'constant' aggregation they still count in the normalizer, which is the
    price of a static shape; the loop can log num_informative to see it).
    """
    rewards = np.asarray(rewards, np.float64)
    if rewards.ndim != 1 or rewards.shape[0] % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} rows")
    grouped = rewards.reshape(-1, group_size)
    num_groups = grouped.shape[0]
    if num_groups_wanted > num_groups:
        raise ValueError(
            f"asked for {num_groups_wanted} groups but only {num_groups} were sampled; sample at "
            "least num_groups_wanted prompts (DAPO oversamples, e.g. 1.5x)"
        )
    informative = np.flatnonzero(~np.all(grouped == grouped[:, :1], axis=1))
    constant = np.flatnonzero(np.all(grouped == grouped[:, :1], axis=1))
    take_informative = min(len(informative), num_groups_wanted)
    chosen_informative = np.sort(rng.choice(informative, take_informative, replace=False))
    chosen_refill = np.sort(rng.choice(constant, num_groups_wanted - take_informative, replace=False))
    groups = np.concatenate([chosen_informative, chosen_refill]).astype(np.int64)
    rows = (groups[:, None] * group_size + np.arange(group_size)[None, :]).reshape(-1)
    return rows, int(take_informative)


# ----------------------------------------------------------------------------------------------
# Accumulable metrics


@dataclasses.dataclass(frozen=True)
class Accumulated:
    """A metric that combines exactly across micro-batches; see the module docstring.

    value: [] float32, a sum ('mean'), an extreme ('min' / 'max') or a share of a total ('sum').
    count: [] float32, the number of items (masked tokens) behind value.
    reduce: static, one of 'mean', 'min', 'max', 'sum'.
    """

    value: jax.Array
    count: jax.Array
    reduce: str = "mean"

    def result(self) -> jax.Array:
        """The scalar to log; 0 when no item contributed (an all-padding batch)."""
        if self.reduce == "sum":
            return self.value
        if self.reduce == "mean":
            return jnp.where(self.count > 0, self.value / jnp.maximum(self.count, 1.0), 0.0)
        return jnp.where(self.count > 0, self.value, 0.0)


jax.tree_util.register_dataclass(Accumulated, data_fields=["value", "count"], meta_fields=["reduce"])

_COMBINE = {"mean": jnp.add, "sum": jnp.add, "min": jnp.minimum, "max": jnp.maximum}


def combine(a: dict[str, Accumulated], b: dict[str, Accumulated]) -> dict[str, Accumulated]:
    """Merges the metrics of two disjoint micro-batches (same keys); jittable."""
    if a.keys() != b.keys():
        raise ValueError(f"metric keys differ: {sorted(a)} vs {sorted(b)}")
    return {
        k: Accumulated(_COMBINE[a[k].reduce](a[k].value, b[k].value), a[k].count + b[k].count, a[k].reduce)
        for k in a
    }


_COMBINE_ALONG = {"mean": jnp.sum, "sum": jnp.sum, "min": jnp.min, "max": jnp.max}


def combine_stacked(metrics: dict[str, Accumulated]) -> dict[str, Accumulated]:
    """Merges metrics stacked along a leading micro-batch axis (what a `lax.scan` returns); jittable."""
    return {k: Accumulated(_COMBINE_ALONG[m.reduce](m.value, axis=0), jnp.sum(m.count, axis=0), m.reduce)
            for k, m in metrics.items()}


def finalize(metrics: dict[str, Accumulated]) -> dict[str, jax.Array]:
    """Scalars to log, one per metric."""
    return {k: m.result() for k, m in metrics.items()}


def _masked_mean(x: jax.Array, mask: jax.Array, count: jax.Array) -> Accumulated:
    return Accumulated(jnp.sum(jnp.where(mask, x, 0.0)), count, "mean")


# ----------------------------------------------------------------------------------------------
# Loss


@dataclasses.dataclass(frozen=True)
class Normalizer:
    """Whole-batch counts that fix each micro-batch's share of the loss.

    num_tokens: [] float32, masked tokens in the whole batch.
    num_sequences: [] float32, rows with at least one masked token in the whole batch.
    loss_agg: static, the aggregation these counts are for.
    max_len: static, the max completion length for 'constant' aggregation.
    """

    num_tokens: jax.Array
    num_sequences: jax.Array
    loss_agg: str
    max_len: int


jax.tree_util.register_dataclass(
    Normalizer, data_fields=["num_tokens", "num_sequences"], meta_fields=["loss_agg", "max_len"]
)


def loss_normalizer(mask: jax.Array, loss_agg: LossAgg, max_len: int | None = None) -> Normalizer:
    """Counts of the WHOLE batch, computed once before splitting into micro-batches.

    mask: [rows, T] bool or float, the completion mask of the full batch.
    max_len: the configured max completion length for 'constant' (Dr. GRPO divides by
        num_sequences * max_completion_len, a constant independent of the sampled lengths);
        defaults to T. Ignored by the other aggregations.
    """
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")
    mask = jnp.asarray(mask, jnp.float32)
    seq_len = mask.sum(axis=-1)
    return Normalizer(
        num_tokens=seq_len.sum(),
        num_sequences=(seq_len > 0).sum(dtype=jnp.float32),
        loss_agg=loss_agg,
        max_len=int(mask.shape[1] if max_len is None else max_len),
    )


def _k3(log_ratio: jax.Array) -> jax.Array:
    # k3 = exp(d) - d - 1 with d = log(p_other / p_policy): nonnegative, unbiased for KL(policy ||
    # other) under samples from the policy, and low variance (Schulman's "approximating KL").
    return jnp.exp(log_ratio) - log_ratio - 1.0


def policy_loss(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    eps_low: float,
    eps_high: float,
    loss_agg: LossAgg,
    is_level: ISLevel,
    beta: float = 0.0,
    ref_logprobs: jax.Array | None = None,
    normalizer: Normalizer | None = None,
    tis_weights: jax.Array | None = None,
    entropy: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, Accumulated]]:
    """Clipped importance-sampled GRPO surrogate for one micro-batch.

    logprobs: [rows, T] float32, log pi_theta of the completion tokens (differentiated).
    old_logprobs: [rows, T] float32, log pi_old, the policy that sampled them (constant).
    advantages: [rows] float32, one per completion (group_advantages).
    mask: [rows, T] bool or float, True on completion tokens that carry loss.
    eps_low, eps_high: ratio clipped to [1 - eps_low, 1 + eps_high].
    loss_agg: 'seq_mean_token_mean' | 'token_mean' | 'constant' | 'seq_sum' (module docstring).
    is_level: 'token' ratio per token; 'sequence' (GSPO) one ratio per row, exp of the mean log
        ratio over its tokens, shared by all its tokens.
    beta, ref_logprobs: [rows, T] float32; adds beta * k3(ref - logprobs) per token (TRL's KL).
        When ref_logprobs is given the KL is also reported as a metric, even with beta = 0.
    normalizer: from loss_normalizer on the WHOLE batch; None means this call is the whole batch.
    tis_weights: [rows, T] float32, truncated importance weights pi_old / pi_engine (capped by the
        caller), multiplying the clipped surrogate per token (not the KL term, as TRL);
        gradients do not flow through them.
    entropy: [rows, T] float32, per-token entropy from the logprob pass, reported only.
    Returns (loss, metrics): loss is this micro-batch's share of the batch loss (sum the shares);
        metrics is a dict of Accumulated (combine across micro-batches, then finalize).
    """
    if is_level not in IS_LEVELS:
        raise ValueError(f"is_level must be one of {IS_LEVELS}, got {is_level!r}")
    if isinstance(beta, (int, float)) and beta != 0.0 and ref_logprobs is None:
        raise ValueError(
            "beta > 0 needs ref_logprobs (the policy with LoRA adapters off, or the initial weights)"
        )
    if normalizer is None:
        normalizer = loss_normalizer(mask, loss_agg)
    elif normalizer.loss_agg != loss_agg:
        raise ValueError(f"normalizer was built for {normalizer.loss_agg!r}, the loss uses {loss_agg!r}")

    bool_mask = jnp.asarray(mask).astype(bool)
    float_mask = bool_mask.astype(jnp.float32)
    seq_len = float_mask.sum(axis=-1)  # [rows]
    # jnp.where, not a product: padding positions may hold garbage logprobs, and exp(garbage)
    # could be inf, whose product with a zero mask is NaN in the loss and in the gradient.
    log_ratio = jnp.where(bool_mask, logprobs - old_logprobs, 0.0)
    if is_level == "sequence":
        seq_log_ratio = log_ratio.sum(axis=-1) / jnp.maximum(seq_len, 1.0)
        log_ratio = jnp.broadcast_to(seq_log_ratio[:, None], log_ratio.shape)
    ratio = jnp.exp(log_ratio)  # [rows, T]

    adv = jnp.asarray(advantages, jnp.float32)[:, None]
    surrogate = ratio * adv
    clipped_surrogate = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    per_token = -jnp.minimum(surrogate, clipped_surrogate)
    if tis_weights is not None:
        per_token = per_token * jax.lax.stop_gradient(tis_weights)
    if ref_logprobs is not None:
        kl_ref = _k3(jnp.where(bool_mask, ref_logprobs - logprobs, 0.0))
        per_token = per_token + beta * kl_ref

    # Each token's weight in the batch loss; only whole-batch counts appear in the denominators.
    if loss_agg == "seq_mean_token_mean":
        row_weight = 1.0 / (jnp.maximum(seq_len, 1.0) * jnp.maximum(normalizer.num_sequences, 1.0))
        token_weight = float_mask * row_weight[:, None]
    elif loss_agg == "token_mean":
        token_weight = float_mask / jnp.maximum(normalizer.num_tokens, 1.0)
    elif loss_agg == "constant":
        token_weight = float_mask / (jnp.maximum(normalizer.num_sequences, 1.0) * normalizer.max_len)
    elif loss_agg == "seq_sum":
        # Eq. 3: the ratio of whole sequences, summed over a prompt's K samples, averaged over prompts.
        # On-policy its gradient is sum_i A_i sum_t grad log pi(y_it): token sums, no length division.
        token_weight = float_mask / jnp.maximum(normalizer.num_sequences, 1.0)
    else:
        raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")
    loss = jnp.sum(jnp.where(bool_mask, per_token * token_weight, 0.0))

    # Metrics are logged, never differentiated.
    ratio_sg = jax.lax.stop_gradient(ratio)
    count = seq_len.sum()
    # A token is clipped when clipping is what sets its gradient to zero: the ratio left the
    # trust region in the direction the advantage pushes it (TRL's definition).
    clipped_low = (ratio_sg < 1.0 - eps_low) & (adv < 0)
    clipped_high = (ratio_sg > 1.0 + eps_high) & (adv > 0)
    metrics = {
        "loss": Accumulated(jax.lax.stop_gradient(loss), count, "sum"),
        "clip_frac_low": _masked_mean(clipped_low.astype(jnp.float32), bool_mask, count),
        "clip_frac_high": _masked_mean(clipped_high.astype(jnp.float32), bool_mask, count),
        "clip_frac": _masked_mean((clipped_low | clipped_high).astype(jnp.float32), bool_mask, count),
        "ratio_mean": _masked_mean(ratio_sg, bool_mask, count),
        "ratio_min": Accumulated(jnp.min(jnp.where(bool_mask, ratio_sg, jnp.inf)), count, "min"),
        "ratio_max": Accumulated(jnp.max(jnp.where(bool_mask, ratio_sg, -jnp.inf)), count, "max"),
        "kl_old": _masked_mean(
            _k3(jnp.where(bool_mask, old_logprobs - jax.lax.stop_gradient(logprobs), 0.0)), bool_mask, count
        ),
    }
    if ref_logprobs is not None:
        metrics["kl_ref"] = _masked_mean(jax.lax.stop_gradient(kl_ref), bool_mask, count)
    if entropy is not None:
        metrics["entropy"] = _masked_mean(jax.lax.stop_gradient(entropy), bool_mask, count)
    if tis_weights is not None:
        metrics["tis_weight_mean"] = _masked_mean(jax.lax.stop_gradient(tis_weights), bool_mask, count)
    return loss, metrics
