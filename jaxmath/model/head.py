"""Logprobs and entropy of chosen tokens, fused with the LM head, in chunks.

Qwen's vocabulary is 151,936 wide: float32 logits for a [16 x 4096] batch would take 40 GB. Here
the hidden states are cut into chunks of `chunk_size` token positions, and each chunk's logsumexp
is computed over vocabulary chunks of `vocab_chunk` rows with a running max and sum (online
softmax), so only a [chunk_size, vocab_chunk] tile of logits exists at a time. This is what SFT's
cross-entropy and GRPO's policy logprobs both use.

Why vocabulary chunks and a hand-written backward: a [1024, 151936] float32 tile is 622 MB, so
every elementwise pass over it (max, exp, sum, the softmax of the backward) streams it through
main memory; on a CPU with ~14 GB/s those passes cost more than the matmul itself (XLA's
`log_softmax` over [2048, 151936] took 2.2 s forward). A [1024, 4096] tile stays in cache. The
backward recomputes each tile from the saved logsumexp (p = exp(logits - lse)) and accumulates the
hidden-state gradient and emits the head-weight gradient per vocabulary chunk, so no [c, vocab]
tensor is ever stored for the backward either. The picked token's logit is a [c, embed] dot with
the gathered head rows, outside the vocabulary loop.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

F32 = jnp.float32


def _joined(parts) -> jax.Array:
    """An operand given whole or as parts along its last (embedding) axis (`Qwen3.head_operands`), whole."""
    if not isinstance(parts, (tuple, list)):
        return parts
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


def _split_vocab(w: jax.Array, vocab_chunk: int) -> jax.Array:
    """[vocab, d] -> [chunks, chunk, d] with chunks as even as possible (zero rows pad the last)."""
    vocab, d = w.shape
    chunks = -(-vocab // min(vocab_chunk, vocab))
    size = -(-vocab // chunks)
    pad = chunks * size - vocab
    return (jnp.pad(w, ((0, pad), (0, 0))) if pad else w).reshape(chunks, size, d)


def _tile_logits(h: jax.Array, w: jax.Array, index: jax.Array, vocab: int, inv_t: float) -> jax.Array:
    """Tempered float32 logits [c, chunk] of vocabulary chunk `index`; padded rows are -inf."""
    logits = jnp.einsum("cd,vd->cv", h, w.astype(h.dtype), preferred_element_type=F32) * inv_t
    ids = index * w.shape[0] + jnp.arange(w.shape[0], dtype=jnp.int32)
    return jnp.where(ids[None, :] < vocab, logits, -jnp.inf)


def _online_lse(h, w_chunks, inv_t, vocab, with_entropy, keep_tiles=False):
    """Online logsumexp (and sum p * logit for the entropy) over the vocabulary chunks: (lse [c],
    entropy [c], and with keep_tiles the logits tiles [chunks, c, chunk], else None)."""
    c = h.shape[0]

    def step(carry, xs):
        run_max, run_sum, run_dot = carry
        w, index = xs
        logits = _tile_logits(h, w, index, vocab, inv_t)
        new_max = jnp.maximum(run_max, jnp.max(logits, axis=-1))
        rescale = jnp.exp(run_max - new_max)
        e = jnp.exp(logits - new_max[:, None])
        run_sum = run_sum * rescale + jnp.sum(e, axis=-1)
        if with_entropy:
            # Padded entries have e == 0 and logit -inf; keep their product out of the sum.
            run_dot = run_dot * rescale + jnp.sum(jnp.where(e > 0, e * logits, 0.0), axis=-1)
        return (new_max, run_sum, run_dot), (logits if keep_tiles else None)

    init = (jnp.full((c,), -jnp.inf, F32), jnp.zeros((c,), F32), jnp.zeros((c,), F32))
    indices = jnp.arange(w_chunks.shape[0], dtype=jnp.int32)
    (run_max, run_sum, run_dot), tiles = jax.lax.scan(step, init, (w_chunks, indices))
    lse = run_max + jnp.log(run_sum)
    entropy = lse - run_dot / run_sum if with_entropy else jnp.zeros_like(lse)
    return lse, entropy, tiles


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _lse_entropy(h, w_chunks, inv_t, vocab, with_entropy):
    """h [c, d], w_chunks [chunks, chunk, d] -> logsumexp [c], entropy [c] of the tempered logits.
    The entropy carries no gradient (its cotangent is ignored)."""
    return _online_lse(h, w_chunks, inv_t, vocab, with_entropy)[:2]


def _lse_entropy_fwd(h, w_chunks, inv_t, vocab, with_entropy):
    lse, entropy, _ = _online_lse(h, w_chunks, inv_t, vocab, with_entropy)
    return (lse, entropy), (h, w_chunks, lse)


def _lse_entropy_bwd(inv_t, vocab, with_entropy, residuals, cotangents):
    h, w_chunks, lse = residuals
    g = cotangents[0]  # d loss / d lse [c]

    def step(dh, xs):
        w, index = xs
        logits = _tile_logits(h, w, index, vocab, inv_t)
        # d lse / d logit = softmax; the temperature scales logits, so it scales their gradient.
        dlogits = (jnp.exp(logits - lse[:, None]) * (g * inv_t)[:, None]).astype(h.dtype)
        dh = dh + jnp.einsum("cv,vd->cd", dlogits, w.astype(h.dtype), preferred_element_type=F32)
        dw = jnp.einsum("cv,cd->vd", dlogits, h, preferred_element_type=F32).astype(w.dtype)
        return dh, dw

    indices = jnp.arange(w_chunks.shape[0], dtype=jnp.int32)
    dh, dw = jax.lax.scan(step, jnp.zeros(h.shape, F32), (w_chunks, indices))
    return dh.astype(h.dtype), dw


_lse_entropy.defvjp(_lse_entropy_fwd, _lse_entropy_bwd)


@functools.partial(jax.jit, static_argnames=("temperature", "chunk_size", "with_entropy", "vocab_chunk"))
def token_logprobs(hidden: jax.Array, head_weight: jax.Array, targets: jax.Array, *, temperature: float = 1.0,
                   chunk_size: int = 1024, with_entropy: bool = False,
                   vocab_chunk: int = 4096) -> tuple[jax.Array, jax.Array]:
    """Logprob of `targets` under softmax(hidden @ head_weight.T / temperature).

    hidden:      [batch, seq, embed] (compute dtype; accumulation in float32), or a tuple of blocks
                 along embed (`Qwen3.head_operands`), joined here
    head_weight: [vocab, embed], or a tuple of blocks along embed
    targets:     [batch, seq] int
    chunk_size:  token positions per step; vocab_chunk: vocabulary rows per logits tile
    returns:     logprobs [batch, seq] float32, entropy [batch, seq] float32 (zeros unless with_entropy;
                 entropy carries no gradient)
    """
    hidden, head_weight = _joined(hidden), _joined(head_weight)
    b, t, d = hidden.shape
    vocab = head_weight.shape[0]
    n = b * t
    chunk = min(chunk_size, n)
    pad = -n % chunk
    flat_h = jnp.pad(hidden.reshape(n, d), ((0, pad), (0, 0)))
    flat_y = jnp.pad(targets.reshape(n).astype(jnp.int32), (0, pad))
    w = head_weight.astype(hidden.dtype)
    w_chunks = _split_vocab(w, vocab_chunk)
    inv_t = 1.0 / temperature

    def step(_, xs):
        h, y = xs
        lse, entropy = _lse_entropy(h, w_chunks, inv_t, vocab, with_entropy)
        # The picked logit from the gathered head rows: one [c, d] dot, not a pass over the tile.
        picked = jnp.einsum("cd,cd->c", h, jnp.take(w, y, axis=0), preferred_element_type=F32) * inv_t
        return None, (picked - lse, jax.lax.stop_gradient(entropy))

    _, (lp, ent) = jax.lax.scan(step, None, (flat_h.reshape(-1, chunk, d), flat_y.reshape(-1, chunk)))
    return lp.reshape(-1)[:n].reshape(b, t), ent.reshape(-1)[:n].reshape(b, t)


# ---------------------------------------------------------------------------------------------------
# The head with a known cotangent: SFT's loss and on-policy GRPO's (whose ratio is exactly 1) give
# d loss / d logprob per token before the logits exist, so the gradient can be taken in the same pass
# over the vocabulary as the logprob, instead of recomputing every logits tile in the backward.


def _fused_chunk(hc, yc, gc, w, w_chunks, inv_t, vocab, with_entropy, want_dh, dw_columns):
    """One chunk of c positions: logprobs [c], entropy [c], d(sum gc * logprob)/d hc [c, d] (or None)
    and the head gradient of the softmax part in the padded chunked layout, one [chunks, chunk, b - a]
    per (a, b) range of embedding columns in dw_columns (a tuple, empty for none: a frozen head's
    columns take no matmul).

    Pass 1 writes each [c, chunk] logits tile into a [chunks, c, chunk] buffer while it keeps the
    online max and sum; pass 2 reads the tiles back for p = exp(logits - lse) and the two gradient
    matmuls. Three matmuls per tile instead of four (forward, recompute, d hidden, d head), for one
    [c, vocab] float32 buffer per position chunk."""
    want_dw = bool(dw_columns)
    lse, entropy, tiles = _online_lse(hc, w_chunks, inv_t, vocab, with_entropy, keep_tiles=want_dh or want_dw)
    w_picked = jnp.take(w, yc, axis=0)
    logprobs = jnp.einsum("cd,cd->c", hc, w_picked, preferred_element_type=F32) * inv_t - lse
    if not (want_dh or want_dw):
        return logprobs, entropy, None, ()
    scale = gc * inv_t  # d(g * logprob) / d logit = g * inv_t * (onehot - p)

    def backward(dh, xs):
        logits, wt = xs
        dlogits = (jnp.exp(logits - lse[:, None]) * -scale[:, None]).astype(hc.dtype)
        if want_dh:
            dh = dh + jnp.einsum("cv,vd->cd", dlogits, wt, preferred_element_type=F32)
        dw = tuple(jnp.einsum("cv,cd->vd", dlogits, hc[:, a:b], preferred_element_type=F32) for a, b in dw_columns)
        return dh, dw

    dh, dw = jax.lax.scan(backward, jnp.zeros(hc.shape, F32), (tiles, w_chunks))
    if want_dh:  # stored per chunk in the hidden states' dtype: [n, d] float32 would be twice that
        dh = (dh + scale[:, None] * w_picked.astype(F32)).astype(hc.dtype)
    return logprobs, entropy, (dh if want_dh else None), dw


def _fused_scan(h, w_parts, y, g, inv_t, vocab, with_entropy, chunk, vocab_chunk, want_dh, want_dw):
    """h [n, d] (n a multiple of chunk), w_parts: the head [vocab, d] as a tuple of column blocks, y, g [n]
    -> logprobs [n], entropy [n], dh [n, d] in h's dtype or None, and per part its gradient in the
    part's dtype, or None where want_dw (a bool per part) is False."""
    n, d = h.shape
    w = _joined(w_parts)
    w_chunks = _split_vocab(w, vocab_chunk)
    ends = [sum(p.shape[-1] for p in w_parts[:i + 1]) for i in range(len(w_parts))]
    dw_columns = tuple((end - p.shape[-1], end) for p, end, want in zip(w_parts, ends, want_dw) if want)

    def step(dw_acc, xs):
        hc, yc, gc = xs
        lp, ent, dh, dw = _fused_chunk(hc, yc, gc, w, w_chunks, inv_t, vocab, with_entropy, want_dh, dw_columns)
        # summed over position chunks in the head's dtype, as the backward of token_logprobs does
        dw_acc = tuple(acc + part.astype(w.dtype) for acc, part in zip(dw_acc, dw))
        return dw_acc, (lp, ent, dh)

    init = tuple(jnp.zeros(w_chunks.shape[:2] + (b - a,), w.dtype) for a, b in dw_columns)
    dw, (lp, ent, dh) = jax.lax.scan(step, init, (h.reshape(-1, chunk, d), y.reshape(-1, chunk),
                                                  g.reshape(-1, chunk)))
    picked = (g * inv_t)[:, None] * h.astype(F32)  # the one-hot part: + g * inv_t * h at each picked row
    dw = iter(acc.reshape(-1, b - a)[:vocab].at[y].add(picked[:, a:b].astype(w.dtype))
              for acc, (a, b) in zip(dw, dw_columns))
    dw_parts = tuple(next(dw) if want else None for want in want_dw)
    return lp.reshape(n), ent.reshape(n), (dh.reshape(n, d) if want_dh else None), dw_parts


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _weighted_logprobs(h, w_parts, y, g, inv_t, vocab, with_entropy, chunk, vocab_chunk):
    """(sum(g * logprobs), logprobs, entropy); only the first output carries a gradient. w_parts: the
    head as a tuple of column blocks (a frozen base head and its adapter's block, `Qwen3.head_operands`)."""
    lp, ent, _, _ = _fused_scan(h, w_parts, y, g, inv_t, vocab, with_entropy, chunk, vocab_chunk, False,
                                (False,) * len(w_parts))
    return jnp.sum(g * lp), lp, ent


def _weighted_logprobs_fwd(h, w_parts, y, g, inv_t, vocab, with_entropy, chunk, vocab_chunk):
    # symbolic_zeros: each argument arrives as (value, perturbed); a frozen head (LoRA) or hidden
    # states that need no gradient skip their matmul and buffer entirely, and of a head given in
    # blocks only the blocks that train (a head adapter's) take a gradient.
    want_dh, want_dw = h.perturbed, tuple(p.perturbed for p in w_parts)
    hv, wv, yv, gv = h.value, tuple(p.value for p in w_parts), y.value, g.value
    lp, ent, dh, dw = _fused_scan(hv, wv, yv, gv, inv_t, vocab, with_entropy, chunk, vocab_chunk, want_dh, want_dw)
    residuals = (dh, dw)
    return (jnp.sum(gv * lp), lp, ent), residuals


def _weighted_logprobs_bwd(inv_t, vocab, with_entropy, chunk, vocab_chunk, residuals, cotangents):
    dh, dw = residuals
    ct = cotangents[0]  # the scalar's; logprobs and entropy are returned under stop_gradient
    if isinstance(ct, jax.custom_derivatives.SymbolicZero):
        ct = jnp.zeros((), F32)
    scale = lambda x: None if x is None else (ct * x).astype(x.dtype)  # noqa: E731
    return scale(dh), tuple(scale(x) for x in dw), None, None


_weighted_logprobs.defvjp(_weighted_logprobs_fwd, _weighted_logprobs_bwd, symbolic_zeros=True)


@functools.partial(jax.jit, static_argnames=("temperature", "chunk_size", "with_entropy", "vocab_chunk"))
def weighted_token_logprobs(hidden: jax.Array, head_weight: jax.Array, targets: jax.Array, weights: jax.Array, *,
                            temperature: float = 1.0, chunk_size: int = 1024, with_entropy: bool = False,
                            vocab_chunk: int = 4096) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`token_logprobs` for a loss whose gradient in each logprob is known in advance.

    Returns (objective, logprobs, entropy): objective = sum(weights * logprobs), a float32 scalar whose
    gradient (in hidden and head_weight) is computed in the forward pass, tile by tile, with the
    logprobs; logprobs [batch, seq] and entropy [batch, seq] carry no gradient. A loss L(logprobs)
    with dL/dlogprobs == weights at the current logprobs trains the same as
    `L(stop_gradient(logprobs)) + objective - stop_gradient(objective)`: SFT's negative log-likelihood
    (weights = -loss mask) and the on-policy GRPO surrogate, whose ratio is exactly 1 (weights = its
    gradient at ratio 1). Same results as `token_logprobs` up to float rounding, three logits-sized
    matmuls per vocabulary tile instead of four, and a [chunk_size, vocab] float32 buffer per chunk.
    hidden and head_weight may each be a tuple of blocks along the embedding (`Qwen3.head_operands` of an
    adapted head): a block that takes no gradient (the frozen base head) costs no gradient matmul.
    """
    head_parts = tuple(head_weight) if isinstance(head_weight, (tuple, list)) else (head_weight,)
    hidden = _joined(hidden)
    b, t, d = hidden.shape
    vocab = head_parts[0].shape[0]
    n = b * t
    chunk = min(chunk_size, n)
    pad = -n % chunk
    flat_h = jnp.pad(hidden.reshape(n, d), ((0, pad), (0, 0)))
    flat_y = jnp.pad(targets.reshape(n).astype(jnp.int32), (0, pad))
    flat_g = jnp.pad(jax.lax.stop_gradient(weights).reshape(n).astype(F32), (0, pad))
    objective, lp, ent = _weighted_logprobs(flat_h, tuple(p.astype(hidden.dtype) for p in head_parts), flat_y, flat_g,
                                            1.0 / temperature, vocab, with_entropy, chunk, vocab_chunk)
    lp = jax.lax.stop_gradient(lp)[:n].reshape(b, t)
    ent = jax.lax.stop_gradient(ent)[:n].reshape(b, t)
    return objective, lp, ent
