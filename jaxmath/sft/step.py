"""The jitted SFT step: cross-entropy on the assistant tokens, through the shared accumulated update.

Loss: the summed negative log-likelihood of the loss-masked targets, through the chunked LM head
(`jaxmath.model.head.weighted_token_logprobs`, which takes the head's gradient in its forward pass),
so [batch, seq, vocab] float32 logits never exist.

Gradient accumulation: a step's batch arrives laid out [accum, micro, seq] (`stack_micro` on the
host, rows split over the mesh's batch axes on dimension 1, so every micro-batch spans every
device). `jaxmath.train_state.accumulate_and_apply` scans over the micro-batches, sums the token
losses' gradients and divides once by the number of loss tokens in the whole batch, so k
micro-batches give the same update as one batch of k * micro rows (up to float rounding).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxmath.model import sharding
from jaxmath.model.head import weighted_token_logprobs
from jaxmath.train_state import accumulate_and_apply

F32 = jnp.float32


def token_nll(graphdef: nnx.GraphDef, trainable: nnx.State, frozen: nnx.State, batch: dict[str, jax.Array], *,
              chunk_size: int = 1024, remat: bool = True,
              one_document_per_row: bool = False) -> tuple[jax.Array, jax.Array]:
    """Summed negative log-likelihood of the loss-masked targets and their count, both float32 scalars.

    batch: input_ids, targets, segment_ids, positions [rows, seq] int32; loss_mask [rows, seq] bool.
    one_document_per_row: the rows are unpacked (`pack=False`: one document from position 0, then
    padding), so the model takes each row's length instead of a segment mask, which cuDNN's attention
    runs without a dense bias.
    """
    model = nnx.merge(graphdef, trainable, frozen)
    if one_document_per_row:
        # An empty padding row keeps one position, so its (ignored) attention stays finite.
        lengths = jnp.maximum(jnp.sum(batch["segment_ids"] != 0, axis=1, dtype=jnp.int32), 1)
        hidden = model.hidden_states(batch["input_ids"], positions=batch["positions"], seq_lengths=lengths,
                                     remat=remat)
    else:
        hidden = model.hidden_states(batch["input_ids"], positions=batch["positions"],
                                     segment_ids=batch["segment_ids"], remat=remat)
    hidden, head = model.head_operands(hidden)
    weights = batch["loss_mask"].astype(F32)
    # The NLL's gradient in each logprob is -mask: the head takes its gradient in its forward pass.
    nll, _, _ = weighted_token_logprobs(hidden, head, batch["targets"], -weights, chunk_size=chunk_size)
    return nll, jnp.sum(weights)


def make_sft_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, *, chunk_size: int = 1024,
                  remat: bool = True, one_document_per_row: bool = False) -> Callable:
    """The jitted SFT update: `step(trainable, frozen, opt_state, batch) -> (trainable, opt_state, metrics)`,
    run under the mesh its arguments are on.

    batch: the BATCH_KEYS arrays shaped [accum, micro, seq] (`stack_micro`).
    trainable and opt_state are donated (their buffers are reused for the outputs).
    metrics: loss (mean NLL per loss token), grad_norm (before clipping), loss_tokens; float32 scalars.
    one_document_per_row: unpacked rows (see `token_nll`).
    """

    def micro_loss(trainable, frozen, micro):
        return token_nll(graphdef, trainable, frozen, micro, chunk_size=chunk_size, remat=remat,
                         one_document_per_row=one_document_per_row)[0], ()

    def step(trainable, frozen, opt_state, batch):
        count = jnp.sum(batch["loss_mask"].astype(F32))
        scale = 1.0 / jnp.maximum(count, 1.0)
        trainable, opt_state, nll, _, norms = accumulate_and_apply(micro_loss, optimizer, trainable, frozen, opt_state,
                                                                   batch, grad_scale=scale)
        metrics = {"loss": jnp.sum(nll) * scale, "grad_norm": norms["grad_norm"], "loss_tokens": count}
        return trainable, opt_state, metrics

    return sharding.jit_on_mesh(step, donate_argnums=(0, 2))


def make_eval_step(graphdef: nnx.GraphDef, *, chunk_size: int = 1024, one_document_per_row: bool = False) -> Callable:
    """Jitted `(trainable, frozen, batch [rows, seq]) -> (nll_sum, loss_tokens)` for held-out loss."""
    return sharding.jit_on_mesh(lambda t, f, b: token_nll(graphdef, t, f, b, chunk_size=chunk_size, remat=False,
                                                          one_document_per_row=one_document_per_row))


def stack_micro(arrays: dict[str, np.ndarray], accum_steps: int) -> dict[str, Any]:
    """[batch, seq] -> [accum_steps, batch / accum_steps, seq] for `make_sft_step`."""
    return {k: v.reshape(accum_steps, v.shape[0] // accum_steps, *v.shape[1:]) for k, v in arrays.items()}
