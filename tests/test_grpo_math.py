"""The GRPO math against hand computations and a float64 numpy re-implementation, and gradient
accumulation against the one-batch gradient."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmath.rl import grpo
from jaxmath.rl.grpo import (
    combine,
    finalize,
    group_advantages,
    group_stats,
    loss_normalizer,
    policy_loss,
    select_groups,
)

LOSS_AGGS = grpo.LOSS_AGGS
IS_LEVELS = grpo.IS_LEVELS
EPS_LOW, EPS_HIGH = 0.2, 0.28

# ----------------------------------------------------------------------------------------------
# Advantages and group statistics


def test_advantages_hand_computed():
    rewards = jnp.array([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    # Group 1: mean 0.25, population std sqrt(0.25 * 0.75), sample std 0.5.
    # Group 2: mean 0.75, same stds.
    pop = np.sqrt(0.25 * 0.75)
    centered = np.array([0.75, -0.25, -0.25, -0.25, 0.25, 0.25, -0.75, 0.25])
    np.testing.assert_allclose(group_advantages(rewards, 4, std="sample"), centered / (0.5 + 1e-4), rtol=1e-6)
    np.testing.assert_allclose(
        group_advantages(rewards, 4, std="population"), centered / (pop + 1e-4), rtol=1e-6
    )
    np.testing.assert_allclose(group_advantages(rewards, 4, scale="none"), centered, rtol=1e-6)
    # The default is TRL's sample std.
    np.testing.assert_array_equal(group_advantages(rewards, 4), group_advantages(rewards, 4, std="sample"))


def test_constant_groups_get_exactly_zero_advantage():
    rewards = jnp.array([1.0] * 4 + [0.0] * 4 + [0.3] * 4 + [0.0, 0.0, 1.0, 0.0])
    for scale, std in [("group_std", "sample"), ("group_std", "population"), ("none", "sample")]:
        adv = np.asarray(group_advantages(rewards, 4, scale=scale, std=std))
        assert np.all(np.isfinite(adv))
        np.testing.assert_array_equal(adv[:12], 0.0)
        assert adv[14] > 0 and adv[12] < 0


def test_advantages_reject_ragged_groups():
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(jnp.zeros(7), 4)


def test_group_stats_binary():
    rewards = jnp.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0], jnp.float32)
    stats = group_stats(rewards, 4)
    assert float(stats["frac_all_correct"]) == 0.25
    assert float(stats["frac_all_wrong"]) == 0.5
    assert float(stats["frac_mixed"]) == 0.25
    assert float(stats["frac_zero_std"]) == 0.75
    np.testing.assert_allclose(stats["reward_mean"], 6 / 16)
    np.testing.assert_allclose(stats["reward_std"], np.std(np.asarray(rewards)), rtol=1e-6)


def test_group_stats_non_binary_uses_variance():
    stats = group_stats(jnp.array([0.5, 0.5, 0.2, 0.7]), 2)
    assert float(stats["frac_zero_std"]) == 0.5 and float(stats["frac_mixed"]) == 0.5
    assert float(stats["frac_all_correct"]) == 0.0 and float(stats["frac_all_wrong"]) == 0.0


# ----------------------------------------------------------------------------------------------
# Group selection


def _rewards_with_informative(groups_informative, group_size=4):
    rows = []
    for informative in groups_informative:
        rows += [1.0, 0.0] + [0.0] * (group_size - 2) if informative else [1.0] * group_size
    return np.array(rows)


def test_select_groups_prefers_informative_and_refills():
    rewards = _rewards_with_informative([False, True, False, False, True, False])
    rows, num_informative = select_groups(rewards, 4, 4, np.random.default_rng(0))
    assert rows.shape == (16,) and num_informative == 2
    groups = rows.reshape(4, 4) // 4
    assert np.all(groups == groups[:, :1])  # whole groups, rows in order
    np.testing.assert_array_equal(rows.reshape(4, 4)[:, 0] % 4, 0)
    assert list(groups[:2, 0]) == [1, 4]  # the informative ones, first
    assert len(set(groups[:, 0])) == 4  # no group twice
    assert set(groups[2:, 0]) <= {0, 2, 3, 5}
    # The refill rows are constant groups, so they carry zero advantage.
    adv = np.asarray(group_advantages(jnp.asarray(rewards[rows]), 4))
    np.testing.assert_array_equal(adv[8:], 0.0)
    assert np.any(adv[:8] != 0.0)


def test_select_groups_when_more_informative_than_wanted():
    rewards = _rewards_with_informative([True, False, True, True, True])
    seen = set()
    for seed in range(20):
        rows, num_informative = select_groups(rewards, 4, 2, np.random.default_rng(seed))
        assert rows.shape == (8,) and num_informative == 2
        chosen = tuple(rows[::4] // 4)
        assert set(chosen) <= {0, 2, 3, 4}
        seen.add(chosen)
    assert len(seen) > 1  # the rng picks among the candidates
    again, _ = select_groups(rewards, 4, 2, np.random.default_rng(3))
    np.testing.assert_array_equal(again, select_groups(rewards, 4, 2, np.random.default_rng(3))[0])


def test_select_groups_needs_enough_groups():
    with pytest.raises(ValueError, match="only 2 were sampled"):
        select_groups(_rewards_with_informative([True, False]), 4, 3, np.random.default_rng(0))


# ----------------------------------------------------------------------------------------------
# Policy loss against numpy


def _numpy_loss(lp, old, adv, mask, *, loss_agg, is_level, beta=0.0, ref=None, tis=None, max_len=None):
    """Row by row, float64, only the masked tokens ever read."""
    lp, old = np.float64(lp), np.float64(old)
    mask = np.asarray(mask, bool)
    row_sums, row_lens = [], []
    for i in range(lp.shape[0]):
        take = mask[i]
        log_ratio = lp[i, take] - old[i, take]
        if is_level == "sequence" and take.any():
            log_ratio = np.full_like(log_ratio, log_ratio.mean())
        ratio = np.exp(log_ratio)
        per_token = -np.minimum(ratio * adv[i], np.clip(ratio, 1 - EPS_LOW, 1 + EPS_HIGH) * adv[i])
        if tis is not None:
            per_token = per_token * tis[i, take]
        if ref is not None:
            d = np.float64(ref[i, take]) - lp[i, take]
            per_token = per_token + beta * (np.exp(d) - d - 1)
        row_sums.append(per_token.sum())
        row_lens.append(take.sum())
    row_sums, row_lens = np.array(row_sums), np.array(row_lens)
    real = row_lens > 0
    if loss_agg == "seq_mean_token_mean":
        return np.mean(row_sums[real] / row_lens[real])
    if loss_agg == "token_mean":
        return row_sums.sum() / row_lens.sum()
    if loss_agg == "seq_sum":
        return row_sums.sum() / real.sum()
    return row_sums.sum() / (real.sum() * (max_len or mask.shape[1]))


def _batch(seed=0, rows=6, length=7, spread=0.4):
    rng = np.random.default_rng(seed)
    old = -rng.uniform(0.1, 3.0, (rows, length)).astype(np.float32)
    lp = (old + rng.normal(0, spread, (rows, length))).astype(np.float32)
    ref = (old + rng.normal(0, spread, (rows, length))).astype(np.float32)
    lengths = np.array([7, 3, 0, 5, 1, 6])[:rows]
    mask = np.arange(length)[None, :] < lengths[:, None]
    # Garbage on padding: the loss must never read it (an exp(80) would overflow to NaN).
    lp = np.where(mask, lp, 80.0).astype(np.float32)
    adv = rng.normal(0, 1, rows).astype(np.float32)
    tis = rng.uniform(0.5, 2.0, (rows, length)).astype(np.float32)
    return lp, old, adv, mask, ref, tis


@pytest.mark.parametrize("loss_agg,is_level", list(itertools.product(LOSS_AGGS, IS_LEVELS)))
@pytest.mark.parametrize("with_kl,with_tis", [(False, False), (True, False), (False, True), (True, True)])
def test_loss_matches_numpy(loss_agg, is_level, with_kl, with_tis):
    lp, old, adv, mask, ref, tis = _batch()
    kwargs = dict(loss_agg=loss_agg, is_level=is_level)
    extra = {}
    if with_kl:
        extra.update(beta=0.05, ref_logprobs=ref)
    if with_tis:
        extra.update(tis_weights=tis)
    normalizer = loss_normalizer(mask, loss_agg, max_len=10)
    loss, metrics = policy_loss(
        lp, old, adv, mask, eps_low=EPS_LOW, eps_high=EPS_HIGH, normalizer=normalizer, **kwargs, **extra
    )
    expected = _numpy_loss(
        lp, old, adv, mask, **kwargs, beta=0.05 if with_kl else 0.0,
        ref=ref if with_kl else None, tis=tis if with_tis else None, max_len=10,
    )
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-7)
    assert np.isfinite(float(loss))
    assert float(finalize(metrics)["loss"]) == float(loss)
    assert ("kl_ref" in metrics) == with_kl and ("tis_weight_mean" in metrics) == with_tis


def test_metrics_match_numpy():
    lp, old, adv, mask, ref, tis = _batch(spread=0.5)
    entropy = np.abs(lp)
    _, metrics = policy_loss(
        lp, old, adv, mask, eps_low=EPS_LOW, eps_high=EPS_HIGH, loss_agg="token_mean", is_level="token",
        ref_logprobs=ref, entropy=entropy,
    )
    out = finalize(metrics)
    ratio = np.exp(np.float64(lp) - old)[mask]
    adv_tok = np.broadcast_to(adv[:, None], mask.shape)[mask]
    low = (ratio < 1 - EPS_LOW) & (adv_tok < 0)
    high = (ratio > 1 + EPS_HIGH) & (adv_tok > 0)
    assert low.any() and high.any()  # the batch exercises both sides
    np.testing.assert_allclose(out["clip_frac_low"], low.mean(), rtol=1e-6)
    np.testing.assert_allclose(out["clip_frac_high"], high.mean(), rtol=1e-6)
    np.testing.assert_allclose(out["clip_frac"], (low | high).mean(), rtol=1e-6)
    np.testing.assert_allclose(out["ratio_mean"], ratio.mean(), rtol=1e-5)
    np.testing.assert_allclose(out["ratio_min"], ratio.min(), rtol=1e-5)
    np.testing.assert_allclose(out["ratio_max"], ratio.max(), rtol=1e-5)
    d_old = np.float64(old)[mask] - np.float64(lp)[mask]
    np.testing.assert_allclose(out["kl_old"], np.mean(np.exp(d_old) - d_old - 1), rtol=1e-5)
    d_ref = np.float64(ref)[mask] - np.float64(lp)[mask]
    np.testing.assert_allclose(out["kl_ref"], np.mean(np.exp(d_ref) - d_ref - 1), rtol=1e-5)
    np.testing.assert_allclose(out["entropy"], entropy[mask].mean(), rtol=1e-6)
    assert float(metrics["ratio_min"].count) == mask.sum()


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("is_level", IS_LEVELS)
def test_unit_ratio_gives_minus_mean_advantage(loss_agg, is_level):
    _, old, adv, mask, _, _ = _batch()
    lengths = mask.sum(-1)
    real = lengths > 0
    expected = {
        "seq_mean_token_mean": -adv[real].mean(),
        "token_mean": -(adv * lengths).sum() / lengths.sum(),
        "constant": -(adv * lengths).sum() / (real.sum() * mask.shape[1]),
        "seq_sum": -(adv * lengths).sum() / real.sum(),
    }[loss_agg]
    loss, metrics = policy_loss(
        old, old, adv, mask, eps_low=EPS_LOW, eps_high=EPS_HIGH, loss_agg=loss_agg, is_level=is_level
    )
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    out = finalize(metrics)
    assert float(out["clip_frac"]) == 0.0 and float(out["kl_old"]) == 0.0
    assert float(out["ratio_min"]) == 1.0 == float(out["ratio_max"])


def test_clipping_stops_gradient_only_on_the_clipped_side():
    # One row per case, one token each: (log ratio, advantage).
    cases = [
        (np.log(1.5), 1.0),   # above 1 + eps_high, A > 0: clipped, zero gradient
        (np.log(1.1), 1.0),   # inside: gradient
        (np.log(0.5), -1.0),  # below 1 - eps_low, A < 0: clipped, zero gradient
        (np.log(1.5), -1.0),  # above, A < 0: the min keeps the unclipped term, gradient
        (np.log(0.5), 1.0),   # below, A > 0: unclipped term is smaller, gradient
    ]
    old = np.zeros((len(cases), 1), np.float32)
    lp = np.array([[c[0]] for c in cases], np.float32)
    adv = np.array([c[1] for c in cases], np.float32)
    mask = np.ones_like(lp, bool)

    def loss_fn(lp):
        return policy_loss(
            lp, old, adv, mask, eps_low=0.2, eps_high=0.2, loss_agg="token_mean", is_level="token"
        )

    grad = np.asarray(jax.grad(lambda x: loss_fn(x)[0])(lp))[:, 0]
    assert grad[0] == 0.0 and grad[2] == 0.0
    # d/dlp of -ratio * A / n_tokens = -ratio * A / 5
    np.testing.assert_allclose(grad[[1, 3, 4]], [-1.1 / 5, 1.5 / 5, -0.5 / 5], rtol=1e-6)
    out = finalize(loss_fn(lp)[1])
    clip_fracs = [out["clip_frac_high"], out["clip_frac_low"], out["clip_frac"]]
    np.testing.assert_allclose(clip_fracs, [0.2, 0.2, 0.4])


def test_sequence_level_clips_whole_rows():
    # Row 0: sequence log ratio mean(log 1.6, log 1.2) -> ratio ~1.386 > 1.2 with A > 0: whole row
    # clipped although one token's own ratio is inside. Row 1: same ratios, A < 0: gradient.
    lp = np.log(np.array([[1.6, 1.2], [1.6, 1.2]], np.float32))
    old = np.zeros_like(lp)
    adv = np.array([1.0, -1.0], np.float32)
    mask = np.ones_like(lp, bool)
    grad = jax.grad(
        lambda x: policy_loss(x, old, adv, mask, eps_low=0.2, eps_high=0.2, loss_agg="token_mean",
                              is_level="sequence")[0]
    )(lp)
    np.testing.assert_array_equal(grad[0], 0.0)
    seq_ratio = np.sqrt(1.6 * 1.2)
    # Each token's loss -ratio_seq * A depends on every token of the row through the mean.
    np.testing.assert_allclose(grad[1], [seq_ratio / 4] * 2, rtol=1e-6)


def test_beta_without_reference_is_an_error():
    lp, old, adv, mask, _, _ = _batch()
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(
            lp, old, adv, mask, eps_low=0.2, eps_high=0.2, loss_agg="token_mean", is_level="token",
            beta=0.1,
        )


def test_normalizer_must_match_aggregation():
    lp, old, adv, mask, _, _ = _batch()
    with pytest.raises(ValueError, match="built for"):
        policy_loss(lp, old, adv, mask, eps_low=0.2, eps_high=0.2, loss_agg="token_mean", is_level="token",
                    normalizer=loss_normalizer(mask, "constant"))


# ----------------------------------------------------------------------------------------------
# Gradient accumulation on a toy differentiable policy

ROWS, LENGTH, FEATURES, VOCAB = 8, 6, 5, 7


def _toy_problem(seed=0):
    rng = np.random.default_rng(seed)
    features = rng.normal(0, 1, (ROWS, LENGTH, FEATURES)).astype(np.float32)
    targets = rng.integers(0, VOCAB, (ROWS, LENGTH))
    weights = rng.normal(0, 0.5, (FEATURES, VOCAB)).astype(np.float32)
    # Rows 6 and 7 are padding, so with k=4 one micro-batch has no tokens at all.
    lengths = np.array([6, 2, 5, 1, 3, 4, 0, 0])
    mask = np.arange(LENGTH)[None, :] < lengths[:, None]

    def logprobs_and_entropy(w, x, t):
        logp = jax.nn.log_softmax(x @ w, axis=-1)
        entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
        return jnp.take_along_axis(logp, t[..., None], axis=-1)[..., 0], entropy

    # The sampling policy and the reference differ from the current one, so ratios leave the clip
    # range and the KL is nonzero.
    def perturbed():
        return weights + rng.normal(0, 0.4, weights.shape).astype(np.float32)

    old, _ = logprobs_and_entropy(perturbed(), features, targets)
    ref, _ = logprobs_and_entropy(perturbed(), features, targets)
    data = dict(
        x=features, t=targets, old=np.asarray(old), ref=np.asarray(ref), mask=mask,
        adv=rng.normal(0, 1, ROWS).astype(np.float32),
        tis=rng.uniform(0.5, 1.5, (ROWS, LENGTH)).astype(np.float32),
    )
    return weights, data, logprobs_and_entropy


def _grads_and_metrics(weights, data, logprobs_and_entropy, loss_agg, is_level, normalizer):
    def loss_fn(w):
        logprobs, entropy = logprobs_and_entropy(w, data["x"], data["t"])
        return policy_loss(
            logprobs, data["old"], data["adv"], data["mask"], eps_low=EPS_LOW, eps_high=EPS_HIGH,
            loss_agg=loss_agg, is_level=is_level, beta=0.1, ref_logprobs=data["ref"], normalizer=normalizer,
            tis_weights=data["tis"], entropy=entropy,
        )

    return jax.grad(loss_fn, has_aux=True)(weights)


def _split(data, k):
    size = ROWS // k
    return [{name: value[i * size:(i + 1) * size] for name, value in data.items()} for i in range(k)]


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("is_level", IS_LEVELS)
def test_accumulated_micro_batches_equal_one_batch(loss_agg, is_level):
    weights, data, logprobs_and_entropy = _toy_problem()
    normalizer = loss_normalizer(data["mask"], loss_agg, max_len=LENGTH + 2)
    step = jax.jit(_grads_and_metrics, static_argnums=(2, 3, 4))
    full_grad, full_metrics = step(weights, data, logprobs_and_entropy, loss_agg, is_level, normalizer)
    full = finalize(full_metrics)
    assert float(full["clip_frac"]) > 0  # clipping is exercised
    for k in (1, 2, 4):
        grad_sum, metrics = None, None
        for micro in _split(data, k):
            grad, micro_metrics = step(weights, micro, logprobs_and_entropy, loss_agg, is_level, normalizer)
            grad_sum = grad if grad_sum is None else grad_sum + grad
            metrics = micro_metrics if metrics is None else combine(metrics, micro_metrics)
        np.testing.assert_allclose(grad_sum, full_grad, atol=1e-6, err_msg=f"k={k}")
        combined = finalize(metrics)
        assert combined.keys() == full.keys()
        for name in full:
            np.testing.assert_allclose(
                combined[name], full[name], rtol=1e-6, atol=1e-6, err_msg=f"{name} k={k}"
            )


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean"])
def test_local_normalization_would_be_wrong(loss_agg):
    """The accumulation test can fail: normalizing each micro-batch by its own counts (and
    averaging the k results) gives a different gradient on ragged masks."""
    weights, data, logprobs_and_entropy = _toy_problem()
    step = jax.jit(_grads_and_metrics, static_argnums=(2, 3, 4))
    full_grad, _ = step(weights, data, logprobs_and_entropy, loss_agg, "token", None)
    micro = [step(weights, m, logprobs_and_entropy, loss_agg, "token", None)[0] for m in _split(data, 2)]
    assert np.max(np.abs((micro[0] + micro[1]) / 2 - full_grad)) > 1e-3


def test_metrics_combine_inside_scan():
    weights, data, logprobs_and_entropy = _toy_problem()
    normalizer = loss_normalizer(data["mask"], "token_mean")
    stacked = {name: value.reshape(4, ROWS // 4, *value.shape[1:]) for name, value in data.items()}

    @jax.jit
    def accumulate(w, stacked):
        def body(carry, micro):
            grad, metrics = _grads_and_metrics(
                w, micro, logprobs_and_entropy, "token_mean", "token", normalizer
            )
            grad_sum, metrics_sum = carry
            return (grad_sum + grad, combine(metrics_sum, metrics)), None

        first = jax.tree.map(lambda v: v[0], stacked)
        rest = jax.tree.map(lambda v: v[1:], stacked)
        init = _grads_and_metrics(w, first, logprobs_and_entropy, "token_mean", "token", normalizer)
        return jax.lax.scan(body, init, rest)[0]

    grad, metrics = accumulate(weights, stacked)
    full_grad, full_metrics = jax.jit(_grads_and_metrics, static_argnums=(2, 3, 4))(
        weights, data, logprobs_and_entropy, "token_mean", "token", normalizer
    )
    np.testing.assert_allclose(grad, full_grad, atol=1e-6)
    for name, value in finalize(full_metrics).items():
        np.testing.assert_allclose(finalize(metrics)[name], value, rtol=1e-6, atol=1e-6)
