"""The JAX sampler: greedy equals HF generate, logprobs equal teacher forcing, seeds, sampling
frequencies, stop tokens and early exit, buckets, the memory check, donation, LoRA modes, sharding."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

import jaxmath.model as jm
from jaxmath.model.lora import LoRAConfig, apply_lora, has_lora, projections
from jaxmath.rollout import jax_sampler
from jaxmath.rollout.jax_sampler import JaxSampler, SamplerConfig, SamplerMemoryError
from jaxmath.rollout.types import FINISH_LENGTH, FINISH_STOP, SamplingParams
from tests.hf_models import make_hf_model

VOCAB = 512
# Prompts of different lengths in one batch: 3 prompts are padded to 4, all in the 16-token bucket.
PROMPTS = [[5, 17, 301, 44, 9], [120, 7, 7, 88, 400, 31, 2, 250, 19, 3, 61], [77, 12, 450]]
# Most tests share these, so they share compiled programs (8 rows x 32 tokens, or 2 rows x 32).
NEW, K = 32, 2


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("sampler_model"))
    return d, make_hf_model(d, vocab_size=VOCAB, seed=3)


@pytest.fixture(scope="module")
def model(hf_pair):
    return jm.from_pretrained(hf_pair[0], dtype=jnp.float32)


@pytest.fixture(scope="module")
def sampler(model):
    # A small vocab_chunk so the fused path crosses several chunks (512 / 128), and a small
    # decode_window so decoding crosses attention windows (8, 16, 32 new tokens).
    return JaxSampler(model, SamplerConfig(vocab_chunk=128, decode_window=8))


def _teacher_forced_logits(model, rollout):
    """Logits [rows, NEW, vocab] float64 of a forward pass over prompt + completion, one batch."""
    width = max(map(len, PROMPTS)) + NEW
    ids = np.zeros((rollout.num_rows, width), np.int32)
    for row in range(rollout.num_rows):
        seq = PROMPTS[rollout.prompt_index[row]] + rollout.completion_ids[row].tolist()
        ids[row, width - len(seq):] = seq
    mask = np.zeros_like(ids)
    for row in range(rollout.num_rows):
        mask[row, width - len(PROMPTS[rollout.prompt_index[row]]) - NEW:] = 1
    out = np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(mask)), np.float64)
    return out[:, width - NEW - 1:-1]


@nnx.jit
def _forward(model, ids, mask):
    return model(ids, attention_mask=mask)


def _log_softmax(logits):
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def test_greedy_matches_hf_generate_batched(hf_pair, sampler):
    import torch

    _, hf = hf_pair
    width = max(map(len, PROMPTS))
    ids = np.zeros((len(PROMPTS), width), np.int64)
    mask = np.zeros_like(ids)
    for i, p in enumerate(PROMPTS):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    with torch.no_grad():
        out = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=NEW, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[:, width:].numpy()
    rollout = sampler.generate(PROMPTS, SamplingParams(max_new_tokens=NEW, num_samples=K, temperature=0.0))
    assert out.shape == (3, NEW) and len(set(out[:, 0])) > 1
    np.testing.assert_array_equal(rollout.completion_ids[::K], out)
    np.testing.assert_array_equal(rollout.completion_ids[1::K], out)
    assert rollout.completion_mask.all() and (rollout.finish_reason == FINISH_LENGTH).all()


@pytest.mark.parametrize("temperature, top_k", [(0.0, 0), (0.7, 0), (1.3, 0), (1.0, 20)])
def test_logprobs_match_teacher_forcing(model, sampler, temperature, top_k):
    params = SamplingParams(max_new_tokens=NEW, num_samples=K, temperature=temperature, top_k=top_k, seed=4)
    rollout = sampler.generate(PROMPTS, params)
    logits = _teacher_forced_logits(model, rollout)
    if temperature > 0:
        logits = logits / temperature
    if top_k:
        # Under top-k the logprob is that of the renormalised top-k distribution.
        kth = np.sort(logits, -1)[..., -top_k][..., None]
        logits = np.where(logits >= kth, logits, -np.inf)
    expected = np.take_along_axis(_log_softmax(logits), rollout.completion_ids[..., None], -1)[..., 0]
    assert np.isfinite(expected).all(), "a token was sampled outside the top k"
    np.testing.assert_allclose(rollout.logprobs, expected, atol=1e-4)


def test_seeded_reproducible_and_independent_of_batching(model, sampler):
    params = SamplingParams(max_new_tokens=NEW, num_samples=K, temperature=1.0, seed=11)
    first = sampler.generate(PROMPTS, params)
    again = sampler.generate(PROMPTS, params)
    np.testing.assert_array_equal(first.completion_ids, again.completion_ids)
    np.testing.assert_array_equal(first.logprobs, again.logprobs)
    for i in range(len(PROMPTS)):  # the samples of one prompt differ from each other
        assert (first.completion_ids[K * i] != first.completion_ids[K * i + 1]).any()
    other_seed = sampler.generate(PROMPTS, dataclasses.replace(params, seed=12))
    assert (other_seed.completion_ids != first.completion_ids).any()
    # Split into sub-batches of one prompt each, the rows are the same (keys follow the prompt index).
    split = JaxSampler(model, SamplerConfig(vocab_chunk=128, decode_window=8, max_batch_rows=K)).generate(PROMPTS,
                                                                                                          params)
    assert split.num_rows == first.num_rows
    np.testing.assert_array_equal(split.completion_ids, first.completion_ids)
    np.testing.assert_allclose(split.logprobs, first.logprobs, atol=1e-5)


def test_sleep_frees_the_copy_of_the_layers_until_the_next_weights(model):
    """`JaxSampler.sleep` (the GRPO loop's synchronous train phase): the sampler's own copy of the layers
    is freed, the device's live bytes dropping by its size; generate is refused while asleep; the next
    update_weights makes the copy again, which samples the same tokens and logprobs as before."""
    sampler = JaxSampler(model, SamplerConfig(vocab_chunk=128, decode_window=8))
    params = SamplingParams(max_new_tokens=NEW, num_samples=K, temperature=1.0, seed=11)
    before = sampler.generate(PROMPTS, params)
    shared = {id(x) for x in jax.tree.leaves(nnx.state(model))}  # the embedding and head are the trainer's
    copy = sum(x.nbytes for x in jax.tree.leaves(sampler._state) if id(x) not in shared)
    assert copy > 0
    live = sum(x.nbytes for x in jax.live_arrays())
    assert sampler.sleep() is True
    assert live - sum(x.nbytes for x in jax.live_arrays()) == copy
    with pytest.raises(RuntimeError, match=r"asleep.*update_weights"):
        sampler.generate(PROMPTS, params)
    assert sampler.wake_up() is True
    sampler.update_weights(model)
    after = sampler.generate(PROMPTS, params)
    np.testing.assert_array_equal(after.completion_ids, before.completion_ids)
    np.testing.assert_array_equal(after.logprobs, before.logprobs)


def _chi_square_p(counts, probs):
    keep = probs > 0
    return stats.chisquare(counts[keep], counts.sum() * probs[keep] / probs[keep].sum()).pvalue


@pytest.mark.parametrize("chunk", [0, 128])
def test_sampling_frequencies_match_softmax(chunk):
    """100,000 draws over a 300-token vocabulary (not a multiple of the chunk or group size). Fixed
    seeds; the test passes when Pearson's chi-square p-value is above 1e-3 for the right distribution
    and below 1e-6 for the same logits at a 10% different temperature (so it can tell them apart)."""
    vocab, dim, rows, temperature = 300, 16, 100_000, 0.8
    key = jax.random.key(0)
    head = jax.random.normal(key, (vocab, dim), jnp.float32)
    hidden = jnp.broadcast_to(0.6 * jax.random.normal(jax.random.fold_in(key, 1), (1, dim)), (rows, dim))
    inv_t = jnp.float32(1 / temperature)
    if chunk:
        chunks = jax_sampler.chunk_head(head, chunk)
        u = jax.random.uniform(jax.random.fold_in(key, 2), (rows, chunks.shape[0], 2))
        draw = jax.jit(lambda h, u: jax_sampler.sample_chunked(h, chunks, vocab, u, inv_t, greedy=False))
    else:
        u = jax.random.uniform(jax.random.fold_in(key, 2), (rows,))
        draw = jax.jit(lambda h, u: jax_sampler.sample_full(h, head, u, inv_t, greedy=False))
    tokens, logprobs = draw(hidden, u)
    logits = np.asarray(hidden[0] @ head.T, np.float64)
    probs = np.exp(logits / temperature - np.logaddexp.reduce(logits / temperature))
    counts = np.bincount(np.asarray(tokens), minlength=vocab)
    assert counts.size == vocab
    assert _chi_square_p(counts, probs) > 1e-3
    wrong = np.exp(logits / (1.1 * temperature) - np.logaddexp.reduce(logits / (1.1 * temperature)))
    assert _chi_square_p(counts, wrong) < 1e-6
    np.testing.assert_allclose(np.asarray(logprobs), np.log(probs[np.asarray(tokens)]), atol=1e-5)


@pytest.mark.slow
def test_model_sampling_frequencies_and_top_k(model):
    """First-token frequencies of 4,096 samples of one prompt follow the model's softmax at T=1.5
    (chi-square p > 1e-3 over the tokens with expected count >= 5, the rest pooled); top-k=5 never
    leaves the five most likely tokens."""
    prompt = PROMPTS[0]
    logits = np.asarray(model(jnp.asarray([prompt])))[0, -1].astype(np.float64) / 1.5
    probs = np.exp(logits - np.logaddexp.reduce(logits))
    big = JaxSampler(model, SamplerConfig(vocab_chunk=128, max_batch_rows=4096))
    rollout = big.generate([prompt], SamplingParams(max_new_tokens=1, num_samples=4096, temperature=1.5, seed=5))
    counts = np.bincount(rollout.completion_ids[:, 0], minlength=VOCAB).astype(float)
    common = probs * 4096 >= 5
    pooled_counts = np.append(counts[common], counts[~common].sum())
    pooled_probs = np.append(probs[common], probs[~common].sum())
    assert _chi_square_p(pooled_counts, pooled_probs) > 1e-3
    top = big.generate([prompt], SamplingParams(max_new_tokens=1, num_samples=512, temperature=1.5, top_k=5))
    assert set(top.completion_ids[:, 0]) <= set(np.argsort(-logits)[:5])


def test_stop_tokens_end_rows_and_loop_exits_early(sampler):
    params = SamplingParams(max_new_tokens=NEW, num_samples=K, temperature=1.0, seed=7)
    free = sampler.generate(PROMPTS, params).completion_ids
    stops = tuple(sorted({int(row[5]) for row in free}))  # every row meets a stop id by position 5
    rollout = sampler.generate(PROMPTS, dataclasses.replace(params, stop_token_ids=stops))
    ends = [int(np.flatnonzero(np.isin(row, stops))[0]) for row in free]
    assert max(ends) <= 5
    for row, end in enumerate(ends):
        # Same tokens up to and including the stop token, then pad 0 with mask and logprob off.
        np.testing.assert_array_equal(rollout.completion_ids[row, :end + 1], free[row, :end + 1])
        assert (rollout.completion_ids[row, end + 1:] == 0).all() and (rollout.logprobs[row, end + 1:] == 0).all()
        assert rollout.completion_mask[row, :end + 1].all() and not rollout.completion_mask[row, end + 1:].any()
        assert rollout.completion_token_lists()[row][-1] in stops
    assert (rollout.finish_reason == FINISH_STOP).all()
    assert sampler.last_stats["decode_steps"] == [max(ends) + 1]  # the while_loop stopped there


def test_any_number_of_stop_ids(sampler):
    """Stop ids are a table over the vocabulary: half of it stops rows within a few steps, in one
    compiled program whatever their number."""
    params = SamplingParams(max_new_tokens=NEW, num_samples=K, temperature=1.0, seed=4)
    free = sampler.generate(PROMPTS, params).completion_ids
    stops = tuple(range(0, VOCAB, 2))
    compiled = jax_sampler._decode._cache_size()
    rollout = sampler.generate(PROMPTS, dataclasses.replace(params, stop_token_ids=stops))
    assert jax_sampler._decode._cache_size() == compiled
    for row, tokens in enumerate(free):
        end = int(np.flatnonzero(tokens % 2 == 0)[0]) if (tokens % 2 == 0).any() else NEW - 1
        assert rollout.completion_mask[row].sum() == end + 1
        np.testing.assert_array_equal(rollout.completion_ids[row, :end + 1], tokens[:end + 1])


def test_buckets_reuse_compiles_and_long_prompts_refused(model):
    sampler = JaxSampler(model, SamplerConfig(vocab_chunk=128, prompt_buckets=(8, 16)))
    assert [sampler.bucket_for(n) for n in (1, 8, 9, 16)] == [8, 8, 16, 16]
    params = SamplingParams(max_new_tokens=NEW, num_samples=K, temperature=1.0)
    sampler.generate([[1, 2, 3, 4, 5, 6, 7, 8, 9]], params)
    compiled = jax_sampler._decode._cache_size()
    sampler.generate([[9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11, 12]], params)  # another length, same bucket
    assert jax_sampler._decode._cache_size() == compiled
    with pytest.raises(ValueError, match="prompt_buckets"):
        sampler.generate([list(range(1, 20))], params)
    assert JaxSampler(model).bucket_for(17) == 32  # default: powers of two


def test_rows_that_fit_follow_the_budget_and_split_a_group_that_does_not_fit(model):
    cost = jax_sampler.sub_batch_cost(model.config, prompt_len=16, max_new_tokens=NEW, vocab_chunk=128)
    group = cost.per_prompt + 8 * cost.per_row
    assert jax_sampler.rows_that_fit(cost, cost.fixed + 3 * group, 8) == 24  # whole groups
    assert jax_sampler.rows_that_fit(cost, cost.fixed + 3 * group - 1, 8) == 16
    assert jax_sampler.rows_that_fit(cost, cost.bytes(1, 5), 8) == 5  # part of one group
    assert jax_sampler.rows_that_fit(cost, cost.bytes(1, 1), 8) == 1
    assert jax_sampler.rows_that_fit(cost, cost.bytes(1, 1) - 1, 8) == 0
    longer = jax_sampler.sub_batch_cost(model.config, prompt_len=16, max_new_tokens=4 * NEW, vocab_chunk=128)
    assert jax_sampler.rows_that_fit(longer, cost.fixed + 3 * group, 8) < 24


def test_a_plan_keeps_its_rows_while_they_fit(model):
    """Free memory that grows between calls keeps the sub-batch shapes (no recompile); memory that
    shrinks below them shrinks them."""
    sampler = JaxSampler(model, SamplerConfig(vocab_chunk=128))
    cost = sampler.cost(16, NEW, full_vocab=False)
    params = SamplingParams(max_new_tokens=NEW, num_samples=3)
    for budget, rows in ((cost.bytes(1, 3), 3), (cost.bytes(2, 3), 3), (cost.bytes(1, 2), 2), (cost.bytes(2, 3), 2)):
        sampler.config = dataclasses.replace(sampler.config, memory_budget_bytes=budget)
        assert sampler.plan(PROMPTS, params).rows == rows


@pytest.mark.parametrize("temperature", [pytest.param(0.0, marks=pytest.mark.slow), pytest.param(1.0, marks=pytest.mark.slow)])
def test_a_request_split_by_memory_gives_the_tokens_and_logprobs_of_one_batch(model, sampler, temperature):
    """3 prompts x 3 samples in one prefill and 16 slots, then under budgets that hold one group (3
    slots, a prefill per prompt) and two rows (each group spread over two admissions: 6 prefills)."""
    params = SamplingParams(max_new_tokens=NEW, num_samples=3, temperature=temperature, seed=9)
    whole = sampler.generate(PROMPTS, params)
    assert sampler.last_stats["prefills"] == 1 and sampler.last_stats["rows"] == 16
    cost = sampler.cost(16, NEW, full_vocab=False)
    for budget, prefills, rows in ((cost.bytes(1, 3), 3, 3), (cost.bytes(1, 2), 6, 2)):
        split_sampler = JaxSampler(model, SamplerConfig(vocab_chunk=128, decode_window=8, memory_budget_bytes=budget))
        split = split_sampler.generate(PROMPTS, params)
        assert split_sampler.last_stats["prefills"] == prefills
        assert split_sampler.last_stats["rows"] == rows
        np.testing.assert_array_equal(split.prompt_index, whole.prompt_index)
        np.testing.assert_array_equal(split.completion_ids, whole.completion_ids)
        np.testing.assert_array_equal(split.completion_mask, whole.completion_mask)
        np.testing.assert_allclose(split.logprobs, whole.logprobs, atol=1e-5)


def test_a_request_where_no_row_fits_is_refused_up_front_with_what_would_fit(model):
    roomy = JaxSampler(model, SamplerConfig(vocab_chunk=128))
    need = roomy.cost(16, 400, full_vocab=False).bytes(1, 1)
    small = JaxSampler(model, SamplerConfig(memory_budget_bytes=need - 1, vocab_chunk=128))
    before = jax_sampler._prefill._cache_size()
    with pytest.raises(SamplerMemoryError, match=rf"memory_budget_bytes to at least {need}.*max_new_tokens to \d+") as e:
        small.generate([[1, 2, 3]] * 4, SamplingParams(max_new_tokens=400, num_samples=8))
    assert jax_sampler._prefill._cache_size() == before  # refused before compiling anything
    fits = int(re.search(r"max_new_tokens to (\d+)", str(e.value)).group(1))
    assert 0 < fits < 400
    assert jax_sampler.rows_that_fit(roomy.cost(16, fits, False), need - 1, 8) == 1
    assert jax_sampler.rows_that_fit(roomy.cost(16, fits + 1, False), need - 1, 8) == 0


@pytest.mark.slow  # nine compiles of the prefill, admit and decode programs
def test_the_cost_model_bounds_the_compiled_programs(model):
    """sub_batch_cost against XLA's buffer assignment of the real prefill (beside the live slots),
    admission and decode (temporaries and outputs), compiled for this CPU on abstract shapes: an upper
    bound at each shape, and the growth per row and per prompt within it. (On a CPU XLA also upcasts
    bf16 weights for its dots, a fixed cost outside this model: hence a float32 model here.) The programs
    take the sampler's own layout of the weights, one array per layer (`unstack_layers`)."""
    from jaxmath.model.qwen3 import unstack_layers

    graphdef, state = nnx.split(unstack_layers(model))
    spec = jax.ShapeDtypeStruct
    bucket, new = 16, 48

    def compiled(prompts, samples):
        rows = prompts * samples
        tokens, valid = spec((prompts, bucket), jnp.int32), spec((prompts, bucket), jnp.bool_)
        prefill = jax_sampler._prefill.lower(graphdef, state, tokens, valid, cache_len=bucket + new,
                                             cache_dtype=jnp.float32)
        hidden, cache = jax.eval_shape(functools.partial(jax_sampler._prefill, graphdef, cache_len=bucket + new,
                                                         cache_dtype=jnp.float32), state, tokens, valid)
        slots = jax.eval_shape(functools.partial(jax_sampler._empty_slots, config=model.config, rows=rows,
                                                 cache_len=bucket + new, max_new_tokens=new, cache_dtype=jnp.float32))
        keys = jax.eval_shape(lambda: jax_sampler.row_keys(0, np.zeros(rows), np.zeros(rows)).reshape(prompts, samples))
        admit = jax_sampler._admit.lower(slots, hidden, cache, spec((prompts, samples), jnp.int32), keys)
        decode = jax_sampler._decode.lower(
            graphdef, state, slots, spec((VOCAB,), jnp.bool_), spec((), jnp.float32), spec((), jnp.float32),
            spec((), jnp.int32), greedy=False, top_k=0, truncate=False, vocab_chunk=128, window=bucket + new)
        slot_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(slots))
        held = [slot_bytes, 0, 0]  # a refill's prefill runs beside the live slots
        return [m.temp_size_in_bytes + m.output_size_in_bytes + h
                for m, h in zip((p.compile().memory_analysis() for p in (prefill, admit, decode)), held)]

    cost = jax_sampler.sub_batch_cost(model.config, prompt_len=bucket, max_new_tokens=new, cache_dtype=jnp.float32,
                                      vocab_chunk=128)
    shapes = {(1, 1): compiled(1, 1), (1, 9): compiled(1, 9), (5, 1): compiled(5, 1)}
    for (prompts, samples), programs in shapes.items():
        assert max(programs) <= cost.bytes(prompts, samples) <= 4 * max(programs), (prompts, samples, programs)
    for program in (0, 1, 2):
        assert (shapes[(1, 9)][program] - shapes[(1, 1)][program]) / 8 <= cost.per_row
        assert (shapes[(5, 1)][program] - shapes[(1, 1)][program]) / 4 <= cost.per_prompt + cost.per_row


def test_slots_are_donated_and_updated_in_place(model):
    graphdef, state = nnx.split(model)
    tokens = np.zeros((1, 16), np.int32)
    tokens[0, -3:] = [5, 6, 7]
    slots = jax_sampler._empty_slots(config=model.config, rows=K, cache_len=16 + NEW, max_new_tokens=NEW,
                                     cache_dtype=jnp.float32)
    hidden, cache = jax_sampler._prefill(graphdef, state, tokens, tokens > 0, cache_len=16 + NEW,
                                         cache_dtype=jnp.float32)
    keys = jax_sampler.row_keys(0, np.zeros(K, int), np.arange(K)).reshape(1, K)
    admitted = jax_sampler._admit(slots, hidden, cache, np.arange(K, dtype=np.int32)[None], keys)
    assert all(k.is_deleted() for k in slots.cache.k) and slots.tokens.is_deleted()
    done, steps = jax_sampler._decode(graphdef, state, admitted, np.zeros(VOCAB, bool), np.float32(1.0),
                                      np.float32(1.0), np.int32(K + 1), greedy=False, top_k=0, truncate=False,
                                      vocab_chunk=128, window=16 + NEW)
    assert int(steps) == NEW and bool(done.finished.all()) and (np.asarray(done.steps) == NEW).all()
    assert all(x.is_deleted() for x in admitted.cache.k + admitted.cache.v)


def test_decode_windows_cover_every_written_slot():
    assert jax_sampler.decode_windows(128, 2048, 128) == (
        (128, 256), (256, 384), (512, 640), (1024, 1152), (2048, 2176))
    assert jax_sampler.decode_windows(16, 100, 32) == ((32, 48), (64, 80), (100, 116))
    assert jax_sampler.decode_windows(16, 32, 0) == ((32, 48),)  # 0: the whole cache
    assert jax_sampler.decode_windows(16, 32, 32) == ((32, 48),)
    for bucket, n, first in [(16, 100, 32), (64, 2048, 128), (8, 9, 1)]:
        windows = jax_sampler.decode_windows(bucket, n, first)
        assert windows[-1] == (n, bucket + n)
        # Step t writes slot bucket + t, so its window must reach past it.
        assert all(window >= bucket + end for end, window in windows)


def test_windowed_decode_equals_whole_cache_decode(model, sampler):
    """Attention over growing windows reads fewer slots, but the slots it skips are masked anyway."""
    whole = JaxSampler(model, SamplerConfig(vocab_chunk=128, decode_window=0))
    for temperature in (1.0, 0.0):
        params = SamplingParams(max_new_tokens=NEW, num_samples=K, temperature=temperature, seed=5)
        windowed, reference = sampler.generate(PROMPTS, params), whole.generate(PROMPTS, params)
        np.testing.assert_array_equal(windowed.completion_ids, reference.completion_ids)
        np.testing.assert_allclose(windowed.logprobs, reference.logprobs, atol=1e-5)


# Six prompts of two samples each, so a request is larger than the slots of a small sampler.
MORE_PROMPTS = PROMPTS + [[9, 9, 31], [400, 2, 17, 66, 5, 8], [13]]


def _varying_stops(free: np.ndarray) -> tuple[tuple[int, ...], np.ndarray]:
    """Stop ids taken from a free run's rows at spread positions, and the length each row then has."""
    stops = tuple(sorted({int(free[r, (5 * r) % (free.shape[1] - 2) + 1]) for r in range(8)}))
    ends = np.array([np.flatnonzero(np.isin(row, stops))[0] + 1 if np.isin(row, stops).any() else len(row)
                     for row in free])
    return stops, ends


@pytest.mark.parametrize("temperature", [pytest.param(0.7, marks=pytest.mark.slow), pytest.param(1.0, marks=pytest.mark.slow)])
def test_finished_rows_free_their_slots_for_waiting_rows(model, temperature):
    """Rows that end at different steps: with 4 slots for 12 rows, a finished row's slot takes a waiting
    row; with 16 slots, the live rows are compacted into 8. Both give the tokens and
    logprobs of decoding each row alone, and decode fewer slot-steps than batches that wait for their
    longest row."""
    params = SamplingParams(max_new_tokens=NEW, num_samples=K, temperature=temperature, seed=21)
    config = SamplerConfig(vocab_chunk=128, decode_window=8, compact_min_rows=8)
    free = JaxSampler(model, config).generate(MORE_PROMPTS, params).completion_ids
    stops, ends = _varying_stops(free)
    assert len(set(ends.tolist())) >= 4, ends  # the rows do end at different steps
    params = dataclasses.replace(params, stop_token_ids=stops)
    one = JaxSampler(model, dataclasses.replace(config, memory_budget_bytes=JaxSampler(model, config).cost(
        16, NEW, False).bytes(1, 1)))
    alone = one.generate(MORE_PROMPTS, params)
    assert one.last_stats["rows"] == 1 and one.last_stats["prefills"] == len(ends)
    np.testing.assert_array_equal(alone.completion_mask.sum(1), ends)

    refill = JaxSampler(model, dataclasses.replace(config, max_batch_rows=4, compact_min_rows=0))
    compact = JaxSampler(model, config)
    for sampler in (refill, compact):
        out = sampler.generate(MORE_PROMPTS, params)
        np.testing.assert_array_equal(out.completion_ids, alone.completion_ids)
        np.testing.assert_array_equal(out.completion_mask, alone.completion_mask)
        np.testing.assert_array_equal(out.finish_reason, alone.finish_reason)
        np.testing.assert_allclose(out.logprobs, alone.logprobs, atol=1e-5)
    # Batches of 4 rows (two groups) that each wait for their longest row, against the refilled slots.
    waiting = sum(4 * ends[i:i + 4].max() for i in range(0, len(ends), 4))
    assert refill.last_stats["rows"] == 4 and refill.last_stats["slot_steps"] < waiting
    assert compact.last_stats["rows"] == 16 and compact.last_stats["compactions"] >= 1
    assert compact.last_stats["slot_steps"] < 16 * ends.max()


def test_with_compaction_off_every_slot_decodes_to_the_last_row(model):
    """compact_min_rows=0 keeps every slot until the last row ends (what the sampler did before)."""
    params = SamplingParams(max_new_tokens=NEW, num_samples=K, temperature=1.0, seed=21)
    config = SamplerConfig(vocab_chunk=128, decode_window=8, compact_min_rows=0)
    sampler = JaxSampler(model, config)
    free = sampler.generate(MORE_PROMPTS, params).completion_ids
    stops, ends = _varying_stops(free)
    sampler.generate(MORE_PROMPTS, dataclasses.replace(params, stop_token_ids=stops))
    assert sampler.last_stats["compactions"] == 0 and sampler.last_stats["slot_steps"] == 16 * ends.max()


def test_lora_merge_and_on_the_fly_agree_and_follow_updates(hf_pair):
    trainer = jm.from_pretrained(hf_pair[0], dtype=jnp.float32)
    params = SamplingParams(max_new_tokens=NEW, num_samples=K, temperature=0.0)
    base = JaxSampler(trainer, SamplerConfig(vocab_chunk=128)).generate(PROMPTS, params)
    apply_lora(trainer, LoRAConfig(rank=4, alpha=8.0), seed=1)
    for i, (_, dense) in enumerate(projections(trainer)):
        b = dense.lora_b.get_value()
        dense.lora_b.set_value(0.3 * jax.random.normal(jax.random.key(i), b.shape, b.dtype))
    merged = JaxSampler(trainer, SamplerConfig(vocab_chunk=128, lora_mode="merge"))
    assert has_lora(trainer)  # merging worked on a copy, the trainer keeps its adapters
    on_the_fly = JaxSampler(trainer, SamplerConfig(vocab_chunk=128, lora_mode="on_the_fly"))
    out_merged, out_fly = merged.generate(PROMPTS, params), on_the_fly.generate(PROMPTS, params)
    np.testing.assert_array_equal(out_merged.completion_ids, out_fly.completion_ids)
    np.testing.assert_allclose(out_merged.logprobs, out_fly.logprobs, atol=1e-4)
    assert (out_merged.completion_ids != base.completion_ids).any()
    # After the optimizer zeroes the adapters, update_weights brings the base model back.
    for _, dense in projections(trainer):
        dense.lora_b.set_value(jnp.zeros_like(dense.lora_b.get_value()))
    merged.update_weights(trainer)
    np.testing.assert_array_equal(merged.generate(PROMPTS, params).completion_ids, base.completion_ids)


@pytest.mark.slow
def test_sharded_batch_matches_single_device(hf_pair, sampler):
    from jaxmath.model import sharding

    mesh = sharding.make_mesh(data=2, tp=2)
    sharded_model = jm.from_pretrained(hf_pair[0], dtype=jnp.float32, mesh=mesh)
    params = SamplingParams(max_new_tokens=NEW, num_samples=K, temperature=1.0, seed=3)
    out = JaxSampler(sharded_model, SamplerConfig(vocab_chunk=128), mesh=mesh).generate(PROMPTS, params)
    ref = sampler.generate(PROMPTS, params)
    np.testing.assert_array_equal(out.completion_ids, ref.completion_ids)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-4)


def test_requests_the_engine_must_refuse(sampler):
    with pytest.raises(ValueError, match="empty prompt"):
        sampler.generate([[1, 2], []], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="max_batch_rows"):
        sampler.generate([[1, 2]], SamplingParams(max_new_tokens=2, num_samples=1000))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        sampler.generate([[1, 2]], SamplingParams(max_new_tokens=600))
    with pytest.raises(ValueError, match=r"stop token ids \[512\] are outside the model's vocabulary of 512"):
        sampler.generate([[1, 2]], SamplingParams(max_new_tokens=2, stop_token_ids=(3, 512)))
    with pytest.raises(ValueError, match="lora_mode"):
        SamplerConfig(lora_mode="fast")
    assert jax_sampler.stop_tokens_for(jm.preset("tiny")) == (151645,)
