"""Optimizer construction: a frozen `OptimizerConfig` turned into an optax transformation.

The optimizer works on whatever pytree it is given. Choosing what trains (LoRA adapters or all
weights) is the trainer's job: it splits the NNX state by variable type and passes only the trainable
part here, so there is one optimizer path for both.

Chain: clip by global norm (computed in float32) -> AdamW with a learning-rate schedule, optionally
wrapped so that bf16 parameters are updated through a float32 master copy (`master_fp32`).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

Schedule = Literal["constant", "warmup_constant", "linear", "warmup_linear", "cosine"]
SCHEDULES = ("constant", "warmup_constant", "linear", "warmup_linear", "cosine")
DECAYING = ("linear", "warmup_linear", "cosine")  # schedules that end at total_steps


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with gradient clipping and a schedule.

    learning_rate: peak learning rate (the study: 4e-5 LoRA GRPO, 5e-6 full GRPO, 2e-4 SFT).
    schedule: 'constant'; 'warmup_constant' (0 -> lr over warmup_steps, then lr); 'linear'
        (lr -> lr * end_lr_ratio over total_steps, HF's default 'linear' without warmup);
        'warmup_linear' (warmup, then linear decay to lr * end_lr_ratio at total_steps); 'cosine'
        (warmup, then cosine decay to lr * end_lr_ratio at total_steps). Warmup starts from 0 at
        step 0, as HF's schedulers do. Past total_steps the final value holds.
    warmup_steps, total_steps: in optimizer updates (not micro-batches); total_steps 0 means the run's
        length, which the GRPO and SFT trainers fill in (`jaxmath.train_state.resolve_total_steps`).
    b1, b2, eps, weight_decay: AdamW's (decoupled decay, applied to every leaf it is given).
    max_grad_norm: clip the global gradient norm to this; 0 disables clipping.
    master_fp32: keep a float32 master copy of the parameters in the optimizer state and update
        through it (see with_fp32_master). Costs 4 bytes per trainable parameter (16 GB for
        Qwen3-4B full-parameter) and makes the Adam moments float32 too; use it for full-parameter
        training with bf16 weights, where lr * update is often below bf16 spacing (Adam moves a weight
        by about lr per step: 5e-6 at the study's full-parameter lr, while bf16 spacing at a weight
        of 0.02 is 1.2e-4, so without a master most updates round away).
    """

    learning_rate: float
    schedule: Schedule = "constant"
    warmup_steps: int = 0
    total_steps: int = 0
    end_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    master_fp32: bool = False

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.learning_rate < 0:
            raise ValueError(f"learning_rate must be >= 0, got {self.learning_rate}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.schedule in DECAYING and 0 < self.total_steps <= self.warmup_steps:
            raise ValueError(
                f"schedule {self.schedule!r} decays until total_steps, which must exceed warmup_steps "
                f"(got total_steps={self.total_steps}, warmup_steps={self.warmup_steps}); set "
                "total_steps to the number of optimizer updates in the run"
            )
        if not 0.0 <= self.end_lr_ratio <= 1.0:
            raise ValueError(f"end_lr_ratio must be in [0, 1], got {self.end_lr_ratio}")
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0 disables clipping), got {self.max_grad_norm}")


def make_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """The learning rate as a function of the optimizer step (0 for the first update)."""
    if cfg.schedule in DECAYING and not cfg.total_steps:
        raise ValueError(f"schedule {cfg.schedule!r} decays until total_steps, which is 0 (the run's length, not "
                         "known here); set total_steps to the number of optimizer updates in the run")
    peak = cfg.learning_rate
    end = peak * cfg.end_lr_ratio
    warmup = optax.linear_schedule(0.0, peak, cfg.warmup_steps) if cfg.warmup_steps else None
    decay_steps = cfg.total_steps - cfg.warmup_steps
    if cfg.schedule == "constant":
        return optax.constant_schedule(peak)
    if cfg.schedule == "linear":
        # 'linear' has no warmup by definition; warmup_steps belongs to 'warmup_linear'.
        return optax.linear_schedule(peak, end, cfg.total_steps)
    if cfg.schedule == "warmup_constant":
        after = optax.constant_schedule(peak)
    elif cfg.schedule == "warmup_linear":
        after = optax.linear_schedule(peak, end, decay_steps)
    else:
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.end_lr_ratio)
    if warmup is None:
        return after
    return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def lr_at(cfg: OptimizerConfig, step: int) -> float:
    """The learning rate used by update number `step` (0-based), for logging."""
    return float(make_schedule(cfg)(step))


def global_norm(tree) -> jax.Array:
    """L2 norm over all leaves, accumulated in float32 (bf16 sums of squares lose digits)."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """optax.clip_by_global_norm, but with the norm computed in float32 and the scale cast back to
    each leaf's dtype, so bf16 gradients are clipped by their true norm."""

    def update(updates, state, params=None):
        del params
        norm = global_norm(updates)
        scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-12))
        return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class Fp32MasterState(NamedTuple):
    """master: float32 copy of the parameters; inner: the wrapped optimizer's state (on master)."""

    master: optax.Params
    inner: optax.OptState


def with_fp32_master(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Runs `inner` on a float32 master copy of the parameters.

    Gradients are cast to float32, `inner` updates the master, and the returned update is
    round(new_master) - params in the params' dtype, so `optax.apply_updates(params, update)` lands
    on the master rounded to bf16: small updates accumulate in the master until they cross a bf16
    spacing instead of being rounded away every step. Because the update is taken against the
    params actually passed in, any rounding in the subtraction is corrected on the next step.
    Memory: 4 bytes per parameter for the master plus `inner`'s state, now float32.
    """

    def init(params):
        master = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
        return Fp32MasterState(master, inner.init(master))

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("with_fp32_master needs params: call optimizer.update(grads, state, params)")
        grads = jax.tree.map(lambda g: jnp.asarray(g, jnp.float32), grads)
        updates, inner_state = inner.update(grads, state.inner, state.master)
        master = optax.apply_updates(state.master, updates)
        low_precision = jax.tree.map(lambda m, p: m.astype(p.dtype) - p, master, params)
        return low_precision, Fp32MasterState(master, inner_state)

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """Clip by global norm (unless max_grad_norm is 0) -> AdamW(schedule), optionally through a
    float32 master copy. Without master_fp32 the Adam moments take the params' dtype."""
    parts = []
    if cfg.max_grad_norm > 0:
        parts.append(clip_by_global_norm(cfg.max_grad_norm))
    parts.append(
        optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    )
    optimizer = optax.chain(*parts)
    return with_fp32_master(optimizer) if cfg.master_fp32 else optimizer
