"""The dense Qwen3 family as Flax NNX modules: forward, prefill and one-token decode.

Read top to bottom: numerics helpers (RMSNorm, RoPE), the projection with optional LoRA, attention,
MLP, the decoder layer, the model, the KV cache. Details that break ports, all matched against HF
`Qwen3ForCausalLM` in tests/test_model.py:

- q and k are RMS-normalised per head *before* RoPE;
- `head_dim` is its own field (Qwen3-4B: 128, not hidden / heads = 80);
- grouped-query attention (num_kv_heads < num_heads), SwiGLU MLP, no biases;
- embeddings tied to the LM head for 0.6B-4B, untied for 8B and larger.

Layers are stacked (every layer parameter has a leading `layers` axis) and run under `lax.scan`, so
compile time does not grow with depth. The KV-cache path (prefill and decode, `forward_with_cache`)
runs the layers unrolled over one array per layer and weight (`unstack_layers`) and per layer of the
cache: a GPU's matmul fusions read those where they lie, where they copied each scanned layer's
slices out first (docs/BENCHMARKS.md, "Lean programs"). Compute runs in `config.dtype` (bf16 by default); norms,
RoPE, softmax and logits accumulate in float32. Model code has no training logic: the logprob
head lives in `jaxmath.model.head`, the sampler in `jaxmath.rollout`.

Einsum letters: b batch, t time (query), s key slot, d embed, n heads, k kv heads, h head_dim,
f ffw, v vocab, r LoRA rank.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxmath.model.config import Qwen3Config
from jaxmath.model.projection import joined_matmul, joins
from jaxmath.model.sharding import constrain

F32 = jnp.float32
_LARGE_NEGATIVE = -0.7 * float(jnp.finfo(F32).max)  # a masked logit (as jax.nn.dot_product_attention's)


class LoRAParam(nnx.Variable):
    """LoRA adapter weights: their own variable type, so the optimizer, checkpoints and the weight
    sync select them by type (`nnx.split(model, LoRAParam, ...)`), and the reference policy is the
    same model with adapters switched off."""


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: Any, std: float = 0.02) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), shape, F32)).astype(dtype)


# --- numerics ------------------------------------------------------------------------------------


class RMSNorm(nnx.Module):
    """y = x / rms(x) * scale, computed in float32."""

    def __init__(self, dim: int, eps: float, *, axis_name: str, stack: tuple[int, ...] = (), param_dtype: Any = F32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones(stack + (dim,), param_dtype), axes=("layers",) * len(stack) + (axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(F32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale.get_value().astype(F32)).astype(x.dtype)


def rope_inv_freq(config: Qwen3Config) -> tuple[np.ndarray, float]:
    """Inverse frequencies [head_dim // 2] and the cos/sin scale, following HF's rope types
    (default, linear, dynamic at its base length, yarn)."""
    dim, base = config.head_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    scaling = config.rope_scaling_dict
    kind = scaling.get("rope_type", "default")
    if kind in ("default", "dynamic"):
        # dynamic NTK only changes frequencies beyond max_position_embeddings; the study stays below.
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "yarn":
        factor = scaling["factor"]
        original = scaling.get("original_max_position_embeddings") or config.max_position_embeddings
        attention_factor = scaling.get("attention_factor")
        if attention_factor is None:
            attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
        beta_fast = scaling.get("beta_fast") or 32
        beta_slow = scaling.get("beta_slow") or 1

        def correction_dim(rotations):
            return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
        extrapolation = 1 - ramp
        inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
        return inv_freq.astype(np.float32), float(attention_factor)
    raise ValueError(f"rope_type {kind!r} is not supported; use default, linear, dynamic or yarn")


def rope_cos_sin(positions: jax.Array, config: Qwen3Config) -> tuple[jax.Array, jax.Array]:
    """positions [b, t] int -> cos, sin [b, t, head_dim] float32 (halves concatenated, as in HF)."""
    inv_freq, scale = rope_inv_freq(config)
    freqs = positions.astype(F32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * scale, jnp.sin(emb) * scale


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [b, t, heads, h]; rotate-half convention of HF Qwen3 (not interleaved)."""
    x32 = x.astype(F32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)


# --- layers --------------------------------------------------------------------------------------


class Dense(nnx.Module):
    """A bias-free projection `einsum(equation, x, kernel)` with an optional LoRA adapter.

    The kernel's first `num_in` dims contract with the input, the rest are output dims. LoRA adds
    `(x @ A) @ B * alpha / rank` with A [in..., r] and B [r, out...]; `jaxmath.model.lora` attaches it.
    """

    def __init__(self, equation: str, shape: tuple[int, ...], axes: tuple[str, ...], num_in: int, *,
                 rngs: nnx.Rngs, stack: tuple[int, ...], param_dtype: Any):
        self.equation = equation
        self.num_in = num_in
        self.kernel = nnx.Param(_normal(rngs, stack + shape, param_dtype), axes=("layers",) * len(stack) + axes)
        # Declared as data (not static) so adapters can be attached later by jaxmath.model.lora.
        self.lora_a: LoRAParam | None = nnx.data(None)
        self.lora_b: LoRAParam | None = nnx.data(None)
        self.lora_scale = 0.0

    def lora_equations(self) -> tuple[str, str]:
        lhs, rest = self.equation.split(",")
        kernel, out = rest.split("->")
        k_in, k_out = kernel[: self.num_in], kernel[self.num_in:]
        prefix = out[: len(out) - len(k_out)]
        return f"{lhs},{k_in}r->{prefix}r", f"{prefix}r,r{k_out}->{out}"

    def __call__(self, x: jax.Array, lora: bool = True) -> jax.Array:
        kernel = self.kernel.get_value().astype(x.dtype)
        if lora and self.lora_a is not None:
            eq_a, eq_b = self.lora_equations()
            low = jnp.einsum(eq_a, x, self.lora_a.get_value().astype(x.dtype))
            b = self.lora_b.get_value().astype(x.dtype)
            if joins(self.equation, kernel.shape, b.shape[0], math.prod(x.shape[:-1])):  # one matmul
                return joined_matmul(self.equation, x, (self.lora_scale * low).astype(x.dtype), kernel, b)
            return jnp.einsum(self.equation, x, kernel) + self.lora_scale * jnp.einsum(eq_b, low, b)
        return jnp.einsum(self.equation, x, kernel)


class Attention(nnx.Module):
    def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs, stack: tuple[int, ...]):
        c = config
        d, n, k, h = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        kw = dict(rngs=rngs, stack=stack, param_dtype=c.param_dtype)
        self.q_proj = Dense("btd,dnh->btnh", (d, n, h), ("embed", "heads", "head_dim"), 1, **kw)
        self.k_proj = Dense("btd,dkh->btkh", (d, k, h), ("embed", "kv_heads", "head_dim"), 1, **kw)
        self.v_proj = Dense("btd,dkh->btkh", (d, k, h), ("embed", "kv_heads", "head_dim"), 1, **kw)
        self.o_proj = Dense("btnh,nhd->btd", (n, h, d), ("heads", "head_dim", "embed"), 2, **kw)
        self.q_norm = RMSNorm(h, c.rms_norm_eps, axis_name="head_dim", stack=stack, param_dtype=c.param_dtype)
        self.k_norm = RMSNorm(h, c.rms_norm_eps, axis_name="head_dim", stack=stack, param_dtype=c.param_dtype)
        self.scale = h ** -0.5
        self.implementation = c.attention_impl

    def qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array, lora: bool) -> tuple[jax.Array, ...]:
        # The projections' outputs (before the norms): what the "attention" remat policies keep.
        q = apply_rope(self.q_norm(checkpoint_name(self.q_proj(x, lora), "qkv_proj")), cos, sin)
        k = apply_rope(self.k_norm(checkpoint_name(self.k_proj(x, lora), "qkv_proj")), cos, sin)
        v = checkpoint_name(self.v_proj(x, lora), "qkv_proj")
        return (constrain(q, ("batch", "seq", "heads", "head_dim")),
                constrain(k, ("batch", "seq", "kv_heads", "head_dim")),
                constrain(v, ("batch", "seq", "kv_heads", "head_dim")))

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, lora: bool,
               causal: bool = False, seq_lengths: jax.Array | None = None) -> jax.Array:
        """q [b, t, n, h], k/v [b, s, k, h], mask [b, 1, t, s] bool or None -> [b, t, d].

        causal: also restrict query i to keys <= i (q and k aligned from position 0). The mask may say
        the same; saying it here lets cuDNN skip the blocks above the diagonal, which it cannot infer
        from a mask (it turns a mask into a dense additive bias).
        seq_lengths [b] int32 (cuDNN, causal only): right-padded rows whose first seq_lengths[i] tokens
        are real; cuDNN masks the rest itself (its padding-causal mode), with no mask and no bias."""
        implementation = self.implementation_for(cached=not causal)
        if seq_lengths is not None and implementation == "cudnn":
            out = jax.nn.dot_product_attention(q, k, v, scale=self.scale, is_causal=True, query_seq_lengths=seq_lengths,
                                               key_value_seq_lengths=seq_lengths, implementation="cudnn")
            return self.o_proj(out, lora)
        # With a mask (which holds the causality already) only cuDNN gains from the flag; XLA would build
        # a second causal mask and combine the two (4.7 GB more in GRPO v2's 4B plan).
        is_causal = causal and (mask is None or implementation == "cudnn")
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=self.scale, is_causal=is_causal,
                                           implementation=implementation)
        return self.o_proj(out, lora)

    def attend_cached(self, q: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array,
                      lora: bool) -> jax.Array:
        """Attention over cache slots: q [b, t, n, h], keys [b, k, s, h] and values [b, k, h, s] (one
        layer's cache window, `KVCache`'s layouts), mask [b, 1, t, s] -> [b, t, d]; the numerics of
        jax.nn.dot_product_attention's XLA path. Written for the cache's layouts: given [b, s, k, h] as that
        function wants, XLA kept the whole cache transposed through the decode loops (docs/BENCHMARKS.md).

        A one-token step compiled for a GPU contracts the values as a reduction XLA fuses with the
        window's slice, where its matmul fusions would first copy a window sliced along their contracted
        axis (every step, every layer: docs/BENCHMARKS.md, "Lean programs"); the keys' window is sliced
        along a kept axis, which XLA's matmul fusion reads in place. On a CPU both stay matmuls."""
        b, t, n, h = q.shape
        kv = keys.shape[1]
        grouped = q.reshape(b, t, kv, n // kv, h)
        logits = jnp.einsum("btkgh,bksh->bkgts", grouped, keys, preferred_element_type=F32) * self.scale
        logits = jnp.where(mask[:, :, None], logits, _LARGE_NEGATIVE)
        probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)

        def matmul(probs, values):
            return jnp.einsum("bkgts,bkhs->btkgh", probs, values)

        def reduction(probs, values):  # [b, k, g, t, 1, s] x [b, k, 1, 1, h, s], summed over s
            out = jnp.sum(probs[..., None, :].astype(F32) * values[:, :, None, None].astype(F32), axis=-1)
            return jnp.transpose(out, (0, 3, 1, 2, 4)).astype(q.dtype)

        out = (jax.lax.platform_dependent(probs, values, cpu=matmul, default=reduction) if t == 1
               else matmul(probs, values))
        return self.o_proj(out.reshape(b, t, n, h), lora)

    def implementation_for(self, cached: bool) -> str:
        """The attention kernel: the configured one for training and scoring (`Qwen3Config.for_platform`
        decides an auto choice from the device platform: cuDNN's flash attention on a GPU, 1.5x XLA's SFT
        step on an H200), XLA when none was decided. The KV-cache path (prefill and one-query decode
        steps) always uses XLA."""
        if cached:
            return "xla"
        return self.implementation or "xla"


class MLP(nnx.Module):
    def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs, stack: tuple[int, ...]):
        d, f = config.hidden_size, config.intermediate_size
        kw = dict(rngs=rngs, stack=stack, param_dtype=config.param_dtype)
        self.gate_proj = Dense("btd,df->btf", (d, f), ("embed", "ffw"), 1, **kw)
        self.up_proj = Dense("btd,df->btf", (d, f), ("embed", "ffw"), 1, **kw)
        self.down_proj = Dense("btf,fd->btd", (f, d), ("ffw", "embed"), 1, **kw)

    def __call__(self, x: jax.Array, lora: bool = True) -> jax.Array:
        gate, up = (checkpoint_name(p(x, lora), "mlp_gate_up") for p in (self.gate_proj, self.up_proj))
        hidden = jax.nn.silu(gate) * up
        return self.down_proj(constrain(hidden, ("batch", "seq", "ffw")), lora)


class DecoderLayer(nnx.Module):
    """Pre-norm attention and MLP blocks with residuals. Built with `stack=(num_layers,)` its
    parameters carry a leading layers axis; `nnx.merge` of one slice gives a single layer."""

    def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs, stack: tuple[int, ...] = ()):
        c = config
        self.input_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, axis_name="embed", stack=stack,
                                  param_dtype=c.param_dtype)
        self.attn = Attention(c, rngs=rngs, stack=stack)
        self.post_attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, axis_name="embed", stack=stack,
                                      param_dtype=c.param_dtype)
        self.mlp = MLP(c, rngs=rngs, stack=stack)

    def __call__(self, h, cos, sin, mask, lora: bool = True, seq_lengths=None):
        """Causal self-attention over the sequence (further restricted by `mask`, or for cuDNN by
        right-padded `seq_lengths`, when given) and the MLP."""
        q, k, v = self.attn.qkv(self.input_norm(h), cos, sin, lora)
        h = checkpoint_name(h + self.attn.attend(q, k, v, mask, lora, causal=True, seq_lengths=seq_lengths),
                            "attention_residual")
        return h + self.mlp(self.post_attn_norm(h), lora)

    def shared_prompt(self, prompt_h, h, prompt_rope, rope, prompt_mask, mask, group_size: int, lora: bool = True):
        """__call__ for groups of sequences that share their prompt: `prompt_h` [g, p, d] one prompt per
        group (causal under `prompt_mask` [g, 1, p, p]); `h` [g * group_size, t, d] the groups'
        continuations, row i of group i // group_size, each attending to its group's prompt keys and
        causally to its own (`mask` [g * group_size, 1, t, p + t]). Each prompt passes the layer once,
        not group_size times; the keys and values it gives are broadcast to its continuations."""
        q, k, v = self.attn.qkv(self.input_norm(prompt_h), *prompt_rope, lora)
        prompt_h = checkpoint_name(prompt_h + self.attn.attend(q, k, v, prompt_mask, lora, causal=True),
                                   "attention_residual")
        q_rows, k_rows, v_rows = self.attn.qkv(self.input_norm(h), *rope, lora)
        keys = jnp.concatenate([jnp.repeat(k, group_size, axis=0), k_rows], axis=1)
        values = jnp.concatenate([jnp.repeat(v, group_size, axis=0), v_rows], axis=1)
        h = checkpoint_name(h + self.attn.attend(q_rows, keys, values, mask, lora), "attention_residual")
        return (prompt_h + self.mlp(self.post_attn_norm(prompt_h), lora),
                h + self.mlp(self.post_attn_norm(h), lora))

    def decode(self, h, cos, sin, mask, k_cache, v_cache, write_index, lora: bool = True):
        """Like __call__, but writes this chunk's k/v into this layer's caches (k [b, k, s, h], v
        [b, k, h, s]) at slot `write_index` ([] shared, or [b] one per row for a single token) and
        attends over the first mask.shape[-1] slots of them."""
        q, k, v = self.attn.qkv(self.input_norm(h), cos, sin, lora)
        if write_index.ndim:  # one slot per row (t == 1); a slot past the cache is dropped
            rows = jnp.arange(k.shape[0])
            k_cache = k_cache.at[rows, :, write_index].set(k[:, 0].astype(k_cache.dtype), mode="drop")
            v_cache = v_cache.at[rows, :, :, write_index].set(v[:, 0].astype(v_cache.dtype), mode="drop")
        else:
            k_cache = jax.lax.dynamic_update_slice(k_cache, jnp.swapaxes(k, 1, 2).astype(k_cache.dtype),
                                                   (0, 0, write_index, 0))
            v_cache = jax.lax.dynamic_update_slice(v_cache, jnp.transpose(v, (0, 2, 3, 1)).astype(v_cache.dtype),
                                                   (0, 0, 0, write_index))
        window = mask.shape[-1]  # a static slice (none at the full cache): XLA reads it in place (attend_cached)
        keys, values = k_cache[:, :, :window].astype(q.dtype), v_cache[..., :window].astype(q.dtype)
        h = h + self.attn.attend_cached(q, keys, values, mask, lora)
        return h + self.mlp(self.post_attn_norm(h), lora), k_cache, v_cache


# --- the model -----------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer for a batch of sequences written slot by slot.

    k:       per layer [batch, kv_heads, max_len, head_dim]
    v:       per layer [batch, kv_heads, head_dim, max_len]
    valid:   [batch, max_len] bool, slots holding a real token (left padding stays False)
    lengths: [batch] int32, real tokens so far = the next RoPE position of each row
    index:   [] int32, the next slot to write, shared by all rows; or [batch] int32, each row's own
             (rows admitted at different steps, decoding one token at a time: the sampler's slots)

    One array per layer, so a decode step reads its layer's window where it lies and updates the slot
    it writes in place; stacked [layers, ...], XLA copied each layer's window out before its matmuls.
    Values keep the slots last, so the window the values are contracted over is a run of their
    fastest axis (`Attention.attend_cached`).
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    valid: jax.Array
    lengths: jax.Array
    index: jax.Array

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @staticmethod
    def layer_shapes(config: Qwen3Config, batch: int, max_len: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of one layer's k and v."""
        return ((batch, config.num_kv_heads, max_len, config.head_dim),
                (batch, config.num_kv_heads, config.head_dim, max_len))

    @staticmethod
    def zeros(config: Qwen3Config, batch: int, max_len: int, dtype: Any) -> tuple[tuple, tuple]:
        """(k, v): every layer's empty caches."""
        k_shape, v_shape = KVCache.layer_shapes(config, batch, max_len)
        layers = range(config.num_layers)
        return tuple(jnp.zeros(k_shape, dtype) for _ in layers), tuple(jnp.zeros(v_shape, dtype) for _ in layers)

    @staticmethod
    def nbytes_for(config: Qwen3Config, batch: int, max_len: int, dtype: Any = None) -> int:
        itemsize = jnp.dtype(dtype or config.dtype).itemsize
        return 2 * config.num_layers * batch * max_len * config.num_kv_heads * config.head_dim * itemsize


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """[b, t] segment ids -> positions that restart at 0 where the segment id changes."""
    t = segment_ids.shape[1]
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids.shape)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


def segment_mask(segment_ids: jax.Array) -> jax.Array:
    """Causal attention within each segment; segment 0 is padding. [b, t] -> [b, 1, t, t] bool.
    A padding query attends to itself only, so its (ignored) output stays finite."""
    t = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    real = (segment_ids != 0)[:, None, :]
    return ((same & real & causal) | jnp.eye(t, dtype=bool))[:, None]


class HeadLoRA(nnx.Module):
    """A LoRA adapter on the LM head (the unembedding; Tinker's `train_unembed`): the logits gain
    `scale * (h @ A) @ B` with A [embed, r] and B [r, vocab]. Only the head changes: with tied
    embeddings the input embedding stays the base one, so an adapted tied model has, in effect, an
    untied head (`jaxmath.model.lora.merge_lora` unties it)."""

    def __init__(self, a: jax.Array, b: jax.Array, scale: float):
        self.lora_a = LoRAParam(a, axes=("embed", "lora_rank"))
        self.lora_b = LoRAParam(b, axes=("lora_rank", "vocab"))
        self.lora_scale = scale

    def delta(self) -> jax.Array:
        """scale * (A @ B).T in the head's layout [vocab, embed], float32."""
        a = self.lora_a.get_value().astype(F32)
        b = self.lora_b.get_value().astype(F32)
        return self.lora_scale * (a @ b).T


def _remat_saving(*names: str):
    """A remat policy that keeps the values named `names` (`checkpoint_name`) and the outputs of cuDNN's
    attention forward (its output and softmax statistics, which its backward reads) and recomputes the
    rest of the layer: the projections whose outputs are kept are not recomputed, nor is the attention."""
    named = jax.checkpoint_policies.save_only_these_names(*names)

    def policy(prim, *args, **params):
        return prim.name.startswith("dot_product_attention_fwd") or named(prim, *args, **params)

    return policy


class Qwen3(nnx.Module):
    """A Qwen3 causal LM. `model(input_ids)` returns float32 logits [batch, seq, vocab]."""

    def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.embed = nnx.Param(_normal(rngs, (c.vocab_size, c.hidden_size), c.param_dtype), axes=("vocab", "embed"))
        self.layers = DecoderLayer(c, rngs=rngs, stack=(c.num_layers,))
        self.final_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, axis_name="embed", param_dtype=c.param_dtype)
        self.lm_head = None if c.tie_word_embeddings else nnx.Param(
            _normal(rngs, (c.vocab_size, c.hidden_size), c.param_dtype), axes=("vocab", "embed"))
        # A LoRA adapter on the head (HeadLoRA), attached by jaxmath.model.lora when lora.train_unembed.
        self.head_lora: HeadLoRA | None = nnx.data(None)

    def base_head_weight(self) -> jax.Array:
        """The LM head [vocab, embed] without its adapter (the embedding itself when tied)."""
        return (self.embed if self.lm_head is None else self.lm_head).get_value()

    @property
    def head_weight(self) -> jax.Array:
        """The LM head [vocab, embed] (the embedding itself when tied), with its LoRA adapter folded in
        (in float32, then the head's dtype) when there is one: what a sampler or an engine decodes with,
        as vLLM receives it merged. Training uses `head_operands`, which keeps the adapter exact."""
        w = self.base_head_weight()
        if self.head_lora is None:
            return w
        return (w.astype(F32) + self.head_lora.delta()).astype(w.dtype)

    def head_operands(self, hidden: jax.Array, lora: bool = True) -> tuple[Any, Any]:
        """(hidden, head) whose product hidden @ head.T is the logits, for `jaxmath.model.head.token_logprobs`.

        Without a head adapter (or with lora=False): the hidden states and the head itself. With one:
        the blocks (h, scale * h @ A) and (W, B.T), which `jaxmath.model.head` joins along the embedding,
        so one matmul gives h @ W.T + scale * (h @ A) @ B exactly as a PEFT LoRA layer computes it (the
        low-rank product in the compute dtype, never rounded into W), and gradients reach A and B; kept
        as blocks, the frozen W's block takes no gradient matmul in the one-pass head."""
        w = self.base_head_weight()
        if not lora or self.head_lora is None:
            return hidden, w
        a = self.head_lora.lora_a.get_value().astype(hidden.dtype)
        b = self.head_lora.lora_b.get_value()
        low = (self.head_lora.lora_scale * jnp.einsum("...d,dr->...r", hidden, a)).astype(hidden.dtype)
        return (hidden, low), (w.astype(hidden.dtype), b.T.astype(hidden.dtype))

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        x = jnp.take(self.embed.get_value(), input_ids, axis=0).astype(self.config.dtype)
        return constrain(x, ("batch", "seq", "embed"))

    def _scan_layers(self, body, carry, extra_xs=None, remat: bool = False):
        graphdef, state = nnx.split(self.layers)

        offload = remat and self.config.remat == "offload"

        def step(carry, xs):
            layer_state, extra = xs
            if offload:  # the layer's input, the one thing its backward pass keeps, goes to the host
                carry = jax.tree.map(lambda x: checkpoint_name(x, "layer_input"), carry)
            return body(nnx.merge(graphdef, layer_state), carry, extra), None

        if remat and self.config.remat != "none":
            policy = {"dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                      "attention": _remat_saving("qkv_proj", "attention_residual"),
                      "attention_mlp": _remat_saving("qkv_proj", "attention_residual", "mlp_gate_up"),
                      "full": jax.checkpoint_policies.nothing_saveable,
                      "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
                          names_which_can_be_saved=[], names_which_can_be_offloaded=["layer_input"],
                          offload_src="device", offload_dst="pinned_host")}[self.config.remat]
            step = jax.checkpoint(step, policy=policy, prevent_cse=False)
        carry, _ = jax.lax.scan(step, carry, (state, extra_xs))
        return carry

    def hidden_states(self, input_ids: jax.Array, *, positions: jax.Array | None = None,
                      segment_ids: jax.Array | None = None, seq_lengths: jax.Array | None = None,
                      lora: bool = True, remat: bool = False) -> jax.Array:
        """Final-normed hidden states [batch, seq, embed] in the compute dtype.

        segment_ids [b, t] int: tokens attend causally within their own segment; 0 marks padding.
        Packed documents use 1, 2, 3, ...; a left- or right-padded batch uses its 0/1 attention mask.
        seq_lengths [b] int (instead of segment_ids): right-padded rows, one sequence in the first
        seq_lengths[i] positions of each. cuDNN takes the lengths as they are (no mask, no bias); XLA
        gets the mask of segment ids 1...1 0...0, so both compute what segment_ids would.
        None of the two: one unpadded sequence per row, plain causal attention with no mask at all.
        positions [b, t] int default to restarting at 0 in each segment (0, 1, 2, ... with seq_lengths).

        cuDNN's training attention refuses an odd sequence length in JAX 0.10 (its check counts a bias
        even when there is none), so for cuDNN an odd-length batch runs one padding position longer
        (the 5,119 positions of a 1,024-token prompt bucket and 4,096 completion tokens become 5,120).
        """
        if segment_ids is not None and seq_lengths is not None:
            raise ValueError("pass segment_ids or seq_lengths, not both")
        b, t = input_ids.shape
        cudnn = self.layers.attn.implementation_for(cached=False) == "cudnn"
        if seq_lengths is not None and not cudnn:
            segment_ids = (jnp.arange(t, dtype=jnp.int32)[None, :] < seq_lengths[:, None]).astype(jnp.int32)
            seq_lengths = None
        if positions is None:
            positions = (jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
                         if segment_ids is None else positions_from_segments(segment_ids))
        extra = t % 2 if cudnn else 0
        if extra:  # one padding position: after every real token (causal), segment 0, past every length
            input_ids, positions = (jnp.pad(x, ((0, 0), (0, extra))) for x in (input_ids, positions))
            segment_ids = None if segment_ids is None else jnp.pad(segment_ids, ((0, 0), (0, extra)))
        cos, sin = rope_cos_sin(positions, self.config)
        mask = None if segment_ids is None else segment_mask(segment_ids)
        h = self._scan_layers(lambda layer, h, _: layer(h, cos, sin, mask, lora, seq_lengths),
                              self.embed_tokens(input_ids), remat=remat)
        return self.final_norm(h[:, :t] if extra else h)

    def shared_prompt_hidden_states(self, prompt_ids: jax.Array, prompt_lengths: jax.Array, continuation_ids: jax.Array,
                                    *, lora: bool = True, remat: bool = False) -> tuple[jax.Array, jax.Array]:
        """Final-normed hidden states of groups of sequences that share a prompt, each prompt run once.

        prompt_ids [g, p] int: one prompt per group, right-padded, its first prompt_lengths[i] (>= 1)
        tokens real; continuation_ids [g * k, t] int: the k sequences of group i (rows i*k ... i*k + k - 1)
        go on from position prompt_lengths[i]. Returns (prompt hidden [g, p, d], continuation hidden
        [g * k, t, d]): what `hidden_states` gives each whole sequence [prompt | continuation] at those
        positions, up to float rounding. For GRPO's K completions of a prompt (jaxmath.rl.step), whose
        prompts would otherwise pass every layer K times.

        Attention takes masks here (XLA's kernel; cuDNN's would turn them into dense biases), so the
        callers keep `hidden_states` where the model attends with cuDNN."""
        g, p = prompt_ids.shape
        rows, t = continuation_ids.shape
        if rows % g:
            raise ValueError(f"{rows} continuation rows are not a whole number of groups of the {g} prompts")
        group_size = rows // g
        prompt_segments = (jnp.arange(p, dtype=jnp.int32)[None, :] < prompt_lengths[:, None]).astype(jnp.int32)
        prompt_rope = rope_cos_sin(jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (g, p)), self.config)
        lengths = jnp.repeat(prompt_lengths, group_size)
        rope = rope_cos_sin(lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :], self.config)
        # Continuation query j sees its group's real prompt tokens and its own tokens up to j.
        sees_prompt = jnp.broadcast_to((jnp.arange(p) < lengths[:, None])[:, None, :], (rows, t, p))
        sees_own = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (rows, t, t))
        mask = jnp.concatenate([sees_prompt, sees_own], axis=-1)[:, None]
        prompt_mask = segment_mask(prompt_segments)

        def body(layer, carry, _):
            return layer.shared_prompt(*carry, prompt_rope, rope, prompt_mask, mask, group_size, lora)

        prompt_h, h = self._scan_layers(body, (self.embed_tokens(prompt_ids), self.embed_tokens(continuation_ids)),
                                        remat=remat)
        return self.final_norm(prompt_h), self.final_norm(h)

    def logits(self, hidden: jax.Array, lora: bool = True) -> jax.Array:
        """[..., embed] -> float32 logits [..., vocab]. Materializes the full vocabulary: for training
        use `jaxmath.model.head.token_logprobs`, which never does for a whole batch."""
        h, w = (x if isinstance(x, jax.Array) else jnp.concatenate(x, axis=-1)
                for x in self.head_operands(hidden, lora))
        return jnp.einsum("...d,vd->...v", h, w.astype(h.dtype), preferred_element_type=F32)

    def __call__(self, input_ids: jax.Array, *, positions: jax.Array | None = None,
                 attention_mask: jax.Array | None = None, segment_ids: jax.Array | None = None,
                 lora: bool = True) -> jax.Array:
        """Logits [batch, seq, vocab] float32. `attention_mask` (HF style, 1 = real token) is the
        same as `segment_ids` with one segment; pass `positions` to match HF's arange positions."""
        if segment_ids is None and attention_mask is not None:
            segment_ids = attention_mask.astype(jnp.int32)
        return self.logits(self.hidden_states(input_ids, positions=positions, segment_ids=segment_ids, lora=lora),
                           lora=lora)

    # --- KV-cache path: prefill and decode share one function --------------------------------

    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> KVCache:
        c = self.config
        k, v = KVCache.zeros(c, batch, max_len, dtype or c.dtype)
        return KVCache(k=k, v=v, valid=jnp.zeros((batch, max_len), bool),
                       lengths=jnp.zeros((batch,), jnp.int32), index=jnp.zeros((), jnp.int32))

    def forward_with_cache(self, tokens: jax.Array, token_valid: jax.Array, cache: KVCache,
                           lora: bool = True, window: int | None = None) -> tuple[jax.Array, KVCache]:
        """Run `tokens` [b, t] through the model, appending them to `cache` at slots index..index+t.

        token_valid [b, t] bool marks real tokens (False = left padding of a prompt). Prefill is a call
        with the padded prompt; decode is a call with t = 1. Returns final-normed hidden [b, t, d].
        With a per-row `cache.index` ([b]), each row writes its token at its own slot, and only a valid
        token advances its row's index (a finished row's token is written, masked, and overwritten).

        window: attend over cache slots [0, window) only, reading that much of the cache instead of all
        of it; the caller guarantees index + t <= window (slots past it are empty then). Decoding in
        growing windows keeps the keys and values read per step near the ones written so far.
        """
        window = cache.max_len if window is None else window
        if not 0 < window <= cache.max_len:
            raise ValueError(f"window must be in (0, {cache.max_len}], got {window}")
        b, t = tokens.shape
        valid_i = token_valid.astype(jnp.int32)
        positions = jnp.maximum(cache.lengths[:, None] + jnp.cumsum(valid_i, axis=1) - 1, 0)
        cos, sin = rope_cos_sin(positions, self.config)
        if cache.index.ndim:  # each row its own slot: one token per row
            if t != 1:
                raise ValueError(f"a cache with a slot index per row takes one token per row, got {t}")
            slots = cache.index[:, None]  # [b, 1]
            valid = cache.valid.at[jnp.arange(b), cache.index].set(token_valid[:, 0], mode="drop")
            next_index = cache.index + valid_i[:, 0]
        else:
            slots = (cache.index + jnp.arange(t, dtype=jnp.int32))[None, :]  # [1, t]
            valid = jax.lax.dynamic_update_slice(cache.valid, token_valid, (0, cache.index))
            next_index = cache.index + t
        key_slot = jnp.arange(window, dtype=jnp.int32)
        mask = valid[:, None, :window] & (key_slot[None, None, :] <= slots[:, :, None])
        mask = (mask | (key_slot[None, None, :] == slots[:, :, None]))[:, None]  # [b, 1, t, s]
        h, keys, values = self.embed_tokens(tokens), [], []
        for layer, k, v in zip(self.layer_list(), cache.k, cache.v):  # unrolled: one layer's arrays each
            h, k, v = layer.decode(h, cos, sin, mask, k, v, cache.index, lora)
            # Each layer's output in the compute dtype, as the scanned layers' carry holds it: unrolled,
            # XLA would feed it on in float32 (excess precision), and the logits would move.
            h = jax.lax.optimization_barrier(h)
            keys.append(k)
            values.append(v)
        new_cache = KVCache(k=tuple(keys), v=tuple(values), valid=valid, lengths=cache.lengths + valid_i.sum(axis=1),
                            index=next_index)
        return self.final_norm(h), new_cache

    def layer_list(self) -> list[DecoderLayer]:
        """The layers one by one: those of a per-layer model (`unstack_layers`), or slices of the
        stacked ones (which XLA materializes on a GPU before their matmuls)."""
        if isinstance(self.layers, DecoderLayer):
            graphdef, state = nnx.split(self.layers)
            return [nnx.merge(graphdef, jax.tree.map(lambda x, i=i: x[i], state))
                    for i in range(self.config.num_layers)]
        return list(self.layers)


def unstack_layers(model: Qwen3) -> Qwen3:
    """A model over the same embedding, norm and head whose layers are one module per layer, each with
    its own arrays (a copy of the stacked layers): the decode's layout, which reads every weight where
    it lies (`forward_with_cache` loops over the layers unrolled). Training keeps the stacked layers,
    scanned; `jaxmath.rollout.jax_sampler` holds this copy."""
    graphdef, state = nnx.split(model)
    out = nnx.merge(graphdef, state)
    out.layers = nnx.List(model.layer_list())
    return out


# --- construction ----------------------------------------------------------------------------------


def init_model(config: Qwen3Config, *, seed: int = 0, mesh: jax.sharding.Mesh | None = None,
               rng_impl: str = "threefry2x32") -> Qwen3:
    """A randomly initialised model, built shapes-first: `nnx.eval_shape` gives the abstract state,
    then initialisation runs under jit with output shardings, so no device ever holds an unsharded copy.
    An auto attention kernel (config.attention_impl None) is decided for the mesh's device platform.

    rng_impl: JAX's default "threefry2x32" draws the same weights on any mesh, but its counters and
    bits for every weight at once make the Qwen3-4B init program ask for a 35 GB temporary (4.4x the
    bf16 weights). "rbg" (XLA's RngBitGenerator) needs 7 GB, with values that depend on the mesh: the
    benchmarks' random-weight presets use it, since their speed depends only on shapes."""
    from jaxmath.model.sharding import make_mesh, state_shardings

    mesh = mesh or make_mesh(devices=jax.devices()[:1])
    config = config.for_platform(mesh.devices.flat[0].platform)
    abstract = nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(seed)))
    graphdef, abstract_state = nnx.split(abstract)

    @functools.partial(jax.jit, out_shardings=state_shardings(abstract_state, mesh))
    def init():
        return nnx.split(Qwen3(config, rngs=nnx.Rngs(jax.random.key(seed, impl=rng_impl))))[1]

    return nnx.merge(graphdef, init())
