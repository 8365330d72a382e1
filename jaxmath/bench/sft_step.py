"""`python -m jaxmath.bench sft_step --model=DIR --batch=B --seq=T`: tokens/s of one full SFT update
(forward, backward, clip, AdamW b1 0.9 / b2 0.95) in jaxmath against HF transformers (torch) on the
same model directory and the same token batch, in one process.

jaxmath runs `jaxmath.sft.make_sft_step` (chunked fused LM head, donated state); transformers runs
`model(ids, labels=ids).loss.backward()`, `clip_grad_norm_(1.0)` and `torch.optim.AdamW.step()`.
Both train every parameter in float32 on the CPU by default, with the loss on all B * T tokens, and
both recompute each decoder layer's forward in the backward pass by default (`--remat=full`; HF's
`gradient_checkpointing_enable()`, per decoder layer like jaxmath's scan): with `--remat=none` neither
does. (Before 2026-12-07 HF kept every activation while jaxmath recomputed: the ratios on record from
then compare unlike work.)
Timing alternates jaxmath and HF rounds, so load from other users of a shared machine hits both
alike; rates are medians over rounds, compile time is reported apart.

GPU mode, for the 4B shape without downloading weights:

    python -m jaxmath.bench sft_step --preset=qwen3-4b --random_weights --batch=1 --seq=4096 \
        --dtype=bfloat16 --lora_rank=64 --skip_hf          # and --lora_rank=0 for full-parameter

MFU = model FLOPs per step / step time / --peak_flops (989e12: H100 SXM dense bf16). Model FLOPs
per token (recomputation under remat is not counted, as in PaLM's MFU):
    full-parameter: 6 * N + 12 * L * H * Dh * T
    LoRA:           4 * N + 6 * N_lora + 12 * L * H * Dh * T
N counts the weights in matmuls (the layers plus the LM head; the embedding lookup is not a matmul,
and a tied embedding is counted once, as the head); the forward is 2N, the backward 2N for activation
gradients plus 2N for weight gradients, which frozen LoRA bases skip. 12 * L * H * Dh * T is
attention's QK^T and AV (forward + backward, no causal halving: PaLM appendix B, MaxText).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

from jaxmath.bench._common import add_model_flags, check_model_flags, load_model


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jaxmath.bench sft_step", description=__doc__.split("\n\n")[0])
    add_model_flags(p)
    p.add_argument("--batch", type=int, default=8, help="sequences per optimizer step")
    p.add_argument("--micro_batch", type=int, default=0, help="sequences per micro-batch (0 = batch)")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=2, help="timed steps per round and side")
    p.add_argument("--rounds", type=int, default=3, help="alternating jaxmath/HF rounds")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--param_dtype", default="", help="weight dtype (default float32 for full-parameter "
                                                      "on CPU, the compute dtype otherwise)")
    p.add_argument("--lora_rank", type=int, default=0, help="> 0: train LoRA adapters only (alpha = 2 * rank)")
    p.add_argument("--remat", default="full", choices=["none", "full", "dots"])
    p.add_argument("--attention_impl", default="", help="'' = auto (cuDNN on a GPU, XLA elsewhere); 'xla' or 'cudnn'")
    p.add_argument("--chunk_size", type=int, default=1024, help="token positions per LM-head chunk")
    p.add_argument("--peak_flops", type=float, default=989e12, help="device peak FLOP/s for MFU")
    p.add_argument("--skip_hf", action="store_true", help="time jaxmath only")
    a = p.parse_args(argv)
    check_model_flags(p, a)
    return a


def flops_per_token(config, seq: int, lora_params: int) -> float:
    """Model FLOPs per trained token (see the module docstring)."""
    d, f, h, kv, dh, layers = (config.hidden_size, config.intermediate_size, config.num_heads, config.num_kv_heads,
                               config.head_dim, config.num_layers)
    per_layer = d * h * dh * 2 + d * kv * dh * 2 + 3 * d * f
    matmul_params = layers * per_layer + config.vocab_size * d
    attention = 12 * layers * h * dh * seq
    if lora_params:
        return 4 * matmul_params + 6 * lora_params + attention
    return 6 * matmul_params + attention


def _jax_side(args: argparse.Namespace):
    """(step, state tuple, batch, model config, trainable count, lora count, compile seconds)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxmath import sft
    from jaxmath.model.config import dtype_from_name
    from jaxmath.model.lora import LoRAConfig, apply_lora
    from jaxmath.optim import OptimizerConfig, make_optimizer

    dtype = dtype_from_name(args.dtype)
    param_dtype = dtype_from_name(args.param_dtype) if args.param_dtype else (
        jnp.float32 if args.lora_rank == 0 and args.dtype == "float32" else dtype)
    model = load_model(args, dtype, param_dtype, remat=args.remat, attention_impl=args.attention_impl or None)
    lora_params = apply_lora(model, LoRAConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank)) \
        if args.lora_rank else 0
    graphdef, trainable, frozen = sft.split_trainable(model)
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-5, b1=0.9, b2=0.95, max_grad_norm=1.0))
    opt_state = jax.jit(optimizer.init)(trainable)
    step = sft.make_sft_step(graphdef, optimizer, chunk_size=args.chunk_size, remat=args.remat != "none")

    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (args.batch, args.seq)).astype(np.int32)
    arrays = {"input_ids": ids, "targets": np.roll(ids, -1, axis=1),
              "segment_ids": np.ones_like(ids), "positions": np.broadcast_to(np.arange(args.seq), ids.shape).copy(),
              "loss_mask": np.ones(ids.shape, bool)}
    arrays["loss_mask"][:, -1] = False  # the last position has no next token (as HF's shifted labels)
    micro = args.micro_batch or args.batch
    batch = {k: jnp.asarray(v) for k, v in sft.stack_micro(arrays, args.batch // micro).items()}
    start = time.perf_counter()
    compiled = step.lower(trainable, frozen, opt_state, batch).compile()
    compile_s = time.perf_counter() - start
    count = sum(x.size for x in jax.tree.leaves(trainable))
    return compiled, [trainable, frozen, opt_state], batch, ids, model.config, count, lora_params, compile_s


def _run_jax(step, state: list, batch, steps: int) -> tuple[float, float]:
    """Mean seconds per step and the last loss; `state` is updated in place (donated buffers)."""
    import jax

    start = time.perf_counter()
    for _ in range(steps):
        state[0], state[2], metrics = step(state[0], state[1], state[2], batch)
    jax.block_until_ready(state[0])
    return (time.perf_counter() - start) / steps, float(metrics["loss"])


def _hf_side(args: argparse.Namespace, ids_np):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).train()
    if args.remat != "none":  # the same recomputation as jaxmath's (whole layers; HF has no "dots")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)
    ids = torch.as_tensor(ids_np, dtype=torch.long)

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step, bool(model.is_gradient_checkpointing)


def main(argv: list[str]) -> dict[str, Any]:
    args = _parse(argv)
    import jax

    if args.batch % (args.micro_batch or args.batch):
        raise SystemExit(f"--batch {args.batch} must be a multiple of --micro_batch {args.micro_batch}")
    tokens = args.batch * args.seq
    step, state, batch, ids, config, trainable, lora_params, compile_s = _jax_side(args)
    _, loss = _run_jax(step, state, batch, 1)  # warm-up: allocation and thread pools, not timed
    result: dict[str, Any] = {
        "model": args.model or args.preset, "batch": args.batch, "micro_batch": args.micro_batch or args.batch,
        "seq": args.seq, "dtype": args.dtype, "lora_rank": args.lora_rank, "remat": args.remat,
        "attention_impl": args.attention_impl or "auto",
        "trainable_params": int(trainable), "compile_s": round(compile_s, 2), "loss": loss,
        "backend": jax.default_backend(), "device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count()}

    hf_step = None
    if not args.skip_hf:
        if not args.model:
            raise SystemExit("the HF comparison needs --model=DIR (or pass --skip_hf)")
        import torch

        hf_step, result["hf_gradient_checkpointing"] = _hf_side(args, ids)
        result["hf_loss"] = hf_step()  # warm-up; one update, like jaxmath's
        # Same weights, same tokens: the first (pre-update) losses agree in float32, or the two sides
        # do different work.
        result["loss_matches_hf"] = abs(result["hf_loss"] - loss) < 1e-3 * abs(loss)
        result["torch_threads"] = torch.get_num_threads()

    jax_s, hf_s = [], []
    for _ in range(args.rounds):
        seconds, result["loss"] = _run_jax(step, state, batch, args.steps)
        jax_s.append(seconds)
        if hf_step is not None:
            start = time.perf_counter()
            for _ in range(args.steps):
                result["hf_loss"] = hf_step()
            hf_s.append((time.perf_counter() - start) / args.steps)
    step_s = statistics.median(jax_s)
    result["step_s"] = round(step_s, 4)
    result["tokens_per_s"] = round(tokens / step_s, 1)
    flops = flops_per_token(config, args.seq, lora_params) * tokens
    result["model_tflops_per_step"] = round(flops / 1e12, 3)
    result["mfu"] = round(flops / step_s / args.peak_flops, 4)
    if hf_s:
        result["hf_step_s"] = round(statistics.median(hf_s), 4)
        result["hf_tokens_per_s"] = round(tokens / statistics.median(hf_s), 1)
        result["speedup"] = round(statistics.median(hf_s) / step_s, 3)
    return result
