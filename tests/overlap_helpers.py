"""A tiny GRPO run whose reward varies within groups (a completion scores 1 when its length is odd),
so a step's loss and gradient are not zero from the first step: shared by the overlap tests and the
script that recorded the synchronous loop's figures before rl.max_staleness existed."""

import dataclasses
import json
import os

from jaxmath import demo, optim
from jaxmath.data import demo_task
from jaxmath.model import init_model
from jaxmath.model.lora import LoRAConfig
from jaxmath.rl import loop
from jaxmath.rl import step as step_lib
from jaxmath.rollout.jax_sampler import JaxSampler, SamplerConfig

TOKENIZER = demo_task.CharTokenizer()
TRAIN = [dataclasses.replace(e, answer="1") for e in demo_task.AdditionTask(digits=1, seed=0).split(num_eval=20)[0]]
SMALL = demo.DemoConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                        head_dim=16)
KEYS = ("loss", "grad_norm", "reward_mean", "ratio_mean", "completion_len_mean", "mismatch/abs_mean")


def odd_length(ids) -> str:
    return f"\\boxed{{{len(ids) % 2}}}"


def run(workdir, steps, *, engine_wrapper=None, mesh=None, sampler_mesh=None, **overrides):
    """mesh: the trainer's (None: the default device); sampler_mesh: the sampler's (None: mesh)."""
    model = init_model(demo.model_config(SMALL, TOKENIZER.vocab_size), seed=0, mesh=mesh)
    cfg = loop.GRPOConfig(**{**dict(steps=steps, prompts_per_step=2, num_generations=4, max_completion_tokens=6,
                                    checkpoint_every=0, plot_every=0, prompt_bucket=8, warn_zero_std=1.0,
                                    warn_truncation=1.0, seed=1), **overrides})
    engine = JaxSampler(model, SamplerConfig(min_bucket=8, vocab_chunk=0),
                        mesh=mesh if sampler_mesh is None else sampler_mesh)
    if engine_wrapper is not None:
        engine = engine_wrapper(engine)
    loop.train(model, TRAIN, encode=lambda batch: [TOKENIZER.encode(e.problem) for e in batch], decode=odd_length,
               cfg=cfg, loss_cfg=step_lib.LossConfig(logprob_chunk=64),
               optim_cfg=optim.OptimizerConfig(learning_rate=3e-2), lora_cfg=LoRAConfig(rank=0),
               workdir=str(workdir), engine=engine, stop_token_ids=(demo_task.EOS,))
    return model, metrics(workdir)


def metrics(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
