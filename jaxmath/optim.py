"""Optimizer construction: a frozen `OptimizerConfig` turned into an optax transformation, and the
precision rules of a training step (what dtype gradients accumulate in, what dtype Adam stores).

The optimizer works on whatever pytree it is given. Choosing what trains (LoRA adapters or all
weights) is the trainer's job: it splits the NNX state by variable type and passes only the trainable
part here, so there is one optimizer path for both.

Chain: clip by global norm (computed in float32) -> AdamW with a learning-rate schedule, optionally
wrapped so that bf16 parameters are updated through a float32 master copy (`master_fp32`).

Precision (docs/PRECISION.md has the numbers behind each choice):
- Adam's arithmetic is float32 whatever the storage. Its moments are stored in `moment_dtype`:
  "auto" keeps them in the stored parameter's dtype, so float32 LoRA adapters get float32 moments
  (as PEFT) and bf16 full-parameter weights get bf16 moments, 4 bytes per parameter instead of 8.
  bf16 storage is stochastically rounded: with b2 = 0.999, 0.999 v is within half a bf16 spacing of
  v, so a round-to-nearest second moment could never decay.
- Gradients accumulate across micro-batches in the parameter's dtype (`grad_accumulator`,
  `accumulate_grads`), as a bf16 PyTorch model's `.grad` does: bf16 for bf16 weights (8 GB instead
  of 16 GB for Qwen3-4B), float32 for float32 adapters.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

Schedule = Literal["constant", "warmup_constant", "linear", "warmup_linear", "cosine"]
SCHEDULES = ("constant", "warmup_constant", "linear", "warmup_linear", "cosine")
DECAYING = ("linear", "warmup_linear", "cosine")  # schedules that end at total_steps
MOMENT_DTYPES = ("auto", "float32", "bfloat16")
F32 = jnp.float32
# Stochastic rounding draws from a fixed stream: the bits of step t, leaf i follow from (t, i) only,
# so a resumed run rounds exactly as an uninterrupted one (no key in the optimizer state).
_ROUNDING_SEED = 0x5EED


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
    end_lr_ratio: where the decaying schedules end, as a fraction of learning_rate (0: decay to 0).
    b1, b2, eps, weight_decay: AdamW's (decoupled decay, applied to every leaf it is given).
    max_grad_norm: clip the global gradient norm to this; 0 disables clipping.
    master_fp32: keep a float32 master copy of the parameters in the optimizer state and update
        through it (see with_fp32_master). Costs 4 bytes per trainable parameter (16 GB for
        Qwen3-4B full-parameter); use it for full-parameter training with bf16 weights, where
        lr * update is often below bf16 spacing (Adam moves a weight by about lr per step: 5e-6 at
        the study's full-parameter lr, while bf16 spacing at a weight of 0.02 is 1.2e-4, so without
        a master most updates round away).
    moment_dtype: storage of Adam's two moments. "auto": the dtype of the stored parameter
        (float32 adapters: float32; bf16 weights, with or without a master: bf16, stochastically
        rounded); "float32": always float32 (8 bytes per parameter; the layout of checkpoints
        written before moment_dtype existed, for resuming a full-parameter run); "bfloat16":
        always bf16, stochastically rounded. Full-parameter Qwen3-4B with the master and "auto"
        keeps 40.2 GB of weights and optimizer state instead of 56.3 GB (docs/PRECISION.md).
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
    moment_dtype: str = "auto"

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
        if self.moment_dtype not in MOMENT_DTYPES:
            raise ValueError(f"optimizer.moment_dtype must be one of {MOMENT_DTYPES}, got {self.moment_dtype!r}")


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


# --- gradient accumulation --------------------------------------------------------------------------


def grad_accumulator(params: Any) -> Any:
    """Zeros to sum a step's micro-batch gradients into: each leaf in its parameter's dtype.

    bf16 weights accumulate in bf16, as the study's PyTorch `.grad` did (Table 10: "gradients bf16
    8 GB"): half the float32 accumulator (16 GB for Qwen3-4B). Autodiff already returns a bf16
    parameter's micro-batch gradient in bf16, so each addition costs one rounding (relative 2^-9);
    docs/PRECISION.md measures what that does to 50 AdamW steps. float32 adapters accumulate in float32."""
    return jax.tree.map(lambda p: jnp.zeros(p.shape, p.dtype), params)


def accumulate_grads(total: Any, grads: Any) -> Any:
    """total + grads, in total's dtype (see grad_accumulator)."""
    return jax.tree.map(lambda a, g: a + g.astype(a.dtype), total, grads)


# --- Adam with compact moments ------------------------------------------------------------------------


def stochastic_round(x: jax.Array, bits: jax.Array, dtype: Any) -> jax.Array:
    """x (float32) rounded to `dtype` up or down at random, with E[result] = x.

    bits: uint32 of x's shape, uniform in [0, 2^16) (only the low 16 are used). bf16 is the top 16
    bits of a float32, so adding a uniform 16-bit integer to the float32 pattern and truncating
    rounds the magnitude up with probability (dropped bits) / 2^16: unbiased for either sign.
    float32 passes through unchanged. Non-finite values round to nearest (inf and NaN stay so).
    """
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32:
        return x.astype(F32)
    if dtype != jnp.bfloat16:
        raise ValueError(f"stochastic rounding is to bfloat16 or float32, got {dtype}")
    x = x.astype(F32)
    raw = jax.lax.bitcast_convert_type(x, jnp.uint32)
    up = (raw + (bits & 0xFFFF)) & jnp.uint32(0xFFFF0000)
    rounded = jax.lax.bitcast_convert_type(up, F32).astype(jnp.bfloat16)  # exact: low bits are zero
    return jnp.where(jnp.isfinite(x), rounded, x.astype(jnp.bfloat16))


def scale_by_adam(b1: float, b2: float, eps: float, moment_dtypes: Sequence[Any]) -> optax.GradientTransformation:
    """optax.scale_by_adam (same formulas, same `ScaleByAdamState`), computed in float32 with the
    moments of leaf i stored in moment_dtypes[i] (leaves in jax.tree.leaves order).

    float32 storage gives optax's float32 numbers. bf16 storage is stochastically rounded from the
    float32 moments (the update of this step uses the unrounded ones); the random bits of step t
    and leaf i come from a fixed stream indexed by (t, i), one uint32 per element whose high half
    rounds the first moment and low half the second.
    """
    moment_dtypes = tuple(jnp.dtype(d) for d in moment_dtypes)

    def check(leaves):
        if len(leaves) != len(moment_dtypes):
            raise ValueError(f"scale_by_adam was built for {len(moment_dtypes)} leaves, got {len(leaves)}")

    def init(params):
        leaves, treedef = jax.tree.flatten(params)
        check(leaves)
        def zeros():  # a fresh buffer each: the steps donate the state
            return treedef.unflatten([jnp.zeros(p.shape, d) for p, d in zip(leaves, moment_dtypes)])

        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=zeros(), nu=zeros())

    def update(updates, state, params=None):
        del params
        grads, treedef = jax.tree.flatten(updates)
        check(grads)
        count = optax.safe_increment(state.count)
        correction1 = 1 - b1 ** count
        correction2 = 1 - b2 ** count
        step_key = jax.random.fold_in(jax.random.key(_ROUNDING_SEED), count)
        out, mus, nus = [], [], []
        for i, (g, m, v, dtype) in enumerate(zip(grads, jax.tree.leaves(state.mu), jax.tree.leaves(state.nu),
                                                 moment_dtypes)):
            g = g.astype(F32)
            m = (1 - b1) * g + b1 * m.astype(F32)
            v = (1 - b2) * (g * g) + b2 * v.astype(F32)
            out.append((m / correction1) / (jnp.sqrt(v / correction2) + eps))
            if dtype == jnp.float32:
                mus.append(m)
                nus.append(v)
            else:
                bits = jax.random.bits(jax.random.fold_in(step_key, i), g.shape, jnp.uint32)
                mus.append(stochastic_round(m, bits >> 16, dtype))
                nus.append(stochastic_round(v, bits, dtype))
        return treedef.unflatten(out), optax.ScaleByAdamState(count, treedef.unflatten(mus), treedef.unflatten(nus))

    return optax.GradientTransformation(init, update)


def moment_dtype_for(setting: str, param_dtype: Any) -> jnp.dtype:
    """The storage dtype of a parameter's Adam moments under OptimizerConfig.moment_dtype."""
    if setting == "auto":
        return jnp.dtype(jnp.bfloat16) if jnp.dtype(param_dtype) == jnp.bfloat16 else jnp.dtype(F32)
    return jnp.dtype(setting)


# --- the optimizer --------------------------------------------------------------------------------


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
    Memory: 4 bytes per parameter for the master plus `inner`'s state.
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
    float32 master copy, with moments stored per `cfg.moment_dtype`.

    The moment dtypes follow the parameters, which the transformation first sees in `init` and
    `update`; so `update` needs params (`optimizer.update(grads, state, params)`), as the steps pass.
    """

    def build(params) -> optax.GradientTransformation:
        dtypes = [moment_dtype_for(cfg.moment_dtype, p.dtype) for p in jax.tree.leaves(params)]
        parts = [clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm > 0 else []
        # optax.adamw's own chain (so its state layout), with the Adam above.
        parts.append(optax.chain(scale_by_adam(cfg.b1, cfg.b2, cfg.eps, dtypes),
                                 optax.add_decayed_weights(cfg.weight_decay),
                                 optax.scale_by_learning_rate(make_schedule(cfg))))
        optimizer = optax.chain(*parts)
        return with_fp32_master(optimizer) if cfg.master_fp32 else optimizer

    def init(params):
        return build(params).init(params)

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("the optimizer needs params to know their dtypes: call "
                             "optimizer.update(grads, state, params)")
        return build(params).update(grads, state, params)

    return optax.GradientTransformation(init, update)
