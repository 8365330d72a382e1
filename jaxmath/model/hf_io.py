"""HF safetensors in and out. The one table mapping jaxmath parameter paths to HF names lives here,
shared by `from_pretrained`, `save_pretrained`, `jaxmath.convert` and the weight sync to vLLM.

Loading streams tensor by tensor (`os.pread` into a buffer per tensor, no mmap of the whole file),
converts straight to the target dtype and layout, and places each stacked parameter on its devices
before reading the next, so host memory stays near one copy of the weights.

Layouts: HF stores a linear layer as weight [out, in]; jaxmath keeps kernels [in..., out...] with
heads split out (q_proj [embed, heads, head_dim], o_proj [heads, head_dim, embed]), so conversion is
a transpose and a reshape, exact in both directions.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import logging
from flax import nnx

from jaxmath.model.config import Qwen3Config
from jaxmath.model.qwen3 import Qwen3
from jaxmath.model.sharding import make_mesh, variable_sharding

# --- the name table ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """One jaxmath parameter and its HF tensor(s).

    path:    keys into the model's NNX state, e.g. ("layers", "attn", "q_proj", "kernel")
    hf_name: HF tensor name; stacked parameters have a "{}" for the layer index
    num_in:  for projections, how many leading kernel dims are inputs (None: copied as is)
    """

    path: tuple[str, ...]
    hf_name: str
    num_in: int | None = None

    @property
    def stacked(self) -> bool:
        return "{}" in self.hf_name


_LAYER_TABLE = (
    (("input_norm", "scale"), "input_layernorm.weight", None),
    (("post_attn_norm", "scale"), "post_attention_layernorm.weight", None),
    (("attn", "q_norm", "scale"), "self_attn.q_norm.weight", None),
    (("attn", "k_norm", "scale"), "self_attn.k_norm.weight", None),
    (("attn", "q_proj", "kernel"), "self_attn.q_proj.weight", 1),
    (("attn", "k_proj", "kernel"), "self_attn.k_proj.weight", 1),
    (("attn", "v_proj", "kernel"), "self_attn.v_proj.weight", 1),
    (("attn", "o_proj", "kernel"), "self_attn.o_proj.weight", 2),
    (("mlp", "gate_proj", "kernel"), "mlp.gate_proj.weight", 1),
    (("mlp", "up_proj", "kernel"), "mlp.up_proj.weight", 1),
    (("mlp", "down_proj", "kernel"), "mlp.down_proj.weight", 1),
)

# The seven projections LoRA targets by default, by their HF module names.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def weight_table(config: Qwen3Config) -> list[WeightSpec]:
    specs = [WeightSpec(("embed",), "model.embed_tokens.weight"),
             WeightSpec(("final_norm", "scale"), "model.norm.weight")]
    if not config.tie_word_embeddings:
        specs.append(WeightSpec(("lm_head",), "lm_head.weight"))
    for path, hf, num_in in _LAYER_TABLE:
        specs.append(WeightSpec(("layers",) + path, "model.layers.{}." + hf, num_in))
    return specs


def to_jax_layout(hf: np.ndarray, spec: WeightSpec, shape: tuple[int, ...]) -> np.ndarray:
    """HF tensor -> jaxmath layout of one layer (`shape` without the layers axis)."""
    if spec.num_in is None:
        return hf.reshape(shape)
    return hf.T.reshape(shape)


def to_hf_layout(x: np.ndarray, spec: WeightSpec) -> np.ndarray:
    """jaxmath layout of one layer -> HF tensor [out, in] (contiguous)."""
    if spec.num_in is None:
        return np.ascontiguousarray(x)
    n_in = math.prod(x.shape[: spec.num_in])
    return np.ascontiguousarray(x.reshape(n_in, -1).T)


# --- safetensors, read and written directly -----------------------------------------------------

_ST_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


class SafetensorsFile:
    """Reads single tensors of a .safetensors file without mapping the whole file."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes); re-download or re-export it")
            n = int.from_bytes(head, "little")
            if n <= 0 or n > min(size - 8, 100_000_000):
                raise ValueError(f"{path} has a corrupt safetensors header (length {n}); re-download or re-export it")
            try:
                header = json.loads(f.read(n))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} has a corrupt safetensors header ({e}); re-download or re-export it") from e
        self.metadata = header.pop("__metadata__", {}) or {}
        self.entries = header
        self.data_start = 8 + n
        for name, e in header.items():
            end = self.data_start + e["data_offsets"][1]
            if end > size:
                raise ValueError(f"{path} is truncated: tensor {name} ends at byte {end} of {size}; "
                                 "re-download or re-export it")

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def read(self, name: str) -> np.ndarray:
        e = self.entries[name]
        dtype = _ST_DTYPES.get(e["dtype"])
        if dtype is None:
            raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {e['dtype']}")
        start, end = e["data_offsets"]
        buf = np.empty(end - start, np.uint8)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + start)
            if f.readinto(memoryview(buf)) != end - start:
                raise ValueError(f"{self.path} is truncated while reading {name}")
        return buf.view(dtype).reshape(e["shape"])


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write numpy arrays (bf16 through ml_dtypes) as one safetensors file, tensors in the given order."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, arr in tensors.items():
        dtype_name = _ST_NAMES.get(np.dtype(arr.dtype))
        if dtype_name is None:
            raise ValueError(f"cannot write {name}: dtype {arr.dtype} has no safetensors code")
        header[name] = {"dtype": dtype_name, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for arr in tensors.values():
            f.write(np.ascontiguousarray(arr).tobytes())
    os.replace(tmp, path)


class CheckpointReader:
    """All tensors of an HF directory: one model.safetensors, several with an index, or several without."""

    def __init__(self, path: str):
        index = os.path.join(path, "model.safetensors.index.json")
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            for name, fname in weight_map.items():
                if fname not in self.files:
                    fpath = os.path.join(path, fname)
                    if not os.path.isfile(fpath):
                        raise FileNotFoundError(f"{index} lists {fname}, which is missing from {path}; "
                                                "the download is incomplete")
                    self.files[fname] = SafetensorsFile(fpath)
                self.where[name] = fname
        else:
            names = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
            if not names:
                raise FileNotFoundError(
                    f"{path} has no *.safetensors weights; download the model in HF safetensors format or "
                    "export one with `python -m jaxmath.convert.jax_to_hf`")
            for fname in names:
                self.files[fname] = SafetensorsFile(os.path.join(path, fname))
                for name in self.files[fname].names():
                    self.where[name] = fname
        self.path = path

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def read(self, name: str) -> np.ndarray:
        if name not in self.where:
            raise KeyError(f"tensor {name} is missing from the checkpoint in {self.path}")
        return self.files[self.where[name]].read(name)

    def nbytes(self) -> int:
        return sum(os.path.getsize(f.path) for f in self.files.values())


# --- load ----------------------------------------------------------------------------------------


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def load_state(path: str, config: Qwen3Config, abstract_state: nnx.State,
               mesh: jax.sharding.Mesh | None = None) -> nnx.State:
    """Fill `abstract_state` (from `nnx.eval_shape`) with the HF weights in `path`, placed on `mesh`."""
    reader = CheckpointReader(path)
    mesh = mesh or make_mesh(devices=jax.devices()[:1])
    used: set[str] = set()
    for spec in weight_table(config):
        var = _get(abstract_state, spec.path)
        target = var.get_value()
        dtype = np.dtype(target.dtype)
        if spec.stacked:
            host = np.empty(target.shape, dtype)
            for i in range(config.num_layers):
                name = spec.hf_name.format(i)
                host[i] = _convert(reader, name, spec, target.shape[1:], dtype)
                used.add(name)
        else:
            host = _convert(reader, spec.hf_name, spec, target.shape, dtype)
            used.add(spec.hf_name)
        var.set_value(jax.device_put(host, variable_sharding(var, mesh)))
        del host
    extra = sorted(set(reader.where) - used - {"lm_head.weight"})
    if extra:
        logging.warning("ignored %d tensors in %s that a Qwen3 model does not use, e.g. %s", len(extra), path, extra[:3])
    return abstract_state


def _convert(reader: CheckpointReader, name: str, spec: WeightSpec, shape: tuple[int, ...], dtype: np.dtype):
    hf = reader.read(name)
    expected = math.prod(shape)
    if hf.size != expected:
        raise ValueError(f"tensor {name} in {reader.path} has shape {hf.shape}, but config.json implies "
                         f"{expected} elements ({shape} in jaxmath layout); config and weights disagree")
    return to_jax_layout(hf, spec, shape).astype(dtype)


def from_pretrained(path: str, dtype: Any = jnp.bfloat16, *, param_dtype: Any = None,
                    mesh: jax.sharding.Mesh | None = None, **config_overrides) -> Qwen3:
    """Load an HF-format Qwen3 directory (config.json + safetensors) as a jaxmath model.

    dtype: compute dtype; param_dtype: storage dtype of the weights (defaults to dtype). An auto
    attention kernel (attention_impl None) is decided for the platform of the devices the weights go to.
    """
    config = Qwen3Config.from_dir(path, dtype=dtype, param_dtype=param_dtype or dtype, **config_overrides)
    mesh = mesh or make_mesh(devices=jax.devices()[:1])
    config = config.for_platform(mesh.devices.flat[0].platform)
    abstract = nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    return nnx.merge(graphdef, load_state(path, config, abstract_state, mesh))


# --- save ----------------------------------------------------------------------------------------

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")


def hf_tensors(state: nnx.State, config: Qwen3Config, dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, numpy array in HF layout) for every weight, one layer slice at a time."""
    np_dtype = np.dtype(dtype) if dtype is not None else None
    for spec in weight_table(config):
        value = _get(state, spec.path).get_value()
        if spec.stacked:
            for i in range(config.num_layers):
                x = np.asarray(jax.device_get(value[i]))
                yield spec.hf_name.format(i), to_hf_layout(x if np_dtype is None else x.astype(np_dtype), spec)
        else:
            x = np.asarray(jax.device_get(value))
            yield spec.hf_name, to_hf_layout(x if np_dtype is None else x.astype(np_dtype), spec)


def save_pretrained(model_or_state: Qwen3 | nnx.State, out_dir: str, *, config: Qwen3Config | None = None,
                    dtype: Any = None, tokenizer_dir: str | None = None,
                    max_shard_bytes: int = 5 * 1024 ** 3) -> list[str]:
    """Write config.json + safetensors (sharded with an index above max_shard_bytes) that transformers
    and vLLM load, and copy tokenizer files from `tokenizer_dir` when given. Returns the files written."""
    if isinstance(model_or_state, Qwen3):
        config = config or model_or_state.config
        state = nnx.state(model_or_state)
    else:
        state = model_or_state
        if config is None:
            raise ValueError("save_pretrained of a bare state needs config=")
    if dtype is not None:
        config = config.replace(param_dtype=dtype)
    os.makedirs(out_dir, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in hf_tensors(state, config, dtype):
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    written = []
    if len(shards) == 1:
        write_safetensors(os.path.join(out_dir, "model.safetensors"), shards[0])
        written.append("model.safetensors")
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(os.path.join(out_dir, fname), shard)
            written.append(fname)
            for name, arr in shard.items():
                weight_map[name] = fname
                total += arr.nbytes
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        written.append("model.safetensors.index.json")
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config.to_hf_dict(), f, indent=2)
    written.append("config.json")
    if tokenizer_dir:
        for fname in TOKENIZER_FILES:
            src = os.path.join(tokenizer_dir, fname)
            if os.path.isfile(src) and os.path.abspath(src) != os.path.abspath(os.path.join(out_dir, fname)):
                shutil.copyfile(src, os.path.join(out_dir, fname))
                written.append(fname)
    return written
