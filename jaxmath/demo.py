"""The embedded demo: a tiny Qwen3 learns seeded arithmetic from scratch on a CPU in minutes.

1. a short SFT warm-up on a flawed teacher's answers (boxed only some of the time, see
   `jaxmath.data.demo_task`) teaches arithmetic and the teacher's habits; 2. GRPO with the same
   `\\boxed{}` reward the real runs use optimizes what is actually checked; greedy accuracy on
   held-out problems is measured after each phase and printed as a small table.
Nothing is downloaded: the tokenizer is character-level (`jaxmath.data.demo_task`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxmath import optim
from jaxmath.data import demo_task
from jaxmath.model import init_model
from jaxmath.model.config import Qwen3Config
from jaxmath.model.lora import LoRAConfig
from jaxmath.reward import correctness_rewards
from jaxmath.rl import loop as rl_loop
from jaxmath.rl import step as step_lib
from jaxmath.rollout.jax_sampler import JaxSampler, SamplerConfig
from jaxmath.rollout.types import SamplingParams
from jaxmath.sft import SFTConfig, TokenizedExample


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """The task and the warm-up. `sft_steps` is for the default GRPO length; the warm-up scales with
    the GRPO steps actually asked for (`sft_steps * steps / default_steps`, at least `min_sft_steps`),
    so a 3-step smoke run finishes in about a minute."""

    digits: int = 2
    second_digits: int = 1
    boxed_fraction: float = 0.3
    num_eval: int = 200
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 3
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    sft_steps: int = 300
    min_sft_steps: int = 20
    default_steps: int = 60
    sft_batch_size: int = 64
    sft_learning_rate: float = 3e-3
    max_new_tokens: int = 12


def model_config(cfg: DemoConfig, vocab_size: int) -> Qwen3Config:
    return Qwen3Config(vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                       num_layers=cfg.num_layers, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                       head_dim=cfg.head_dim, rope_theta=10000.0, max_position_embeddings=64,
                       tie_word_embeddings=True, eos_token_id=demo_task.EOS, pad_token_id=demo_task.PAD,
                       dtype=jnp.float32, param_dtype=jnp.float32, remat="none")


def greedy_accuracy(engine: JaxSampler, tokenizer: demo_task.CharTokenizer, examples, max_new_tokens: int) -> float:
    rollout = engine.generate([tokenizer.encode(e.problem) for e in examples],
                              SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0,
                                             stop_token_ids=(demo_task.EOS,)))
    texts = [tokenizer.decode(ids) for ids in rollout.completion_token_lists()]
    return float(np.mean(correctness_rewards(texts, [e.answer for e in examples])[0]))


def run_demo(cfg: DemoConfig, grpo_cfg: rl_loop.GRPOConfig, loss_cfg: step_lib.LossConfig,
             optim_cfg: optim.OptimizerConfig, workdir: str, *, seed: int = 0, mesh=None,
             run_config: dict | None = None) -> dict[str, Any]:
    from jaxmath.sft import run_sft

    start = time.perf_counter()
    tokenizer = demo_task.CharTokenizer()
    train, held_out = demo_task.ArithmeticTask(digits=cfg.digits, second_digits=cfg.second_digits, seed=seed).split(cfg.num_eval)
    model = init_model(model_config(cfg, tokenizer.vocab_size), seed=seed, mesh=mesh)

    sft_steps = max(cfg.min_sft_steps, round(cfg.sft_steps * grpo_cfg.steps / cfg.default_steps))
    sft_examples = [TokenizedExample(*demo_task.sft_example(
        tokenizer, e, boxed=demo_task.teacher_boxes(e, cfg.boxed_fraction, seed))) for e in train]
    sft_cfg = SFTConfig(batch_size=cfg.sft_batch_size, max_seq_len=32, steps=sft_steps, seed=seed,
                        optimizer=optim.OptimizerConfig(learning_rate=cfg.sft_learning_rate, schedule="warmup_linear",
                                                        warmup_steps=10, b1=0.9, b2=0.95),
                        lora=LoRAConfig(rank=0), export=False, remat=False, chunk_size=256, checkpoint_every=sft_steps)
    logging.info("demo: SFT warm-up, %d steps on %d problems", sft_steps, len(train))
    run_sft(model, sft_examples, sft_cfg, os.path.join(workdir, "sft"), mesh=mesh)

    engine = JaxSampler(model, SamplerConfig(min_bucket=8, vocab_chunk=0), mesh=mesh)
    sft_accuracy = greedy_accuracy(engine, tokenizer, held_out, cfg.max_new_tokens)
    logging.info("demo: held-out greedy accuracy after SFT %.1f%%", 100 * sft_accuracy)

    def encode(examples):
        return [tokenizer.encode(e.problem) for e in examples]

    def evaluate(_, step: int) -> dict[str, float]:
        return {"eval_accuracy": greedy_accuracy(engine, tokenizer, held_out, cfg.max_new_tokens)}

    rl_loop.train(model, train, encode=encode, decode=tokenizer.decode, cfg=grpo_cfg, loss_cfg=loss_cfg,
                  optim_cfg=optim_cfg, lora_cfg=LoRAConfig(rank=0), workdir=workdir, engine=engine,
                  stop_token_ids=(demo_task.EOS,), evaluate=evaluate, run_config=run_config)
    grpo_accuracy = greedy_accuracy(engine, tokenizer, held_out, cfg.max_new_tokens)
    results = {"sft_accuracy": sft_accuracy, "grpo_accuracy": grpo_accuracy, "n_eval": len(held_out),
               "sft_steps": sft_steps, "grpo_steps": grpo_cfg.steps, "seconds": time.perf_counter() - start}
    with open(os.path.join(workdir, "demo_results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(results_table(results))
    return results


def results_table(r: dict) -> str:
    return "\n".join([
        "",
        f"| held-out {r['n_eval']} problems, greedy | accuracy |",
        "|---|---|",
        f"| after SFT warm-up ({r['sft_steps']} steps) | {100 * r['sft_accuracy']:.1f}% |",
        f"| after GRPO ({r['grpo_steps']} steps) | {100 * r['grpo_accuracy']:.1f}% |",
        f"| change | {100 * (r['grpo_accuracy'] - r['sft_accuracy']):+.1f} points |",
        f"({r['seconds']:.0f} s in all)",
    ])
