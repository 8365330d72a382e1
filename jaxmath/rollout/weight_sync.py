"""Handing the trainer's weights to a rollout engine after each optimizer step (JAX side).

Three ways, fastest first; the `jaxmath.rollout.vllm` engines pick one:

- in memory: every weight in HF name and layout, converted on the device it lives on (one jitted
  transpose per stacked parameter, not per layer), gathered to one device when sharded, and handed
  to torch through DLPack, so no host copy is made when trainer and engine share a process; the
  tensors are grouped into buckets of about `bucket_bytes` so the engine's `load_weights` runs a
  few times per sync, never once per parameter (OpenRLHF#647, verl#496);
- LoRA, merged: where the engine runs without LoRA support (colocated vLLM, by default), each
  adapted projection is folded (kernel + scale * A @ B, float32, on the device) and sent in memory
  like a full sync: no file, no host copy, and vLLM decodes without LoRA kernels;
- LoRA, adapters: only the adapters, written in PEFT format (`jaxmath.model.peft`) for the engine's
  own LoRA support (a vLLM server, or vllm.enable_lora=True);
- file: one safetensors file in shared memory (/dev/shm), which any engine on the host can read,
  in-process or not. The fallback that always works.

Names and layouts come from `jaxmath.model.hf_io.weight_table`, the same table `jaxmath.convert` uses.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmath.model import hf_io
from jaxmath.model.config import Qwen3Config
from jaxmath.model.lora import has_lora
from jaxmath.model.qwen3 import Qwen3


@dataclasses.dataclass
class SyncRecord:
    """What one sync cost; `as_metrics()` goes into the step's metrics log.

    method:  "load_weights" | "lora" | "file"
    seconds: wall time of the whole sync; gather_seconds the JAX side (layout, gather, handover)
    """

    method: str
    seconds: float = 0.0
    gather_seconds: float = 0.0
    bytes: int = 0
    tensors: int = 0
    buckets: int = 0

    def as_metrics(self) -> dict[str, float]:
        return {"sync/seconds": self.seconds, "sync/gather_seconds": self.gather_seconds,
                "sync/bytes": float(self.bytes), "sync/buckets": float(self.buckets)}


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


@functools.partial(jax.jit, static_argnames=("num_in", "stacked", "dtype"))
def _hf_layout(x: jax.Array, *, num_in: int | None, stacked: bool, dtype: Any) -> jax.Array:
    """jaxmath layout -> HF layout on device: [layers?, in..., out...] -> [layers?, out, in]."""
    x = x.astype(dtype)
    if num_in is None:
        return x
    lead = x.shape[:1] if stacked else ()
    body = x.shape[len(lead):]
    n_in = math.prod(body[:num_in])
    x = x.reshape(lead + (n_in, -1))
    return jnp.swapaxes(x, -1, -2)


def _one_device(x: jax.Array) -> jax.Array:
    """Gather a sharded array onto its first device (DLPack hands over single-device buffers only)."""
    devices = x.sharding.device_set
    if len(devices) == 1:
        return x
    target = min(devices, key=lambda d: d.id)
    return jax.device_put(x, jax.sharding.SingleDeviceSharding(target))


@functools.partial(jax.jit, static_argnames=("scale", "num_in", "stacked", "dtype"))
def _merged_hf_layout(kernel: jax.Array, lora_a: jax.Array, lora_b: jax.Array, *, scale: float,
                      num_in: int | None, stacked: bool, dtype: Any) -> jax.Array:
    """A projection with its adapter folded in (kernel + scale * A @ B, in float32), in HF layout and
    `dtype`, on the device: the merged weights of a LoRA model, never the model's own arrays."""
    delta = jax.vmap(lambda a, b: jnp.tensordot(a, b, axes=1))(lora_a.astype(jnp.float32),
                                                                  lora_b.astype(jnp.float32))
    merged = kernel.astype(jnp.float32) + scale * delta
    return _hf_layout(merged, num_in=num_in, stacked=stacked, dtype=dtype)


def _module(model: Qwen3, path: tuple[str, ...]) -> Any:
    for key in path:
        model = getattr(model, key)
    return model


def hf_device_arrays(model: Qwen3, dtype: Any = None) -> Iterator[tuple[str, jax.Array]]:
    """(HF name, jax.Array in HF layout on one device) for every weight of `model`.

    A projection with a LoRA adapter is sent merged (kernel + scale * A @ B, computed in float32 on
    the device, then `dtype`), so an engine without LoRA support generates with the adapted policy;
    the model itself is not changed. Stacked parameters are converted whole and sliced per layer
    afterwards, so a sync dispatches one conversion per table entry.

    An adapted LM head (lora.train_unembed) is sent merged as "lm_head.weight", also for a tied model,
    whose table has no such entry: the engine must then untie its head (the vLLM worker extension
    does, `jaxmath.rollout.vllm.worker`), keeping the embedding it received as "embed_tokens".
    """
    config: Qwen3Config = model.config
    state = nnx.state(model)
    target = jnp.dtype(dtype) if dtype is not None else None
    head_lora = getattr(model, "head_lora", None)
    for spec in hf_io.weight_table(config):
        value = _get(state, spec.path).get_value()
        layout = dict(num_in=spec.num_in, stacked=spec.stacked, dtype=target or value.dtype)
        dense = _module(model, spec.path[:-1]) if spec.path[-1] == "kernel" else None
        if dense is not None and getattr(dense, "lora_a", None) is not None:
            hf = _one_device(_merged_hf_layout(value, dense.lora_a.get_value(), dense.lora_b.get_value(),
                                               scale=float(dense.lora_scale), **layout))
        elif spec.hf_name == HEAD_NAME and head_lora is not None:
            hf = _one_device(_merged_head(value, head_lora.lora_a.get_value(), head_lora.lora_b.get_value(),
                                          scale=float(head_lora.lora_scale), dtype=layout["dtype"]))
        else:
            hf = _one_device(_hf_layout(value, **layout))
        if spec.stacked:
            for i in range(config.num_layers):
                yield spec.hf_name.format(i), hf[i]
        else:
            yield spec.hf_name, hf
    if head_lora is not None and config.tie_word_embeddings:
        embed = model.embed.get_value()
        yield HEAD_NAME, _one_device(_merged_head(embed, head_lora.lora_a.get_value(), head_lora.lora_b.get_value(),
                                                  scale=float(head_lora.lora_scale), dtype=target or embed.dtype))


HEAD_NAME = "lm_head.weight"


@functools.partial(jax.jit, static_argnames=("scale", "dtype"))
def _merged_head(head: jax.Array, lora_a: jax.Array, lora_b: jax.Array, *, scale: float, dtype: Any) -> jax.Array:
    """The LM head [vocab, embed] with its adapter folded in (head + scale * (A @ B).T, in float32)."""
    delta = (lora_a.astype(jnp.float32) @ lora_b.astype(jnp.float32)).T
    return (head.astype(jnp.float32) + scale * delta).astype(dtype)


def to_torch(x: jax.Array):
    """A torch tensor sharing `x`'s buffer through DLPack (no copy), or a host copy where the platform
    cannot share (then torch gets a numpy-backed tensor)."""
    import torch

    try:
        return torch.from_dlpack(x)
    except (RuntimeError, TypeError, BufferError):
        return torch.from_numpy(np.asarray(jax.device_get(x)))


def torch_buckets(model: Qwen3, dtype: Any = None, bucket_bytes: int = 256 << 20,
                  record: SyncRecord | None = None) -> Iterator[list[tuple[str, Any]]]:
    """Lists of (HF name, torch tensor) of about `bucket_bytes` each, for the engine's load_weights.

    A tensor larger than a bucket gets a bucket to itself. `record` (when given) accumulates the
    bytes, tensors, buckets and the time spent on the JAX side (conversion, gather, handover).
    """
    bucket: list[tuple[str, Any]] = []
    size = 0
    start = time.perf_counter()
    for name, x in hf_device_arrays(model, dtype):
        tensor = to_torch(x)
        nbytes = tensor.element_size() * tensor.numel()
        if bucket and size + nbytes > bucket_bytes:
            if record is not None:
                record.gather_seconds += time.perf_counter() - start
                record.buckets += 1
            yield bucket
            start = time.perf_counter()
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
        if record is not None:
            record.bytes += nbytes
            record.tensors += 1
    if bucket:
        if record is not None:
            record.gather_seconds += time.perf_counter() - start
            record.buckets += 1
        yield bucket


def write_weights_file(model: Qwen3, path: str, dtype: Any = None, record: SyncRecord | None = None) -> str:
    """All base weights in HF names and layout as one safetensors file at `path` (the fallback sync).

    Put it under /dev/shm so the write and the engine's read stay in memory.
    """
    start = time.perf_counter()
    np_dtype = np.dtype(dtype) if dtype is not None else None
    tensors = {}
    for name, x in hf_device_arrays(model, dtype):
        arr = np.asarray(jax.device_get(x))
        tensors[name] = arr if np_dtype is None else arr.astype(np_dtype)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    hf_io.write_safetensors(path, tensors)
    if record is not None:
        record.gather_seconds += time.perf_counter() - start
        record.bytes += sum(a.nbytes for a in tensors.values())
        record.tensors += len(tensors)
        record.buckets += 1
    return path


def uses_lora(model: Qwen3) -> bool:
    """True when `model` carries adapters, so a LoRA sync (adapters only) applies."""
    return has_lora(model)
