"""The in-process JAX rollout engine: token ids in, completions and their logprobs out.

For a batch of prompts and K samples each, `JaxSampler.generate`

1. splits the request into sub-batches whose rows fit the memory budget (`rows_that_fit`: the KV
   cache, its K-fold copy, the prefill's attention scores and the sampling working set, against the
   device's free memory less a margin, or `memory_budget_bytes`) and `max_batch_rows`. A prompt's K
   samples stay together when one group fits; otherwise the group's samples are spread over
   sub-batches. A request where not even one row fits is refused before any work, with the
   `max_new_tokens` that would fit;
2. left-pads each sub-batch to a prompt-length bucket (powers of two by default), so shapes and
   compiles are reused across calls;
3. prefills each prompt once per sub-batch, in chunks of 256 tokens that each attend over the slots
   written so far, and `jnp.repeat`s its KV cache to its sample rows;
4. decodes under jitted `lax.while_loop`s that exit as soon as every row has finished, with the
   KV cache donated; attention reads a window of the cache that grows with the completion
   (`decode_windows`: the prompt bucket plus 64, 128, 256, ... slots) instead of all of it.

Sampling is fused with the LM head, vocabulary chunk by vocabulary chunk (`vocab_chunk`): a chunk's
logits are drawn by inverse CDF with one uniform, and the chunks are combined by weighted reservoir
sampling with a second uniform, so the draw is exact, the full [rows, 151,936] logits never exist and
no per-vocabulary-entry random numbers are made (`jax.random.categorical` over the full vocabulary
costs more than the LM head on a CPU). The sampled token's logprob comes out of the same pass:
under softmax(logits / T) for T > 0, under the untempered softmax for greedy (T == 0). Top-k and
top-p (for evaluation only) take a full-vocabulary path, and their logprobs are those of the
truncated, renormalised distribution actually sampled from, which is biased for GRPO ratios.

Randomness is per row: row (prompt i of the call, sample j) uses
`fold_in(fold_in(key(seed), i), j)`, and step t folds in t, so a row's completion does not depend
on how the request was split (by prompts or within a group) or on which other prompts came with it.

A stop token (`SamplingParams.stop_token_ids`; `stop_tokens_for(config)` gives the model's eos) is
part of the completion and of its mask; after it a row emits pad id 0 with mask False. Passing no
stop ids generates exactly max_new_tokens per row.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmath.model.config import Qwen3Config, dtype_from_name
from jaxmath.model.lora import has_lora, merge_lora
from jaxmath.model.qwen3 import KVCache, Qwen3
from jaxmath.model.sharding import use_mesh
from jaxmath.rollout.types import FINISH_LENGTH, FINISH_STOP, Rollout, RolloutEngine, SamplingParams

F32 = jnp.float32
PAD_ID = 0
LORA_MODES = ("merge", "on_the_fly", "auto")
# Within a vocabulary chunk the inverse CDF runs in two levels (groups of this many tokens, then
# tokens in the chosen group), so both cumulative sums are short.
_GROUP = 64
# Stop ids are passed as a fixed-size array (padded with -1) so their number does not recompile.
_STOP_SLOTS = 8
# Prompt tokens per prefill chunk: bounds the attention scores of a long prompt bucket.
_PREFILL_CHUNK = 256


# The share of the device's free memory left unplanned. `sub_batch_cost` bounds the buffers of the
# compiled programs (checked against XLA's buffer assignment in tests/test_sampler.py), not an
# allocator's fragmentation or what other programs hold at the same time.
MEMORY_MARGIN = 0.1


class SamplerMemoryError(ValueError):
    """A generate request of which not even one row fits the memory budget."""


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """How the JAX sampler batches, buckets and sizes its work.

    prompt_buckets:      allowed padded prompt lengths, ascending; empty means powers of two from
                         `min_bucket` (a longer prompt takes the next power of two)
    min_bucket:          the smallest power-of-two bucket
    max_batch_rows:      at most this many rows (prompts x samples) are decoded together; fewer
                         when fewer fit the memory budget (`rows_that_fit`). num_samples above it
                         is refused (a group shares one prefill)
    cache_dtype:         KV cache dtype ("float32", "bfloat16"); "" uses the model's compute dtype
    memory_budget_bytes: bytes a sub-batch may take beyond the weights (`sub_batch_cost`); 0 = the
                         free memory the device reports (available host RAM on a CPU) less
                         `MEMORY_MARGIN`
    lora_mode:           "merge" folds adapters into a copy of the kernels at `update_weights`,
                         "on_the_fly" applies them at every step, "auto" = merge (measured faster,
                         docs/BENCHMARKS.md)
    vocab_chunk:         vocabulary rows per fused head+sampling step; 0 = the whole vocabulary
    decode_window:       new tokens decoded while attention reads the prompt bucket plus this many
                         cache slots; each later window doubles it (`decode_windows`), so a step
                         reads at most about twice the keys and values written so far rather
                         than the whole cache; 0 reads the whole cache at every step
    """

    prompt_buckets: tuple[int, ...] = ()
    min_bucket: int = 16
    max_batch_rows: int = 256
    cache_dtype: str = ""
    memory_budget_bytes: int = 0
    lora_mode: str = "auto"
    vocab_chunk: int = 2048
    decode_window: int = 64

    def __post_init__(self):
        if self.lora_mode not in LORA_MODES:
            raise ValueError(f"sampler.lora_mode must be one of {LORA_MODES}, got {self.lora_mode!r}")
        if (self.max_batch_rows < 1 or self.min_bucket < 1 or self.vocab_chunk < 0 or self.memory_budget_bytes < 0
                or self.decode_window < 0):
            raise ValueError("sampler.max_batch_rows and min_bucket must be >= 1, vocab_chunk, decode_window and "
                             "memory_budget_bytes >= 0")
        if list(self.prompt_buckets) != sorted(set(self.prompt_buckets)) or any(b < 1 for b in self.prompt_buckets):
            raise ValueError(f"sampler.prompt_buckets must be strictly ascending positive lengths, "
                             f"got {self.prompt_buckets}")
        if self.cache_dtype:
            dtype_from_name(self.cache_dtype)


def stop_tokens_for(model_config: Qwen3Config) -> tuple[int, ...]:
    """The model's own end-of-sequence ids (config.json `eos_token_id`), for SamplingParams.stop_token_ids."""
    return model_config.stop_token_ids


# --- sampling: pure functions of logits or of hidden states ----------------------------------------


def _pad_to_groups(logits: jax.Array) -> jax.Array:
    pad = -logits.shape[-1] % _GROUP
    return jnp.pad(logits, ((0, 0), (0, pad)), constant_values=-jnp.inf) if pad else logits


def inverse_cdf(logits: jax.Array, u: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Draw one index per row from softmax(logits) with one uniform per row.

    logits: [rows, n] float32 (-inf for excluded entries; at least one finite per row)
    u:      [rows] float32 in [0, 1)
    returns index [rows] int32, row max [rows], sum of exp(logits - max) [rows]

    Two levels (group sums, then tokens in the chosen group) keep the cumulative sums short. Rounding
    can only move the draw to a neighbouring entry of nonzero probability, never onto a zero one.
    """
    rows, n = logits.shape
    logits = _pad_to_groups(logits)
    groups = logits.shape[1] // _GROUP
    row_max = jnp.max(logits, axis=-1)
    weights = jnp.exp(logits - row_max[:, None]).reshape(rows, groups, _GROUP)
    group_sums = jnp.sum(weights, axis=-1)
    group_cdf = jnp.cumsum(group_sums, axis=-1)
    total = group_cdf[:, -1]
    target = jnp.minimum(u * total, jnp.nextafter(total, 0.0))
    group = jnp.minimum(jnp.sum(group_cdf <= target[:, None], axis=-1), groups - 1)
    before = jnp.take_along_axis(group_cdf - group_sums, group[:, None], axis=1)[:, 0]
    in_group = jnp.take_along_axis(weights, group[:, None, None], axis=1)[:, 0]  # [rows, _GROUP]
    within_cdf = jnp.cumsum(in_group, axis=-1)
    last_nonzero = _GROUP - 1 - jnp.argmax(in_group[:, ::-1] > 0, axis=-1)
    offset = jnp.minimum(jnp.sum(within_cdf <= (target - before)[:, None], axis=-1), last_nonzero)
    return (group * _GROUP + offset).astype(jnp.int32), row_max, total


def truncate_logits(logits: jax.Array, top_k: int, top_p: jax.Array | float) -> jax.Array:
    """Set logits outside the top-k and outside the top-p nucleus to -inf. logits [rows, vocab]."""
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits >= kth, logits, -jnp.inf)
    ordered = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = jnp.maximum(jnp.sum(mass_before < top_p, axis=-1), 1)
    threshold = jnp.take_along_axis(ordered, keep[:, None] - 1, axis=1)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def sample_full(hidden: jax.Array, head: jax.Array, u: jax.Array, inv_temperature: jax.Array, *,
                greedy: bool, top_k: int = 0, top_p: jax.Array | float = 1.0,
                truncate: bool = False) -> tuple[jax.Array, jax.Array]:
    """Sample from the whole vocabulary at once (needed for top-k / top-p).

    hidden [rows, d], head [vocab, d], u [rows] -> token [rows] int32, logprob [rows] float32.
    """
    logits = jnp.einsum("bd,vd->bv", hidden, head.astype(hidden.dtype), preferred_element_type=F32)
    if greedy:
        token, row_max = first_argmax(logits)
        # The picked logit is the maximum, so its logprob is -log sum exp(logits - max).
        return token, -jnp.log(jnp.sum(jnp.exp(logits - row_max[:, None]), axis=-1))
    logits = logits * inv_temperature
    if truncate:
        logits = truncate_logits(logits, top_k, top_p)
    token, row_max, total = inverse_cdf(logits, u)
    return token, _picked(logits, token) - row_max - jnp.log(total)


def _picked(logits: jax.Array, token: jax.Array) -> jax.Array:
    return jnp.take_along_axis(logits, token[:, None], axis=1)[:, 0]


def first_argmax(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(first index of the row maximum [rows] int32, the maximum [rows]) of logits [rows, n].

    Two plain reductions instead of `jnp.argmax`, whose (value, index) reduction XLA's CPU backend
    does not vectorise: greedy decoding ran at half the speed of sampling with it."""
    row_max = jnp.max(logits, axis=-1)
    ids = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(logits == row_max[:, None], ids, logits.shape[-1]), axis=-1), row_max


def chunk_head(head: jax.Array, vocab_chunk: int) -> jax.Array:
    """[vocab, d] -> [chunks, chunk, d], zero-padded; padded rows are masked by vocabulary id."""
    vocab, d = head.shape
    chunk = min(vocab_chunk or vocab, vocab)
    pad = -vocab % chunk
    return jnp.pad(head, ((0, pad), (0, 0))).reshape(-1, chunk, d)


def sample_chunked(hidden: jax.Array, head_chunks: jax.Array, vocab_size: int, u: jax.Array,
                   inv_temperature: jax.Array, *, greedy: bool) -> tuple[jax.Array, jax.Array]:
    """LM head fused with exact sampling, one vocabulary chunk at a time.

    hidden [rows, d], head_chunks [chunks, chunk, d], u [rows, chunks, 2] float32 uniforms
    returns token [rows] int32 and its logprob [rows] float32 (tempered; untempered when greedy)

    Each chunk draws a candidate by inverse CDF (u[..., 0]); the running candidate is replaced with
    probability chunk mass / mass so far (u[..., 1]), which is weighted reservoir sampling of size
    one: token v ends up chosen with probability exp(l_v) / sum exp(l). Greedy keeps the first
    maximum, like argmax.
    """
    rows = hidden.shape[0]
    chunks, chunk, _ = head_chunks.shape
    scale = jnp.ones((), F32) if greedy else inv_temperature.astype(F32)

    def step(carry, xs):
        run_max, run_sum, token, token_logit = carry
        weights, index, uc = xs
        logits = jnp.einsum("bd,vd->bv", hidden, weights.astype(hidden.dtype), preferred_element_type=F32) * scale
        ids = index * chunk + jnp.arange(chunk, dtype=jnp.int32)
        logits = jnp.where(ids[None, :] < vocab_size, logits, -jnp.inf)
        if greedy:
            local, chunk_max = first_argmax(logits)
            chunk_sum = jnp.sum(jnp.exp(logits - chunk_max[:, None]), axis=-1)
        else:
            local, chunk_max, chunk_sum = inverse_cdf(logits, uc[:, 0])
        new_max = jnp.maximum(run_max, chunk_max)
        chunk_mass = chunk_sum * jnp.exp(chunk_max - new_max)
        new_sum = run_sum * jnp.exp(run_max - new_max) + chunk_mass
        take = chunk_max > run_max if greedy else uc[:, 1] * new_sum < chunk_mass
        token = jnp.where(take, index * chunk + local, token)
        token_logit = jnp.where(take, _picked(logits, local), token_logit)
        return (new_max, new_sum, token, token_logit), None

    init = (jnp.full((rows,), -jnp.inf, F32), jnp.zeros((rows,), F32), jnp.zeros((rows,), jnp.int32),
            jnp.zeros((rows,), F32))
    xs = (head_chunks, jnp.arange(chunks, dtype=jnp.int32), jnp.moveaxis(u, 1, 0))
    (run_max, run_sum, token, token_logit), _ = jax.lax.scan(step, init, xs)
    return token, token_logit - run_max - jnp.log(run_sum)


def decode_windows(bucket: int, max_new_tokens: int, first: int) -> tuple[tuple[int, int], ...]:
    """(end step, attention window) per decode segment: steps [previous end, end) attend over the
    first `window` = bucket + end cache slots, which hold every token written by then. Segment
    lengths double from `first` (0: one segment over the whole cache), so per step at most about
    twice the slots in use are read, for log2(max_new_tokens / first) + 1 compiled loop bodies."""
    if first <= 0 or first >= max_new_tokens:
        return ((max_new_tokens, bucket + max_new_tokens),)
    ends, end = [], first
    while end < max_new_tokens:
        ends.append(end)
        end *= 2
    ends.append(max_new_tokens)
    return tuple((e, bucket + e) for e in ends)


def row_keys(seed: int, prompt_index: np.ndarray, sample_index: np.ndarray) -> jax.Array:
    """[rows] keys from (seed, prompt index within the call, sample index)."""
    base = jax.random.key(seed)
    return jax.vmap(lambda p, s: jax.random.fold_in(jax.random.fold_in(base, p), s))(
        jnp.asarray(prompt_index, jnp.uint32), jnp.asarray(sample_index, jnp.uint32))


# --- the jitted steps -----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("graphdef", "num_samples", "cache_len", "cache_dtype"))
def _prefill(graphdef, state, tokens, token_valid, *, num_samples: int, cache_len: int, cache_dtype: Any):
    """tokens/token_valid [prompts, bucket] left-padded -> (last hidden [rows, d], cache of rows),
    rows = prompts * num_samples in prompt-major order."""
    model = nnx.merge(graphdef, state)
    with jax.named_scope("prefill"):
        cache = model.init_cache(tokens.shape[0], cache_len, cache_dtype)
        # The prompt goes in chunks, each attending over the slots written so far (not the whole cache):
        # XLA's attention holds float32 scores [prompts, heads, chunk, end of chunk]: 4.3 GB for 64
        # prompts of a 2,048 bucket at 256-token chunks, 34 GB in one piece.
        bucket = tokens.shape[1]
        for start in range(0, bucket, _PREFILL_CHUNK):
            end = min(start + _PREFILL_CHUNK, bucket)
            hidden, cache = model.forward_with_cache(tokens[:, start:end], token_valid[:, start:end], cache,
                                                     window=end)
    repeat = functools.partial(jnp.repeat, repeats=num_samples, axis=0)
    # Each prompt is prefilled once; its K sample rows share copies of its cache.
    cache = KVCache(k=jnp.repeat(cache.k, num_samples, axis=1), v=jnp.repeat(cache.v, num_samples, axis=1),
                    valid=repeat(cache.valid), lengths=repeat(cache.lengths), index=cache.index)
    return repeat(hidden[:, -1]), cache


@functools.partial(jax.jit, donate_argnames=("cache",),
                   static_argnames=("graphdef", "greedy", "top_k", "truncate", "vocab_chunk", "windows"))
def _decode(graphdef, state, cache, hidden, keys, live, stop_ids, inv_temperature, top_p, *,
            greedy: bool, top_k: int, truncate: bool, vocab_chunk: int, windows: tuple[tuple[int, int], ...]):
    """Sample up to max_new_tokens (the last window's end step) per row under while_loops, one per
    attention window (`decode_windows`), each exiting as soon as every row has finished.

    hidden [rows, d] (the state after the prompt), keys [rows] PRNG keys, live [rows] bool (False for
    padding rows), stop_ids [_STOP_SLOTS] int32 (-1 unused). Returns tokens, logprobs, mask
    [rows, max_new_tokens], stopped [rows] bool, the number of steps run and the final cache.
    """
    model = nnx.merge(graphdef, state)
    rows, max_new_tokens = hidden.shape[0], windows[-1][0]
    head = model.head_weight
    vocab = head.shape[0]
    fused = not (truncate or vocab_chunk == 0)
    head_chunks = chunk_head(head, vocab_chunk) if fused else head
    draws = (head_chunks.shape[0], 2) if fused else (1,)

    def cond(end, carry):
        step, finished = carry[0], carry[1]
        return (step < end) & ~jnp.all(finished)

    def body(window, carry):
        step, finished, stopped, hidden, cache, tokens, logprobs, mask = carry
        with jax.named_scope("sample"):
            u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, step), draws, F32))(keys)
            if fused:
                token, logprob = sample_chunked(hidden, head_chunks, vocab, u, inv_temperature, greedy=greedy)
            else:
                token, logprob = sample_full(hidden, head_chunks, u[:, 0], inv_temperature, greedy=greedy,
                                             top_k=top_k, top_p=top_p, truncate=truncate)
        active = ~finished
        token = jnp.where(active, token, PAD_ID)
        column = (0, step)
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], column)
        logprobs = jax.lax.dynamic_update_slice(logprobs, jnp.where(active, logprob, 0.0)[:, None], column)
        mask = jax.lax.dynamic_update_slice(mask, active[:, None], column)
        hit = active & jnp.any(token[:, None] == stop_ids[None, :], axis=-1)
        with jax.named_scope("decode_step"):
            new_hidden, cache = model.forward_with_cache(token[:, None], jnp.ones((rows, 1), bool), cache,
                                                         window=window)
        return (step + 1, finished | hit, stopped | hit, new_hidden[:, 0], cache, tokens, logprobs, mask)

    carry = (jnp.zeros((), jnp.int32), ~live, jnp.zeros((rows,), bool), hidden, cache,
             jnp.zeros((rows, max_new_tokens), jnp.int32), jnp.zeros((rows, max_new_tokens), F32),
             jnp.zeros((rows, max_new_tokens), bool))
    for end, window in windows:
        carry = jax.lax.while_loop(functools.partial(cond, end), functools.partial(body, window), carry)
    step, _, stopped, _, cache, tokens, logprobs, mask = carry
    # Returning the cache lets XLA alias it to the donated input, so the loop updates it in place.
    return tokens, logprobs, mask, stopped, step, cache


# --- memory: how many rows a sub-batch may hold -----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SubBatchCost:
    """Bytes a sub-batch of `prompts` x `samples` rows needs beyond the weights:
    fixed + prompts * per_prompt + prompts * samples * per_row."""

    fixed: int
    per_prompt: int
    per_row: int

    def bytes(self, prompts: int, samples: int) -> int:
        return self.fixed + prompts * self.per_prompt + prompts * samples * self.per_row


def sub_batch_cost(config: Qwen3Config, *, prompt_len: int, max_new_tokens: int, cache_dtype: Any = None,
                   vocab_chunk: int = 2048, full_vocab: bool = False) -> SubBatchCost:
    """An upper bound of the memory of `_prefill` and `_decode` for a sub-batch, by the buffers they hold.

    prompt_len: the padded prompt (bucket); the cache holds prompt_len + max_new_tokens slots.
    per prompt: its KV cache, and one prefill layer's temporaries: XLA's attention scores of one
        prefill chunk, [heads, min(prompt_len, _PREFILL_CHUNK), prompt_len] (float32 logits, masked logits and exponentials, bf16
        probabilities: 14 bytes each; the KV-cache path never uses cuDNN), the MLP's
        [prompt_len, ffw] x 3 and the q/k/v, norms and residuals of each position.
    per row: its copy of the cache; the sampling working set (float32 logits of a vocabulary chunk,
        with their exponentials; x4 over the full vocabulary for top-k/top-p's sort); a decode step's
        attention scores over the cache and one layer's window of keys and values; the outputs.
    fixed: the vocabulary-chunked copy of the LM head the decode loop makes. (XLA on a CPU also
        upcasts bf16 weights to float32 for its dots, a fixed cost not counted here.)
    The prompts' cache and its K-fold copy are both counted, as both live while the copy is made.
    """
    c = config
    cache_len = prompt_len + max_new_tokens
    compute = jnp.dtype(c.dtype).itemsize
    kv_row = KVCache.nbytes_for(c, 1, cache_len, cache_dtype)
    qkv = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
    per_token = c.hidden_size * 16 + c.intermediate_size * 3 * compute + qkv * 8
    per_prompt = kv_row + prompt_len * per_token + c.num_heads * min(prompt_len, _PREFILL_CHUNK) * prompt_len * 14
    width = c.vocab_size if full_vocab or not vocab_chunk else min(vocab_chunk, c.vocab_size)
    sampling = width * 4 * (4 if full_vocab else 2) + (c.vocab_size // max(width, 1) + 1) * 2 * 4
    window = 2 * cache_len * c.num_kv_heads * c.head_dim * 4  # one layer's keys and values, float32 at worst
    per_row = (kv_row + sampling + c.num_heads * cache_len * 10 + window + per_token + max_new_tokens * 9)
    head_copy = 0 if full_vocab else (c.vocab_size + width) * c.hidden_size * compute
    return SubBatchCost(fixed=head_copy, per_prompt=per_prompt, per_row=per_row)


def rows_that_fit(cost: SubBatchCost, budget_bytes: int, num_samples: int) -> int:
    """Rows of one sub-batch within `budget_bytes`: whole groups (a multiple of num_samples) when at
    least one fits; else the samples of one prompt that fit (its group is split over sub-batches);
    0 when not even one row does."""
    room = budget_bytes - cost.fixed
    groups = room // (cost.per_prompt + num_samples * cost.per_row) if room > 0 else 0
    if groups >= 1:
        return int(groups) * num_samples
    samples = (room - cost.per_prompt) // cost.per_row if room > cost.per_prompt else 0
    return int(min(samples, num_samples))


def _available_bytes(mesh: jax.sharding.Mesh | None) -> int:
    """Free bytes on the (first) device: what it reports, or available host RAM on a CPU."""
    device = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0])
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # the platform cannot tell; the allocator will


@dataclasses.dataclass(frozen=True)
class _SubBatch:
    """Prompts [start, start + len(prompts)) padded to `padded` prompts of `bucket` tokens, each
    decoding samples first_sample .. first_sample + samples - 1 (rows past num_samples are padding)."""

    start: int
    prompts: list[list[int]]
    padded: int
    bucket: int
    samples: int
    first_sample: int = 0


# --- the engine -----------------------------------------------------------------------------------


class JaxSampler(RolloutEngine):
    """A RolloutEngine running the model in this process.

        sampler = JaxSampler(model, SamplerConfig(max_batch_rows=256))
        rollout = sampler.generate(prompt_ids, SamplingParams(max_new_tokens=512, num_samples=8,
                                                              stop_token_ids=stop_tokens_for(model.config)))
        sampler.update_weights(trained_model)   # after each optimizer step

    `last_stats` holds, after each generate, the decode steps run per sub-batch and the seconds spent.
    """

    def __init__(self, model: Qwen3, config: SamplerConfig = SamplerConfig(), *, mesh: jax.sharding.Mesh | None = None):
        self.config = config
        self.mesh = mesh
        self.last_stats: dict[str, Any] = {}
        self._rows_for: dict[tuple, int] = {}  # (num_samples, max_new_tokens, bucket, full_vocab) -> rows
        self.update_weights(model)

    @property
    def model_config(self) -> Qwen3Config:
        return self._model_config

    def update_weights(self, model: Qwen3) -> dict[str, float]:
        """Generate with `model`'s current weights from now on. LoRA adapters are merged into a copy
        of the kernels ("merge"/"auto"; the trainer's model is untouched) or applied at every step.
        The arrays are shared, not copied, so there are no sync metrics to report."""
        self._model_config = model.config
        graphdef, state = nnx.split(model)
        if has_lora(model) and self.config.lora_mode in ("merge", "auto"):
            # A fresh module over the same arrays: merging replaces its kernels, not the trainer's.
            copy = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))
            merge_lora(copy)
            graphdef, state = nnx.split(copy)
        # Wait for the merge, so a caller timing the weight sync times the real work.
        self._graphdef, self._state = graphdef, jax.block_until_ready(state)
        return {}

    # --- planning -------------------------------------------------------------------------------

    def bucket_for(self, length: int) -> int:
        """The padded prompt length used for a sub-batch whose longest prompt has `length` tokens."""
        buckets = self.config.prompt_buckets
        if buckets:
            for b in buckets:
                if b >= length:
                    return b
            raise ValueError(f"a prompt has {length} tokens, more than the largest sampler.prompt_buckets "
                             f"entry {buckets[-1]}; add a larger bucket or shorten the prompt")
        return max(self.config.min_bucket, 1 << max(0, (length - 1).bit_length()))

    @property
    def cache_dtype(self) -> Any:
        return dtype_from_name(self.config.cache_dtype) if self.config.cache_dtype else self._model_config.dtype

    def memory_budget(self) -> int:
        """Bytes a sub-batch may take beyond the weights: sampler.memory_budget_bytes when set, else
        the device's free memory less MEMORY_MARGIN (read now, so it sees the trainer's state)."""
        if self.config.memory_budget_bytes:
            return self.config.memory_budget_bytes
        return int(_available_bytes(self.mesh) * (1 - MEMORY_MARGIN))

    def cost(self, prompt_len: int, max_new_tokens: int, full_vocab: bool) -> SubBatchCost:
        """`sub_batch_cost` for this model and sampler configuration."""
        return sub_batch_cost(self._model_config, prompt_len=prompt_len, max_new_tokens=max_new_tokens,
                              cache_dtype=self.cache_dtype, vocab_chunk=self.config.vocab_chunk, full_vocab=full_vocab)

    def plan(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[_SubBatch]:
        """The sub-batches `generate` runs, sized by `rows_that_fit` at the request's largest bucket
        and by max_batch_rows; raises SamplerMemoryError when not even one row fits."""
        k, n = params.num_samples, params.max_new_tokens
        full_vocab = self._truncates(params) or self.config.vocab_chunk == 0
        bucket = self.bucket_for(max(len(p) for p in prompts))
        budget = self.memory_budget()
        cost = self.cost(bucket, n, full_vocab)
        # The rows chosen for these shapes before are kept while they still fit, so free memory that
        # moves a little between calls does not change the shapes and recompile the programs.
        shapes = (k, n, bucket, full_vocab)
        rows = self._rows_for.get(shapes, 0)
        if not rows or rows > self.config.max_batch_rows or self._sub_batch_bytes(cost, rows, k) > budget:
            rows = min(rows_that_fit(cost, budget, k), self.config.max_batch_rows)
            self._rows_for[shapes] = rows
        if rows == 0:
            shorter = _largest(lambda m: rows_that_fit(self.cost(bucket, m, full_vocab), budget, k) > 0, n - 1)
            hint = (f"lower max_new_tokens to {shorter}" if shorter else
                    "shorten the prompts (a prompt's own KV cache and prefill do not fit)")
            raise SamplerMemoryError(
                f"not even one row of {len(prompts)} prompts x {k} samples fits the sampler's memory budget of "
                f"{budget / 2**30:.2f} GiB: one prompt and one sample of a {bucket}-token prompt bucket + {n} new "
                f"tokens need {cost.bytes(1, 1) / 2**30:.2f} GiB. Raise sampler.memory_budget_bytes to at least "
                f"{cost.bytes(1, 1)}, {hint}, or set sampler.cache_dtype=bfloat16")
        if rows >= k:
            per_batch = rows // k
            out = []
            for start in range(0, len(prompts), per_batch):
                chunk = [list(p) for p in prompts[start:start + per_batch]]
                padded = min(per_batch, 1 << (len(chunk) - 1).bit_length())
                out.append(_SubBatch(start, chunk, padded, self.bucket_for(max(map(len, chunk))), k))
            return out
        # One group does not fit: its samples go in sub-batches of `rows`, each prefilling the prompt.
        return [_SubBatch(i, [list(p)], 1, self.bucket_for(len(p)), rows, first)
                for i, p in enumerate(prompts) for first in range(0, k, rows)]

    @staticmethod
    def _sub_batch_bytes(cost: SubBatchCost, rows: int, num_samples: int) -> int:
        return cost.bytes(rows // num_samples, num_samples) if rows >= num_samples else cost.bytes(1, rows)

    def _truncates(self, params: SamplingParams) -> bool:
        return params.temperature > 0 and (params.top_k > 0 or params.top_p < 1.0)

    # --- generation -----------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> Rollout:
        """Sample `params.num_samples` completions per prompt; rows grouped by prompt (see Rollout)."""
        prompts = [list(map(int, p)) for p in prompts]
        if not prompts:
            raise ValueError("generate needs at least one prompt")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token (got an empty prompt)")
        k = params.num_samples
        if k > self.config.max_batch_rows:
            raise ValueError(f"num_samples={k} exceeds sampler.max_batch_rows={self.config.max_batch_rows}; "
                             "a prompt's samples share one prefill, so raise max_batch_rows to at least num_samples")
        if len(params.stop_token_ids) > _STOP_SLOTS:
            raise ValueError(f"at most {_STOP_SLOTS} stop token ids are supported, got {len(params.stop_token_ids)}")
        n = params.max_new_tokens
        longest = max(len(p) for p in prompts)
        limit = self._model_config.max_position_embeddings
        if longest + n > limit:
            raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({n}) exceeds the model's "
                             f"max_position_embeddings {limit}; shorten the prompt or lower max_new_tokens")
        # Plan every sub-batch before running any, so a request fails before any work.
        plans = self.plan(prompts, params)
        outputs, steps = [], []
        began = time.perf_counter()
        with use_mesh(self.mesh):
            for sub_batch in plans:
                result = self._generate_batch(sub_batch, params)
                outputs.append(result[:4])
                steps.append(result[4])
        tokens, logprobs, mask, stopped = (np.concatenate(parts) for parts in zip(*outputs))
        self.last_stats = {"decode_steps": steps, "seconds": time.perf_counter() - began,
                           "sub_batches": len(plans), "rows_per_sub_batch": max(p.padded * p.samples for p in plans)}
        return Rollout(prompt_ids=prompts, completion_ids=tokens, logprobs=logprobs, completion_mask=mask,
                       finish_reason=np.where(stopped, FINISH_STOP, FINISH_LENGTH).astype(np.int8),
                       prompt_index=np.repeat(np.arange(len(prompts), dtype=np.int32), k))

    def _generate_batch(self, sub_batch: _SubBatch, params: SamplingParams):
        k, n = params.num_samples, params.max_new_tokens
        padded, bucket, samples = sub_batch.padded, sub_batch.bucket, sub_batch.samples
        tokens = np.full((padded, bucket), PAD_ID, np.int32)
        valid = np.zeros((padded, bucket), bool)
        for i, p in enumerate(sub_batch.prompts):
            tokens[i, bucket - len(p):] = p
            valid[i, bucket - len(p):] = True
        valid[len(sub_batch.prompts):, -1] = True  # padding prompts: one pad token, so their rows stay finite
        hidden, cache = _prefill(self._graphdef, self._state, tokens, valid, num_samples=samples,
                                 cache_len=bucket + n, cache_dtype=self.cache_dtype)
        rows = padded * samples
        sample_index = sub_batch.first_sample + np.arange(rows) % samples
        keys = row_keys(params.seed, sub_batch.start + np.arange(rows) // samples, sample_index)
        live = (np.arange(rows) < len(sub_batch.prompts) * samples) & (sample_index < k)
        stop_ids = np.full((_STOP_SLOTS,), -1, np.int32)
        stop_ids[:len(params.stop_token_ids)] = params.stop_token_ids
        greedy = params.temperature == 0
        truncate = self._truncates(params)
        out = _decode(self._graphdef, self._state, cache, hidden, keys, live, stop_ids,
                      np.float32(0.0 if greedy else 1.0 / params.temperature), np.float32(params.top_p),
                      greedy=greedy, top_k=params.top_k if truncate else 0,
                      truncate=truncate, vocab_chunk=self.config.vocab_chunk,
                      windows=decode_windows(bucket, n, self.config.decode_window))
        tokens_out, logprobs, mask, stopped, steps = jax.device_get(out[:5])
        del out
        return tokens_out[live], logprobs[live], mask[live], stopped[live], int(steps)


def _largest(fits, upper: int) -> int:
    """The largest m in [1, upper] with fits(m), for a fits that holds up to some point; 0 if none."""
    low, high = 0, upper
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low
