"""SFT: the assistant-only mask (decoded), packing == no packing, exact accumulation, no full logits,
overfitting a fixed set, N + resume + N == 2N, the HF export that GRPO starts from, the configs."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxmath.model as jm
from jaxmath import sft
from jaxmath.checkpoint import CheckpointManager
from jaxmath.data.prompts import build_messages
from jaxmath.model.lora import LoRAConfig
from jaxmath.optim import OptimizerConfig
from jaxmath.sft import SFTConfig, TokenizedExample

VOCAB = 512


@functools.lru_cache(maxsize=1)
def _base():
    return nnx.split(jm.init_model(jm.preset("tiny", vocab_size=VOCAB, dtype=jnp.float32, param_dtype=jnp.float32)))


def _model():
    """A fresh copy of one tiny model (own buffers: the SFT step donates what it trains)."""
    graphdef, state = _base()
    return nnx.merge(graphdef, jax.tree.map(lambda x: jnp.array(x, copy=True), state))


@nnx.jit
def _logits(model, ids):
    return model(ids)


def _documents(count, seed=0, low=6, high=20):
    """Random documents whose first tokens are a 'prompt' (not in the loss)."""
    rng = np.random.RandomState(seed)
    docs = []
    for _ in range(count):
        n = rng.randint(low, high)
        prompt = rng.randint(1, n - 2)
        docs.append(TokenizedExample(rng.randint(1, VOCAB, n).tolist(), [False] * prompt + [True] * (n - prompt)))
    return docs


# --- the loss mask ---------------------------------------------------------------------------------


def _masked_spans(tokenizer, example):
    spans, current = [], []
    for token, on in zip(example.input_ids, example.loss_mask):
        if on:
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    if current:
        spans.append(tokenizer.decode(current))
    return spans


def test_loss_mask_covers_exactly_the_assistant_turns(tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    answer = "We add: $2 + 2 = 4$.\n\nSo the answer is \\boxed{4}."
    messages = build_messages("What is 2+2?", few_shot=2, system="You are a careful mathematician.")
    messages.append({"role": "assistant", "content": answer})
    example = sft.tokenize_chat(tokenizer, messages)
    shots = [m["content"] for m in messages if m["role"] == "assistant"]
    # Every assistant turn with its closing <|im_end|>, nothing else: no header, no think block,
    # no newline after <|im_end|>, no system or user text.
    assert _masked_spans(tokenizer, example) == [s + "<|im_end|>" for s in shots]
    unmasked = tokenizer.decode([t for t, on in zip(example.input_ids, example.loss_mask) if not on])
    assert "<think>\n\n</think>\n\n" in unmasked and unmasked.count("<|im_start|>assistant\n") == 3
    assert example.input_ids == tokenizer(tokenizer.apply_chat_template(messages, tokenize=False,
                                                                        enable_thinking=False))["input_ids"]
    with pytest.raises(ValueError, match="no assistant turn"):
        sft.tokenize_chat(tokenizer, [{"role": "user", "content": "What is 2+2?"}])


# --- packing ---------------------------------------------------------------------------------------


def test_first_fit_packing_plan_and_arrays():
    assert sft.pack_plan([5, 3, 4, 2, 6], 8) == [[0, 1], [2, 3], [4]]
    assert sft.pack_plan([5, 3], 8, pack=False) == [[0], [1]]
    docs = [TokenizedExample([10, 11, 12], [False, True, True]), TokenizedExample([20, 21], [False, True])]
    rows = sft.pack_examples(docs, 4, num_rows=2)
    np.testing.assert_array_equal(rows["input_ids"][0], [10, 11, 20, 0])
    np.testing.assert_array_equal(rows["targets"][0], [11, 12, 21, 0])  # no target crosses documents
    np.testing.assert_array_equal(rows["segment_ids"][0], [1, 1, 2, 0])
    np.testing.assert_array_equal(rows["positions"][0], [0, 1, 0, 0])
    np.testing.assert_array_equal(rows["loss_mask"][0], [True, True, True, False])
    assert not rows["segment_ids"][1].any()  # padding row
    with pytest.raises(ValueError, match="truncate"):
        sft.pack_plan([9], 8)


def test_packed_and_unpacked_batches_give_the_same_loss():
    model = _model()
    graphdef, trainable, frozen = sft.split_trainable(model)
    docs = _documents(8, seed=1)
    lengths = [len(d.input_ids) - 1 for d in docs]
    plan = sft.pack_plan(lengths, 48)
    assert len(plan) < len(docs) // 2  # documents really share rows
    packed = sft.pack_examples(docs, 48, plan, num_rows=len(docs))  # same shape: one compilation
    unpacked = sft.pack_examples(docs, 48, rows=sft.pack_plan(lengths, 48, pack=False))
    nll = jax.jit(lambda b: sft.token_nll(graphdef, trainable, frozen, b, chunk_size=32))
    packed_sum, packed_count = nll(packed)
    unpacked_sum, unpacked_count = nll(unpacked)
    assert float(packed_count) == float(unpacked_count) == sum(sum(d.loss_mask[1:]) for d in docs)
    np.testing.assert_allclose(float(packed_sum), float(unpacked_sum), rtol=2e-6)
    # Unpacked rows described by their lengths (how cuDNN takes them, without a mask) give the same loss.
    by_length = jax.jit(lambda b: sft.token_nll(graphdef, trainable, frozen, b, chunk_size=32,
                                                one_document_per_row=True))(unpacked)
    np.testing.assert_allclose(float(by_length[0]), float(unpacked_sum), rtol=2e-6)
    # The same rows without segment ids (attention across documents) give a different loss.
    crossing = dict(packed, segment_ids=(packed["segment_ids"] > 0).astype(np.int32))
    assert abs(float(nll(crossing)[0]) - float(packed_sum)) > 1e-3


# --- the step --------------------------------------------------------------------------------------


@pytest.mark.slow  # 8-17 s: out of the fast subset's 10 minutes (the whole suite runs it)
def test_accumulated_micro_batches_equal_one_batch_and_no_full_logits():
    docs = _documents(4, seed=2, low=4, high=30)  # unequal loss-token counts per row
    arrays = sft.pack_examples(docs, 32, rows=[[0], [1], [2], [3]])
    counts = arrays["loss_mask"].sum(1)
    assert len(set(counts.tolist())) > 1
    results = {}
    for accum in (1, 4):
        model = _model()
        graphdef, trainable, frozen = sft.split_trainable(model)
        optimizer = optax.sgd(1.0)
        step = sft.make_sft_step(graphdef, optimizer, chunk_size=16, remat=False)
        batch = sft.stack_micro(arrays, accum)
        if accum == 1:
            # Logits exist only per chunk of 16 positions, never for the [rows, seq, vocab] batch.
            hlo = step.lower(trainable, frozen, optimizer.init(trainable), batch).as_text()
            assert f"16x{VOCAB}xf32" in hlo
            assert f"4x32x{VOCAB}xf32" not in hlo and f"128x{VOCAB}xf32" not in hlo
        trainable, _, metrics = step(trainable, frozen, optimizer.init(trainable), batch)
        results[accum] = (nnx.to_pure_dict(trainable), metrics)
    np.testing.assert_allclose(float(results[1][1]["loss"]), float(results[4][1]["loss"]), rtol=1e-6)
    assert float(results[4][1]["loss_tokens"]) == counts.sum()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-7, rtol=1e-5), results[1][0], results[4][0])
    # A mean of per-micro-batch means (the normalization bug) is a different loss.
    graphdef, trainable, frozen = sft.split_trainable(_model())
    row_nll = jax.jit(lambda b: sft.token_nll(graphdef, trainable, frozen, b, chunk_size=16)[0])
    per_row = np.array([float(row_nll({k: v[i:i + 1] for k, v in arrays.items()})) for i in range(4)])
    assert abs(np.mean(per_row / counts) - float(results[1][1]["loss"])) > 1e-3


# --- the loop --------------------------------------------------------------------------------------


@pytest.mark.slow  # 8-17 s: out of the fast subset's 10 minutes (the whole suite runs it)
def test_sft_overfits_a_small_fixed_set(tmp_path):
    docs = _documents(8, seed=3)
    cfg = SFTConfig(batch_size=8, micro_batch_size=4, max_seq_len=24, pack=False, steps=40,
                    optimizer=OptimizerConfig(learning_rate=1e-2, schedule="warmup_linear", warmup_steps=3, b2=0.95),
                    lora=LoRAConfig(rank=0), export=False, log_every=0)
    result = sft.run_sft(_model(), docs, cfg, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 41))
    assert records[0]["lr"] == 0.0 and records[3]["lr"] == pytest.approx(1e-2)
    assert records[-1]["lr"] < 1e-3  # linear decay towards 0
    assert records[0]["loss"] > 5.5  # ~log(512) at init
    assert result["loss"] < 0.5, result
    assert all(r["tokens_per_s"] > 0 and r["step_seconds"] > 0 and r["grad_norm"] > 0 for r in records)


def test_resume_is_exact_and_the_export_is_the_merged_model(tmp_path):
    docs = _documents(12, seed=4)
    eval_docs = _documents(3, seed=5)
    cfg = SFTConfig(batch_size=4, micro_batch_size=2, max_seq_len=32, pack=True, steps=4,
                    optimizer=OptimizerConfig(learning_rate=2e-2, schedule="warmup_linear", warmup_steps=1, b2=0.95),
                    lora=LoRAConfig(rank=4, alpha=8), checkpoint_every=2, keep_last=2,
                    log_every=0, export=True, eval_every=2)
    straight = sft.run_sft(_model(), docs, cfg, tmp_path / "straight", eval_examples=eval_docs)
    killed = sft.run_sft(_model(), docs, cfg, tmp_path / "resumed", eval_examples=eval_docs, stop_after_step=2)
    assert killed["steps"] == 2 and "export_dir" not in killed
    model = _model()
    resumed = sft.run_sft(model, docs, cfg, tmp_path / "resumed", eval_examples=eval_docs)
    assert resumed["loss"] == straight["loss"] and resumed["eval_loss"] == straight["eval_loss"]

    def final_state(run):
        with CheckpointManager(tmp_path / run / "checkpoints") as manager:
            assert manager.latest_step() == 4
            return manager.restore()

    a, b = final_state("straight"), final_state("resumed")
    assert a.data_cursor == b.data_cursor and a.data_cursor["step"] == 4
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)  # bit for bit
    jax.tree.map(np.testing.assert_array_equal, a.opt_state, b.opt_state)
    records = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and "eval_loss" in records[1]

    # The export is an HF folder whose weights are the LoRA-merged model (what GRPO's model.path loads).
    ids = jnp.asarray(np.random.RandomState(6).randint(1, VOCAB, (2, 9)))
    exported = np.asarray(_logits(jm.from_pretrained(resumed["export_dir"], dtype=jnp.float32), ids))
    np.testing.assert_allclose(exported, np.asarray(_logits(model, ids)), atol=1e-5)
    assert np.abs(exported - np.asarray(_logits(_model(), ids))).max() > 1e-3  # training changed it


def test_study_configs_have_the_study_step_counts_at_its_trace_counts():
    """Steps through `plan_run` (what run_sft trains on, hold-out included) for each row of Table 12 at
    the study's trace count; a hold-out taken before planning (eval_fraction 0.02) gave A 234, not 238."""
    from pathlib import Path

    from jaxmath.config import load_config
    from jaxmath.sections import sft_config

    configs = Path(__file__).resolve().parents[1] / "configs"

    def build(name):
        return sft_config(load_config(str(configs / name)))

    def steps(cfg, traces):
        plan = sft.plan_run([TokenizedExample([1] * 100, [False] * 50 + [True] * 50)] * traces, cfg)
        assert len(plan.train) == min(traces, cfg.max_documents or traces)  # none held out
        return len(plan.batches)

    a = build("sft_config_a.py")
    assert (a.lora.rank, a.optimizer.learning_rate, a.batch_size, a.max_seq_len, a.optimizer.b1,
            a.optimizer.b2) == (64, 2e-4, 32, 4096, 0.9, 0.95)
    # paper_summary.md: Config A and B 3,825 traces; v1/v2 390 OlympiadBench; v3 5.4k (custom + OpenR1:
    # its files hold 3,825 custom and thousands of OpenR1 traces, of which the first 5,400 train); v4 861.
    study = {"sft_config_a.py": (3825, 238), "sft_config_b.py": (3825, 119), "sft_sweep.py:v1": (390, 9),
             "sft_sweep.py:v2": (390, 36), "sft_sweep.py:v3": (3825 + 9000, 168), "sft_sweep.py:v4": (861, 53),
             "sft_sweep.py:a": (3825, 238), "sft_sweep.py:b": (3825, 119)}
    assert {name: steps(build(name), traces) for name, (traces, _) in study.items()} == \
        {name: count for name, (_, count) in study.items()}
    # A hold-out, when asked for, leaves the training set (and says so in the count).
    held = dataclasses.replace(a, eval_fraction=0.02)
    plan = sft.plan_run([TokenizedExample([1] * 100, [False] * 50 + [True] * 50)] * 3825, held)
    assert (len(plan.train), len(plan.eval), len(plan.batches)) == (3749, 76, 234)
    with pytest.raises(ValueError, match="multiple"):
        SFTConfig(batch_size=6, micro_batch_size=4)
