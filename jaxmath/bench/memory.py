"""`python -m jaxmath.bench memory --config=configs/grpo_v2.py`: the memory plan of a GRPO run (and
its SFT step) for one accelerator, from the real jitted steps compiled ahead of time on abstract
shapes; no weight is ever allocated.

For each method (LoRA rank 64, full-parameter) and each K x completion length (8/16 x 2,048/4,096),
the 4B model, its adapters and its optimizer state are built with `nnx.eval_shape` / `jax.eval_shape`;
the GRPO step of `jaxmath.rl.step` (rows = K x rl.prompts_per_step, the config's
loss.micro_batch_rows, prompt rl.max_prompt_tokens + completion tokens) and the SFT step of
`jaxmath.sft` (batch 32 x seq, micro-batch --sft_micro) are lowered and compiled, and XLA's
`memory_analysis()` gives their temporary buffers. The breakdown follows the study's Table 10:

  weights      every parameter, in model.param_dtype (bf16: 8,044,936,192 bytes for Qwen3-4B),
               plus the LoRA adapters (float32) when training LoRA
  optimizer    Adam's two moments per trainable parameter, stored in its dtype (float32 adapters:
               8 bytes; bf16 weights: 4 bytes, optimizer.moment_dtype "auto"), plus the float32
               master copy (optimizer.master_fp32, on for full-parameter in the configs)
  gradients    the step's gradient accumulator, in each parameter's dtype (jaxmath.optim)
  activations  the compiled step's other temporaries (saved residuals, logprob chunks, batch)
  kv_cache     the rollout's KV cache: the prompts' cache and its K-fold copy (jaxmath's sampler
               keeps both during the copy), `KVCache.nbytes_for`
  peak         the larger of training (weights + optimizer + the step's temporaries) and generation
               (weights + optimizer + KV cache + the LoRA-merged kernel copy the sampler makes)

The numbers are the buffer assignment of whichever backend runs the command, for the same program.
On a CPU, attention is XLA's reference implementation, which materializes one layer's float32 scores
[micro rows, heads, seq, seq] and their gradient (19 GB each at 16 rows x 3,072 positions); cuDNN's
fused attention on a GPU does not, so CPU activations are an upper bound: run the same command on the
GPU for its own numbers, and use --micro_batch_rows to find a micro-batch that fits. The last line is
JSON keyed "<method>/<K>x<tokens>".
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import time
from typing import Any

GB = 1e9
CAPACITIES = {"H100 80GB": 80e9, "H200 141GB": 141e9}
# The study's Table 10 (one H100 80GB, K=8, 2,048 tokens), in bytes.
STUDY = {"full": dict(weights=8e9, optimizer=32e9, gradients=8e9, activations=10e9, kv_cache=8e9, peak=66e9),
         "lora_r64": dict(weights=8e9, optimizer=0.5e9, gradients=0.3e9, activations=10e9, kv_cache=8e9,
                          peak=27e9)}
FIELDS = ("weights", "optimizer", "gradients", "activations", "kv_cache", "peak")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one run shape needs. method: "lora_r64" or "full"."""

    method: str
    lora_rank: int
    master_fp32: bool
    num_generations: int
    completion_tokens: int


def _nbytes(tree: Any) -> int:
    import jax
    import numpy as np

    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def abstract_state(model_cfg, lora_rank: int, master_fp32: bool, learning_rate: float = 1e-5):
    """(graphdef, trainable, frozen, opt_state, optimizer): abstract (ShapeDtypeStruct) states of the
    model with `lora_rank` adapters (0: full-parameter) and its AdamW state."""
    import jax
    from flax import nnx

    from jaxmath import optim
    from jaxmath.model import lora as lora_lib
    from jaxmath.model.qwen3 import Qwen3
    from jaxmath.rl import step as step_lib

    def build():
        model = Qwen3(model_cfg, rngs=nnx.Rngs(0))
        if lora_rank:
            lora_lib.apply_lora(model, lora_lib.LoRAConfig(rank=lora_rank, alpha=2.0 * lora_rank))
        return model

    model = nnx.eval_shape(build)
    graphdef, trainable, frozen = step_lib.split_trainable(model)
    optimizer = optim.make_optimizer(optim.OptimizerConfig(learning_rate=learning_rate, master_fp32=master_fp32))
    opt_state = jax.eval_shape(optimizer.init, trainable)
    return graphdef, trainable, frozen, opt_state, optimizer


def state_bytes(model_cfg, lora_rank: int, master_fp32: bool) -> dict[str, int]:
    """weights, optimizer and gradient bytes, from abstract shapes only (seconds, no compile)."""
    import jax

    from jaxmath import optim

    _, trainable, frozen, opt_state, _ = abstract_state(model_cfg, lora_rank, master_fp32)
    trainable_params = sum(int(x.size) for x in jax.tree.leaves(trainable))
    accumulator = jax.eval_shape(optim.grad_accumulator, trainable)
    return {"weights": _nbytes(trainable) + _nbytes(frozen), "optimizer": _nbytes(opt_state),
            "gradients": _nbytes(accumulator), "trainable_params": trainable_params}


def _compiled_temp_bytes(compiled) -> int:
    stats = compiled.memory_analysis()
    return int(stats.temp_size_in_bytes)


def grpo_step_temp_bytes(model_cfg, plan: Plan, *, prompts: int, prompt_tokens: int, micro_batch_rows: int,
                         logprob_chunk: int) -> tuple[int, float]:
    """Temporary bytes of the compiled GRPO step (rows = K x prompts) and the compile seconds."""
    import jax
    import jax.numpy as jnp

    from jaxmath.rl import step as step_lib

    graphdef, trainable, frozen, opt_state, optimizer = abstract_state(model_cfg, plan.lora_rank, plan.master_fp32)
    rows, t = plan.num_generations * prompts, plan.completion_tokens
    loss_cfg = step_lib.LossConfig(micro_batch_rows=micro_batch_rows or rows, logprob_chunk=logprob_chunk)
    step = step_lib.make_train_step(graphdef, optimizer, loss_cfg, on_policy=True)
    spec = jax.ShapeDtypeStruct
    batch = step_lib.Batch(tokens=spec((rows, prompt_tokens + t), jnp.int32),
                           valid=spec((rows, prompt_tokens + t), jnp.bool_),
                           completion_mask=spec((rows, t), jnp.bool_), advantages=spec((rows,), jnp.float32),
                           old_logprobs=spec((rows, t), jnp.float32), engine_logprobs=spec((rows, t), jnp.float32))
    began = time.perf_counter()
    compiled = step.lower(trainable, frozen, opt_state, batch).compile()
    return _compiled_temp_bytes(compiled), time.perf_counter() - began


def sft_step_temp_bytes(model_cfg, lora_rank: int, master_fp32: bool, *, batch_size: int, micro: int,
                        seq: int, chunk: int) -> tuple[int, float]:
    """Temporary bytes of the compiled SFT step ([batch / micro, micro, seq]) and the compile seconds."""
    import jax
    import jax.numpy as jnp

    from jaxmath import sft

    graphdef, trainable, frozen, opt_state, optimizer = abstract_state(model_cfg, lora_rank, master_fp32)
    step = sft.make_sft_step(graphdef, optimizer, chunk_size=chunk, remat=True)
    shape = (batch_size // micro, micro, seq)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.bool_ if k == "loss_mask" else jnp.int32) for k in sft.BATCH_KEYS}
    began = time.perf_counter()
    compiled = step.lower(trainable, frozen, opt_state, batch).compile()
    return _compiled_temp_bytes(compiled), time.perf_counter() - began


def plan_bytes(model_cfg, plan: Plan, *, prompts: int, prompt_tokens: int, micro_batch_rows: int,
               logprob_chunk: int, cache_dtype=None) -> dict[str, Any]:
    """The Table 10 breakdown of one plan, in bytes (plus compile seconds)."""
    from jaxmath.model.qwen3 import KVCache

    state = state_bytes(model_cfg, plan.lora_rank, plan.master_fp32)
    temp, seconds = grpo_step_temp_bytes(model_cfg, plan, prompts=prompts, prompt_tokens=prompt_tokens,
                                         micro_batch_rows=micro_batch_rows, logprob_chunk=logprob_chunk)
    rows = plan.num_generations * prompts
    kv = KVCache.nbytes_for(model_cfg, prompts + rows, prompt_tokens + plan.completion_tokens, cache_dtype)
    activations = max(temp - state["gradients"], 0)
    resident = state["weights"] + state["optimizer"]
    merged_copy = _projection_bytes(model_cfg) if plan.lora_rank else 0
    peak = max(resident + temp, resident + kv + merged_copy)
    return {"weights": state["weights"], "optimizer": state["optimizer"], "gradients": state["gradients"],
            "activations": activations, "kv_cache": kv, "peak": peak, "compile_seconds": round(seconds, 1)}


def _projection_bytes(model_cfg) -> int:
    """Bytes of the seven projection kernels: the copy the sampler merges LoRA adapters into."""
    import numpy as np

    c = model_cfg
    per_layer = (2 * c.hidden_size * c.num_heads * c.head_dim + 2 * c.hidden_size * c.num_kv_heads * c.head_dim
                 + 3 * c.hidden_size * c.intermediate_size)
    return int(c.num_layers * per_layer * np.dtype(c.param_dtype).itemsize)


def _load_config(path: str):
    """The ml_collections config of a config file (`configs/grpo_v2.py`, or `file.py:arg`)."""
    path, _, arg = path.partition(":")
    spec = importlib.util.spec_from_file_location("_memory_config", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--config={path} is not a Python config file; pass e.g. configs/grpo_v2.py")
    module = importlib.util.module_from_spec(spec)
    import sys
    from pathlib import Path

    root = str(Path(path).resolve().parent.parent)  # configs/ import their siblings as `configs.x`
    if root not in sys.path:
        sys.path.insert(0, root)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jaxmath.bench memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a GRPO config file, e.g. configs/grpo_v2.py")
    p.add_argument("--preset", default="", help="model preset (default: qwen3-4b, or the config's model.preset)")
    p.add_argument("--methods", default="lora_r64,full", help="comma list of lora_r64, full")
    p.add_argument("--ks", default="8,16", help="completions per prompt")
    p.add_argument("--tokens", default="2048,4096", help="max completion tokens")
    p.add_argument("--micro_batch_rows", type=int, default=0,
                   help="GRPO rows per micro-batch (default: the config's loss.micro_batch_rows)")
    p.add_argument("--sft_micro", type=int, default=4, help="SFT micro-batch rows (batch 32)")
    p.add_argument("--no_sft", action="store_true", help="skip the SFT step")
    return p.parse_args(argv)


def _gb(x: float) -> str:
    return f"{x / GB:.1f}"


def table(results: dict[str, dict], sft: dict[str, dict]) -> str:
    """Markdown in the layout of the study's Table 10, one column per plan, the study's beside."""
    names = list(results) + list(sft)
    cols = {**results, **sft}
    head = "| GB | " + " | ".join(names) + " | study full | study LoRA r64 |"
    lines = [head, "|---|" + "---|" * (len(names) + 2)]
    for field in FIELDS:
        cells = [_gb(cols[n][field]) for n in names]
        lines.append(f"| {field} | " + " | ".join(cells) + f" | {_gb(STUDY['full'][field])} | "
                     f"{_gb(STUDY['lora_r64'][field])} |")
    for label, capacity in CAPACITIES.items():
        fits = ["yes" if cols[n]["peak"] <= capacity else "no" for n in names]
        lines.append(f"| fits {label} | " + " | ".join(fits) + " | yes | yes |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> dict[str, dict]:
    args = _parse(argv)
    import jax

    from jaxmath.model import config as model_config
    from jaxmath.model import preset

    cfg = _load_config(args.config)
    name = args.preset or cfg.model.get("preset") or "qwen3-4b"
    dtype = model_config.dtype_from_name(cfg.model.dtype)
    param_dtype = model_config.dtype_from_name(cfg.model.param_dtype or cfg.model.dtype)
    model_cfg = preset(name, dtype=dtype, param_dtype=param_dtype, remat=cfg.model.remat)
    prompts, prompt_tokens = cfg.rl.prompts_per_step, cfg.rl.max_prompt_tokens
    micro, chunk = args.micro_batch_rows or cfg.loss.micro_batch_rows, cfg.loss.logprob_chunk
    rank = cfg.lora.rank or 64
    print(f"memory plan: {name} (params {cfg.model.param_dtype or cfg.model.dtype}), "
          f"{prompts} prompts x K, prompt {prompt_tokens} tokens, micro-batch {micro} rows, jax "
          f"{jax.__version__} on {jax.devices()[0].platform}", flush=True)
    results: dict[str, dict] = {}
    for method in args.methods.split(","):
        lora_rank = {"lora_r64": rank, "full": 0}[method]
        for k in (int(x) for x in args.ks.split(",")):
            for tokens in (int(x) for x in args.tokens.split(",")):
                plan = Plan(method, lora_rank, master_fp32=lora_rank == 0, num_generations=k,
                            completion_tokens=tokens)
                key = f"{method}/{k}x{tokens}"
                results[key] = plan_bytes(model_cfg, plan, prompts=prompts, prompt_tokens=prompt_tokens,
                                          micro_batch_rows=micro, logprob_chunk=chunk)
                print(f"  {key}: peak {_gb(results[key]['peak'])} GB (compiled in "
                      f"{results[key]['compile_seconds']} s)", flush=True)
    sft: dict[str, dict] = {}
    if not args.no_sft:
        for method in args.methods.split(","):
            lora_rank = {"lora_r64": rank, "full": 0}[method]
            state = state_bytes(model_cfg, lora_rank, lora_rank == 0)
            seq = max(int(x) for x in args.tokens.split(","))
            temp, seconds = sft_step_temp_bytes(model_cfg, lora_rank, lora_rank == 0, batch_size=32,
                                                micro=args.sft_micro, seq=seq, chunk=chunk)
            resident = state["weights"] + state["optimizer"]
            sft[f"sft {method} 32x{seq}"] = {"weights": state["weights"], "optimizer": state["optimizer"],
                                             "gradients": state["gradients"],
                                             "activations": max(temp - state["gradients"], 0), "kv_cache": 0,
                                             "peak": resident + temp, "compile_seconds": round(seconds, 1)}
            print(f"  sft {method} 32x{seq} (micro {args.sft_micro}): peak {_gb(resident + temp)} GB", flush=True)
    print()
    print(table(results, sft))
    return {k: {f: int(v[f]) for f in FIELDS} for k, v in results.items()}
