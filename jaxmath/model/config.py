"""Qwen3 architecture hyperparameters, read from an HF `config.json` or chosen by preset name.

Only the dense Qwen3 family is supported (model_type "qwen3"). Both writers of HF configs are read:
transformers 4 keeps `rope_theta` / `rope_scaling` at the top level (the published checkpoints),
transformers 5 nests them in `rope_parameters`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


REMAT_MODES = ("none", "full", "dots", "offload", "attention", "attention_mlp")


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """Shapes and numerics of a dense Qwen3 model.

    `dtype` is the compute dtype (activations, matmul inputs); `param_dtype` the storage dtype of
    the weights. Softmax, norms and logit reductions always run in float32.
    """

    vocab_size: int = 151936
    hidden_size: int = 2560
    intermediate_size: int = 9728
    num_layers: int = 36
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    # ("type", value) pairs of the HF rope_scaling dict, kept hashable; () means plain RoPE.
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = 151645
    pad_token_id: int | None = 151643
    dtype: Any = jnp.bfloat16
    param_dtype: Any = jnp.bfloat16
    # Rematerialization of each decoder layer in training: "none", "full" (save nothing inside a
    # layer), "dots" (save matmul outputs without batch dims, recompute the rest), "attention" (save
    # the q/k/v projections, cuDNN attention's output and statistics and the residual after attention)
    # or "attention_mlp" (those and the MLP's gate and up projections); "offload" is
    # "full" with each layer's input kept in pinned host memory instead of the device's (what the
    # memory plan picks where not even one row fits otherwise: `jaxmath.aot.fit`).
    remat: str = "full"
    # Training attention kernel, "xla" or "cudnn". None = auto, decided by the platform the model is
    # placed on (`for_platform`, which `init_model` and `from_pretrained` call with their mesh's devices,
    # and the memory bench with its compile target); a config still None when traced uses XLA. The
    # KV-cache path always uses XLA.
    attention_impl: str | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.remat not in REMAT_MODES:
            raise ValueError(f"remat must be one of {REMAT_MODES}, got {self.remat!r}")
        if self.attention_impl not in (None, "xla", "cudnn"):
            raise ValueError(f"attention_impl must be 'xla', 'cudnn' or empty (auto), got {self.attention_impl!r}")

    @property
    def rope_scaling_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling)

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        eos = self.eos_token_id
        if eos is None:
            return ()
        return tuple(eos) if isinstance(eos, (tuple, list)) else (int(eos),)

    def replace(self, **changes) -> "Qwen3Config":
        return dataclasses.replace(self, **changes)

    def for_platform(self, platform: str) -> "Qwen3Config":
        """This config with an auto (None) `attention_impl` decided for `platform` ("gpu", "cuda",
        "cpu", "tpu", as a jax Device's `.platform` says): cuDNN's fused attention on an NVIDIA GPU
        when the compute dtype is bf16/fp16 and the head size is one cuDNN takes, XLA otherwise.
        An explicit choice is kept."""
        if self.attention_impl is not None:
            return self
        fits = jnp.dtype(self.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and \
            self.head_dim <= 128 and self.head_dim % 8 == 0
        return self.replace(attention_impl="cudnn" if fits and platform in ("gpu", "cuda") else "xla")

    def num_params(self) -> int:
        """Parameter count from shapes alone (no LoRA)."""
        d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * self.num_heads * h * 2 + d * self.num_kv_heads * h * 2 + 2 * h
        layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_layers * layer + d + head

    # --- HF config.json -------------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], **overrides) -> "Qwen3Config":
        model_type = hf.get("model_type")
        if model_type not in (None, "qwen3"):
            raise ValueError(
                f"config.json has model_type {model_type!r}; jaxmath supports the dense Qwen3 family "
                "(model_type 'qwen3', e.g. Qwen3-4B-Instruct-2507)")
        rope = dict(hf.get("rope_parameters") or {})
        rope_theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = dict(hf.get("rope_scaling") or {})
        if not scaling and rope.get("rope_type", "default") != "default":
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if scaling.get("rope_type", scaling.get("type", "default")) == "default":
            scaling = {}
        if "type" in scaling and "rope_type" not in scaling:
            scaling["rope_type"] = scaling.pop("type")
        num_heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id")
        kwargs = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads", num_heads),
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=tuple(sorted(scaling.items())),
            max_position_embeddings=hf.get("max_position_embeddings", 40960),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=hf.get("pad_token_id"),
        )
        if hf.get("attention_bias"):
            raise ValueError("Qwen3 checkpoints have no attention bias; this config sets attention_bias=true")
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_dir(cls, path: str, **overrides) -> "Qwen3Config":
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"model directory {path} does not exist; download Qwen3-4B-Instruct-2507 in HF format "
                "(hf download Qwen/Qwen3-4B-Instruct-2507 --local-dir DIR) or export one "
                "with `python -m jaxmath.convert.jax_to_hf`")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(
                f"model directory {path} has no config.json; point model.path at an HF-format Qwen3 "
                "directory (config.json + *.safetensors) or run `python -m jaxmath.convert.jax_to_hf`")
        try:
            with open(cfg_path) as f:
                hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path} is not valid JSON ({e}); re-download or re-export the model") from e
        try:
            return cls.from_hf_dict(hf, **overrides)
        except KeyError as e:
            raise ValueError(f"{cfg_path} lacks the field {e}; it does not look like a Qwen3 config") from e

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that transformers 4.5x and 5.x and vLLM read as Qwen3ForCausalLM."""
        dtype_name = {jnp.dtype(v): k for k, v in _DTYPES.items()}[jnp.dtype(self.param_dtype)]
        out = {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling_dict or None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "use_sliding_window": False,
            "sliding_window": None,
            "initializer_range": 0.02,
            "use_cache": True,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": dtype_name,
        }
        return out


def dtype_from_name(name: str | Any) -> Any:
    if not isinstance(name, str):
        return name
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[name]


# Published shapes of the dense Qwen3 family (Qwen/Qwen3-*/config.json on the HF hub).
_FAMILY = {
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_layers=28, num_heads=16, num_kv_heads=8,
                       tie_word_embeddings=True),
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_layers=28, num_heads=16, num_kv_heads=8,
                       tie_word_embeddings=True),
    "qwen3-4b": dict(hidden_size=2560, intermediate_size=9728, num_layers=36, num_heads=32, num_kv_heads=8,
                     tie_word_embeddings=True),
    # The 2507 Instruct release raised rope_theta and the context window.
    "qwen3-4b-instruct-2507": dict(hidden_size=2560, intermediate_size=9728, num_layers=36, num_heads=32,
                                   num_kv_heads=8, tie_word_embeddings=True, rope_theta=5_000_000.0,
                                   max_position_embeddings=262144),
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32, num_kv_heads=8,
                     tie_word_embeddings=False),
    "qwen3-14b": dict(hidden_size=5120, intermediate_size=17408, num_layers=40, num_heads=40, num_kv_heads=8,
                      tie_word_embeddings=False),
    "qwen3-32b": dict(hidden_size=5120, intermediate_size=25600, num_layers=64, num_heads=64, num_kv_heads=8,
                      tie_word_embeddings=False),
    # Test and benchmark shapes (as written by shared/bench/make_bench_model.py).
    "tiny": dict(hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                 tie_word_embeddings=True, max_position_embeddings=4096),
    "bench": dict(hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64,
                  tie_word_embeddings=True, max_position_embeddings=4096),
}


def preset(name: str, **overrides) -> Qwen3Config:
    """A Qwen3Config by family name, e.g. `preset("qwen3-4b", dtype=jnp.float32)`."""
    key = name.lower()
    if key not in _FAMILY:
        raise ValueError(f"unknown Qwen3 preset {name!r}; choose one of {sorted(_FAMILY)}")
    return Qwen3Config(**{**_FAMILY[key], **overrides})


PRESETS = tuple(sorted(_FAMILY))
