"""LoRA adapters in Hugging Face PEFT format: adapter_model.safetensors + adapter_config.json.

vLLM's LoRA support, `peft.PeftModel.from_pretrained` and the adapter-only export read this format.
Names come from the HF name table (`jaxmath.model.hf_io.weight_table`): the adapter of
`model.layers.{i}.self_attn.q_proj.weight` is `base_model.model.model.layers.{i}.self_attn.q_proj.
lora_A.weight` [rank, in] and `...lora_B.weight` [out, rank], with in/out flattened the way HF flattens
the kernel (heads x head_dim). PEFT scales B @ A by lora_alpha / r, as jaxmath does.

    python -m jaxmath.convert.jax_to_hf --ckpt=RUN_OR_STEP_DIR --out=ADAPTER_DIR --adapter_only
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Iterable

import jax
import numpy as np

from jaxmath.model import hf_io
from jaxmath.model.config import Qwen3Config
from jaxmath.model.lora import projections
from jaxmath.model.qwen3 import Qwen3

PEFT_PREFIX = "base_model.model."
# The LM head's adapter (`jaxmath.model.qwen3.HeadLoRA`, lora.train_unembed): module path in the model
# and in a checkpoint's adapter tree, and its PEFT name (PEFT adapts HF's `lm_head` Linear; with tied
# embeddings only the head's output changes, as in jaxmath).
HEAD_PATH = "head_lora"
HEAD_PEFT_NAME = PEFT_PREFIX + "lm_head"


def _spec_for(config: Qwen3Config, module_path: str) -> hf_io.WeightSpec:
    for spec in hf_io.weight_table(config):
        if spec.num_in is not None and ".".join(spec.path[:-1]) == module_path:
            return spec
    raise ValueError(f"projection {module_path} has an adapter but no HF name in hf_io.weight_table")


def _tensors_from_pairs(pairs: Iterable[tuple[str, Any, Any]], config: Qwen3Config, dtype: Any = None
                        ) -> tuple[dict[str, np.ndarray], list[str], int]:
    """PEFT tensors from (module path like "layers.attn.q_proj", A [layers, in..., r], B [layers, r, out...])."""
    tensors: dict[str, np.ndarray] = {}
    targets: list[str] = []
    ranks = set()
    np_dtype = np.dtype(dtype) if dtype is not None else None
    for path, a, b in pairs:
        a = np.asarray(jax.device_get(a))
        b = np.asarray(jax.device_get(b))
        if path == HEAD_PATH:  # A [embed, r], B [r, vocab] -> lora_A [r, embed], lora_B [vocab, r]
            a, b = a.T, b.T
            if np_dtype is not None:
                a, b = a.astype(np_dtype), b.astype(np_dtype)
            ranks.add(a.shape[0])
            targets.append("lm_head")
            tensors[HEAD_PEFT_NAME + ".lora_A.weight"] = np.ascontiguousarray(a)
            tensors[HEAD_PEFT_NAME + ".lora_B.weight"] = np.ascontiguousarray(b)
            continue
        spec = _spec_for(config, path)
        layers, rank = a.shape[0], a.shape[-1]
        a = a.reshape(layers, -1, rank).transpose(0, 2, 1)  # [layers, r, in]
        b = b.reshape(layers, rank, -1).transpose(0, 2, 1)  # [layers, out, r]
        if np_dtype is not None:
            a, b = a.astype(np_dtype), b.astype(np_dtype)
        ranks.add(rank)
        targets.append(path.rsplit(".", 1)[-1])
        for i in range(layers):
            base = PEFT_PREFIX + spec.hf_name.format(i)[: -len(".weight")]
            tensors[base + ".lora_A.weight"] = np.ascontiguousarray(a[i])
            tensors[base + ".lora_B.weight"] = np.ascontiguousarray(b[i])
    if not tensors:
        raise ValueError("there are no LoRA adapters to export; attach them with jaxmath.model.lora.apply_lora, "
                         "or export full weights with save_pretrained / "
                         "`python -m jaxmath.convert.jax_to_hf --merge_lora`")
    if len(ranks) != 1:
        raise ValueError(f"PEFT's adapter_config has one rank; the adapters mix ranks {sorted(ranks)}")
    return tensors, sorted(targets), ranks.pop()


def peft_tensors(model: Qwen3, dtype: Any = None) -> tuple[dict[str, np.ndarray], list[str], int, float]:
    """Every adapter of `model` as PEFT tensors: (tensors by PEFT name, target module names such as
    "q_proj", rank, alpha). Raises if the model has no adapters or mixes ranks or scales."""
    pairs, scales = [], set()
    for path, dense in projections(model):
        if dense.lora_a is not None:
            pairs.append((path, dense.lora_a.get_value(), dense.lora_b.get_value()))
            scales.add(dense.lora_scale)
    if model.head_lora is not None:
        pairs.append((HEAD_PATH, model.head_lora.lora_a.get_value(), model.head_lora.lora_b.get_value()))
        scales.add(model.head_lora.lora_scale)
    if len(scales) > 1:
        raise ValueError(f"PEFT's adapter_config has one alpha; the adapters mix scales {sorted(scales)}")
    tensors, targets, rank = _tensors_from_pairs(pairs, model.config, dtype)
    return tensors, targets, rank, float(scales.pop() * rank)


def write_adapter(out_dir: str, tensors: dict[str, np.ndarray], targets: list[str], rank: int, alpha: float,
                  base_model_name_or_path: str = "") -> list[str]:
    """adapter_model.safetensors + adapter_config.json in `out_dir` (created); returns the file names."""
    os.makedirs(out_dir, exist_ok=True)
    hf_io.write_safetensors(os.path.join(out_dir, "adapter_model.safetensors"), tensors)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": int(rank),
        "lora_alpha": float(alpha),
        "lora_dropout": 0.0,
        "target_modules": sorted(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
        "init_lora_weights": True,
    }
    # Written last and renamed into place: a reader that sees the config sees complete weights.
    tmp = os.path.join(out_dir, "adapter_config.json.tmp")
    with open(tmp, "w") as f:
        json.dump(config, f, indent=2)
    os.replace(tmp, os.path.join(out_dir, "adapter_config.json"))
    return ["adapter_model.safetensors", "adapter_config.json"]


def save_peft_adapter(model: Qwen3, out_dir: str, base_model_name_or_path: str = "", *,
                      dtype: Any = None) -> dict[str, Any]:
    """Write `model`'s adapters as a PEFT adapter directory. Returns a record: files, tensors, bytes,
    rank, alpha, targets and seconds (the sync logs it)."""
    start = time.perf_counter()
    tensors, targets, rank, alpha = peft_tensors(model, dtype)
    files = write_adapter(out_dir, tensors, targets, rank, alpha, base_model_name_or_path)
    return {"files": files, "tensors": len(tensors), "bytes": sum(t.nbytes for t in tensors.values()),
            "rank": rank, "alpha": alpha, "targets": targets, "seconds": time.perf_counter() - start}


def save_peft_from_tree(lora_tree: dict, out_dir: str, *, alpha: float, config: Qwen3Config | None = None,
                        base_model_name_or_path: str = "", dtype: Any = None) -> dict[str, Any]:
    """The adapter-only export of a run checkpoint: `lora_tree` is its nested dict of adapters
    ({"layers": {"attn": {"q_proj": {"lora_a": A, "lora_b": B}}}}); no base weights are read.
    `config` only decides the HF names (default: a Qwen3 with tied embeddings; the layer names do
    not depend on the shapes)."""
    def walk(tree, prefix):
        if "lora_a" in tree:
            yield ".".join(prefix), tree["lora_a"], tree["lora_b"]
            return
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from walk(value, prefix + (key,))

    tensors, targets, rank = _tensors_from_pairs(walk(lora_tree, ()), config or Qwen3Config(), dtype)
    files = write_adapter(out_dir, tensors, targets, rank, alpha, base_model_name_or_path)
    return {"files": files, "tensors": len(tensors), "rank": rank, "alpha": alpha, "targets": targets}


def read_peft_adapter(adapter_dir: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(adapter_config, tensors by PEFT name) of a PEFT adapter directory."""
    cfg_path = os.path.join(adapter_dir, "adapter_config.json")
    st_path = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not (os.path.isfile(cfg_path) and os.path.isfile(st_path)):
        raise FileNotFoundError(f"{adapter_dir} is not a PEFT adapter (needs adapter_config.json and "
                                "adapter_model.safetensors); write one with jaxmath.model.peft.save_peft_adapter")
    with open(cfg_path) as f:
        config = json.load(f)
    reader = hf_io.SafetensorsFile(st_path)
    return config, {name: reader.read(name) for name in reader.names()}


def merge_into_hf(hf_weights: dict[str, np.ndarray], adapter_dir: str) -> dict[str, np.ndarray]:
    """HF weights with a PEFT adapter folded in (W + alpha / r * B @ A, in float32), as PEFT merges.
    An `lm_head` adapter on tied weights (no lm_head.weight) adds an lm_head.weight merged from the
    embedding: the result is untied (its config needs tie_word_embeddings false)."""
    config, tensors = read_peft_adapter(adapter_dir)
    scale = config["lora_alpha"] / config["r"]
    out = dict(hf_weights)
    for name, a in tensors.items():
        if not name.endswith(".lora_A.weight"):
            continue
        stem = name[len(PEFT_PREFIX): -len(".lora_A.weight")]
        b = tensors[name.replace(".lora_A.", ".lora_B.")]
        if stem == "lm_head" and "lm_head.weight" not in out:
            out["lm_head.weight"] = out["model.embed_tokens.weight"]
        w = out[stem + ".weight"]
        delta = scale * (b.astype(np.float32) @ a.astype(np.float32))
        out[stem + ".weight"] = (w.astype(np.float32) + delta).astype(w.dtype)
    return out

