"""LoRA adapters on the Qwen3 projections, as their own NNX variable type (`LoRAParam`).

`apply_lora` attaches A [in..., rank] and B [rank, out...] to every projection whose name matches
`targets` (default: all seven attention and MLP projections). B starts at zero, so the adapted
model equals the base model until the first update; A follows PEFT's default (Kaiming-uniform,
bound 1 / sqrt(fan_in)). The update is scaled by alpha / rank.

Adapters are float32 whatever the base dtype, as PEFT keeps them: their gradients and Adam moments
follow their dtype (`jaxmath.optim`), so a 2e-5 step on an entry of 0.0123 is not rounded away
as it would be in bf16 (spacing 6.1e-5 there). The forward casts them to the compute dtype for the
matmul (`Dense.__call__`); merging folds them into the kernel in float32 and keeps the kernel's dtype.

Training selects adapters by type: `nnx.split(model, LoRAParam, ...)` gives the trainable state
without copying the base weights, and `model(..., lora=False)` is the reference policy.
Merging (`merge_lora`) folds B @ A into the kernels for export or for fast generation.

`train_unembed` adds one more adapter, on the LM head (`jaxmath.model.qwen3.HeadLoRA`: logits gain
scale * (h @ A) @ B), as Tinker's `LoraConfig.train_unembed` does by default. With tied embeddings only
the head changes, never the input embedding; merging unties the model (`merge_lora`).

Qwen3-4B with rank 64 on all seven projections has 132,120,576 adapter parameters (3.3% of
4,022,468,096); the head adapter adds 64 x (2,560 + 151,936) = 9,887,744, 142,008,320 in all (3.5%).
`tests/test_lora.py` counts both on Qwen3-4B's shapes.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmath.model.qwen3 import Dense, HeadLoRA, LoRAParam, Qwen3

DEFAULT_TARGETS = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
# The dotted paths of a Qwen3's projections (`projections`), for checking `targets` before any model exists.
PROJECTION_PATHS = ("layers.attn.q_proj", "layers.attn.k_proj", "layers.attn.v_proj", "layers.attn.o_proj",
                    "layers.mlp.gate_proj", "layers.mlp.up_proj", "layers.mlp.down_proj")
ADAPTER_DTYPE = jnp.float32


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters on the projections.

    rank:          the adapters' rank; 0 disables LoRA (full-parameter training)
    alpha:         the adapters' scale is alpha / rank. The study does not state alpha; 2 x rank
                   (scale 2) is the common PEFT choice with rank 64 and is the default here (the Tinker
                   rows set Tinker's: configs/grpo_common.py)
    targets:       a regular expression searched in each projection's dotted path (e.g.
                   "layers.attn.q_proj"); the default takes all seven attention and MLP projections
    dropout:       adapter dropout; only 0 is supported (the study uses 0)
    train_unembed: also adapt the LM head (Tinker's default; `HeadLoRA`)
    """

    rank: int = 64
    alpha: float = 128.0
    targets: str = DEFAULT_TARGETS
    dropout: float = 0.0
    train_unembed: bool = False

    def __post_init__(self):
        if self.rank < 0:
            raise ValueError(f"lora rank must be >= 0, got {self.rank}")
        if self.dropout != 0.0:
            raise ValueError("LoRA dropout is not supported (the study uses 0); set lora.dropout=0")
        try:
            pattern = re.compile(self.targets)
        except re.error as e:
            raise ValueError(f"lora.targets {self.targets!r} is not a regular expression ({e})") from e
        if not any(pattern.search(path) for path in PROJECTION_PATHS):
            raise ValueError(f"lora.targets {self.targets!r} matches no projection; the paths are {PROJECTION_PATHS}")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def projections(model: nnx.Module) -> Iterator[tuple[str, Dense]]:
    """(dotted path, module) of every Dense projection, e.g. ("layers.attn.q_proj", Dense)."""
    for path, module in nnx.iter_graph(model):
        if isinstance(module, Dense):
            yield ".".join(str(p) for p in path), module


def apply_lora(model: Qwen3, config: LoRAConfig, *, seed: int = 0) -> int:
    """Attach fresh float32 adapters in place; returns the number of adapter parameters."""
    if not config.enabled:
        return 0
    pattern = re.compile(config.targets)
    key = jax.random.key(seed)
    stack = (model.config.num_layers,)
    count = 0
    for i, (path, dense) in enumerate(projections(model)):
        if not pattern.search(path):
            continue
        kernel = dense.kernel.get_value()
        axes = dense.kernel.get_metadata()["axes"]
        in_shape, out_shape = kernel.shape[1:1 + dense.num_in], kernel.shape[1 + dense.num_in:]
        in_axes, out_axes = axes[1:1 + dense.num_in], axes[1 + dense.num_in:]
        bound = 1.0 / math.sqrt(math.prod(in_shape))
        a = jax.random.uniform(jax.random.fold_in(key, i), stack + in_shape + (config.rank,), ADAPTER_DTYPE,
                               -bound, bound)
        dense.lora_a = LoRAParam(a, axes=("layers",) + in_axes + ("lora_rank",))
        dense.lora_b = LoRAParam(jnp.zeros(stack + (config.rank,) + out_shape, ADAPTER_DTYPE),
                                 axes=("layers", "lora_rank") + out_axes)
        dense.lora_scale = config.scale
        count += a.size + dense.lora_b.get_value().size
    if count == 0:
        raise ValueError(f"lora.targets {config.targets!r} matched no projection; names are e.g. "
                         f"{[p for p, _ in projections(model)][:3]}")
    if config.train_unembed:
        head = model.base_head_weight()  # [vocab, embed]
        vocab, embed = head.shape
        bound = 1.0 / math.sqrt(embed)
        a = jax.random.uniform(jax.random.fold_in(key, 1 << 20), (embed, config.rank), ADAPTER_DTYPE, -bound, bound)
        model.head_lora = HeadLoRA(a, jnp.zeros((config.rank, vocab), ADAPTER_DTYPE), config.scale)
        count += a.size + config.rank * vocab
    return count


def lora_delta(dense: Dense) -> jax.Array:
    """scale * A @ B in the kernel's layout ([layers, in..., out...] stacked, [in..., out...] for one
    layer's module: `jaxmath.model.qwen3.unstack_layers`), float32."""
    a = dense.lora_a.get_value().astype(jnp.float32)
    b = dense.lora_b.get_value().astype(jnp.float32)
    if a.ndim + b.ndim - 2 == dense.kernel.get_value().ndim:  # one layer's
        return dense.lora_scale * jnp.tensordot(a, b, axes=1)
    return dense.lora_scale * jax.vmap(lambda x, y: jnp.tensordot(x, y, axes=1))(a, b)


def merge_lora(model: Qwen3) -> int:
    """Fold every adapter into its kernel (in float32, then the kernel's dtype) and remove it.
    Returns the number of projections merged (the LM head's adapter counts as one).

    A head adapter of a tied model unties it: the merged head becomes its own `lm_head` and the
    config says `tie_word_embeddings=False`, so an HF export writes lm_head.weight beside the
    unchanged embedding."""
    merged = 0
    if model.head_lora is not None:
        base = model.base_head_weight()
        head = (base.astype(jnp.float32) + model.head_lora.delta()).astype(base.dtype)
        if model.lm_head is None:
            model.lm_head = nnx.data(nnx.Param(head, axes=("vocab", "embed")))
            model.config = dataclasses.replace(model.config, tie_word_embeddings=False)
        else:
            model.lm_head.set_value(head)
        model.head_lora = None
        merged += 1
    for _, dense in projections(model):
        if dense.lora_a is None:
            continue
        kernel = dense.kernel.get_value()
        dense.kernel.set_value((kernel.astype(jnp.float32) + lora_delta(dense)).astype(kernel.dtype))
        dense.lora_a = None
        dense.lora_b = None
        dense.lora_scale = 0.0
        merged += 1
    return merged


def has_lora(model: Qwen3) -> bool:
    return getattr(model, "head_lora", None) is not None or any(
        dense.lora_a is not None for _, dense in projections(model))


def split_trainable(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, trainable, frozen): the LoRA adapters when the model has them, else every nnx.Param.
    GRPO and SFT both train exactly this split, so LoRA versus full-parameter is a property of the model."""
    has_adapters = bool(jax.tree.leaves(nnx.state(model, LoRAParam)))
    return nnx.split(model, LoRAParam if has_adapters else nnx.Param, ...)
