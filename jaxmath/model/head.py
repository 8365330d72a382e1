"""Logprobs and entropy of chosen tokens, fused with the LM head, in chunks.

Qwen's vocabulary is 151,936 wide: float32 logits for a [16 x 4096] batch would take 40 GB. Here
the hidden states are cut into chunks of `chunk_size` token positions; each chunk's logits exist only
inside one scan step, and under `jax.checkpoint` the backward pass recomputes them instead of
storing them. This is what SFT's cross-entropy and GRPO's policy logprobs both use.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

F32 = jnp.float32


def _chunk_stats(h: jax.Array, w: jax.Array, targets: jax.Array, inv_temperature: float, with_entropy: bool):
    """h [c, d], w [v, d], targets [c] -> logprob [c], entropy [c] (zeros unless asked)."""
    logits = jnp.einsum("cd,vd->cv", h, w, preferred_element_type=F32) * inv_temperature
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    if with_entropy:
        probs = jnp.exp(logits - lse[:, None])
        entropy = lse - jnp.sum(probs * logits, axis=-1)
    else:
        entropy = jnp.zeros_like(lse)
    return picked - lse, entropy


@functools.partial(jax.jit, static_argnames=("temperature", "chunk_size", "with_entropy"))
def token_logprobs(hidden: jax.Array, head_weight: jax.Array, targets: jax.Array, *, temperature: float = 1.0,
                   chunk_size: int = 1024, with_entropy: bool = False) -> tuple[jax.Array, jax.Array]:
    """Logprob of `targets` under softmax(hidden @ head_weight.T / temperature).

    hidden:      [batch, seq, embed] (compute dtype; accumulation in float32)
    head_weight: [vocab, embed]
    targets:     [batch, seq] int
    returns:     logprobs [batch, seq] float32, entropy [batch, seq] float32 (zeros unless with_entropy;
                 entropy carries no gradient)
    """
    b, t, d = hidden.shape
    n = b * t
    chunk = min(chunk_size, n)
    pad = -n % chunk
    flat_h = jnp.pad(hidden.reshape(n, d), ((0, pad), (0, 0)))
    flat_y = jnp.pad(targets.reshape(n).astype(jnp.int32), (0, pad))
    w = head_weight.astype(hidden.dtype)
    inv_t = 1.0 / temperature

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def step(_, xs):
        h, y = xs
        lp, ent = _chunk_stats(h, w, y, inv_t, with_entropy)
        return None, (lp, jax.lax.stop_gradient(ent))

    _, (lp, ent) = jax.lax.scan(step, None, (flat_h.reshape(-1, chunk, d), flat_y.reshape(-1, chunk)))
    return lp.reshape(-1)[:n].reshape(b, t), ent.reshape(-1)[:n].reshape(b, t)
