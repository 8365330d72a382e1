"""Schedules, global-norm clipping, the float32 master copy for bf16 parameters, Adam's moment
storage (float32 = optax's AdamW; bf16 stochastically rounded) and the gradient accumulator's dtype."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmath.optim import (
    Fp32MasterState,
    OptimizerConfig,
    accumulate_grads,
    clip_by_global_norm,
    global_norm,
    grad_accumulator,
    lr_at,
    make_optimizer,
    make_schedule,
    scale_by_adam,
    stochastic_round,
)


@pytest.mark.parametrize(
    "schedule,expected",
    [
        # steps:            0    5    10   60    110  200
        ("constant", [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
        ("warmup_constant", [0.0, 0.5, 1.0, 1.0, 1.0, 1.0]),
        ("linear", [1.0, 1 - 0.9 * 5 / 110, 1 - 0.9 * 10 / 110, 1 - 0.9 * 60 / 110, 0.1, 0.1]),
        ("warmup_linear", [0.0, 0.5, 1.0, 0.55, 0.1, 0.1]),
        # Halfway through the decay the cosine is at the midpoint of peak and end.
        ("cosine", [0.0, 0.5, 1.0, 0.55, 0.1, 0.1]),
    ],
)
def test_schedule_values(schedule, expected):
    cfg = OptimizerConfig(2e-5, schedule, warmup_steps=10, total_steps=110, end_lr_ratio=0.1)
    got = [lr_at(cfg, step) for step in (0, 5, 10, 60, 110, 200)]
    np.testing.assert_allclose(got, [2e-5 * e for e in expected], rtol=1e-5, atol=1e-12)


def test_cosine_shape_between_points():
    cfg = OptimizerConfig(1.0, "cosine", warmup_steps=0, total_steps=100, end_lr_ratio=0.0)
    schedule = make_schedule(cfg)
    for step in (0, 25, 75, 100):
        np.testing.assert_allclose(schedule(step), 0.5 * (1 + np.cos(np.pi * step / 100)), atol=1e-6)


def test_study_sft_schedule_linear_to_zero():
    # Table 2: lr 2e-4 decaying linearly to 0 over 238 steps.
    cfg = OptimizerConfig(2e-4, "linear", total_steps=238, b2=0.95)
    assert lr_at(cfg, 0) == pytest.approx(2e-4)
    assert lr_at(cfg, 119) == pytest.approx(1e-4)
    assert lr_at(cfg, 238) == 0.0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(schedule="linear", total_steps=0), "total_steps"),
        (dict(schedule="cosine", warmup_steps=10, total_steps=10), "total_steps"),
        (dict(schedule="exponential"), "schedule must be"),
        (dict(end_lr_ratio=1.5), "end_lr_ratio"),
        (dict(max_grad_norm=-1.0), "max_grad_norm"),
        (dict(moment_dtype="float16"), "moment_dtype"),
    ],
)
def test_config_rejects_nonsense(kwargs, match):
    with pytest.raises(ValueError, match=match):  # at the latest when the schedule is made
        make_schedule(OptimizerConfig(1e-5, **kwargs))


def test_global_norm_float32_over_bf16():
    tree = {"a": jnp.ones((10_000,), jnp.bfloat16), "b": [jnp.full((3,), 2.0, jnp.float32)]}
    norm = global_norm(tree)
    assert norm.dtype == jnp.float32
    np.testing.assert_allclose(norm, np.sqrt(10_000 + 12), rtol=1e-6)


def test_clip_by_global_norm_scales_only_above_threshold():
    clip = clip_by_global_norm(1.0)
    big = {"a": jnp.array([6.0, 0.0]), "b": jnp.array([[8.0]], jnp.bfloat16)}
    out, _ = clip.update(big, clip.init(big))
    np.testing.assert_allclose(out["a"], [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(out["b"].astype(jnp.float32), [[0.8]], rtol=1e-2)
    assert out["b"].dtype == jnp.bfloat16
    small = {"a": jnp.array([0.3, 0.4])}
    out, _ = clip.update(small, clip.init(small))
    np.testing.assert_array_equal(out["a"], small["a"])


def test_optimizer_clips_before_adam():
    # With eps far above |g|, Adam's first update is -lr * g / eps: linear in g, so the clipping
    # in front of it is visible (with a small eps Adam would normalize it away).
    params = {"w": jnp.zeros(2)}
    grads = {"w": jnp.array([3.0, 4.0])}  # norm 5
    updates = {}
    for max_grad_norm in (1.0, 0.0):
        opt = make_optimizer(OptimizerConfig(1.0, eps=1e3, max_grad_norm=max_grad_norm))
        updates[max_grad_norm], _ = opt.update(grads, opt.init(params), params)
    unclipped, clipped = np.array([3.0, 4.0]), np.array([0.6, 0.8])
    np.testing.assert_allclose(updates[0.0]["w"], -unclipped / (1e3 + unclipped), rtol=1e-5)
    np.testing.assert_allclose(updates[1.0]["w"], -clipped / (1e3 + clipped), rtol=1e-5)


def test_optimizer_follows_schedule():
    # Adam's first update has magnitude ~lr per coordinate; with warmup the first one is zero.
    cfg = OptimizerConfig(1e-2, "warmup_constant", warmup_steps=2, total_steps=10)
    opt = make_optimizer(cfg)
    params = {"w": jnp.ones(3)}
    state = opt.init(params)
    moves = []
    for _ in range(3):
        updates, state = opt.update({"w": jnp.ones(3)}, state, params)
        params = optax.apply_updates(params, updates)
        moves.append(float(-updates["w"][0]))
    np.testing.assert_allclose(moves, [lr_at(cfg, s) for s in range(3)], rtol=1e-4)
    assert moves[0] == 0.0 and moves[1] == pytest.approx(5e-3, rel=1e-4)


def _train(cfg, params, steps):
    """Minimizes sum((p - target)^2) where the target is far away, so the gradient keeps its sign
    and every Adam step moves each weight by about lr."""
    opt = make_optimizer(cfg)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(lambda p: jnp.sum((p.astype(jnp.float32) - 100.0) ** 2))(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    return params, state


def test_master_fp32_moves_bf16_params_that_plain_bf16_cannot():
    # bf16 spacing is 2^-7 = 0.0078 on [1, 2) and 0.25 on [32, 64): lr = 1e-3 per step is below
    # half a spacing, so a bf16 parameter updated in place never changes.
    start = jnp.array([1.0, 1.5, 40.0], jnp.bfloat16)
    steps = 64
    base = dict(learning_rate=1e-3, max_grad_norm=0.0)
    plain, _ = _train(OptimizerConfig(**base), start, steps)
    np.testing.assert_array_equal(plain, start)

    # float32 moments isolate the master copy (bf16 moments are tested below).
    master, state = _train(OptimizerConfig(**base, master_fp32=True, moment_dtype="float32"), start, steps)
    reference, _ = _train(OptimizerConfig(**base), start.astype(jnp.float32), steps)
    assert master.dtype == jnp.bfloat16
    assert isinstance(state, Fp32MasterState) and state.master.dtype == jnp.float32
    # The master follows the float32 run (not exactly: gradients are taken at the bf16 weights, so
    # Adam sees slightly different values); the bf16 params are that master rounded to bf16.
    np.testing.assert_allclose(state.master, reference, rtol=1e-4)
    np.testing.assert_array_equal(master, state.master.astype(jnp.bfloat16))
    # Moved by ~0.064: past one spacing for the first two weights, not yet for the third.
    assert float(master[0]) > 1.0 and float(master[1]) > 1.5
    assert float(master[2]) == 40.0
    np.testing.assert_allclose(master.astype(jnp.float32), reference, atol=0.125)


def _adam_state(state) -> optax.ScaleByAdamState:
    return next(x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
                if isinstance(x, optax.ScaleByAdamState))


@pytest.mark.parametrize("param_dtype,master,setting,moments", [
    (jnp.float32, False, "auto", jnp.float32),  # LoRA adapters: float32 moments, as PEFT
    (jnp.bfloat16, False, "auto", jnp.bfloat16),
    (jnp.bfloat16, True, "auto", jnp.bfloat16),  # full-parameter: fp32 master, bf16 moments
    (jnp.bfloat16, True, "float32", jnp.float32),  # the layout before moment_dtype existed
    (jnp.float32, False, "bfloat16", jnp.bfloat16),
])
def test_moment_dtype_follows_the_stored_parameters(param_dtype, master, setting, moments):
    params = {"w": jnp.ones((4, 4), param_dtype), "b": jnp.zeros((4,), param_dtype)}
    state = make_optimizer(OptimizerConfig(1e-4, master_fp32=master, moment_dtype=setting)).init(params)
    adam = _adam_state(state)
    assert {x.dtype for x in jax.tree.leaves((adam.mu, adam.nu))} == {jnp.dtype(moments)}
    if master:
        assert isinstance(state, Fp32MasterState)
        assert {x.dtype for x in jax.tree.leaves(state.master)} == {jnp.dtype(jnp.float32)}


def test_float32_moments_are_optax_adamw_exactly():
    """The float32 path is optax.adamw's arithmetic and state layout (checkpoints restore across)."""
    cfg = OptimizerConfig(1e-3, "warmup_linear", warmup_steps=3, total_steps=40, weight_decay=0.01)
    params = {"a": jax.random.normal(jax.random.key(0), (50, 7)), "b": jnp.ones(3)}
    ours = make_optimizer(cfg)
    theirs = optax.chain(clip_by_global_norm(1.0), optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                                                               weight_decay=cfg.weight_decay))
    ours_state, theirs_state = ours.init(params), theirs.init(params)
    assert jax.tree.structure(ours_state) == jax.tree.structure(theirs_state)
    p_ours = p_theirs = params
    for t in range(12):
        grads = jax.tree.map(lambda x: 3.0 * jax.random.normal(jax.random.key(t), x.shape), params)
        u, ours_state = jax.jit(ours.update)(grads, ours_state, p_ours)
        p_ours = optax.apply_updates(p_ours, u)
        u, theirs_state = jax.jit(theirs.update)(grads, theirs_state, p_theirs)
        p_theirs = optax.apply_updates(p_theirs, u)
    for a, b in zip(jax.tree.leaves((p_ours, ours_state)), jax.tree.leaves((p_theirs, theirs_state))):
        np.testing.assert_array_equal(a, b)


def test_stochastic_round_is_unbiased_and_keeps_bf16_values():
    n = 200_000
    bits = jax.random.bits(jax.random.key(1), (n,), jnp.uint32)
    for x in (1.0 + 2.0 ** -10, -(1.0 + 2.0 ** -10), 3e-7 * (1 + 2.0 ** -9)):
        # 1 + 2^-10 lies 1/8 of the way from 1 to the next bf16 value, 1 + 2^-7.
        rounded = np.asarray(stochastic_round(jnp.full((n,), x, jnp.float32), bits, jnp.bfloat16), np.float64)
        below = float(jnp.asarray(x, jnp.bfloat16)) if abs(x) < 1 else np.sign(x) * 1.0
        assert len(set(rounded)) == 2 and below in set(rounded)
        assert abs(rounded.mean() - x) < 5 * np.std(rounded) / np.sqrt(n), (rounded.mean(), x)
    exact = jnp.asarray([0.0, -2.5, 1e-20, jnp.inf, -jnp.inf], jnp.bfloat16).astype(jnp.float32)
    out = stochastic_round(exact, bits[:5], jnp.bfloat16)
    np.testing.assert_array_equal(out.astype(jnp.float32), exact)
    assert bool(jnp.isnan(stochastic_round(jnp.asarray([jnp.nan]), bits[:1], jnp.bfloat16))[0])


def test_bf16_second_moment_decays_only_with_stochastic_rounding():
    """One gradient of 1, then 3,000 gradients of 0.01. In float32 v decays (0.999^3000 = 0.05) and
    Adam's step returns to ~0.8. Rounded to nearest in bf16 (optax with bf16 params), 0.999 v rounds
    back to v, so v stays at the spike's 1e-3 and the step stays 2.6x too small for good; rounded
    stochastically it decays as in float32 (mean over 4,096 coordinates within 3%)."""
    n, steps = 4096, 3000
    params = jnp.zeros((n,), jnp.bfloat16)

    def run(transform):
        @jax.jit
        def go(state):
            _, state = transform.update(jnp.ones((n,), jnp.float32), state)

            def body(_, carry):
                return transform.update(jnp.full((n,), 0.01, jnp.float32), carry[1])

            return jax.lax.fori_loop(0, steps, body, (jnp.zeros((n,), jnp.float32), state))[0]
        return np.asarray(go(transform.init(params)), np.float64)

    exact = run(scale_by_adam(0.9, 0.999, 1e-8, [jnp.float32]))
    stochastic = run(scale_by_adam(0.9, 0.999, 1e-8, [jnp.bfloat16]))
    nearest = run(optax.scale_by_adam(0.9, 0.999, 1e-8))  # bf16 moments, round to nearest
    assert 0.75 < exact.mean() < 0.85
    assert abs(stochastic.mean() / exact.mean() - 1) < 0.03
    assert nearest.mean() < exact.mean() / 2.5


def test_gradients_accumulate_in_the_parameter_dtype():
    params = {"adapter": jnp.zeros((3,), jnp.float32), "weight": jnp.zeros((3,), jnp.bfloat16)}
    total = grad_accumulator(params)
    assert total["adapter"].dtype == jnp.float32 and total["weight"].dtype == jnp.bfloat16
    micro = {"adapter": jnp.full((3,), 1e-4, jnp.float32), "weight": jnp.full((3,), 1e-4, jnp.float32)}
    for _ in range(3):
        total = accumulate_grads(total, micro)
    assert total["weight"].dtype == jnp.bfloat16
    np.testing.assert_allclose(total["adapter"], 3e-4, rtol=1e-6)
    np.testing.assert_allclose(total["weight"].astype(jnp.float32), 3e-4, rtol=2 ** -7)
