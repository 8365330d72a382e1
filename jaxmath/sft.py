"""Supervised fine-tuning: the assistant-only loss mask, sequence packing and the jitted SFT step.

The pieces, in the order data flows through them:

    tokenize_chat(tokenizer, messages)   -> TokenizedExample(input_ids, loss_mask)
    pack_plan / pack_examples            -> rows [rows, max_seq_len] of packed (or padded) documents
    make_sft_step(graphdef, optimizer)   -> jitted (trainable, frozen, opt_state, batch) -> new state

The host loop (data order, eval, checkpoints, export) is `jaxmath.sft_loop.run_sft`.

Loss: cross-entropy on assistant tokens only, through the chunked LM head
(`jaxmath.model.head.token_logprobs`), so [batch, seq, vocab] float32 logits never exist. The
assistant tokens are the content of each assistant turn *and its closing `<|im_end|>`* (the model
must learn to stop), but not the newline the template writes after it (never generated), not the
`<|im_start|>assistant\\n` header and not the empty `<think>\\n\\n</think>\\n\\n` block that the
prompt already contains at inference (`enable_thinking=False`). This is what TRL's
`assistant_only_loss` gives with Qwen's `{% generation %}` templates.

Packing: documents are placed first-fit into rows of `max_seq_len` positions; every document keeps
its own segment id (1, 2, ...; 0 is padding) and positions restarting at 0, and the model's
attention never crosses segments, so a packed row computes exactly what separate rows would.
Inputs and targets are shifted per document before packing, so no target crosses a boundary.

Gradient accumulation: a step's batch is [accum, micro, seq]; a `lax.scan` over the micro-batches
sums the token losses' gradients and divides once by the number of loss tokens in the whole batch,
so k micro-batches give the same update as one batch of k * micro rows (up to float rounding).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxmath.model.head import token_logprobs
from jaxmath.model.lora import LoRAConfig, split_trainable  # noqa: F401  (the step's callers split with it)
from jaxmath.model import sharding
from jaxmath.optim import OptimizerConfig, global_norm

F32 = jnp.float32
BATCH_KEYS = ("input_ids", "targets", "segment_ids", "positions", "loss_mask")


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """One SFT run. The study's Config A: lora rank 64, lr 2e-4 linear decay to 0, batch 32, 2 epochs
    (238 steps), max_seq_len 4096, Adam b1 0.9 / b2 0.95, assistant-only loss.

    batch_size:       sequences (pack=False) or packed rows (pack=True) per optimizer step
    micro_batch_size: rows per forward/backward pass; batch_size must be a multiple (0 = batch_size)
    max_seq_len:      positions per row; longer examples are truncated (counted and logged)
    epochs, steps:    steps=0 runs `epochs` passes over the data, each pass floor(rows / batch_size)
                      steps (a partial last batch is dropped: 3,825 traces / 32 = 119 steps, the study's
                      count); steps > 0 runs exactly that many, starting further passes as needed
    eval_fraction:    fraction of the examples held out for eval loss when no eval set is given
    eval_every:       steps between eval-loss measurements (0 = only at the end)
    checkpoint_every: steps between checkpoints (0 = only at the end); keep_last of them are kept
    lora:             rank > 0 trains fresh adapters only (base frozen); rank 0 trains every nnx.Param
    learning_rate .. master_fp32: the optimizer (see jaxmath.optim.OptimizerConfig); total_steps is
                      the run's step count
    chunk_size:       token positions per LM-head chunk
    remat:            rematerialize each decoder layer in the backward pass (per model.remat policy)
    export:           at the end, merge LoRA and write an HF-format model to <workdir>/export
    train_files:      JSONL files of traces for `python -m jaxmath.main` (relative to data.dir); rows
                      hold `messages`, or `problem` with `trace` (jaxmath.distill output) or `traces`
    train_sources:    keep only rows whose `source` is listed (empty: all rows)
    max_trace_chars:  drop traces at least this long (0 keeps all; the study filtered OpenR1 at 4,000)
    """

    batch_size: int = 32
    micro_batch_size: int = 0
    max_seq_len: int = 4096
    pack: bool = False
    epochs: int = 1
    steps: int = 0
    eval_fraction: float = 0.0
    eval_every: int = 0
    checkpoint_every: int = 0
    keep_last: int = 2
    seed: int = 0
    log_every: int = 1
    lora: LoRAConfig = LoRAConfig()
    learning_rate: float = 2e-4
    schedule: str = "warmup_linear"
    warmup_steps: int = 0
    end_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    master_fp32: bool = False
    chunk_size: int = 1024
    remat: bool = True
    export: bool = True
    train_files: tuple[str, ...] = ()
    train_sources: tuple[str, ...] = ()
    max_trace_chars: int = 0

    def __post_init__(self):
        micro = self.micro_batch_size or self.batch_size
        if self.batch_size < 1 or micro < 1 or self.batch_size % micro:
            raise ValueError(f"sft.batch_size ({self.batch_size}) must be a positive multiple of "
                             f"sft.micro_batch_size ({self.micro_batch_size}); 0 means no accumulation")
        if self.max_seq_len < 2:
            raise ValueError(f"sft.max_seq_len must be >= 2, got {self.max_seq_len}")
        if self.steps < 0 or self.epochs < 0 or (self.steps == 0 and self.epochs == 0):
            raise ValueError("set sft.steps > 0 or sft.epochs > 0 (steps=0 means: run `epochs` passes)")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"sft.eval_fraction must be in [0, 1), got {self.eval_fraction}")

    @property
    def micro(self) -> int:
        return self.micro_batch_size or self.batch_size

    @property
    def accum_steps(self) -> int:
        return self.batch_size // self.micro

    def optimizer_config(self, total_steps: int) -> OptimizerConfig:
        """The optimizer for a run of `total_steps` updates (the decay schedule ends there)."""
        return OptimizerConfig(
            learning_rate=self.learning_rate, schedule=self.schedule, warmup_steps=self.warmup_steps,
            total_steps=total_steps, end_lr_ratio=self.end_lr_ratio, b1=self.b1, b2=self.b2, eps=self.eps,
            weight_decay=self.weight_decay, max_grad_norm=self.max_grad_norm, master_fp32=self.master_fp32)


# --- data: the assistant-only mask ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TokenizedExample:
    """One training document. input_ids: [n] token ids; loss_mask: [n] bool, True where the token is
    predicted by the loss (the token itself, not the position before it)."""

    input_ids: list[int]
    loss_mask: list[bool]

    def __post_init__(self):
        if len(self.input_ids) != len(self.loss_mask):
            raise ValueError(f"input_ids ({len(self.input_ids)}) and loss_mask ({len(self.loss_mask)}) "
                             "must have the same length")


def _encode(tokenizer: Any, text: str) -> list[int]:
    # The template writes every special token itself; the tokenizer must add none (no BOS).
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _render(tokenizer: Any, messages: Sequence[dict], generation_prompt: bool, enable_thinking: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt,
                                         enable_thinking=enable_thinking)


def tokenize_chat(tokenizer: Any, messages: Sequence[dict[str, str]], *, enable_thinking: bool = False,
                  end_token: str = "<|im_end|>") -> TokenizedExample:
    """Token ids of `messages` rendered by the tokenizer's chat template, with the loss mask on the
    assistant turns only.

    For each assistant turn i, the conversation before it is rendered with the generation prompt
    (what the model sees at inference) and its tokens must be a prefix of the full conversation's
    tokens; the turn's loss tokens run from there through the first `end_token`, inclusive. The Qwen3
    hybrid template writes an empty think block into the last assistant turn, which the
    `enable_thinking=False` generation prompt also contains, so it stays out of the loss; earlier
    turns (few-shot) carry no think block and match the plain generation prompt instead.

    Raises ValueError when the template renders an assistant turn in a way no generation prompt is a
    prefix of (e.g. a template that rewrites earlier turns); pass pre-tokenized TokenizedExamples then.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat_template; load the model's own tokenizer "
                         "(tokenizer_config.json or chat_template.jinja holds it)")
    end_id = tokenizer.convert_tokens_to_ids(end_token)
    if not isinstance(end_id, int) or end_id == tokenizer.unk_token_id:
        raise ValueError(f"end_token {end_token!r} is not a token of this tokenizer; pass the id that closes "
                         "an assistant turn in its chat template")
    ids = _encode(tokenizer, _render(tokenizer, messages, False, enable_thinking))
    mask = [False] * len(ids)
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant_turns:
        raise ValueError("the conversation has no assistant turn, so there is nothing to train on")
    for i in assistant_turns:
        start = None
        # Longest candidate first: the prompt with the empty think block, then the plain header.
        for thinking in dict.fromkeys((enable_thinking, True)):
            prefix = _encode(tokenizer, _render(tokenizer, messages[:i], True, thinking))
            if ids[:len(prefix)] == prefix:
                start = len(prefix)
                break
        if start is None:
            raise ValueError(f"the chat template's prompt for assistant turn {i} is not a token prefix of the "
                             "rendered conversation, so the assistant tokens cannot be located; tokenize this "
                             "example yourself into a TokenizedExample")
        try:
            end = ids.index(end_id, start) + 1
        except ValueError:
            raise ValueError(f"assistant turn {i} is not closed by {end_token!r} in the rendered conversation; "
                             "pass the template's end-of-turn token as end_token") from None
        mask[start:end] = [True] * (end - start)
    return TokenizedExample(ids, mask)


# --- data: packing --------------------------------------------------------------------------------


def truncate(example: TokenizedExample, max_seq_len: int) -> TokenizedExample | None:
    """Cuts a document to the max_seq_len + 1 tokens that fill one row (inputs are all but the last,
    targets all but the first); None when no loss token is left."""
    ids, mask = example.input_ids[:max_seq_len + 1], example.loss_mask[:max_seq_len + 1]
    if len(ids) < 2 or not any(mask[1:]):
        return None
    return TokenizedExample(list(ids), list(mask))


def pack_plan(lengths: Sequence[int], max_seq_len: int, pack: bool = True) -> list[list[int]]:
    """Which documents go in which row, in the given order: first fit of `lengths` (positions each
    document needs, i.e. tokens - 1) into rows of max_seq_len; one document per row when not pack."""
    if any(n > max_seq_len or n < 1 for n in lengths):
        raise ValueError(f"every document must need 1..{max_seq_len} positions; truncate() them first")
    if not pack:
        return [[i] for i in range(len(lengths))]
    rows: list[list[int]] = []
    free: list[int] = []
    for i, n in enumerate(lengths):
        # Linear first fit is O(docs * rows): fine for the study's thousands of traces.
        for r, room in enumerate(free):
            if n <= room:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(max_seq_len - n)
    return rows


def pack_examples(examples: Sequence[TokenizedExample], max_seq_len: int,
                  rows: Sequence[Sequence[int]] | None = None, num_rows: int | None = None) -> dict[str, np.ndarray]:
    """Materializes rows of documents as arrays, each [num_rows, max_seq_len]:

    input_ids   int32  tokens 0..n-2 of each document
    targets     int32  tokens 1..n-1 (the next token at each position)
    segment_ids int32  1, 2, ... per document within a row; 0 for padding
    positions   int32  restarting at 0 in each document
    loss_mask   bool   True where the target is an assistant token

    rows: document indices per row (default: first-fit `pack_plan` of all examples); num_rows pads
    with empty rows (all padding) to a fixed batch size.
    """
    if rows is None:
        rows = pack_plan([len(e.input_ids) - 1 for e in examples], max_seq_len)
    n = len(rows) if num_rows is None else num_rows
    if n < len(rows):
        raise ValueError(f"num_rows {num_rows} is smaller than the {len(rows)} rows given")
    out = {k: np.zeros((n, max_seq_len), np.int32) for k in BATCH_KEYS[:-1]}
    out["loss_mask"] = np.zeros((n, max_seq_len), bool)
    for r, docs in enumerate(rows):
        at = 0
        for seg, i in enumerate(docs, start=1):
            ids, mask = examples[i].input_ids, examples[i].loss_mask
            k = len(ids) - 1
            if at + k > max_seq_len:
                raise ValueError(f"row {r} overflows max_seq_len {max_seq_len}; build rows with pack_plan")
            out["input_ids"][r, at:at + k] = ids[:-1]
            out["targets"][r, at:at + k] = ids[1:]
            out["segment_ids"][r, at:at + k] = seg
            out["positions"][r, at:at + k] = np.arange(k)
            out["loss_mask"][r, at:at + k] = mask[1:]
            at += k
    return out


# --- the step -------------------------------------------------------------------------------------


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
    logprobs, _ = token_logprobs(hidden, model.head_weight, batch["targets"], chunk_size=chunk_size)
    weights = batch["loss_mask"].astype(F32)
    return -jnp.sum(logprobs * weights), jnp.sum(weights)


def make_sft_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, *, chunk_size: int = 1024,
                  remat: bool = True, one_document_per_row: bool = False):
    """The jitted SFT update: `step(trainable, frozen, opt_state, batch) -> (trainable, opt_state, metrics)`.

    batch: the BATCH_KEYS arrays shaped [accum, micro, seq]; the scan over `accum` adds up gradients of
      the summed token NLL, and the total is divided by the loss-token count of the whole batch.
    trainable and opt_state are donated (their buffers are reused for the outputs).
    metrics: loss (mean NLL per loss token), grad_norm (before clipping), loss_tokens; float32 scalars.
    one_document_per_row: unpacked rows (see `token_nll`).
    """

    def micro_grads(trainable, frozen, micro):
        return jax.value_and_grad(
            lambda t: token_nll(graphdef, t, frozen, micro, chunk_size=chunk_size, remat=remat,
                                one_document_per_row=one_document_per_row)[0])(trainable)

    def step(trainable, frozen, opt_state, batch):
        count = jnp.sum(batch["loss_mask"].astype(F32))
        scale = 1.0 / jnp.maximum(count, 1.0)

        def body(carry, micro):
            nll_sum, grads = carry
            nll, g = micro_grads(trainable, frozen, micro)
            # Summing in float32 keeps bf16 adapters' gradients from losing digits across micro-batches.
            grads = jax.tree.map(lambda a, b: a + b.astype(F32), grads, g)
            return (nll_sum + nll, grads), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, F32), trainable)
        (nll_sum, grads), _ = jax.lax.scan(body, (jnp.zeros((), F32), zeros), batch)
        grads = jax.tree.map(lambda g, p: (g * scale).astype(p.dtype), grads, trainable)
        grad_norm = global_norm(grads)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        trainable, opt_state = sharding.constrain_state((trainable, opt_state))  # outputs keep input shardings
        return trainable, opt_state, {"loss": nll_sum * scale, "grad_norm": grad_norm, "loss_tokens": count}

    return jax.jit(step, donate_argnums=(0, 2))


def make_eval_step(graphdef: nnx.GraphDef, *, chunk_size: int = 1024, one_document_per_row: bool = False):
    """Jitted `(trainable, frozen, batch [rows, seq]) -> (nll_sum, loss_tokens)` for held-out loss."""
    return jax.jit(lambda t, f, b: token_nll(graphdef, t, f, b, chunk_size=chunk_size, remat=False,
                                             one_document_per_row=one_document_per_row))


def stack_micro(arrays: dict[str, np.ndarray], accum_steps: int) -> dict[str, np.ndarray]:
    """[batch, seq] -> [accum_steps, batch / accum_steps, seq] for `make_sft_step`."""
    return {k: v.reshape(accum_steps, v.shape[0] // accum_steps, *v.shape[1:]) for k, v in arrays.items()}
