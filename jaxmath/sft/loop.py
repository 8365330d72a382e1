"""The SFT host loop: data order, the jitted step, eval loss, checkpoints, exact resume, HF export.

    result = run_sft(model, examples, SFTConfig(...), workdir, tokenizer=tokenizer)

The train state comes from `jaxmath.train_state.init_or_restore` (the set-up GRPO uses too), the
batches from `jaxmath.sft.data.plan_run`, rebuilt whole on resume, so N steps + resume + N
steps equals 2N steps.

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
from flax import nnx

from jaxmath import train_state
from jaxmath.checkpoint import ON_DAMAGED, CheckpointManager, TrainState
from jaxmath.data.chat import TokenizedExample
from jaxmath.data.packing import pack_examples, pack_plan
from jaxmath.metrics import MetricsWriter, log_line, progress
from jaxmath.model import lora as lora_lib
from jaxmath.model import sharding
from jaxmath.model.lora import LoRAConfig
from jaxmath.optim import OptimizerConfig, lr_at, make_optimizer
from jaxmath.sft import data as sft_data
from jaxmath.sft.step import make_eval_step, make_sft_step, stack_micro


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """One SFT run. The defaults follow the study's Config A (LoRA rank 64, lr 2e-4 with linear decay
    to 0, batch 32, max_seq_len 4096, Adam b1 0.9 / b2 0.95, assistant-only loss); Config A itself
    runs 2 epochs, 238 steps over 3,825 traces (configs/sft_config_a.py).

    batch_size:       sequences (pack=False) or packed rows (pack=True) per optimizer step
    micro_batch_size: rows per forward/backward pass; batch_size must be a multiple (0 = batch_size)
    max_seq_len:      positions per row; longer examples are truncated (counted and logged)
    epochs, steps:    steps=0 runs `epochs` passes over the data, each pass floor(rows / batch_size)
                      steps (a partial last batch is dropped: 3,825 traces / 32 = 119 steps, the study's
                      count); steps > 0 runs exactly that many, starting further passes as needed
    eval_fraction:    fraction of the examples held out for eval loss when no eval set is given; they
                      leave the training set, so the step count drops (off in the study's configs)
    eval_every:       steps between eval-loss measurements (0 = only at the end)
    checkpoint_every: steps between checkpoints (0 = only at the end)
    keep_last:        newest checkpoints kept (older ones are deleted as new ones are written)
    seed:             the run's seed: data order and LoRA's initial adapters
    log_every:        steps between metric lines in the log (every step is in metrics.jsonl)
    pack:             pack several examples into each max_seq_len row (False: one example per row)
    on_damaged:       when the newest checkpoint of the workdir is damaged on resume: "fall_back"
                      (one warning line, rename it `<step>.damaged`, resume from the newest good one)
                      or "refuse" (stop with one line; nothing is moved)
    lora:             rank > 0 trains fresh adapters only (base frozen); rank 0 trains every nnx.Param
    optimizer:        AdamW and its schedule; total_steps 0 is the run's step count
    chunk_size:       token positions per LM-head chunk
    remat:            rematerialize each decoder layer in the backward pass (per model.remat policy)
    export:           at the end, merge LoRA and write an HF-format model to <workdir>/export
    train_files:      JSONL files of traces for `python -m jaxmath.main` (relative to data.dir); rows
                      hold `messages`, or `problem` with `trace` (jaxmath.distill output) or `traces`
    train_sources:    keep only rows whose `source` is listed (empty: all rows)
    max_trace_chars:  drop traces at least this long (0 keeps all; the study filtered OpenR1 at 4,000)
    max_documents:    > 0: train on the first this many documents, in train_files order (sweep v3's
                      5.4k mix: every custom trace, then OpenR1 traces up to 5,400)
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
    on_damaged: str = "fall_back"
    seed: int = 0
    log_every: int = 1
    lora: LoRAConfig = LoRAConfig()
    optimizer: OptimizerConfig = OptimizerConfig(learning_rate=2e-4, schedule="warmup_linear", b2=0.95)
    chunk_size: int = 1024
    remat: bool = True
    export: bool = True
    train_files: tuple[str, ...] = ()
    train_sources: tuple[str, ...] = ()
    max_trace_chars: int = 0
    max_documents: int = 0

    def __post_init__(self):
        micro = self.micro_batch_size or self.batch_size
        if self.batch_size < 1 or micro < 1 or self.batch_size % micro:
            raise ValueError(f"sft.batch_size ({self.batch_size}) must be a positive multiple of "
                             f"sft.micro_batch_size ({self.micro_batch_size}); 0 means no accumulation")
        if self.max_seq_len < 2:
            raise ValueError(f"sft.max_seq_len must be >= 2, got {self.max_seq_len}")
        if self.steps < 0 or self.epochs < 0 or (self.steps == 0 and self.epochs == 0):
            raise ValueError("set sft.steps > 0 or sft.epochs > 0 (steps=0 means: run `epochs` passes)")
        if self.max_documents < 0:
            raise ValueError(f"sft.max_documents must be >= 0 (0: all), got {self.max_documents}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"sft.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.on_damaged not in ON_DAMAGED:
            raise ValueError(f"sft.on_damaged must be one of {ON_DAMAGED}, got {self.on_damaged!r}")

    @property
    def micro(self) -> int:
        return self.micro_batch_size or self.batch_size

    @property
    def accum_steps(self) -> int:
        return self.batch_size // self.micro


def _eval_loss(eval_step, trainable, frozen, examples, cfg: SFTConfig, shard) -> float:
    rows = pack_plan([len(e.input_ids) - 1 for e in examples], cfg.max_seq_len, cfg.pack)
    nll, count = 0.0, 0.0
    for start in range(0, len(rows), cfg.micro):
        arrays = pack_examples(examples, cfg.max_seq_len, rows[start:start + cfg.micro], num_rows=cfg.micro)
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
    mesh: shards each batch over the mesh's batch axes (default: the mesh the model is on).
    stop_after_step: stop after this step as if killed (checkpoint written), for preemption tests.
    Resumes from the latest checkpoint in <workdir>/checkpoints if there is one.
    """
    workdir = Path(workdir)
    plan = sft_data.plan_run(examples, cfg, eval_examples)
    examples, eval_examples, batches, epochs = plan.train, plan.eval, plan.batches, plan.epochs
    total_steps = len(batches)

    try:
        optim_cfg = train_state.resolve_total_steps(cfg.optimizer, total_steps)
    except ValueError as e:
        from jaxmath.config import ConfigError

        raise ConfigError(f"this SFT run has {total_steps} steps ({len(examples)} documents, batch_size "
                         f"{cfg.batch_size}); {e}. Lower optimizer.warmup_steps or raise steps/epochs") from e
    manager = CheckpointManager(workdir / "checkpoints", keep_last=max(cfg.keep_last, 1), on_damaged=cfg.on_damaged)
    # Closed on every way out (a damaged checkpoint refused, a failed step), so no orbax thread
    # or pending write outlives the loop.
    with manager:
        setup = train_state.init_or_restore(model, optim_cfg, lora_cfg=cfg.lora, seed=cfg.seed, total_steps=total_steps,
                                            checkpoints=manager, mesh=mesh, make_optimizer=_optimizer)
        step_fn, eval_step = _compiled_steps(setup.graphdef, setup.optimizer, cfg.chunk_size, cfg.remat, not cfg.pack)
        frozen, state = setup.frozen, setup.state
        trainable, opt_state, start = state.params, state.opt_state, state.step
        shard = _sharder(setup.mesh)
        config_json = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))

        def save(step: int) -> None:  # metrics.jsonl has the step's metrics; nothing ranks SFT checkpoints
            saved = TrainState(trainable, opt_state, step, {"step": step, "epoch": epochs[step - 1]}, state.rng_key,
                               config_json)
            manager.save(step, saved)

        last: dict[str, float] = {}
        throughput = []
        end = total_steps if stop_after_step is None else min(total_steps, stop_after_step)
        # Records are numbered by updates done (1..), so the checkpoint at `start` covers records <= start.
        with MetricsWriter(workdir, tensorboard=False, resume_step=start + 1) as writer:
            bar = progress(end - start, desc="sft")
            for step in range(start, end):
                arrays = pack_examples(examples, cfg.max_seq_len, batches[step], num_rows=cfg.batch_size)
                real_tokens = int((arrays["segment_ids"] > 0).sum())
                t0 = time.perf_counter()
                trainable, opt_state, metrics = step_fn(trainable, frozen, opt_state,
                                                        shard(stack_micro(arrays, cfg.accum_steps), micro=True))
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                seconds = time.perf_counter() - t0
                last = {**metrics, "lr": lr_at(setup.optim_cfg, step), "epoch": epochs[step], "step_seconds": seconds,
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
                    save(done)
                bar.update(1)
            bar.close()

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
    from jaxmath.distributed import barrier, is_writer, to_host
    from jaxmath.model.hf_io import save_pretrained

    lora_lib.merge_lora(model)
    # Every process of a job gathers the weights (their shards are spread over the processes); process 0 writes.
    state = to_host(nnx.state(model)) if jax.process_count() > 1 else model
    if is_writer():
        save_pretrained(state, str(out_dir), config=model.config)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(str(out_dir))
    barrier("jaxmath_sft_export")
    return Path(out_dir)


@functools.lru_cache(maxsize=4)
def _optimizer(optim_cfg: OptimizerConfig):
    """One optax transformation per optimizer config, so `_compiled_steps` finds the same object."""
    return make_optimizer(optim_cfg)


@functools.lru_cache(maxsize=4)
def _compiled_steps(graphdef, optimizer, chunk_size: int, remat: bool, one_document_per_row: bool):
    """(step, eval_step) shared by runs with the same model structure and optimizer, so a second
    run_sft in one process (a resumed run, a sweep, the demo) reuses the compiled step.
    one_document_per_row: unpacked rows (sft.pack=False), described to the model by their lengths."""
    return (make_sft_step(graphdef, optimizer, chunk_size=chunk_size, remat=remat,
                          one_document_per_row=one_document_per_row),
            make_eval_step(graphdef, chunk_size=chunk_size, one_document_per_row=one_document_per_row))


def _sharder(mesh: jax.sharding.Mesh | None):
    """Puts host batches on the mesh, rows split over the batch axes (identity without a mesh)."""
    if mesh is None:
        return lambda arrays, micro=False: arrays

    def shard(arrays: dict[str, np.ndarray], micro: bool = False) -> dict[str, jax.Array]:
        return sharding.shard_batch(arrays, mesh, batch_dim=1 if micro else 0)

    return shard
