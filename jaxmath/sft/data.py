"""SFT data: trace files to tokenized chat documents, and the order in which a run sees them.

    examples = load_sft_examples(paths, tokenizer)          # JSONL traces -> TokenizedExample list
    plan = plan_run(examples, cfg)                          # hold-out, then the whole run's batches

`plan_run` is what `run_sft` trains on, so a step count computed with it (tests/test_sft.py, at the
study's trace counts) is the run's.

Data order is a pure function of (seed, epoch): each pass shuffles the documents with
`np.random.default_rng([seed, epoch])`, packs them (first fit) or gives each its own row, and cuts
the rows into batches, dropping a partial last batch. The whole plan is rebuilt on resume, so a
checkpoint's data cursor is just the step number.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from absl import logging

from jaxmath.data.chat import TokenizedExample, tokenize_chat
from jaxmath.data.datasets import DataError
from jaxmath.data.packing import pack_plan, truncate
from jaxmath.data.prompts import build_messages


def load_sft_examples(paths: Sequence[str | os.PathLike], tokenizer: Any, *, max_trace_chars: int = 0,
                      sources: Sequence[str] = (), enable_thinking: bool = False) -> list[TokenizedExample]:
    """Chat-formatted, tokenized documents from JSONL trace files.

    A row holds `messages` (a chat, used as is), or `problem` plus `trace` (one assistant answer,
    e.g. jaxmath.distill's output; rows with `correct: false` are skipped) or `traces` (a list, one
    document each, e.g. OpenR1 rows). Problems get the same user turn as evaluation
    (`jaxmath.data.prompts.build_messages`: the problem, then the \\boxed{} instruction).
    sources: keep only rows whose `source` field is listed (empty: all); max_trace_chars > 0 drops
    traces at least that long.
    """
    examples = []
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"SFT trace file {path} not found; write one with `python -m jaxmath.main "
                                    "--config=configs/distill.py` or fix sft.train_files / data.dir")
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{line_number} is not valid JSON ({e}); each line must be one "
                                    "JSON object") from e
                if sources and row.get("source") not in sources:
                    continue
                if "messages" in row:
                    chats = [row["messages"]]
                elif "problem" in row and ("trace" in row or "traces" in row):
                    if row.get("correct") is False:
                        continue
                    traces = [row["trace"]] if "trace" in row else list(row["traces"])
                    chats = [build_messages(row["problem"]) + [{"role": "assistant", "content": t}] for t in traces
                             if not max_trace_chars or len(t) < max_trace_chars]
                else:
                    raise DataError(f"{path}:{line_number} has neither `messages` nor `problem` with "
                                     "`trace`/`traces`; see jaxmath.sft.data.load_sft_examples")
                examples += [tokenize_chat(tokenizer, chat, enable_thinking=enable_thinking) for chat in chats]
    return examples


def prepare(examples: Sequence[TokenizedExample], max_seq_len: int, what: str) -> list[TokenizedExample]:
    """The documents cut to one row each (`truncate`), those left without a loss token dropped;
    both counted in the log."""
    kept = [t for t in (truncate(e, max_seq_len) for e in examples) if t is not None]
    cut = sum(len(e.input_ids) > max_seq_len + 1 for e in examples)
    if cut:
        logging.warning("%s: %d of %d documents are longer than max_seq_len %d + 1 tokens and were truncated",
                        what, cut, len(examples), max_seq_len)
    if len(kept) < len(examples):
        logging.warning("%s: dropped %d documents with no loss token within max_seq_len", what,
                        len(examples) - len(kept))
    return kept


def split_eval(examples: list[TokenizedExample], fraction: float, seed: int
               ) -> tuple[list[TokenizedExample], list[TokenizedExample]]:
    """(train, eval): `fraction` of the documents held out, chosen by seed; train keeps its order."""
    order = np.random.default_rng([seed, 1 << 20]).permutation(len(examples))
    n_eval = max(1, int(round(fraction * len(examples))))
    return [examples[i] for i in sorted(order[n_eval:])], [examples[i] for i in order[:n_eval]]


def _epoch_batches(lengths: Sequence[int], cfg, epoch: int) -> list[list[list[int]]]:
    """One pass: [batch][row] -> document indices."""
    order = np.random.default_rng([cfg.seed, epoch]).permutation(len(lengths))
    rows = pack_plan([lengths[i] for i in order], cfg.max_seq_len, cfg.pack)
    rows = [[int(order[i]) for i in row] for row in rows]
    return [rows[b * cfg.batch_size:(b + 1) * cfg.batch_size] for b in range(len(rows) // cfg.batch_size)]


def plan_batches(lengths: Sequence[int], cfg) -> tuple[list[list[list[int]]], list[int]]:
    """The run's batches (each a list of rows of document indices) and the epoch of each.

    lengths: positions each document needs (tokens - 1); cfg: an SFTConfig (seed, max_seq_len, pack,
    batch_size, epochs, steps)."""
    batches, epochs = [], []
    epoch = 0
    while (cfg.steps and len(batches) < cfg.steps) or (not cfg.steps and epoch < cfg.epochs):
        per_epoch = _epoch_batches(lengths, cfg, epoch)
        if not per_epoch:
            from jaxmath.config import ConfigError

            raise ConfigError(f"one pass over the data gives fewer than sft.batch_size={cfg.batch_size} rows; "
                             "lower sft.batch_size or add data")
        batches += per_epoch
        epochs += [epoch] * len(per_epoch)
        epoch += 1
    if cfg.steps:
        batches, epochs = batches[:cfg.steps], epochs[:cfg.steps]
    return batches, epochs


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What one SFT run trains on: the documents, the held-out ones, and [step][row] -> document."""

    train: list[TokenizedExample]
    eval: list[TokenizedExample]
    batches: list[list[list[int]]]
    epochs: list[int]


def plan_run(examples: Sequence[TokenizedExample], cfg,
             eval_examples: Sequence[TokenizedExample] | None = None) -> RunPlan:
    """The run's training documents (the first cfg.max_documents when > 0, cut to max_seq_len), its
    hold-out and its batches.

    The hold-out (cfg.eval_fraction of the documents, when no `eval_examples` are given) comes out
    of the training set before batches are planned, so it lowers the step count: the study's
    configs (configs/sft_sweep.py) keep it off, their counts assume every trace trains."""
    examples = list(examples)
    if cfg.max_documents:
        if len(examples) < cfg.max_documents:
            logging.warning("sft.max_documents=%d but the trace files hold %d documents; training on all",
                            cfg.max_documents, len(examples))
        examples = examples[:cfg.max_documents]
    train = prepare(examples, cfg.max_seq_len, "train")
    if eval_examples is None and cfg.eval_fraction > 0:
        train, eval_examples = split_eval(train, cfg.eval_fraction, cfg.seed)
    held_out = prepare(eval_examples, cfg.max_seq_len, "eval") if eval_examples else []
    batches, epochs = plan_batches([len(e.input_ids) - 1 for e in train], cfg)
    return RunPlan(train, held_out, batches, epochs)
