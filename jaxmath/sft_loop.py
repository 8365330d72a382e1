"""The SFT host loop: data order, the jitted step, eval loss, checkpoints, exact resume, HF export.

    result = run_sft(model, examples, SFTConfig(...), workdir, tokenizer=tokenizer)

Data order is a pure function of (seed, epoch): each pass shuffles the documents with
`np.random.default_rng([seed, epoch])`, packs them (first fit) or gives each its own row, and cuts
the rows into batches, dropping a partial last batch. The whole plan is rebuilt on resume, so the
checkpoint's data cursor is just the step number, and N steps + resume + N steps equals 2N steps.

Outputs under `workdir`: checkpoints/<step>/ (trainable params, optimizer state, step, cursor, key,
config), metrics.jsonl (step, loss, grad_norm, lr, tokens_per_s, step_seconds, eval_loss),
and with `export` an HF-format model in export/ (LoRA merged, tokenizer saved) that GRPO's
`model.path` can point at.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging
from flax import nnx

from jaxmath import sft
from jaxmath.checkpoint import CheckpointManager, TrainState
from jaxmath.metrics import MetricsWriter, log_line, progress
from jaxmath.model import lora as lora_lib
from jaxmath.model import sharding
from jaxmath.optim import lr_at, make_optimizer
from jaxmath.sft import SFTConfig, TokenizedExample


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
    from jaxmath.data.prompts import build_messages

    examples = []
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"SFT trace file {path} not found; write one with `python -m jaxmath.main "
                                    "--config=configs/distill.py` or fix sft.train_files / data.dir")
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
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
                    raise ValueError(f"{path}:{line_number} has neither `messages` nor `problem` with "
                                     "`trace`/`traces`; see jaxmath.sft_loop.load_sft_examples")
                examples += [sft.tokenize_chat(tokenizer, chat, enable_thinking=enable_thinking) for chat in chats]
    return examples


def _prepare(examples: Sequence[TokenizedExample], max_seq_len: int, what: str) -> list[TokenizedExample]:
    kept = [t for t in (sft.truncate(e, max_seq_len) for e in examples) if t is not None]
    cut = sum(len(e.input_ids) > max_seq_len + 1 for e in examples)
    if cut:
        logging.warning("%s: %d of %d documents are longer than max_seq_len %d + 1 tokens and were truncated",
                        what, cut, len(examples), max_seq_len)
    if len(kept) < len(examples):
        logging.warning("%s: dropped %d documents with no loss token within max_seq_len", what,
                        len(examples) - len(kept))
    return kept


def _epoch_batches(lengths: Sequence[int], cfg: SFTConfig, epoch: int) -> list[list[list[int]]]:
    """One pass: [batch][row] -> document indices."""
    order = np.random.default_rng([cfg.seed, epoch]).permutation(len(lengths))
    rows = sft.pack_plan([lengths[i] for i in order], cfg.max_seq_len, cfg.pack)
    rows = [[int(order[i]) for i in row] for row in rows]
    return [rows[b * cfg.batch_size:(b + 1) * cfg.batch_size] for b in range(len(rows) // cfg.batch_size)]


def plan_batches(lengths: Sequence[int], cfg: SFTConfig) -> tuple[list[list[list[int]]], list[int]]:
    """The run's batches (each a list of rows of document indices) and the epoch of each."""
    batches, epochs = [], []
    epoch = 0
    while (cfg.steps and len(batches) < cfg.steps) or (not cfg.steps and epoch < cfg.epochs):
        per_epoch = _epoch_batches(lengths, cfg, epoch)
        if not per_epoch:
            raise ValueError(f"one pass over the data gives fewer than sft.batch_size={cfg.batch_size} rows; "
                             "lower sft.batch_size or add data")
        batches += per_epoch
        epochs += [epoch] * len(per_epoch)
        epoch += 1
    if cfg.steps:
        batches, epochs = batches[:cfg.steps], epochs[:cfg.steps]
    return batches, epochs


def _eval_loss(eval_step, trainable, frozen, examples, cfg: SFTConfig, shard) -> float:
    rows = sft.pack_plan([len(e.input_ids) - 1 for e in examples], cfg.max_seq_len, cfg.pack)
    nll, count = 0.0, 0.0
    for start in range(0, len(rows), cfg.micro):
        arrays = sft.pack_examples(examples, cfg.max_seq_len, rows[start:start + cfg.micro], num_rows=cfg.micro)
        batch_nll, batch_count = eval_step(trainable, frozen, shard(arrays))
        nll, count = nll + float(batch_nll), count + float(batch_count)
    return nll / max(count, 1.0)


def run_sft(model: nnx.Module, examples: Sequence[TokenizedExample], cfg: SFTConfig, workdir: str | os.PathLike, *,
            eval_examples: Sequence[TokenizedExample] | None = None, tokenizer: Any = None,
            mesh: jax.sharding.Mesh | None = None, stop_after_step: int | None = None) -> dict:
    """Trains `model` in place on `examples` and returns a summary dict.

    model: a jaxmath Qwen3; with cfg.lora.rank > 0 fresh adapters are attached (unless it has some)
      and only they train. On return it holds the trained weights (with export, LoRA merged in).
    eval_examples: held-out documents; default: cfg.eval_fraction of `examples`, chosen by seed.
    tokenizer: saved next to the exported weights (anything with `save_pretrained`).
    mesh: shards each batch over the mesh's batch axes (model already placed on it).
    stop_after_step: stop after this step as if killed (checkpoint written), for preemption tests.
    Resumes from the latest checkpoint in <workdir>/checkpoints if there is one.
    """
    workdir = Path(workdir)
    examples = _prepare(examples, cfg.max_seq_len, "train")
    if eval_examples is None and cfg.eval_fraction > 0:
        order = np.random.default_rng([cfg.seed, 1 << 20]).permutation(len(examples))
        n_eval = max(1, int(round(cfg.eval_fraction * len(examples))))
        eval_examples = [examples[i] for i in order[:n_eval]]
        examples = [examples[i] for i in sorted(order[n_eval:])]
    eval_examples = _prepare(eval_examples, cfg.max_seq_len, "eval") if eval_examples else []
    batches, epochs = plan_batches([len(e.input_ids) - 1 for e in examples], cfg)
    total_steps = len(batches)

    if cfg.lora.enabled and not lora_lib.has_lora(model):
        lora_lib.apply_lora(model, cfg.lora, seed=cfg.seed)
    graphdef, trainable, frozen = sft.split_trainable(model)
    if mesh is not None:
        trainable = sharding.shard_state(trainable, mesh)  # fresh LoRA adapters start on one device
    try:
        opt_cfg = cfg.optimizer_config(total_steps)
    except ValueError as e:
        raise ValueError(f"this SFT run has {total_steps} steps ({len(examples)} documents, batch_size "
                         f"{cfg.batch_size}); {e}. Lower sft.warmup_steps or raise steps/epochs") from e
    optimizer, step_fn, eval_step = _compiled_steps(graphdef, opt_cfg, cfg.chunk_size, cfg.remat, not cfg.pack)
    opt_state = _init_opt_state(optimizer, trainable)
    shard = _sharder(mesh)

    manager = CheckpointManager(workdir / "checkpoints", keep_last=max(cfg.keep_last, 1))
    start, key = 0, jax.random.key(cfg.seed)
    if manager.latest_step() is not None:
        restored = manager.restore(target=TrainState(trainable, opt_state, 0, {}, key, {}))
        trainable, opt_state, start, key = restored.params, restored.opt_state, restored.step, restored.rng_key
        logging.info("sft: resumed from step %d in %s", start, manager.directory)
    config_json = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))

    def save(step: int, metrics: dict) -> None:
        state = TrainState(trainable, opt_state, step, {"step": step, "epoch": epochs[step - 1]}, key, config_json)
        manager.save(step, state, metrics={k: v for k, v in metrics.items() if k in ("loss", "eval_loss")})

    last: dict[str, float] = {}
    throughput = []
    end = total_steps if stop_after_step is None else min(total_steps, stop_after_step)
    # Records are numbered by updates done (1..), so the checkpoint at `start` covers records <= start.
    with MetricsWriter(workdir, tensorboard=False, resume_step=start + 1) as writer:
        bar = progress(end - start, desc="sft")
        for step in range(start, end):
            arrays = sft.pack_examples(examples, cfg.max_seq_len, batches[step], num_rows=cfg.batch_size)
            real_tokens = int((arrays["segment_ids"] > 0).sum())
            t0 = time.perf_counter()
            with sharding.use_mesh(mesh):  # activation constraints apply when the step is traced
                trainable, opt_state, metrics = step_fn(trainable, frozen, opt_state,
                                                        shard(sft.stack_micro(arrays, cfg.accum_steps), micro=True))
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            seconds = time.perf_counter() - t0
            last = {**metrics, "lr": lr_at(opt_cfg, step), "epoch": epochs[step], "step_seconds": seconds,
                    "tokens": real_tokens, "tokens_per_s": real_tokens / seconds}
            throughput.append(last["tokens_per_s"])
            done = step + 1
            if eval_examples and ((cfg.eval_every and done % cfg.eval_every == 0) or done == total_steps):
                last["eval_loss"] = _eval_loss(eval_step, trainable, frozen, eval_examples, cfg, shard)
            writer.write(done, last)
            if cfg.log_every and (done % cfg.log_every == 0 or done == end):
                log_line(done, last, ("loss", "eval_loss", "grad_norm", "lr", "tokens_per_s"),
                         seconds_key="step_seconds")
            if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == end:
                save(done, last)
            bar.update(1)
        bar.close()
    manager.close()

    nnx.update(model, trainable)
    result = {"steps": end, "total_steps": total_steps, "train_documents": len(examples),
              "eval_documents": len(eval_examples), "loss": last.get("loss"), "eval_loss": last.get("eval_loss"),
              # The first step includes compilation; the median is the steady state.
              "tokens_per_s": float(np.median(throughput)) if throughput else None}
    if cfg.export and end == total_steps:
        result["export_dir"] = str(export(model, workdir / "export", tokenizer))
    return result


def export(model: nnx.Module, out_dir: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Merges LoRA adapters into the kernels (in place) and writes an HF-format model that
    `jaxmath.model.from_pretrained`, transformers and vLLM load; the tokenizer is saved beside it."""
    from jaxmath.model.hf_io import save_pretrained

    lora_lib.merge_lora(model)
    save_pretrained(model, str(out_dir))
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(out_dir))
    return Path(out_dir)


@functools.lru_cache(maxsize=4)
def _compiled_steps(graphdef, opt_cfg, chunk_size: int, remat: bool, one_document_per_row: bool):
    """(optimizer, step, eval_step) shared by runs with the same model structure and optimizer, so a
    second run_sft in one process (a resumed run, a sweep, the demo) reuses the compiled step.
    one_document_per_row: unpacked rows (sft.pack=False), described to the model by their lengths."""
    optimizer = make_optimizer(opt_cfg)
    return (optimizer, sft.make_sft_step(graphdef, optimizer, chunk_size=chunk_size, remat=remat,
                                         one_document_per_row=one_document_per_row),
            sft.make_eval_step(graphdef, chunk_size=chunk_size, one_document_per_row=one_document_per_row))


def _init_opt_state(optimizer, trainable):
    """optimizer.init with every leaf on the params' mesh: moments sharded like their parameters
    (a plain jit puts them on one device), counters replicated, so the second step does not
    compile again."""
    return sharding.init_optimizer_state(optimizer, trainable)


def _sharder(mesh: jax.sharding.Mesh | None):
    """Puts host batches on the mesh, rows split over the batch axes (identity without a mesh)."""
    if mesh is None:
        return lambda arrays, micro=False: arrays

    def shard(arrays: dict[str, np.ndarray], micro: bool = False) -> dict[str, jax.Array]:
        return sharding.shard_batch(arrays, mesh, batch_dim=1 if micro else 0)

    return shard
