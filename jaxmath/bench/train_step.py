"""`python -m jaxmath.bench train_step --model=DIR --batch=B --seq=T`: forward+backward tokens/s of
jaxmath against HF transformers (torch) on the same model directory and the same token batch.

Both sides compute the mean next-token cross-entropy and the gradient of every parameter, with no
optimizer update: jaxmath as one jitted `value_and_grad` of `token_logprobs` (chunked, fused LM
head) over the model's hidden states; transformers as `model(ids, labels=ids).loss.backward()` in
float32. The two are timed in alternating rounds in one process, so load from other users of a
shared machine hits both alike; the reported rates are medians over rounds. jaxmath's compile time
is reported separately and is not part of its rate.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jaxmath.bench train_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF-format Qwen3 directory (e.g. /tmp/models/bench)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round and side")
    p.add_argument("--rounds", type=int, default=3, help="alternating jaxmath/HF rounds")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="jaxmath compute dtype")
    p.add_argument("--chunk_size", type=int, default=1024, help="token positions per LM-head chunk")
    p.add_argument("--remat", default="none", choices=["none", "full", "dots"],
                   help="jaxmath layer rematerialization (HF stores all activations, like 'none')")
    p.add_argument("--precision", default="default", choices=["default", "high", "highest"],
                   help="jax_default_matmul_precision for float32 matmuls")
    p.add_argument("--skip_hf", action="store_true", help="time jaxmath only")
    p.add_argument("--profile_dir", default="", help="write a jax.profiler trace of one jaxmath step here")
    return p.parse_args(argv)


def _jax_step(args: argparse.Namespace):
    """Returns (step_fn, state, ids, compile_s): step_fn(state, ids) -> (loss, grads)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxmath.model import from_pretrained, token_logprobs
    from jaxmath.model.config import dtype_from_name

    if args.precision != "default":
        jax.config.update("jax_default_matmul_precision", args.precision)
    dtype = dtype_from_name(args.dtype)
    model = from_pretrained(args.model, dtype=dtype, param_dtype=jnp.float32, remat=args.remat)
    graphdef, state = nnx.split(model)
    vocab = model.config.vocab_size
    ids = jnp.asarray(np.random.default_rng(0).integers(0, vocab, (args.batch, args.seq)), jnp.int32)

    def loss_fn(state, ids):
        m = nnx.merge(graphdef, state)
        hidden = m.hidden_states(ids, remat=args.remat != "none")
        logprobs, _ = token_logprobs(hidden[:, :-1], m.head_weight, ids[:, 1:], chunk_size=args.chunk_size)
        return -jnp.mean(logprobs)

    step = jax.jit(jax.value_and_grad(loss_fn))
    start = time.perf_counter()
    compiled = step.lower(state, ids).compile()
    compile_s = time.perf_counter() - start
    return compiled, state, ids, compile_s


def _time_jax(step, state, ids, steps: int) -> float:
    import jax

    start = time.perf_counter()
    for _ in range(steps):
        out = step(state, ids)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / steps


def _hf_step(args: argparse.Namespace, ids_np):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).train()
    ids = torch.as_tensor(ids_np, dtype=torch.long)

    def step() -> float:
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return float(loss.detach())

    return step


def _time_hf(step, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main(argv: list[str]) -> dict[str, Any]:
    args = _parse(argv)
    import jax
    import numpy as np

    tokens = args.batch * args.seq
    step, state, ids, compile_s = _jax_step(args)
    loss, _ = step(state, ids)  # first run: allocation and thread-pool warm-up, not timed
    result: dict[str, Any] = {"model": args.model, "batch": args.batch, "seq": args.seq, "dtype": args.dtype,
                              "chunk_size": args.chunk_size, "remat": args.remat, "precision": args.precision,
                              "compile_s": round(compile_s, 2), "loss": float(loss),
                              "backend": jax.default_backend(), "cpu_count": os.cpu_count()}
    if args.profile_dir:
        jax.profiler.start_trace(args.profile_dir)
        jax.block_until_ready(step(state, ids))
        jax.profiler.stop_trace()

    hf_step = None
    if not args.skip_hf:
        import torch

        hf_step = _hf_step(args, np.array(ids))  # a writable copy; torch warns on read-only buffers
        start = time.perf_counter()
        result["hf_loss"] = hf_step()  # warm-up, like jaxmath's first run
        result["hf_first_step_s"] = round(time.perf_counter() - start, 2)
        # Same weights, same tokens, same loss (in float32): a mismatch means the two sides do
        # different work.
        if args.dtype == "float32":
            result["loss_matches_hf"] = abs(result["hf_loss"] - result["loss"]) < 1e-3 * abs(result["hf_loss"])
        result["torch_threads"] = torch.get_num_threads()

    jax_s, hf_s = [], []
    for _ in range(args.rounds):
        jax_s.append(_time_jax(step, state, ids, args.steps))
        if hf_step is not None:
            hf_s.append(_time_hf(hf_step, args.steps))
    result["step_s"] = round(statistics.median(jax_s), 4)
    result["tokens_per_s"] = round(tokens / statistics.median(jax_s), 1)
    if hf_s:
        result["hf_step_s"] = round(statistics.median(hf_s), 4)
        result["hf_tokens_per_s"] = round(tokens / statistics.median(hf_s), 1)
        result["speedup"] = round(statistics.median(hf_s) / statistics.median(jax_s), 3)
    return result
