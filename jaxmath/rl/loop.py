"""The GRPO host loop: sample, reward, advantage, step, sync, log, save. One readable function.

Where it departs from the study (TRL GRPOTrainer / tinker-cookbook):
- the trainer's logprobs are always compared with the rollout engine's and the difference is
  logged (`mismatch/*`); TRL only does so in recent versions and only with vLLM;
- one optimizer update per batch of rollouts by default (`num_iterations`), with an "old policy"
  logprob pass only when more than one update reuses the rollouts or importance correction asks;
- groups whose rewards all match are counted every step, and optionally replaced by informative
  groups from an oversampled batch at a static shape (DAPO's dynamic sampling);
- a checkpoint holds everything the run needs (trainable params, optimizer, step, data cursor,
  PRNG key, config), so a resumed run continues bit for bit;
- `max_staleness=1` overlaps the next step's rollout with this step's training (one policy version
  behind, the importance ratio taken against the policy that sampled; see `train`), and every step
  writes its rollout and train intervals (`timeline/*`) so the overlap can be seen.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Sequence

import jax
import numpy as np
from absl import logging
from flax import nnx

from jaxmath import checkpoint as ckpt_lib
from jaxmath import metrics as metrics_lib
from jaxmath import optim, train_state
from jaxmath.data.datasets import Example
from jaxmath.distributed import to_host
from jaxmath.model import lora as lora_lib
from jaxmath.model import sharding
from jaxmath.model.qwen3 import Qwen3
from jaxmath.reward import correctness_rewards
from jaxmath.rl import grpo
from jaxmath.rl import step as step_lib
from jaxmath.rollout.mismatch import logprob_mismatch
from jaxmath.rollout.types import FINISH_LENGTH, RolloutEngine, SamplingParams


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """The run: how many steps, how much sampling, and what to watch.

    steps:                 optimizer steps (one batch of rollouts each, times num_iterations updates)
    prompts_per_step:      groups per step; rows = prompts_per_step * num_generations
    num_generations:       K, completions per prompt
    max_prompt_tokens:     the longest prompt (chat template included) a training problem may have; a
                           longer one stops the run in one line naming the problem
    max_completion_tokens: the rollouts' length budget (also Dr. GRPO's constant loss normalizer)
    temperature:           the rollouts' sampling temperature (the trainer's logprobs use it too)
    num_iterations:        policy updates per batch of rollouts (>1 recomputes old logprobs)
    adv_scale:             "group_std" divides each reward's distance from its group's mean by the
                           group's std (GRPO, the study); "none" only centers it (Dr. GRPO)
    adv_std:               the group std of adv_scale: "sample" (ddof=1, TRL's torch.std, the study's
                           local runs) or "population" (ddof=0, the GRPO paper's notation)
    adv_eps:               added to the group std before dividing (TRL's 1e-4)
    filter_groups:         replace zero-variance groups with informative ones from `oversample` x
                           prompts_per_step sampled prompts (shapes stay static)
    oversample:            with filter_groups, prompts sampled per group kept (>= 1.0)
    reward_workers:        processes grading the rewards (0: in this process)
    reward_timeout:        seconds one answer's grading may take before it scores 0
    answer_fallback:       where the reward looks for an answer without a \\boxed{}: "" (nowhere: boxed
                           only, as in the study), "gsm8k" ("#### N", then the last number) or
                           "answer_is" ("the answer is ...")
    prompt_bucket:         prompt widths are padded up to a multiple of this, so compiled shapes repeat
    seed:                  the run's seed: prompt order, sampling and LoRA's initial adapters
    checkpoint_every:      steps between checkpoints (0: at the end only; the last step is always saved)
    keep_last:             newest checkpoints kept (older ones are deleted as new ones are written)
    keep_best:             also keep this many checkpoints with the best eval_accuracy (needs eval_every)
    eval_every:            steps between evaluations of the `eval` section's benchmarks (0: none)
    plot_every:            steps between redrawing the metric plots in <workdir>/plots (0: at the end only)
    warn_truncation:       warn when more than this fraction of a step's completions hit
                           max_completion_tokens
    warn_zero_std:         warn when more than this fraction of a step's groups have identical rewards
                           (they teach nothing)
    early_stop_*:          the study's three saturation signals (section 5.5: "reward ~0.95 by step 50,
                           gradient norms dropping to ~1e-7 and the importance sampling ratio falling to
                           ~0.1"); the run stops, with a checkpoint and a log line naming the signal,
                           when one holds for `early_stop_patience` consecutive steps (0: that signal off):
      early_stop_reward:     reward_mean >= this (the study: 0.95)
      early_stop_grad_norm:  grad_norm <= this (the study: 1e-7)
      early_stop_ratio:      mismatch/seq_min_ratio_median <= this (the study: 0.1): each completion's
                             smallest per-token ratio pi_trainer / pi_engine, the median over the step's
                             completions. On-policy the loss's own ratio is exactly 1; the study's ratio
                             can only be TRL's vLLM importance-sampling ratio, whose minimum over every
                             token of a step TRL logs (sampling/importance_sampling_ratio/min). That
                             minimum is one token's: a single outlier token (one rare token vLLM's bf16
                             sampler drew) trips it. Per completion the minimum keeps what TRL's
                             statistic measures, and the median over completions holds only when at
                             least half of them carry such a token, so no one token (or completion)
                             stops a run. (A low quantile of all tokens was the other candidate; with
                             few tokens in a step one token is that quantile, and a mean ratio stays ~1
                             in expectation under the engine's own samples, so it never reaches 0.1.)
      early_stop_patience:   consecutive steps a signal must hold before the run stops
    max_staleness:         0: synchronous (sample, then train, then sample). 1: the next step's rollout is
                           generated in a background thread, with the weights the engine holds (the policy
                           of this step's start), while this step trains; it then trains one policy
                           version behind, with the ratio taken against the policy that sampled (`train`)
    rollout_devices:       0: the sampler shares the trainer's devices. N > 0: the JAX sampler runs on the
                           last N devices (a mesh of its own, fsdp over them) and the trainer on the
                           others; the engine's update_weights moves each update's weights (LoRA merged)
                           to the sampler's mesh. Read where the meshes are built (jaxmath.runs), not here
    on_damaged:            when the newest checkpoint of the workdir is damaged on resume: "fall_back"
                           (one warning line, rename it `<step>.damaged`, resume from the newest good
                           one) or "refuse" (stop with one line; nothing is moved)
    """

    steps: int = 100
    prompts_per_step: int = 8
    num_generations: int = 8
    max_prompt_tokens: int = 1024
    max_completion_tokens: int = 2048
    temperature: float = 1.0
    num_iterations: int = 1
    adv_scale: str = "group_std"
    adv_std: str = "sample"
    adv_eps: float = 1e-4
    filter_groups: bool = False
    oversample: float = 1.5
    reward_workers: int = 0
    reward_timeout: float = 1.0
    answer_fallback: str = ""
    prompt_bucket: int = 64
    checkpoint_every: int = 50
    keep_last: int = 3
    keep_best: int = 0
    on_damaged: str = "fall_back"
    eval_every: int = 0
    plot_every: int = 10
    early_stop_reward: float = 0.0
    early_stop_grad_norm: float = 0.0
    early_stop_ratio: float = 0.0
    early_stop_patience: int = 3
    warn_truncation: float = 0.5
    warn_zero_std: float = 0.8
    max_staleness: int = 0
    rollout_devices: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError("rl.temperature must be > 0: greedy rollouts have no policy gradient")
        if self.num_generations < 2:
            raise ValueError("num_generations must be >= 2: GRPO's advantages compare completions of a prompt")
        if self.num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got {self.num_iterations}")
        if min(self.early_stop_reward, self.early_stop_grad_norm, self.early_stop_ratio) < 0 or \
                self.early_stop_patience < 1:
            raise ValueError("rl.early_stop_reward / _grad_norm / _ratio must be >= 0 (0: off) and "
                             f"rl.early_stop_patience >= 1, got patience {self.early_stop_patience}")
        if self.filter_groups and self.oversample < 1.0:
            raise ValueError("filter_groups needs oversample >= 1.0 (prompts sampled per group kept)")
        if self.max_staleness not in (0, 1):
            raise ValueError(f"rl.max_staleness must be 0 (synchronous) or 1 (one step of overlap), "
                             f"got {self.max_staleness}")
        if self.on_damaged not in ckpt_lib.ON_DAMAGED:
            raise ValueError(f"rl.on_damaged must be one of {ckpt_lib.ON_DAMAGED}, got {self.on_damaged!r}")

    @property
    def prompts_sampled(self) -> int:
        return math.ceil(self.prompts_per_step * self.oversample) if self.filter_groups else self.prompts_per_step


class PromptIterator:
    """Batches of examples in a seeded order per epoch; its cursor makes resumption exact."""

    def __init__(self, examples: Sequence[Example], seed: int, cursor: dict | None = None):
        if not examples:
            from jaxmath.data.datasets import DataError

            raise DataError("the training set is empty; check data.dir and the training data name")
        self.examples = list(examples)
        self.seed = seed
        self.epoch = int((cursor or {}).get("epoch", 0))
        self.index = int((cursor or {}).get("index", 0))

    @property
    def cursor(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.examples))

    def next(self, n: int) -> list[Example]:
        out = []
        order = self._order()
        while len(out) < n:
            if self.index >= len(order):
                self.epoch, self.index = self.epoch + 1, 0
                order = self._order()
            out.append(self.examples[order[self.index]])
            self.index += 1
        return out


def _rollout_seed(key: jax.Array) -> tuple[jax.Array, int]:
    key, sub = jax.random.split(key)
    return key, int(jax.random.randint(sub, (), 0, 2 ** 31 - 1))


def train(model: Qwen3, examples: Sequence[Example], *, encode: Callable[[Sequence[Example]], list[list[int]]],
          decode: Callable[[Sequence[int]], str], cfg: GRPOConfig, loss_cfg: step_lib.LossConfig,
          optim_cfg: optim.OptimizerConfig, lora_cfg: lora_lib.LoRAConfig, workdir: str,
          engine: RolloutEngine, stop_token_ids: Sequence[int] = (),
          evaluate: Callable[[Qwen3, int], dict[str, float]] | None = None,
          run_config: dict | None = None) -> dict[str, Any]:
    """Train `model` in place with GRPO; returns the last step's metrics plus `stopped_early`.

    encode: examples -> prompt token ids (chat template, few-shot prefix); decode: ids -> text.
    engine: generates rollouts; `update_weights(model)` after every update, `sleep` / `wake_up` around
      the train phase (see `RolloutEngine`).
    evaluate: (model, step) -> metrics such as {"eval_accuracy": ...}, every `cfg.eval_every` steps.

    cfg.max_staleness=1 (overlap): step t+1's rollout is generated in a background thread with the
    weights the engine holds (step t's starting policy) while step t trains; JAX releases the GIL in
    its compiled calls, so sampling and training run at once. The engine is only ever touched by one
    thread at a time: the main thread waits for the rollout before `update_weights`, an evaluation
    or a return. Step t+1 then trains one version behind, so it is off-policy: its old_logprobs come
    from a logprob pass with step t's starting weights, kept for that pass. The engine samples from a
    copy of the trainable params (the train step donates the trainer's buffers), and that copy is what
    is kept: with a rollout in flight the loop holds two such copies (the one sampling, the one just
    given to the engine) beside the trainer's own. That is the exact pi_old of the loss: the trainer's own computation of the sampling
    policy, so the ratio measures only the policy's change between versions. The engine's logprobs
    are the same policy through other numerics (a KV cache, bf16 decode, vLLM's kernels); they stay
    what they are in the synchronous loop: the `mismatch/*` metrics (here against that pass) and
    `loss.tis_cap`'s truncated importance weights. The first step, and the step after every
    checkpoint, sample with the current weights (the pipeline drains before a checkpoint): a
    checkpoint never has a rollout in flight, so a resumed run regenerates nothing and continues
    exactly as the uninterrupted run does. The engine does not sleep in the train phase (it is
    generating). Refused: more than one process (the two threads' collectives could interleave
    differently on each process).
    """
    if loss_cfg.beta > 0 and not (lora_cfg.enabled or lora_lib.has_lora(model)):
        from jaxmath.config import ConfigError

        raise ConfigError("a KL term (loss.beta > 0) needs LoRA: the reference policy is the base model with "
                         "adapters off; full-parameter KL (a second copy of the weights) is not supported")
    overlap = cfg.max_staleness > 0
    if overlap and jax.process_count() > 1:
        from jaxmath.config import ConfigError

        raise ConfigError(f"rl.max_staleness=1 runs in one process only ({jax.process_count()} here): set "
                          "rl.max_staleness=0")
    manager = ckpt_lib.CheckpointManager(os.path.join(workdir, "checkpoints"), keep_last=cfg.keep_last,
                                         keep_best=cfg.keep_best,
                                         best_metric="eval_accuracy" if cfg.keep_best else None,
                                         on_damaged=cfg.on_damaged)
    # Closed on every way out (a damaged checkpoint refused, a failed step), so no orbax thread
    # or pending write outlives the loop.
    with manager:
        setup = train_state.init_or_restore(model, optim_cfg, lora_cfg=lora_cfg, seed=cfg.seed, total_steps=cfg.steps,
                                            checkpoints=manager)
        graphdef, frozen, mesh, optim_cfg = setup.graphdef, setup.frozen, setup.mesh, setup.optim_cfg
        trainable, opt_state, start_step, key = (setup.state.params, setup.state.opt_state, setup.state.step,
                                                 setup.state.rng_key)
        data = PromptIterator(examples, cfg.seed, setup.state.data_cursor if setup.restored else None)
        # Overlapped steps always take old_logprobs from a logprob pass (the sampling policy's).
        on_policy = not overlap and cfg.num_iterations == 1 and loss_cfg.tis_cap == 0.0
        train_step = step_lib.make_train_step(graphdef, setup.optimizer, loss_cfg, on_policy=on_policy,
                                              temperature=cfg.temperature,
                                              max_completion_tokens=cfg.max_completion_tokens)
        logprob_fn = step_lib.make_logprob_fn(graphdef, loss_cfg, temperature=cfg.temperature)
        fallback = cfg.answer_fallback or None
        # Overlapped, the engine samples from a copy of the weights (the layers it does not copy itself,
        # the embedding, would otherwise be the buffers the train step donates while it reads them); the
        # copy is also the sampling policy whose logprobs the next step's loss compares against.
        engine_policy = _copy(trainable) if overlap else trainable
        engine.update_weights(nnx.merge(graphdef, engine_policy, frozen))

        def sampling(batch_examples, seed) -> tuple[list[list[int]], SamplingParams]:
            return encode(batch_examples), SamplingParams(
                max_new_tokens=cfg.max_completion_tokens, num_samples=cfg.num_generations,
                temperature=cfg.temperature, seed=seed, stop_token_ids=tuple(stop_token_ids))

        origin = time.perf_counter()  # the timeline's zero: this invocation's start

        def timed_generate(prompt_ids, params):
            began = time.perf_counter()
            rollout = engine.generate(prompt_ids, params)
            return rollout, (began - origin, time.perf_counter() - origin)

        # metrics lines are numbered from 1; the checkpointed step itself was already written
        writer = metrics_lib.MetricsWriter(workdir, resume_step=start_step + 1)
        timer = metrics_lib.PhaseTimer()
        last: dict[str, Any] = {}
        streak: dict[str, int] = {}
        stopped_early = ""
        bar = metrics_lib.progress(cfg.steps, desc="grpo")
        bar.update(start_step)
        background = ThreadPoolExecutor(1, thread_name_prefix="rollout") if overlap else None
        # The next step's rollout in flight: its examples, seed, future and the weights that sample it.
        pending: tuple[list[Example], int, Future, Any] | None = None
        try:
            for step in range(start_step, cfg.steps):
                t0 = time.perf_counter()
                step_no = step + 1
                if pending is None:  # sample now, with the current weights
                    key, seed = _rollout_seed(key)
                    batch_examples = data.next(cfg.prompts_sampled)
                    with timer.phase("rollout"):
                        rollout, rollout_span = timed_generate(*sampling(batch_examples, seed))
                    behind, staleness = None, 0
                else:  # sampled in the background while the previous step trained
                    batch_examples, seed, future, behind = pending
                    rollout, rollout_span = future.result()
                    pending, staleness = None, 1
                # What a checkpoint of this step holds: the cursor and key before the next step's draw.
                cursor, saved_key = data.cursor, key
                due = bool(cfg.checkpoint_every and step_no % cfg.checkpoint_every == 0)  # 0: at the end only
                if overlap and step_no < cfg.steps and not due:
                    key, next_seed = _rollout_seed(key)
                    next_examples = data.next(cfg.prompts_sampled)
                    pending = (next_examples, next_seed,
                               background.submit(timed_generate, *sampling(next_examples, next_seed)), engine_policy)
                texts = [decode(ids) for ids in rollout.completion_token_lists()]
                golds = [batch_examples[i].answer for i in rollout.prompt_index]
                with timer.phase("reward"):
                    rewards, answers = correctness_rewards(texts, golds, fallback=fallback, workers=cfg.reward_workers,
                                                           timeout=cfg.reward_timeout)
                rewards = np.asarray(rewards, np.float32)
                all_stats = {k: float(v) for k, v in grpo.group_stats(rewards, cfg.num_generations).items()}
                informative = int(round(all_stats["frac_mixed"] * cfg.prompts_sampled))
                if cfg.filter_groups:
                    rows, informative = grpo.select_groups(rewards, cfg.num_generations, cfg.prompts_per_step,
                                                           np.random.default_rng(seed))
                    rollout = _select_rows(rollout, rows)
                    rewards = rewards[rows]
                advantages = np.asarray(grpo.group_advantages(rewards, cfg.num_generations, scale=cfg.adv_scale,
                                                              std=cfg.adv_std, eps=cfg.adv_eps))
                prompt_len = step_lib.bucket(max(len(p) for p in rollout.prompt_ids), cfg.prompt_bucket)
                width = step_lib.completion_bucket(int(rollout.completion_lengths.max(initial=0)),
                                                   rollout.completion_ids.shape[1])
                batch = step_lib.build_batch(rollout, prompt_len, advantages, completion_len=width)
                device_batch = sharding.shard_batch(batch, mesh)
                completion_len = batch.completion_len
                # A colocated engine frees its memory for JAX's programs (the device plan time-shares it);
                # an overlapped one is generating.
                asleep = False if overlap else engine.sleep()
                # The timeline's train interval: the trainer's device work (logprob passes and updates).
                train_began = time.perf_counter() - origin
                if not on_policy or loss_cfg.beta > 0:
                    with timer.phase("logprob"):
                        if not on_policy:
                            policy = trainable if behind is None else behind  # the weights that sampled
                            device_batch.old_logprobs = logprob_fn(policy, frozen, device_batch.tokens,
                                                                   device_batch.valid, completion_len,
                                                                   group_size=device_batch.group_size)
                        if loss_cfg.beta > 0:
                            device_batch.ref_logprobs = logprob_fn(trainable, frozen, device_batch.tokens,
                                                                   device_batch.valid, completion_len, lora=False,
                                                                   group_size=device_batch.group_size)
                        jax.block_until_ready(device_batch.old_logprobs)
                    behind = None
                with timer.phase("train"):
                    for iteration in range(cfg.num_iterations):
                        trainable, opt_state, step_metrics, logprobs = train_step(trainable, frozen, opt_state,
                                                                                  device_batch)
                        if iteration == 0:  # the policy that the engine sampled from, before any update
                            trainer_logprobs = logprobs
                    step_metrics = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                train_span = (train_began, time.perf_counter() - origin)
                if overlap:  # the trainer's logprobs of the sampling policy, whichever version that was
                    trainer_logprobs = device_batch.old_logprobs
                if pending is not None:
                    with timer.phase("rollout_wait"):  # the engine takes no weights while it generates
                        pending[2].exception()
                with timer.phase("sync"):
                    if asleep:
                        engine.wake_up()
                    engine_policy = _copy(trainable) if overlap else trainable
                    sync = engine.update_weights(nnx.merge(graphdef, engine_policy, frozen))
                phases = timer.pop()
                if "time/rollout" not in phases:  # sampled in the background
                    phases["time/rollout"] = rollout_span[1] - rollout_span[0]
                lengths = rollout.completion_lengths
                tokens = int(lengths.sum())
                m: dict[str, Any] = {
                    **step_metrics, **all_stats, **phases, **sync,
                    **logprob_mismatch(batch.engine_logprobs, to_host(trainer_logprobs), batch.completion_mask),
                    "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
                    "informative_groups": informative,
                    "completion_len_mean": float(lengths.mean()), "completion_len_max": int(lengths.max()),
                    "truncation_rate": float((rollout.finish_reason == FINISH_LENGTH).mean()),
                    "parse_failure_rate": float(np.mean([a is None for a in answers])),
                    "lr": optim.lr_at(optim_cfg, step),
                    "tokens_per_s/rollout": tokens / max(phases.get("time/rollout", 0.0), 1e-9),
                    "tokens_per_s/train": tokens * cfg.num_iterations / max(phases.get("time/train", 0.0), 1e-9),
                    "epoch": data.epoch,
                    "completion_tokens": tokens,
                    "staleness": staleness,  # policy versions between the sampling weights and these
                    "timeline/rollout_start": rollout_span[0], "timeline/rollout_end": rollout_span[1],
                    "timeline/train_start": train_span[0], "timeline/train_end": train_span[1],
                }
                if evaluate is not None and cfg.eval_every and (step_no % cfg.eval_every == 0 or step_no == cfg.steps):
                    with timer.phase("eval"):
                        m.update(evaluate(nnx.merge(graphdef, engine_policy, frozen), step_no))
                    m.update(timer.pop())
                m["step_seconds"] = time.perf_counter() - t0
                writer.write(step_no, m)
                last = m
                _warn(m, cfg, step_no)
                bar.update(1)
                bar.set_postfix(reward=f"{m['reward_mean']:.3f}", loss=f"{m['loss']:.4f}")
                metrics_lib.log_line(step_no, m, ("loss", "reward_mean", "grad_norm", "frac_mixed",  # logs it once
                                                  "completion_len_mean", "mismatch/abs_mean"), seconds_key="step_seconds")
                stopped_early = early_stop_reason(m, cfg, streak)
                if stopped_early or due or step_no == cfg.steps:
                    _save(manager, step_no, trainable, opt_state, cursor, saved_key, run_config, m)
                if cfg.plot_every and step_no % cfg.plot_every == 0:
                    metrics_lib.plot_metrics(workdir)
                if stopped_early:
                    logging.warning("stopping early at step %d: %s; the final checkpoint is step %d", step_no,
                                    stopped_early, step_no)
                    break
        finally:
            if background is not None:  # no thread outlives the loop (its rollout is dropped)
                background.shutdown(wait=True)
            bar.close()
            writer.close()
    nnx.update(model, trainable)
    metrics_lib.plot_metrics(workdir)
    return {**last, "stopped_early": stopped_early}


def _copy(state):
    """A copy of `state`'s arrays in new buffers (same shardings)."""
    return jax.tree.map(lambda x: x.copy(), state)


def _select_rows(rollout, rows: np.ndarray):
    """The rollout restricted to `rows` (whole groups), with prompts renumbered."""
    groups = rollout.prompt_index[rows]
    kept = list(dict.fromkeys(int(g) for g in groups))
    remap = {g: i for i, g in enumerate(kept)}
    return dataclasses.replace(
        rollout, prompt_ids=[rollout.prompt_ids[g] for g in kept], completion_ids=rollout.completion_ids[rows],
        logprobs=rollout.logprobs[rows], completion_mask=rollout.completion_mask[rows],
        finish_reason=rollout.finish_reason[rows],
        prompt_index=np.asarray([remap[int(g)] for g in groups], np.int32))


def _save(manager, step, trainable, opt_state, cursor, key, run_config, m) -> None:
    state = ckpt_lib.TrainState(trainable, opt_state, step, cursor, key, run_config or {})
    metrics = {k: v for k, v in m.items() if isinstance(v, (int, float)) and np.isfinite(v)}
    manager.save(step, state, metrics=metrics, force=True)


def _warn(m: dict, cfg: GRPOConfig, step: int) -> None:
    if m["truncation_rate"] > cfg.warn_truncation:
        logging.warning("step %d: %.0f%% of completions hit max_completion_tokens=%d and mostly score 0 "
                        "(trl#5697); raise rl.max_completion_tokens", step, 100 * m["truncation_rate"],
                        cfg.max_completion_tokens)
    if m["frac_zero_std"] > cfg.warn_zero_std:
        logging.warning("step %d: %.0f%% of groups have identical rewards and teach nothing; consider "
                        "rl.filter_groups=True or a data mix closer to the model's level", step,
                        100 * m["frac_zero_std"])


# (signal, metric, the config field holding its threshold, whether the signal is metric >= threshold)
EARLY_STOP_SIGNALS = (
    ("reward", "reward_mean", "early_stop_reward", True),
    ("grad_norm", "grad_norm", "early_stop_grad_norm", False),
    ("ratio", "mismatch/seq_min_ratio_median", "early_stop_ratio", False),
)


def early_stop_reason(m: dict, cfg: GRPOConfig, streak: dict[str, int]) -> str:
    """Why the run should stop after this step ("" to go on), given its metrics `m`.

    streak: consecutive steps each signal has held so far, updated in place (start with {}). A step
    without the signal's metric (no completion tokens to compare) breaks its streak."""
    for name, metric, field, at_least in EARLY_STOP_SIGNALS:
        threshold = getattr(cfg, field)
        if threshold <= 0:
            continue
        value = m.get(metric)
        holds = value is not None and (value >= threshold if at_least else value <= threshold)
        streak[name] = streak.get(name, 0) + 1 if holds else 0
        if streak[name] >= cfg.early_stop_patience:
            return (f"{metric} {'>=' if at_least else '<='} {threshold:g} for {cfg.early_stop_patience} "
                    f"consecutive steps (rl.{field}; now {value:.3g})")
    return ""
