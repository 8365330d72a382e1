"""`python -m jaxmath.bench weight_sync --model=DIR [--lora_rank=64] [--jax_side_only]`: seconds per
weight sync from the JAX trainer to vLLM. On a GPU without vLLM:
`python -m jaxmath.bench weight_sync --preset=qwen3-4b --jax_side_only [--lora_rank=64]`.

Full: every weight in HF layout, streamed into vLLM's in-place reload (`--method=load_weights`) or
through a safetensors file in /dev/shm (`--method=file`). LoRA (`--lora_rank=R`) on all seven
projections: merged (`--lora_sync=merged`, what a colocated run does) folds the adapters into the
weights on the device and sends them as a full sync; adapter (`--lora_sync=adapter`, a server's way)
writes them in PEFT format and loads them under a new adapter id. The model is loaded
from DIR (HF format) into JAX; one warm-up sync (compiles the layout conversions, first adapter load),
then `--repeats` timed syncs with the weights changed before each, reporting the median.

`--server`: the same through a vLLM server this bench starts (`jaxmath.rollout.vllm.server.start_server`, log in
`--server_log`) and drives over HTTP, as `vllm.mode=server` does: full weights by file only.

`--jax_side_only` (GPU sessions, where no vLLM is installed): gathering, layout conversion and
DLPack handover to torch only, no engine; for LoRA, the PEFT export. The JSON last line carries
`sync_seconds` (and `gather_seconds`, the JAX side, in both modes).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import statistics
import time


def _perturb(model, step: int) -> None:
    """A tiny change to every trainable array, so each sync carries new values (not cached)."""
    import jax
    from flax import nnx

    from jaxmath.model.lora import has_lora
    from jaxmath.model.qwen3 import LoRAParam

    kind = LoRAParam if has_lora(model) else nnx.Param
    state = nnx.state(model, kind)
    nnx.update(model, jax.tree.map(lambda x: x + jax.numpy.asarray(1e-3 * step, x.dtype), state))


def _jax_side(model, method: str, lora: bool, workdir: str) -> float:
    """lora: the adapters as PEFT files (the adapter sync); a LoRA model synced merged takes the
    full-weight path, its adapters folded in (`weight_sync.hf_device_arrays`)."""
    import torch

    from jaxmath.model.peft import save_peft_adapter
    from jaxmath.rollout import weight_sync

    if lora:
        save_peft_adapter(model, os.path.join(workdir, "adapter"))
        return 0.0
    if method == "file":
        weight_sync.write_weights_file(model, os.path.join(workdir, "weights.safetensors"))
        return 0.0
    touched = 0
    for bucket in weight_sync.torch_buckets(model):
        for _, tensor in bucket:
            touched += tensor.numel()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return float(touched)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jaxmath.bench weight_sync")
    p.add_argument("--model", default="", help="HF-format Qwen3 directory (e.g. from make_bench_model.py)")
    p.add_argument("--preset", default="", help="instead of --model: a random model of this preset (e.g. qwen3-4b), "
                   "built on the device; --jax_side_only only, since vLLM needs a directory")
    p.add_argument("--lora_rank", type=int, default=0, help="sync LoRA adapters of this rank instead of full weights")
    p.add_argument("--method", default="load_weights", choices=["load_weights", "file"], help="full-weight path")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--jax_side_only", action="store_true", help="no vLLM: gather + handover (or PEFT export) only")
    p.add_argument("--shm_dir", default="/dev/shm")
    p.add_argument("--server", action="store_true", help="sync into a vLLM server (started here) over HTTP")
    p.add_argument("--server_log", default="/tmp/jaxmath_bench_vllm_server.log")
    p.add_argument("--lora_sync", default="merged", choices=["merged", "adapter"],
                   help="LoRA: adapters folded into the weights and sent in memory (a colocated vLLM, as main "
                        "runs it) or PEFT adapter files for vLLM's LoRA support (a server always)")
    a = p.parse_args(argv)
    if a.server:
        a.lora_sync = "adapter"
    if a.server and a.method == "load_weights":
        a.method = "file"  # the only full-weight path into a server (LoRA syncs ignore the method)
    if bool(a.model) == bool(a.preset):
        p.error("pass exactly one of --model=DIR and --preset=NAME")
    if a.preset and not a.jax_side_only:
        p.error("--preset builds the model in JAX only; add --jax_side_only, or export it and pass --model")
    return a


def main(argv: list[str]) -> dict:
    a = _parse(argv)

    import jax
    import jax.numpy as jnp

    from jaxmath.model import hf_io, init_model, lora, preset

    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[a.dtype]
    if a.preset:
        model = init_model(preset(a.preset, dtype=dtype, param_dtype=dtype), rng_impl="rbg")
    else:
        model = hf_io.from_pretrained(a.model, dtype=dtype)
    if a.lora_rank:
        lora.apply_lora(model, lora.LoRAConfig(rank=a.lora_rank, alpha=2.0 * a.lora_rank))
    workdir = os.path.join(a.shm_dir, f"jaxmath-bench-sync-{os.getpid()}")
    os.makedirs(workdir, exist_ok=True)
    engine = server = None
    adapters = bool(a.lora_rank) and a.lora_sync == "adapter"
    if not a.jax_side_only:
        from jaxmath.rollout.vllm import VLLMConfig, make_engine
        from jaxmath.rollout.vllm.server import start_server

        config = VLLMConfig(model_path=a.model, dtype=a.dtype, max_model_len=512, enable_lora=adapters,
                            max_lora_rank=max(a.lora_rank, 8), sync_method=a.method, shm_dir=a.shm_dir)
        if a.server:
            config = dataclasses.replace(config, mode="server", url=f"http://127.0.0.1:{_free_port()}")
            print(f"starting a vLLM server at {config.url} (log: {a.server_log})", flush=True)
            server = start_server(config, a.server_log)
        engine = make_engine(config)
    seconds, gather = [], []
    for step in range(a.repeats + 1):
        _perturb(model, step + 1)
        jax.block_until_ready(jax.tree.leaves(model))
        start = time.perf_counter()
        if engine is None:
            _jax_side(model, a.method, adapters, workdir)
            elapsed = time.perf_counter() - start
            g = elapsed
        else:
            metrics = engine.update_weights(model)
            elapsed, g = metrics["sync/seconds"], metrics["sync/gather_seconds"]
        if step:  # the first sync compiles the conversions and loads the first adapter
            seconds.append(elapsed)
            gather.append(g)
    nbytes = engine.last_sync.bytes if engine is not None else None
    if engine is not None:
        engine.close()
    if server is not None:
        from jaxmath.rollout.vllm.server import stop_server

        stop_server(server)
    import shutil

    shutil.rmtree(workdir, ignore_errors=True)
    return {"bench": "weight_sync", "model": a.model or a.preset, "lora_rank": a.lora_rank,
            "method": f"lora {a.lora_sync}" if a.lora_rank else a.method, "engine": "server" if a.server else "colocated", "dtype": a.dtype, "jax_side_only": a.jax_side_only,
            "device": str(jax.devices()[0].device_kind), "num_params": model.config.num_params(),
            "repeats": a.repeats, "sync_bytes": nbytes, "all_seconds": [round(s, 4) for s in seconds],
            "gather_seconds": round(statistics.median(gather), 4),
            "sync_seconds": round(statistics.median(seconds), 4)}
