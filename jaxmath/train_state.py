"""The spine both trainers share: setting up the train state and applying one accumulated update.

GRPO (`jaxmath.rl`) and SFT (`jaxmath.sft`) differ in their data and their loss, not in how a model
becomes something to train or how a batch becomes an update:

    setup = init_or_restore(model, optim_cfg, lora_cfg=..., seed=..., total_steps=..., checkpoints=manager)
    def step(trainable, frozen, opt_state, batch):       # jitted by the trainer, e.g.
        ... = accumulate_and_apply(loss_fn, optimizer, trainable, frozen, opt_state, micro_batches(batch, rows))

`init_or_restore` attaches fresh LoRA adapters when asked, splits the model into what trains and
what stays frozen, places the trainable part and the optimizer state on the model's mesh, and
restores the newest checkpoint when one exists. `accumulate_and_apply` runs inside a trainer's
jitted step: a `lax.scan` over micro-batches sums float32 gradients, scales them once, measures
the gradient norm, applies the optax update and pins the outputs to their input shardings.

Boundary: no loss, no data order, no logging; the trainers own those.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import optax
from absl import logging
from flax import nnx

from jaxmath import optim
from jaxmath.checkpoint import CheckpointManager, TrainState
from jaxmath.model import lora as lora_lib
from jaxmath.model import sharding
from jaxmath.model.lora import split_trainable


@dataclasses.dataclass
class TrainSetup:
    """What a trainer starts from.

    graphdef, frozen: the model's structure and the part that does not train (the base weights under
        LoRA; empty in full-parameter training). `nnx.merge(graphdef, state.params, frozen)` is the model.
    state:     trainable params, optimizer state, step, data cursor and PRNG key: fresh (step 0) or
               the newest checkpoint's
    optimizer: the optax transformation `state.opt_state` belongs to
    optim_cfg: the optimizer config with `total_steps` resolved (what `optim.lr_at` needs for logging)
    mesh:      the mesh the model lives on (None on one device)
    restored:  whether `state` came from a checkpoint
    """

    graphdef: nnx.GraphDef
    frozen: nnx.State
    state: TrainState
    optimizer: optax.GradientTransformation
    optim_cfg: optim.OptimizerConfig
    mesh: jax.sharding.Mesh | None
    restored: bool


def resolve_total_steps(optim_cfg: optim.OptimizerConfig, total_steps: int) -> optim.OptimizerConfig:
    """The optimizer config of a run of `total_steps` updates: `total_steps=0` (the default) means
    the run's length, so the decay of a schedule ends where the run does."""
    if optim_cfg.total_steps:
        return optim_cfg
    return dataclasses.replace(optim_cfg, total_steps=total_steps)


def init_or_restore(model: nnx.Module, optim_cfg: optim.OptimizerConfig, *, lora_cfg: lora_lib.LoRAConfig,
                    seed: int, total_steps: int, checkpoints: CheckpointManager | None,
                    mesh: jax.sharding.Mesh | None = None,
                    make_optimizer: Callable[[optim.OptimizerConfig], optax.GradientTransformation] = (
                        optim.make_optimizer)) -> TrainSetup:
    """Prepares `model` for training and returns where training starts.

    lora_cfg: with rank > 0 and no adapters on the model yet, fresh adapters (seeded by `seed`) are
      attached and only they train; otherwise every nnx.Param trains (see `split_trainable`).
    total_steps: the run's optimizer updates, used when optim_cfg.total_steps is 0.
    checkpoints: restore the newest step from here when there is one (None: always start fresh).
    mesh: the mesh to place the trainable state on (default: the one the model's arrays are on;
      fresh adapters are created on one device, so they are placed here too).
    make_optimizer: optim_cfg -> optax transformation (a trainer may cache it to reuse compiled steps).
    Raises ValueError when the optimizer's schedule does not fit `total_steps`.
    """
    if lora_cfg.enabled and not lora_lib.has_lora(model):
        count = lora_lib.apply_lora(model, lora_cfg, seed=seed)
        logging.info("LoRA rank %d on %s: %d trainable parameters", lora_cfg.rank, lora_cfg.targets, count)
    graphdef, trainable, frozen = split_trainable(model)
    mesh = mesh or sharding.mesh_of((frozen, trainable))
    if mesh is not None:
        trainable = sharding.shard_state(trainable, mesh)
    optim_cfg = resolve_total_steps(optim_cfg, total_steps)
    optimizer = make_optimizer(optim_cfg)
    state = TrainState(trainable, sharding.init_optimizer_state(optimizer, trainable, mesh), 0, {},
                       jax.random.key(seed), {})
    restored = checkpoints is not None and checkpoints.latest_step() is not None
    if restored:
        state = checkpoints.restore(target=state)
        logging.info("resumed from %s at step %d", checkpoints.directory, state.step)
    return TrainSetup(graphdef, frozen, state, optimizer, optim_cfg, mesh, restored)


def micro_batches(tree: Any, micro_rows: int) -> Any:
    """Inside jit: every [rows, ...] leaf as [rows / micro_rows, micro_rows, ...] (0, or at least the
    batch's rows: one micro-batch)."""
    rows = jax.tree.leaves(tree)[0].shape[0]
    micro_rows = min(micro_rows or rows, rows)
    if rows % micro_rows:
        raise ValueError(f"batch rows {rows} must be a multiple of micro_batch_rows {micro_rows}")
    return jax.tree.map(lambda x: x.reshape((rows // micro_rows, micro_rows) + x.shape[1:]), tree)


def accumulate_and_apply(loss_fn: Callable, optimizer: optax.GradientTransformation, trainable: nnx.State,
                         frozen: nnx.State, opt_state: Any, batches: Any, *, grad_scale: jax.Array | float | None = None
                         ) -> tuple[nnx.State, Any, jax.Array, Any, dict[str, jax.Array]]:
    """One optimizer update from a batch split into micro-batches; call it inside a jitted step.

    loss_fn(trainable, frozen, micro_batch) -> (loss, aux): the loss of one micro-batch, either its
      share of the whole batch's loss (GRPO normalizes by whole-batch counts) or a sum that
      `grad_scale` turns into a mean (SFT divides by the batch's loss tokens).
    batches: a pytree whose leaves are [accum, micro, ...]; a `lax.scan` runs loss_fn on each
      micro-batch in turn, so memory holds one micro-batch's activations at a time.
    Gradients are summed in each parameter's dtype (`optim.grad_accumulator`: float32 adapters and
    float32 weights in float32; bf16 weights in bf16, as the study's `.grad` did, half the memory;
    docs/PRECISION.md measures the cost), scaled once, and their norm is taken there, accumulated in
    float32: the norm of the gradient the batch defines, which clipping then bounds. Accumulating k micro-batches
    therefore gives the update of one batch of k x micro rows, up to float rounding.

    Returns (trainable, opt_state, losses [accum], aux stacked over [accum, ...],
    {"grad_norm", "update_norm"}); trainable and opt_state keep the shardings their logical axes give
    on the current mesh.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def accumulate(grads, micro):
        (loss, aux), g = grad_fn(trainable, frozen, micro)
        return optim.accumulate_grads(grads, g), (loss, aux)

    grads, (losses, aux) = jax.lax.scan(accumulate, optim.grad_accumulator(trainable), batches)
    if grad_scale is not None:
        grads = jax.tree.map(lambda g: g * grad_scale, grads)
    grad_norm = optim.global_norm(grads)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, trainable)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    trainable, opt_state = sharding.constrain_state((trainable, opt_state))  # outputs keep input shardings
    return trainable, opt_state, losses, aux, {"grad_norm": grad_norm, "update_norm": optax.global_norm(updates)}
