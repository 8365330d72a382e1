"""The in-process JAX rollout engine: token ids in, completions and their logprobs out.

For a batch of prompts and K samples each, `JaxSampler.generate`

1. sizes its decode slots (`plan`): the rows that fit the memory budget (`rows_that_fit`: the KV
   cache of a slot, its prompt's cache and prefill, the sampling working set, against the device's
   free memory less a margin, or `memory_budget_bytes`), at most `max_batch_rows`, whole groups of K
   when one fits; otherwise a group's samples are spread over several admissions. A request where
   not even one row fits is refused before any work, with the `max_new_tokens` that would fit;
2. left-pads the prompts to one prompt-length bucket (powers of two by default), so shapes and
   compiles are reused across calls;
3. admits groups into free slots: prefills each prompt once, in chunks of 256 tokens that each attend
   over the slots written so far, and copies its KV cache into each of its samples' slots in place;
4. decodes every slot under a jitted `lax.while_loop` (the slots donated, so updated in place), each
   slot at its own step and cache position. Attention reads a window of the cache that grows with
   the furthest row (`decode_windows`: the prompt bucket plus 64, 128, 256, ... slots) instead of
   all of it. The loop hands back when enough slots have finished for the next waiting group (which
   is admitted into them: a finished row's slot takes a waiting row), when a row needs the next
   window, or, once no row waits, when the live rows fit in half the slots (they are then compacted
   into fewer slots, `compact_min_rows`). So the decode's cost follows the tokens generated, not the
   longest row of a batch, as vLLM's continuous batching does.

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
on its slot, on when it was admitted, or on which other prompts came with it.

A stop token (`SamplingParams.stop_token_ids`; `stop_tokens_for(config)` gives the model's eos) is
part of the completion and of its mask; after it a row emits pad id 0 with mask False. Passing no
stop ids generates exactly max_new_tokens per row.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmath.distributed import agree_min, to_host
from jaxmath.model.config import Qwen3Config, dtype_from_name
from jaxmath.model.lora import has_lora, merge_lora
from jaxmath.model.qwen3 import KVCache, Qwen3, unstack_layers
from jaxmath.model.sharding import use_mesh
from jaxmath.rollout.types import FINISH_LENGTH, FINISH_STOP, Rollout, RolloutEngine, SamplingParams

F32 = jnp.float32
PAD_ID = 0
LORA_MODES = ("merge", "on_the_fly", "auto")
# Within a vocabulary chunk the inverse CDF runs in two levels (groups of this many tokens, then
# tokens in the chosen group), so both cumulative sums are short.
_GROUP = 64
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
    lora_mode:           "merge" folds adapters into the sampler's copy of the layers at `update_weights`,
                         "on_the_fly" applies them at every step, "auto" = merge (measured faster,
                         docs/BENCHMARKS.md)
    vocab_chunk:         vocabulary rows per fused head+sampling step; 0 = the whole vocabulary
    decode_window:       new tokens decoded while attention reads the prompt bucket plus this many
                         cache slots; each later window doubles it (`decode_windows`), so a step
                         reads at most about twice the keys and values written so far rather
                         than the whole cache; 0 reads the whole cache at every step
    compact_min_rows:    once no row waits for a slot, the live rows are moved into half the slots
                         whenever they fit there, down to this many slots (0 never compacts). On a
                         CPU a decode step costs about its rows; on a GPU it is bound by reading the
                         weights, so fewer rows save less there
    """

    prompt_buckets: tuple[int, ...] = ()
    min_bucket: int = 16
    max_batch_rows: int = 256
    cache_dtype: str = ""
    memory_budget_bytes: int = 0
    lora_mode: str = "auto"
    vocab_chunk: int = 2048
    decode_window: int = 64
    compact_min_rows: int = 8

    def __post_init__(self):
        if self.lora_mode not in LORA_MODES:
            raise ValueError(f"sampler.lora_mode must be one of {LORA_MODES}, got {self.lora_mode!r}")
        if (self.max_batch_rows < 1 or self.min_bucket < 1 or self.vocab_chunk < 0 or self.memory_budget_bytes < 0
                or self.decode_window < 0 or self.compact_min_rows < 0):
            raise ValueError("sampler.max_batch_rows and min_bucket must be >= 1, vocab_chunk, decode_window, "
                             "compact_min_rows and memory_budget_bytes >= 0")
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

    def masked(logits, index):  # logits [..., chunk] of chunk `index` ([] or [chunks, 1]); padding -inf
        ids = index * chunk + jnp.arange(chunk, dtype=jnp.int32)
        return jnp.where(ids < vocab_size, logits, -jnp.inf)

    def draw(logits, u0):  # one chunk: (index in the chunk, chunk max, sum of exp(logits - max))
        if greedy:
            local, chunk_max = first_argmax(logits)
            return local, chunk_max, jnp.sum(jnp.exp(logits - chunk_max[:, None]), axis=-1)
        return inverse_cdf(logits, u0)

    def combine(carry, chunk_max, chunk_sum, local, logit, index, u1):
        """The reservoir step: chunk `index`'s candidate replaces the running one with probability
        chunk mass / mass so far (greedy: when its maximum is larger)."""
        run_max, run_sum, token, token_logit = carry
        new_max = jnp.maximum(run_max, chunk_max)
        chunk_mass = chunk_sum * jnp.exp(chunk_max - new_max)
        new_sum = run_sum * jnp.exp(run_max - new_max) + chunk_mass
        take = chunk_max > run_max if greedy else u1 * new_sum < chunk_mass
        token = jnp.where(take, index * chunk + local, token)
        return new_max, new_sum, token, jnp.where(take, logit, token_logit)

    init = (jnp.full((rows,), -jnp.inf, F32), jnp.zeros((rows,), F32), jnp.zeros((rows,), jnp.int32),
            jnp.zeros((rows,), F32))

    def chunk_by_chunk(hidden, head_chunks, u):
        # A CPU: one chunk's logits at a time, in its caches.
        def step(carry, xs):
            weights, index, uc = xs
            logits = jnp.einsum("bd,vd->bv", hidden, weights.astype(hidden.dtype), preferred_element_type=F32) * scale
            logits = masked(logits, index)
            local, chunk_max, chunk_sum = draw(logits, uc[:, 0])
            return combine(carry, chunk_max, chunk_sum, local, _picked(logits, local), index, uc[:, 1]), None

        xs = (head_chunks, jnp.arange(chunks, dtype=jnp.int32), jnp.moveaxis(u, 1, 0))
        (run_max, run_sum, token, token_logit), _ = jax.lax.scan(step, init, xs)
        return token, token_logit - run_max - jnp.log(run_sum)

    def all_at_once(hidden, head_chunks, u):
        # A GPU: one matmul reads the head where it lies (a scan's slice of the chunked head was copied
        # out before each chunk's matmul), every chunk draws at once from [rows, chunks, chunk] float32
        # logits (39 MB at 64 rows), and only the reservoir's combine runs chunk after chunk.
        logits = jnp.einsum("bd,cvd->bcv", hidden, head_chunks.astype(hidden.dtype), preferred_element_type=F32) * scale
        logits = masked(logits, jnp.arange(chunks, dtype=jnp.int32)[:, None])
        drawn = draw(logits.reshape(rows * chunks, chunk), u[:, :, 0].reshape(rows * chunks))
        local, chunk_max, chunk_sum = (x.reshape(rows, chunks) for x in drawn)
        picked = jnp.take_along_axis(logits, local[..., None], axis=-1)[..., 0]

        def step(carry, xs):
            return combine(carry, *xs), None

        xs = tuple(x.T for x in (chunk_max, chunk_sum, local, picked)) + (jnp.arange(chunks, dtype=jnp.int32),
                                                                          u[:, :, 1].T)
        (run_max, run_sum, token, token_logit), _ = jax.lax.scan(step, init, xs)
        return token, token_logit - run_max - jnp.log(run_sum)

    return jax.lax.platform_dependent(hidden, head_chunks, u, cpu=chunk_by_chunk, default=all_at_once)


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


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Slots:
    """The decode slots on the device: each slot holds one row (a prompt's sample) at its own step, so
    a finished row's slot can take a waiting row while the others go on (`JaxSampler.generate`).

    cache:    the KV cache of every slot, its index per slot ([rows]: each slot's next cache slot)
    hidden:   [rows, d] the state the next token is sampled from
    keys:     [rows] the row's PRNG key (`row_keys`)
    steps:    [rows] int32 tokens generated so far
    finished: [rows] bool, True once a row stopped or reached max_new_tokens, and for an empty slot
    stopped:  [rows] bool, finished by a stop token
    tokens, logprobs, mask: [rows, max_new_tokens] the completions so far
    """

    cache: KVCache
    hidden: jax.Array
    keys: jax.Array
    steps: jax.Array
    finished: jax.Array
    stopped: jax.Array
    tokens: jax.Array
    logprobs: jax.Array
    mask: jax.Array

    @property
    def rows(self) -> int:
        return self.hidden.shape[0]


@functools.partial(jax.jit, static_argnames=("config", "rows", "cache_len", "max_new_tokens", "cache_dtype"))
def _empty_slots(*, config: Qwen3Config, rows: int, cache_len: int, max_new_tokens: int, cache_dtype: Any) -> Slots:
    k, v = KVCache.zeros(config, rows, cache_len, cache_dtype)
    cache = KVCache(k=k, v=v, valid=jnp.zeros((rows, cache_len), bool), lengths=jnp.zeros((rows,), jnp.int32),
                    index=jnp.zeros((rows,), jnp.int32))
    outputs = (rows, max_new_tokens)
    return Slots(cache=cache, hidden=jnp.zeros((rows, config.hidden_size), config.dtype),
                 keys=jax.random.split(jax.random.key(0), rows), steps=jnp.zeros((rows,), jnp.int32),
                 finished=jnp.ones((rows,), bool), stopped=jnp.zeros((rows,), bool),
                 tokens=jnp.zeros(outputs, jnp.int32), logprobs=jnp.zeros(outputs, F32), mask=jnp.zeros(outputs, bool))


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len", "cache_dtype"))
def _prefill(graphdef, state, tokens, token_valid, *, cache_len: int, cache_dtype: Any):
    """tokens/token_valid [prompts, bucket] left-padded -> (last hidden [prompts, d], the prompts' cache)."""
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
    return hidden[:, -1], cache


@functools.partial(jax.jit, donate_argnames=("slots",))
def _admit(slots: Slots, hidden, cache: KVCache, slot_ids, keys) -> Slots:
    """Put prompt p's sample j in slot slot_ids[p, j] (slots.rows: not placed), at step 0.

    hidden [prompts, d] and cache: the prompts' own, from `_prefill`; slot_ids [prompts, samples]
    int32; keys [prompts, samples]. The samples of a prompt share its prefill: each slot gets a copy
    of the prompt's keys and values, written in place (`slots` is donated) one sample column at a
    time under a loop, so no [prompts x samples] copy of the cache is ever made."""
    blank = (slot_ids.shape[0], slots.tokens.shape[1])

    def column(j, slots):
        ids = slot_ids[:, j]

        def put(array, value, axis=0):
            return array.at[(slice(None),) * axis + (ids,)].set(value, mode="drop")

        c = slots.cache
        layers = lambda mine, prompts: tuple(put(a, b.astype(a.dtype)) for a, b in zip(mine, prompts))
        return Slots(cache=KVCache(k=layers(c.k, cache.k), v=layers(c.v, cache.v), valid=put(c.valid, cache.valid), lengths=put(c.lengths, cache.lengths),
                                   index=put(c.index, jnp.broadcast_to(cache.index, ids.shape))),
                     hidden=put(slots.hidden, hidden.astype(slots.hidden.dtype)), keys=put(slots.keys, keys[:, j]),
                     steps=put(slots.steps, 0), finished=put(slots.finished, False),
                     stopped=put(slots.stopped, False), tokens=put(slots.tokens, jnp.zeros(blank, jnp.int32)),
                     logprobs=put(slots.logprobs, jnp.zeros(blank, F32)), mask=put(slots.mask, jnp.zeros(blank, bool)))

    return jax.lax.fori_loop(0, slot_ids.shape[1], column, slots)


@jax.jit
def _compact(slots: Slots, keep) -> Slots:
    """The slots `keep` [rows'] (indices into slots), in that order: fewer rows to decode. (A copy:
    the caller drops the old slots after it.)"""
    c = slots.cache
    cache = KVCache(k=tuple(x[keep] for x in c.k), v=tuple(x[keep] for x in c.v), valid=c.valid[keep],
                    lengths=c.lengths[keep], index=c.index[keep])
    rest = {f.name: getattr(slots, f.name)[keep] for f in dataclasses.fields(Slots) if f.name != "cache"}
    return Slots(cache=cache, **rest)


@functools.partial(jax.jit, donate_argnames=("slots",),
                   static_argnames=("graphdef", "greedy", "top_k", "truncate", "vocab_chunk", "window"))
def _decode(graphdef, state, slots: Slots, stop_table, inv_temperature, top_p, exit_free, *,
            greedy: bool, top_k: int, truncate: bool, vocab_chunk: int, window: int):
    """Decode every unfinished slot, one token per step, under a while_loop that attends over cache
    slots [0, window) and exits as soon as every slot has finished, an unfinished slot's next cache
    slot reaches `window` (the caller goes on with a larger one, `decode_windows`), or `exit_free`
    slots are finished (the caller refills or compacts them).

    stop_table [vocab] bool, True at the stop ids (any number of them, one compiled program). Returns
    the slots and the number of steps run. A row's
    step t draws its uniforms from fold_in(its key, t), so its tokens do not depend on its slot, on
    the window, or on which rows decode beside it.
    """
    model = nnx.merge(graphdef, state)
    rows, max_new_tokens = slots.rows, slots.tokens.shape[1]
    head = model.head_weight
    vocab = head.shape[0]
    fused = not (truncate or vocab_chunk == 0)
    head_chunks = chunk_head(head, vocab_chunk) if fused else head
    draws = (head_chunks.shape[0], 2) if fused else (1,)
    row_ids = jnp.arange(rows)

    def cond(carry):
        _, s = carry
        return (~jnp.all(s.finished) & jnp.all(s.finished | (s.cache.index < window))
                & (jnp.sum(s.finished) < exit_free))

    def body(carry):
        count, s = carry
        with jax.named_scope("sample"):
            u = jax.vmap(lambda k, t: jax.random.uniform(jax.random.fold_in(k, t), draws, F32))(s.keys, s.steps)
            if fused:
                token, logprob = sample_chunked(s.hidden, head_chunks, vocab, u, inv_temperature, greedy=greedy)
            else:
                token, logprob = sample_full(s.hidden, head_chunks, u[:, 0], inv_temperature, greedy=greedy,
                                             top_k=top_k, top_p=top_p, truncate=truncate)
        active = ~s.finished
        token = jnp.where(active, token, PAD_ID)
        column = jnp.where(active, s.steps, max_new_tokens)  # past the end: a finished row writes nothing
        hit = active & stop_table[token]
        steps = s.steps + active
        with jax.named_scope("decode_step"):
            hidden, cache = model.forward_with_cache(token[:, None], active[:, None], s.cache, window=window)
        s = Slots(cache=cache, hidden=hidden[:, 0], keys=s.keys, steps=steps,
                  finished=s.finished | hit | (steps >= max_new_tokens), stopped=s.stopped | hit,
                  tokens=s.tokens.at[row_ids, column].set(token, mode="drop"),
                  logprobs=s.logprobs.at[row_ids, column].set(logprob, mode="drop"),
                  mask=s.mask.at[row_ids, column].set(True, mode="drop"))
        return count + 1, s

    count, slots = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), slots))
    # Returning the slots lets XLA alias them to the donated input, so the loop updates them in place.
    return slots, count


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
        with their exponentials; x4 over the full vocabulary for top-k/top-p's sort; on a GPU the float32
        logits of the whole vocabulary, `sample_chunked`); a decode step's
        attention scores over the cache and one layer's window of keys and values; the outputs.
    fixed: the vocabulary-chunked copy of the LM head the decode loop makes (the sampler's copy of the
        layers is held beside the trainer's weights, not per sub-batch: `JaxSampler.update_weights`). (XLA on a CPU also
        upcasts bf16 weights to float32 for its dots, a fixed cost not counted here.)
    A refill prefills its prompts beside the live slots, so a prompt's cache and prefill are counted
    beside every slot's (per_prompt, per_row); a slot holds less than per_row (its cache, state and
    outputs), so compacting slots into half as many fits while the copy fits the budget.
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
    gpu_logits = 0 if full_vocab else c.vocab_size * 4  # a GPU's decode takes a chunked head's logits at once
    per_row = (kv_row + sampling + gpu_logits + c.num_heads * cache_len * 10 + window + per_token + max_new_tokens * 9)
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
    """Free bytes on this process's first device of the mesh: what it reports, or available host RAM
    on a CPU. (Processes of one job agree on the least of theirs: `JaxSampler.memory_budget`.)"""
    device = (next(d for d in mesh.devices.flat if d.process_index == jax.process_index()) if mesh is not None
              else jax.local_devices()[0])
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # the platform cannot tell; the allocator will


@dataclasses.dataclass(frozen=True)
class _Group:
    """Samples first_sample .. first_sample + samples - 1 of prompt `prompt` (its index in the request),
    admitted together after one prefill of the prompt."""

    prompt: int
    first_sample: int
    samples: int


@dataclasses.dataclass(frozen=True)
class _Plan:
    """How a request decodes: `rows` slots, prompts left-padded to `bucket` tokens, groups admitted in
    order as slots free up, at most `prompts_per_prefill` prompts (a power-of-two shape) per prefill."""

    rows: int
    bucket: int
    groups: tuple[_Group, ...]
    prompts_per_prefill: int
    samples_per_group: int


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# --- the engine -----------------------------------------------------------------------------------


def _place(x: jax.Array, mesh: jax.sharding.Mesh) -> jax.Array:
    """`x` on `mesh` with the partition spec it had on its own mesh (the axis names are the same), or
    replicated where that spec does not divide it on this mesh."""
    spec = x.sharding.spec if isinstance(x.sharding, jax.sharding.NamedSharding) else jax.sharding.PartitionSpec()
    target = jax.sharding.NamedSharding(mesh, spec)
    try:
        target.shard_shape(x.shape)
    except ValueError:
        target = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.device_put(x, target)


def _devices(state) -> set:
    """Every device holding an array of `state`."""
    return {d for x in jax.tree.leaves(state) if isinstance(x, jax.Array) for d in x.devices()}


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
        """Generate with `model`'s current weights from now on: the sampler holds its own copy of the
        layers, one array per layer and weight (the trainer's are stacked for its scan). LoRA adapters
        are merged into that copy ("merge"/"auto"; the trainer's model is untouched) or applied at every
        step. The embedding and head are shared. No sync metrics to report."""
        self._model_config = model.config
        # The sampler's own layout: one copy of the layers, a module per layer (`unstack_layers`), so its
        # decode reads every weight where it lies; merging then replaces the copy's kernels, one layer's
        # at a time, never the trainer's.
        copy = unstack_layers(model)
        if has_lora(copy) and self.config.lora_mode in ("merge", "auto"):
            merge_lora(copy)
        graphdef, state = nnx.split(copy)
        if self.mesh is not None and _devices(state) - set(self.mesh.devices.flat):
            # The sampler has devices of its own (rl.rollout_devices): its copy moves there.
            state = jax.tree.map(functools.partial(_place, mesh=self.mesh), state)
        # Wait for the merge, so a caller timing the weight sync times the real work.
        self._graphdef, self._state = graphdef, jax.block_until_ready(state)
        return {}

    def sleep(self) -> bool:
        """Free the sampler's copy of the layers for the train phase (the GRPO loop's synchronous path,
        whose update replaces the weights anyway): the trainer's saved activations get that memory
        (`jaxmath.aot.plan`'s train phases count no sampler copy where the run does not overlap). The
        next `update_weights` makes a new copy; `generate` before it is refused. True: memory was freed."""
        self._state = None
        return True

    def wake_up(self) -> bool:
        """Nothing to take back: the copy returns with the next `update_weights` (the loop calls it right
        after waking the engine). True, as `sleep` freed memory."""
        return True

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
        # Every process of a job must plan the same slots (they run one program together).
        return agree_min(int(_available_bytes(self.mesh) * (1 - MEMORY_MARGIN)))

    def cost(self, prompt_len: int, max_new_tokens: int, full_vocab: bool) -> SubBatchCost:
        """`sub_batch_cost` for this model and sampler configuration."""
        return sub_batch_cost(self._model_config, prompt_len=prompt_len, max_new_tokens=max_new_tokens,
                              cache_dtype=self.cache_dtype, vocab_chunk=self.config.vocab_chunk, full_vocab=full_vocab)

    def plan(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> _Plan:
        """The slots `generate` decodes in, sized by `rows_that_fit` at the request's largest bucket
        and by max_batch_rows, and the groups it admits; raises SamplerMemoryError when not even one
        row fits."""
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
        # A request smaller than the rows that fit takes the next power of two of its rows.
        slots = min(rows, _pow2(len(prompts) * k)) if rows >= k else rows
        per_group = min(k, rows)  # a group that does not fit whole is spread over admissions
        groups = tuple(_Group(i, first, min(per_group, k - first))
                       for i in range(len(prompts)) for first in range(0, k, per_group))
        return _Plan(rows=slots, bucket=bucket, groups=groups, prompts_per_prefill=max(1, slots // k),
                     samples_per_group=per_group)

    @staticmethod
    def _sub_batch_bytes(cost: SubBatchCost, rows: int, num_samples: int) -> int:
        return cost.bytes(rows // num_samples, num_samples) if rows >= num_samples else cost.bytes(1, rows)

    def _truncates(self, params: SamplingParams) -> bool:
        return params.temperature > 0 and (params.top_k > 0 or params.top_p < 1.0)

    # --- generation -----------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> Rollout:
        """Sample `params.num_samples` completions per prompt; rows grouped by prompt (see Rollout).

        Rows decode in the plan's slots: a slot whose row has finished takes the next waiting group's
        sample (after one prefill of its prompt) when enough slots are free, and once no row waits,
        the live rows are compacted into half the slots whenever half are free (down to
        `SamplerConfig.compact_min_rows`), so the decode's cost follows the tokens generated rather
        than the longest row of a batch."""
        if self._state is None:
            raise RuntimeError("the sampler is asleep: its copy of the layers was freed for the train phase "
                               "(JaxSampler.sleep); call update_weights(model) before generate")
        prompts = [list(map(int, p)) for p in prompts]
        if not prompts:
            raise ValueError("generate needs at least one prompt")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token (got an empty prompt)")
        k = params.num_samples
        if k > self.config.max_batch_rows:
            raise ValueError(f"num_samples={k} exceeds sampler.max_batch_rows={self.config.max_batch_rows}; "
                             "a prompt's samples share one prefill, so raise max_batch_rows to at least num_samples")
        vocab = self._model_config.vocab_size
        outside = [t for t in params.stop_token_ids if not 0 <= t < vocab]
        if outside:
            raise ValueError(f"stop token ids {outside[:5]} are outside the model's vocabulary of {vocab}")
        n = params.max_new_tokens
        longest = max(len(p) for p in prompts)
        limit = self._model_config.max_position_embeddings
        if longest + n > limit:
            raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({n}) exceeds the model's "
                             f"max_position_embeddings {limit}; shorten the prompt or lower max_new_tokens")
        # Plan before running anything, so a request fails before any work.
        plan = self.plan(prompts, params)
        began = time.perf_counter()
        with use_mesh(self.mesh):
            run = _Run(self, prompts, params, plan)
            run.decode_all()
        self.last_stats = {**run.stats, "seconds": time.perf_counter() - began, "rows": plan.rows}
        return Rollout(prompt_ids=prompts, completion_ids=run.tokens, logprobs=run.logprobs,
                       completion_mask=run.mask,
                       finish_reason=np.where(run.stopped, FINISH_STOP, FINISH_LENGTH).astype(np.int8),
                       prompt_index=np.repeat(np.arange(len(prompts), dtype=np.int32), k))


class _Run:
    """One `generate` call's decode: the slots on the device, which output row each slot holds, the
    groups still waiting, and the completions collected so far."""

    def __init__(self, sampler: JaxSampler, prompts: list[list[int]], params: SamplingParams, plan: _Plan):
        self.sampler, self.prompts, self.params, self.plan = sampler, prompts, params, plan
        n, total = params.max_new_tokens, len(prompts) * params.num_samples
        self.tokens = np.zeros((total, n), np.int32)
        self.logprobs = np.zeros((total, n), np.float32)
        self.mask = np.zeros((total, n), bool)
        self.stopped = np.zeros((total,), bool)
        self.waiting = collections.deque(plan.groups)
        self.occupant = np.full((plan.rows,), -1, np.int64)  # the output row each slot decodes, -1: free
        self.steps = np.zeros((plan.rows,), np.int64)  # tokens generated per slot (host copy)
        self.windows = [w for _, w in decode_windows(plan.bucket, n, sampler.config.decode_window)]
        self.slots = _empty_slots(config=sampler.model_config, rows=plan.rows, cache_len=plan.bucket + n,
                                  max_new_tokens=n, cache_dtype=sampler.cache_dtype)
        self.stop_table = np.zeros((sampler.model_config.vocab_size,), bool)
        self.stop_table[list(params.stop_token_ids)] = True
        self.stats = {"decode_steps": [], "slot_steps": 0, "prefills": 0, "compactions": 0}

    def decode_all(self) -> None:
        sampler, params = self.sampler, self.params
        greedy = params.temperature == 0
        truncate = sampler._truncates(params)
        static = dict(greedy=greedy, top_k=params.top_k if truncate else 0, truncate=truncate,
                      vocab_chunk=sampler.config.vocab_chunk)
        inv_temperature = np.float32(0.0 if greedy else 1.0 / params.temperature)
        while True:
            self._admit_waiting()
            live = self.occupant >= 0
            if not live.any():
                return
            top = self.plan.bucket + int(self.steps[live].max())  # the next cache slot of the furthest row
            window = next(w for w in self.windows if w > top)
            rows = len(self.occupant)
            self.slots, count = _decode(sampler._graphdef, sampler._state, self.slots, self.stop_table,
                                        inv_temperature, np.float32(params.top_p), np.int32(self._exit_free()),
                                        window=window, **static)
            count = int(count)
            self.stats["decode_steps"].append(count)
            self.stats["slot_steps"] += count * rows
            collected = self._collect()
            compacted = self._compact()
            if not (count or collected or compacted):
                raise RuntimeError("the sampler's decode loop made no progress (a bug: please report it)")

    def _exit_free(self) -> int:
        """Free slots at which the decode loop hands back: enough for the next waiting group (or a
        quarter of the slots, whichever is more, so prefills are not run one row at a time); with
        none waiting, half the slots when they can be compacted; else never (it runs to the end)."""
        rows = len(self.occupant)
        if self.waiting:
            waiting_rows = sum(g.samples for g in self.waiting)
            return max(self.waiting[0].samples, min(rows // 4, waiting_rows))
        half = self._half()
        return rows - half if half else rows + 1

    def _admit_waiting(self) -> None:
        """Prefill waiting groups' prompts and place their samples in free slots, while they fit."""
        plan, sampler = self.plan, self.sampler
        while self.waiting:
            free = list(np.flatnonzero(self.occupant < 0))
            batch = []
            while (self.waiting and len(batch) < plan.prompts_per_prefill
                   and self.waiting[0].samples <= len(free) - sum(g.samples for g in batch)):
                batch.append(self.waiting.popleft())
            if not batch:
                return
            padded = min(plan.prompts_per_prefill, _pow2(len(batch)))
            tokens = np.full((padded, plan.bucket), PAD_ID, np.int32)
            valid = np.zeros((padded, plan.bucket), bool)
            valid[len(batch):, -1] = True  # padding prompts: one pad token, so their rows stay finite
            slot_ids = np.full((padded, plan.samples_per_group), len(self.occupant), np.int32)
            prompt_index = np.zeros((padded, plan.samples_per_group), np.int64)
            sample_index = np.zeros_like(prompt_index)
            k = self.params.num_samples
            for i, group in enumerate(batch):
                prompt = self.prompts[group.prompt]
                tokens[i, plan.bucket - len(prompt):] = prompt
                valid[i, plan.bucket - len(prompt):] = True
                for j in range(group.samples):
                    slot = free.pop(0)
                    slot_ids[i, j] = slot
                    prompt_index[i, j], sample_index[i, j] = group.prompt, group.first_sample + j
                    self.occupant[slot] = group.prompt * k + group.first_sample + j
                    self.steps[slot] = 0
            hidden, cache = _prefill(sampler._graphdef, sampler._state, tokens, valid,
                                     cache_len=plan.bucket + self.params.max_new_tokens, cache_dtype=sampler.cache_dtype)
            keys = row_keys(self.params.seed, prompt_index.ravel(), sample_index.ravel()).reshape(slot_ids.shape)
            self.slots = _admit(self.slots, hidden, cache, slot_ids, keys)
            self.stats["prefills"] += 1

    def _collect(self) -> bool:
        """Copy the finished rows' completions out of their slots and free the slots; whether any."""
        finished, steps = to_host((self.slots.finished, self.slots.steps))
        self.steps = np.asarray(steps, np.int64)
        done = np.flatnonzero(finished & (self.occupant >= 0))
        if not len(done):
            return False
        tokens, logprobs, mask, stopped = to_host(
            (self.slots.tokens, self.slots.logprobs, self.slots.mask, self.slots.stopped))
        out = self.occupant[done]
        self.tokens[out], self.logprobs[out], self.mask[out] = tokens[done], logprobs[done], mask[done]
        self.stopped[out] = stopped[done]
        self.occupant[done] = -1
        return True

    def _compact_to(self, rows: int) -> bool:
        """Whether the slots may be compacted into `rows`: the copy is made beside them, so it must
        fit the sampler's budget with them."""
        if rows < 1:
            return False
        sampler, plan = self.sampler, self.plan
        k, n = self.params.num_samples, self.params.max_new_tokens
        cost = sampler.cost(plan.bucket, n, sampler._truncates(self.params) or sampler.config.vocab_chunk == 0)
        held = sampler._sub_batch_bytes(cost, plan.rows, k)
        return held + rows * cost.per_row <= sampler.memory_budget()

    def _half(self) -> int:
        """The slots the live rows are compacted into once they fit: the largest power of two at most
        half the slots, when at least compact_min_rows (0 disables) and the copy fits; else 0."""
        minimum = self.sampler.config.compact_min_rows
        half = _pow2(len(self.occupant) // 2 + 1) // 2
        return half if minimum and half >= minimum and self._compact_to(half) else 0

    def _compact(self) -> bool:
        """With no group waiting, move the live rows into fewer slots (a power of two, at least
        compact_min_rows) when they fit in half."""
        live = np.flatnonzero(self.occupant >= 0)
        half = self._half()
        if self.waiting or not len(live) or not half or len(live) > half:
            return False
        target = max(_pow2(len(live)), self.sampler.config.compact_min_rows)
        keep = np.concatenate([live, np.flatnonzero(self.occupant < 0)[:target - len(live)]]).astype(np.int32)
        self.slots = _compact(self.slots, keep)
        self.occupant, self.steps = self.occupant[keep], self.steps[keep]
        self.stats["compactions"] += 1
        return True


def _largest(fits, upper: int) -> int:
    """The largest m in [1, upper] with fits(m), for a fits that holds up to some point; 0 if none."""
    low, high = 0, upper
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low
