"""`python -m jaxmath.bench grpo_step --model=DIR --prompts=4 --k=8 --max_new_tokens=64`: seconds per
GRPO step of jaxmath, split by phase, and of TRL's GRPOTrainer on the same work in the same run.

The work per step matches `shared/bench/trl_grpo_bench.py`: `prompts` MATH level 4-5 problems (the
first `prompts * (steps + 2)` rows of the data file, taken in order), the user message
problem + " Put the final answer in \\boxed{}." rendered by the model directory's chat template with
no extra arguments (as TRL renders it), K completions each of exactly max_new_tokens tokens unless
an eos token comes first (temperature 1, no top-p/top-k), the reward 1.0 when `\\boxed{gold}` occurs
in the completion text (TRL script's substring rule, not `jaxmath.reward`'s grader, so both sides
do the same reward work), group-std advantages, TRL's `grpo` loss (sequence mean of token means, beta
0, eps 0.2) and one AdamW update (lr 1e-5, clip 1.0) of every parameter, in float32.

It runs the library's own pieces, not a fast path: `JaxSampler.generate`, `step.build_batch`,
`step.make_train_step` (on-policy: one update per rollout batch) and `sampler.update_weights`.
One padded prompt width serves the whole run (the longest prompt of the run's rows, rounded up to
`--prompt_bucket`), given to both the sampler (`prompt_buckets`) and `build_batch`, so every step
reuses one compiled sampler and one compiled train step; a width per step would recompile whenever
the longest prompt crossed a bucket, which a long run pays once per bucket but a 6-step bench would
count as step time.

`--engine=vllm` rolls out on vLLM colocated in this process instead (`jaxmath.rollout.vllm`, as the
study configs run; LoRA adapters reach it merged into the weights, in memory); the rest is the same.

Phases, each closed by `jax.block_until_ready` (or a host copy): rollout (generate, including the
device-to-host copy of the completions), reward (detokenize, substring match, advantages), train
(batch assembly, host-to-device copy, the jitted step) and sync (`update_weights`). Reported figures
are means over steps 2..N, like TRL's `TRL_STEP_S`; step 1 holds the compiles and is reported apart.
TRL runs afterwards in a subprocess when it is given (`--trl_python=PYTHON --trl_script=SCRIPT`,
e.g. this project's `../shared/bench/trl_grpo_bench.py`), so both see the machine in the same state;
without them the result's `trl_note` says how to run it.

On a GPU, with random weights and LoRA (the issue's 4B shape):

    python -m jaxmath.bench grpo_step --preset=qwen3-4b --random_weights --dtype=bfloat16 \
        --lora_rank=64 --k=8 --max_new_tokens=2048 --micro_batch_rows=8 --steps=3

prints in addition the model FLOPs utilisation of the train phase against `--peak_flops`:

    train FLOPs = rows x [ c_w * N_layers * S + 6 * L * n_heads * head_dim * S^2 / 2 + c_h * V * d * T ]

with S the valid tokens of a row (prompt + completion), T its completion tokens (the LM head runs on
completion positions only), N_layers the decoder-layer parameters (embedding excluded),
c_w = 6 (full: forward, activation and weight gradients) or 4 plus 6 * N_lora / N_layers (LoRA: the
frozen base needs no weight gradient), the attention term counting the causal half of the score and
value products three times (forward and backward), and c_h = 6 (full) or 4 (LoRA, tied head frozen).
Rematerialisation is not counted (model FLOPs, not hardware FLOPs).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import time
from pathlib import Path

from jaxmath.bench._common import add_model_flags, check_model_flags, load_model, run_peer

_SUFFIX = " Put the final answer in \\boxed{}."
PHASES = ("rollout", "reward", "train", "sync")


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jaxmath.bench grpo_step", description=__doc__.split("\n\n")[0])
    add_model_flags(p)
    p.add_argument("--prompt_tokens", type=int, default=128,
                   help="with --preset (no tokenizer): length of the synthetic prompts")
    p.add_argument("--dtype", default="float32", help="compute and parameter dtype (bfloat16 on a GPU)")
    p.add_argument("--prompts", type=int, default=4, help="problems per step (GRPO groups)")
    p.add_argument("--k", type=int, default=8, help="completions per problem")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=6, help="steps; the mean is over steps 2..N")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="data/math_train_hard_l45.jsonl",
                   help="MATH L4-5 jsonl (problem, answer), as `python -m jaxmath.data.datasets --out data` writes it")
    p.add_argument("--lora_rank", type=int, default=0, help="0 = full-parameter training")
    p.add_argument("--learning_rate", type=float, default=1e-5)
    p.add_argument("--prompt_bucket", type=int, default=64, help="the run's prompt width is rounded up to this")
    p.add_argument("--micro_batch_rows", type=int, default=0, help="LossConfig.micro_batch_rows (0: whole batch)")
    p.add_argument("--logprob_chunk", type=int, default=0, help="LossConfig.logprob_chunk (0: its default)")
    p.add_argument("--remat", default="", choices=["", "none", "full", "dots"],
                   help="decoder-layer rematerialisation in the train step ('' = the config default)")
    p.add_argument("--vocab_chunk", type=int, default=-1, help="sampler.vocab_chunk (-1: SamplerConfig default)")
    p.add_argument("--decode_window", type=int, default=-1,
                   help="sampler.decode_window (-1: SamplerConfig default; 0: attend over the whole cache)")
    p.add_argument("--peak_flops", type=float, default=989e12, help="FLOP/s for MFU (H100 bf16 dense)")
    p.add_argument("--engine", default="jax", choices=["jax", "vllm"],
                   help="rollout engine: the JAX sampler, or vLLM colocated in this process (needs --model; "
                        "LoRA syncs merged in memory, as jaxmath.main runs it)")
    p.add_argument("--trl_python", default="", help="python with trl installed (empty: TRL is not run)")
    p.add_argument("--trl_script", default="",
                   help="TRL's side of the bench (this project's: ../shared/bench/trl_grpo_bench.py)")
    p.add_argument("--trl_steps", type=int, default=0, help="TRL's --steps (0: the same as --steps)")
    p.add_argument("--trl_timeout", type=float, default=3600.0)
    a = p.parse_args(argv)
    check_model_flags(p, a)
    if a.steps < 2:
        p.error("--steps must be >= 2: step 1 holds the compiles and is not part of the mean")
    if a.engine == "vllm" and not a.model:
        p.error("--engine=vllm loads the model from --model=DIR (an HF directory)")
    return a


def _load(a):
    """The model, with the train-step remat setting when one is asked for."""
    from jaxmath.model.config import dtype_from_name

    return load_model(a, dtype_from_name(a.dtype), seed=a.seed, **({"remat": a.remat} if a.remat else {}))


def _problems(a, with_text: bool) -> list[dict]:
    """The rows TRL's script trains on: the first prompts * (steps + 2). Without a tokenizer (a
    preset) prompts are synthetic and nothing is graded, so no data file is read."""
    if not with_text:
        return [{"problem": "", "answer": ""}] * (a.prompts * (a.steps + 2))
    with open(a.data) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = rows[: a.prompts * (a.steps + 2)]
    if len(rows) < a.prompts * a.steps:
        raise ValueError(f"{a.data} has {len(rows)} rows; the run needs {a.prompts * a.steps}")
    return rows


def _encode(a, tokenizer, rows: list[dict], vocab_size: int) -> list[list[int]]:
    """Prompt ids per row: TRL's chat rendering with a tokenizer, else fixed synthetic ids."""
    if tokenizer is None:
        return [[(7919 * i + 104729 * r + 13) % vocab_size for i in range(a.prompt_tokens)] for r in range(len(rows))]
    out = []
    for row in rows:
        text = tokenizer.apply_chat_template([{"role": "user", "content": row["problem"] + _SUFFIX}],
                                             add_generation_prompt=True, tokenize=False)
        out.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return out


def _on_mesh(tree, reference):
    """Leaves of `tree` not yet on a mesh, replicated on the mesh of the first leaf (of `reference`,
    then of `tree`) that has one; unchanged when none has."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    placed = [x for x in jax.tree.leaves((reference, tree)) if isinstance(x.sharding, NamedSharding)]
    if not placed:
        return tree
    mesh = placed[0].sharding.mesh
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated),
                        tree)


def train_flops(config, rows_valid: "np.ndarray", rows_completion: "np.ndarray", lora_params: int) -> float:
    """Model FLOPs of one train step (module docstring), from per-row valid and completion counts."""
    import numpy as np

    c = config
    embed = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    n_layers = c.num_params() - embed - c.hidden_size
    s = rows_valid.astype(np.float64)
    t = rows_completion.astype(np.float64)
    weight = (4.0 * n_layers + 6.0 * lora_params) if lora_params else 6.0 * n_layers
    attention = 6.0 * c.num_layers * c.num_heads * c.head_dim * s * s / 2.0
    head = (4.0 if lora_params else 6.0) * c.vocab_size * c.hidden_size * t
    return float(np.sum(weight * s + attention + head))


def _trl(a) -> tuple[tuple[float, list[float]] | None, str]:
    """((TRL's mean seconds per step, its step times), "") from trl_grpo_bench.py, or (None, why)."""
    cmd = [a.trl_python, a.trl_script, a.model, a.data, "--steps", str(a.trl_steps or a.steps), "--prompts",
           str(a.prompts), "--k", str(a.k), "--max_new_tokens", str(a.max_new_tokens)]
    print("peer:", " ".join(cmd), flush=True)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=a.trl_timeout)
    except subprocess.TimeoutExpired:
        return None, f"TRL did not finish within {a.trl_timeout:.0f} s (--trl_timeout)"
    found = re.findall(r"TRL_STEP_S\s+([0-9.eE+-]+)", done.stdout)
    times = re.findall(r"step_times\s+\[([^\]]*)\]", done.stdout)
    if done.returncode or not found:
        return None, f"TRL failed (exit {done.returncode}): {(done.stdout + done.stderr)[-1500:]}"
    step_times = [float(x) for x in times[-1].split(",")] if times else []
    return (float(found[-1]), step_times), ""


def main(argv: list[str]) -> dict:
    a = _parse(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxmath import optim
    from jaxmath.model.lora import LoRAConfig, apply_lora
    from jaxmath.rl import grpo
    from jaxmath.rl import step as step_lib
    from jaxmath.rollout.jax_sampler import JaxSampler, SamplerConfig
    from jaxmath.rollout.types import SamplingParams

    model = _load(a)
    config = model.config
    tokenizer = None
    if a.model and (Path(a.model) / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(a.model)
    rows = _problems(a, tokenizer is not None)
    prompt_ids = _encode(a, tokenizer, rows, config.vocab_size)
    width = step_lib.bucket(max(len(p) for p in prompt_ids[: a.prompts * a.steps]), a.prompt_bucket)
    stops = tuple(config.stop_token_ids) if tokenizer is not None else ()
    lora_params = 0
    if a.lora_rank:
        lora_params = apply_lora(model, LoRAConfig(rank=a.lora_rank, alpha=2.0 * a.lora_rank), seed=a.seed)

    graphdef, trainable, frozen = step_lib.split_trainable(model)
    optimizer = optim.make_optimizer(optim.OptimizerConfig(learning_rate=a.learning_rate, max_grad_norm=1.0))
    opt_state = optimizer.init(trainable)
    # Fresh LoRA adapters and optimizer moments are uncommitted single-device arrays, while the
    # step returns them placed on the model's mesh; that difference alone made step 2 compile the
    # train step a second time (seen with JAX_LOG_COMPILES=1), so place them as the step will.
    trainable, opt_state = _on_mesh((trainable, opt_state), frozen)
    loss_knobs = {"micro_batch_rows": a.micro_batch_rows}
    if a.logprob_chunk:
        loss_knobs["logprob_chunk"] = a.logprob_chunk
    loss_cfg = step_lib.LossConfig(loss_agg="seq_mean_token_mean", **loss_knobs)
    train_step = step_lib.make_train_step(graphdef, optimizer, loss_cfg, on_policy=True, temperature=a.temperature)
    sampler_knobs = {"max_batch_rows": a.prompts * a.k, "prompt_buckets": (width,)}
    if a.vocab_chunk >= 0:
        sampler_knobs["vocab_chunk"] = a.vocab_chunk
    if a.decode_window >= 0:
        sampler_knobs["decode_window"] = a.decode_window
    if a.engine == "vllm":
        from jaxmath.rollout.vllm import VLLMConfig, make_engine

        sampler = make_engine(VLLMConfig(model_path=a.model, dtype=a.dtype, seed=a.seed,
                                         max_model_len=width + a.max_new_tokens))
        sampler.update_weights(nnx.merge(graphdef, trainable, frozen))  # with the LoRA adapters of step 0
    else:
        sampler = JaxSampler(model, SamplerConfig(**sampler_knobs))
    del model  # the trainer's state lives in (trainable, frozen) from here on

    per_step: list[dict[str, float]] = []
    flops, rewards_seen, tokens = [], [], []
    for i in range(a.steps):
        problems = rows[i * a.prompts:(i + 1) * a.prompts]
        ids = prompt_ids[i * a.prompts:(i + 1) * a.prompts]
        params = SamplingParams(max_new_tokens=a.max_new_tokens, num_samples=a.k, temperature=a.temperature,
                                seed=a.seed + i, stop_token_ids=stops)
        t0 = time.perf_counter()
        rollout = sampler.generate(ids, params)  # returns host arrays: the device work is done
        t1 = time.perf_counter()
        if tokenizer is not None:
            texts = tokenizer.batch_decode([list(c) for c in rollout.completion_token_lists()],
                                           skip_special_tokens=True)
            golds = [problems[int(g)]["answer"] for g in rollout.prompt_index]
            rewards = np.asarray([1.0 if "\\boxed{" + g + "}" in t else 0.0 for t, g in zip(texts, golds)],
                                 np.float32)
        else:
            rewards = np.zeros(rollout.completion_ids.shape[0], np.float32)  # no tokenizer: nothing to grade
        advantages = np.asarray(grpo.group_advantages(rewards, a.k))
        t2 = time.perf_counter()
        batch = step_lib.build_batch(rollout, width, advantages)
        device_batch = jax.tree.map(jnp.asarray, batch)
        trainable, opt_state, metrics, _ = train_step(trainable, frozen, opt_state, device_batch)
        jax.block_until_ready((trainable, opt_state, metrics))
        t3 = time.perf_counter()
        sampler.update_weights(nnx.merge(graphdef, trainable, frozen))
        if a.engine == "jax":
            jax.block_until_ready(jax.tree.leaves(sampler._state))
        t4 = time.perf_counter()
        seconds = {"rollout": t1 - t0, "reward": t2 - t1, "train": t3 - t2, "sync": t4 - t3, "step": t4 - t0}
        per_step.append(seconds)
        mask = np.asarray(batch.completion_mask)
        valid = np.asarray(batch.valid)[:, :-1].sum(axis=1)  # positions the model runs on
        flops.append(train_flops(config, valid, mask.sum(axis=1), lora_params))
        tokens.append(int(mask.sum()))
        rewards_seen.append(float(rewards.mean()))
        loss = float(metrics["loss"])
        print(f"step {i + 1}: " + " ".join(f"{k} {v:.3f}" for k, v in seconds.items())
              + f" | completion tokens {tokens[-1]}, reward {rewards_seen[-1]:.3f}, loss {loss:.4f}", flush=True)

    steady = per_step[1:]
    mean = {k: statistics.fmean(s[k] for s in steady) for k in (*PHASES, "step")}
    train_s = mean["train"]
    result = {"model": a.model or f"{a.preset} (random weights)", "engine": a.engine, "backend": jax.default_backend(),
              "device": str(jax.devices()[0].device_kind), "cpu_count": os.cpu_count(), "dtype": a.dtype,
              "prompts": a.prompts, "k": a.k, "max_new_tokens": a.max_new_tokens, "steps": a.steps,
              "lora_rank": a.lora_rank, "lora_params": lora_params, "prompt_width": width,
              "step_seconds": mean["step"], "phases": {k: mean[k] for k in PHASES},
              "first_step_seconds": per_step[0]["step"], "step_times": [round(s["step"], 3) for s in per_step],
              "tokens_per_step": statistics.fmean(tokens[1:]), "reward_mean": statistics.fmean(rewards_seen),
              "train_tflops_per_step": statistics.fmean(flops[1:]) / 1e12}
    result["train_flops_per_s"] = statistics.fmean(flops[1:]) / train_s
    if result["backend"] == "gpu":
        result["peak_flops"] = a.peak_flops
        result["train_mfu"] = result["train_flops_per_s"] / a.peak_flops
    print(f"jaxmath: {mean['step']:.3f} s/step (" + ", ".join(f"{k} {mean[k]:.3f}" for k in PHASES) + ")",
          flush=True)
    if a.engine == "vllm":
        sampler.close()
    del sampler, trainable, frozen, opt_state

    trl = run_peer(result, "TRL", python=a.trl_python, script=a.trl_script, flag="trl", model=a.model,
                   run=lambda: _trl(a))
    if trl is not None:
        result["trl_step_seconds"], result["trl_step_times"] = trl
        result["speedup"] = trl[0] / mean["step"]
        print(f"TRL: {trl[0]:.3f} s/step; TRL / jaxmath = {result['speedup']:.2f}", flush=True)
    return result
