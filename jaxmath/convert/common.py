"""What the converters (`python -m jaxmath.convert.hf_to_jax`, `... jax_to_hf`) share: finding and reading
the two kinds of jaxmath checkpoint, and turning either one back into a `Qwen3` model that
`save_pretrained` can export.

Two sources are understood:

- a converted checkpoint, written by `python -m jaxmath.convert.hf_to_jax`:
      CKPT/params/             orbax PyTree: the pure dict of the model's nnx.State
      CKPT/model_config.json   the HF config dict the weights belong to (rebuilds the model)
      CKPT/tokenizer.json ...  tokenizer files copied from the HF directory
- a training run checkpoint, written by `jaxmath.checkpoint.CheckpointManager`: a step directory
  (`RUN/<step>/` with params/, meta/, config/) or the run directory itself (its newest complete step).
  Its params are the trainable state only: every base weight for a full-parameter run, only the
  LoRA adapters for a LoRA run, so the base model comes from the run config's `model.path` (or an
  explicit base directory).

Run checkpoints are read with `jaxmath.checkpoint.read_params`, which checks the params against the
digests saved with them (a damaged step is refused, not exported) and never opens a CheckpointManager:
opening a manager on a live run directory removes its in-flight temporary step, and exporting must not
disturb a run that is still training.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from jaxmath.checkpoint import CheckpointError, load_pytree, read_params, save_pytree
from jaxmath.model import LoRAParam, Qwen3, Qwen3Config, from_pretrained, save_pretrained
from jaxmath.model.config import dtype_from_name
from jaxmath.model.hf_io import TOKENIZER_FILES, CheckpointReader
from jaxmath.model.lora import LoRAConfig, apply_lora, has_lora, merge_lora

MODEL_CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
# Files a finished CheckpointManager step holds (see jaxmath/checkpoint.py).
_STEP_FILES = ("params", "meta/meta.json", "config/config.json", "_CHECKPOINT_METADATA")
_ST_TO_DTYPE = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


class ConvertError(ValueError):
    """A directory or flag combination that cannot be converted; the message says what to do."""


# --- HF -> orbax ------------------------------------------------------------------------------------


def read_hf_config(hf_dir: str) -> dict[str, Any]:
    """config.json of an HF directory, with errors that name the directory and the fix."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isdir(hf_dir):
        raise ConvertError(f"--hf_dir {hf_dir} does not exist; pass an HF-format Qwen3 directory "
                           "(config.json + *.safetensors)")
    if not os.path.isfile(path):
        raise ConvertError(f"--hf_dir {hf_dir} has no config.json; it must be an HF-format Qwen3 directory "
                           "(config.json + *.safetensors), e.g. from `hf download Qwen/Qwen3-4B`")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path} is not valid JSON ({e}); re-download the model") from e


def stored_dtype(hf_dir: str) -> str:
    """Name of the dtype the embedding is stored in ("float32", "bfloat16", "float16"), so a conversion
    without --dtype keeps the weights bit for bit."""
    reader = CheckpointReader(hf_dir)
    name = "model.embed_tokens.weight"
    if name not in reader:
        raise ConvertError(f"{hf_dir} has safetensors but no {name}; it is not a Qwen3 checkpoint")
    code = reader.files[reader.where[name]].entries[name]["dtype"]
    if code not in _ST_TO_DTYPE:
        raise ConvertError(f"{hf_dir} stores weights as {code}; pass --dtype=bfloat16 or --dtype=float32")
    return _ST_TO_DTYPE[code]


def copy_tokenizer(src_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Copy the tokenizer files that exist in src_dir; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        src = Path(src_dir) / name
        if src.is_file() and src.resolve() != (Path(out_dir) / name).resolve():
            shutil.copyfile(src, Path(out_dir) / name)
            copied.append(name)
    return copied


def hf_to_orbax(hf_dir: str, out: str, dtype: str = "") -> dict[str, Any]:
    """Convert an HF directory into a converted checkpoint at `out` (which must not exist yet).
    Returns a summary (dtype, parameter count, tokenizer files)."""
    hf_config = read_hf_config(hf_dir)
    dtype = dtype or stored_dtype(hf_dir)
    if os.path.exists(out):
        raise ConvertError(f"--out {out} already exists; choose a new directory or delete it first")
    logging.info("loading %s as %s", hf_dir, dtype)
    model = from_pretrained(hf_dir, dtype=dtype_from_name(dtype))
    state = nnx.state(model)
    count = sum(x.size for x in jax.tree.leaves(state))
    os.makedirs(out)
    logging.info("writing %d parameters to %s", count, os.path.join(out, PARAMS_DIR))
    save_pytree(os.path.join(out, PARAMS_DIR), state)
    # The config keeps the source's own fields (and transformers' spelling of them); only the dtype
    # changes, so the converted checkpoint says what it stores.
    hf_config = dict(hf_config, torch_dtype=dtype)
    hf_config.pop("dtype", None)
    with open(os.path.join(out, MODEL_CONFIG_FILE), "w") as f:
        json.dump(hf_config, f, indent=2)
    tokenizer = copy_tokenizer(hf_dir, out)
    if not tokenizer:
        logging.warning("%s has no tokenizer files; the checkpoint will carry none", hf_dir)
    return {"dtype": dtype, "num_params": int(count), "tokenizer_files": tokenizer}


# --- finding a checkpoint ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Source:
    """A checkpoint to export. kind: "converted" (hf_to_jax output) or "run" (one training step)."""

    kind: str
    path: Path


def _is_step_dir(path: Path) -> bool:
    return (path / "_CHECKPOINT_METADATA").is_file() or ((path / "meta").is_dir() and (path / "params").is_dir())


def _check_step(path: Path) -> None:
    missing = [name for name in _STEP_FILES if not (path / name).exists()]
    if missing:
        raise ConvertError(f"training checkpoint step {path} is incomplete: it lacks {', '.join(missing)}. "
                           "It was probably cut short; pass an earlier step directory or the run directory")


def find_source(ckpt: str) -> Source:
    """Classify `ckpt` as a converted checkpoint, a run step directory, or a run directory (-> newest
    complete step); anything else is an error that says what was expected."""
    path = Path(ckpt).absolute()
    if not path.is_dir():
        raise ConvertError(f"--ckpt {ckpt} does not exist; pass a directory written by "
                           "`python -m jaxmath.convert.hf_to_jax` "
                           "or a training run checkpoint directory (RUN or RUN/<step>)")
    if (path / MODEL_CONFIG_FILE).exists() or (path / PARAMS_DIR).is_dir() and not _is_step_dir(path):
        missing = [n for n in (MODEL_CONFIG_FILE, PARAMS_DIR) if not (path / n).exists()]
        if missing:
            raise ConvertError(f"--ckpt {ckpt} looks like a converted checkpoint but lacks {', '.join(missing)}; "
                               "re-create it with `python -m jaxmath.convert.hf_to_jax --hf_dir=... --out=...`")
        return Source("converted", path)
    if _is_step_dir(path):
        _check_step(path)
        return Source("run", path)
    # Orbax finishes a step by renaming `<step>.orbax-checkpoint-tmp-*` to `<step>`, so only plain
    # integer names are complete steps.
    steps = sorted(int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit())
    if not steps:
        raise ConvertError(
            f"--ckpt {ckpt} is neither a converted checkpoint ({MODEL_CONFIG_FILE} + {PARAMS_DIR}/) nor a training "
            "checkpoint (a run directory with numbered step directories, or one step directory with params/, "
            f"meta/, config/); its entries are {sorted(p.name for p in path.iterdir())[:10]}")
    step_dir = path / str(steps[-1])
    _check_step(step_dir)
    logging.info("run directory %s: using its newest step %d (steps: %s)", path, steps[-1], steps)
    return Source("run", step_dir)


# --- reading ----------------------------------------------------------------------------------------


def _hf_config_of_converted(path: Path) -> dict[str, Any]:
    try:
        with open(path / MODEL_CONFIG_FILE) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path / MODEL_CONFIG_FILE} is not valid JSON ({e}); re-run "
                           "jaxmath.convert.hf_to_jax") from e


def load_converted(path: Path) -> Qwen3:
    """The model stored in a converted checkpoint, its params in the dtype they were stored in."""
    hf_config = _hf_config_of_converted(path)
    stored = hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32"
    try:
        config = Qwen3Config.from_hf_dict(hf_config, dtype=dtype_from_name(stored), param_dtype=dtype_from_name(stored))
    except KeyError as e:
        raise ConvertError(f"{path / MODEL_CONFIG_FILE} lacks the field {e}; re-run jaxmath.convert.hf_to_jax") from e
    abstract = nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    logging.info("restoring %s", path / PARAMS_DIR)
    try:
        state = load_pytree(path / PARAMS_DIR, target=abstract_state)
    except CheckpointError as e:
        raise ConvertError(
            f"{path / PARAMS_DIR} does not hold the parameters {MODEL_CONFIG_FILE} describes: {e}") from e
    return nnx.merge(graphdef, state)


@dataclasses.dataclass(frozen=True)
class RunCheckpoint:
    """One step of a training run: its trainable params (host numpy, nested dicts) and run config."""

    path: Path
    step: int
    params: dict
    config: dict

    @property
    def lora(self) -> dict:
        """The adapter subtree: every (lora_a, lora_b) pair, keyed by module path."""
        return _select(self.params, lambda keys: keys[-1] in ("lora_a", "lora_b"))

    @property
    def base(self) -> dict:
        """Everything that is not an adapter (all base weights for a full-parameter run, else empty)."""
        return _select(self.params, lambda keys: keys[-1] not in ("lora_a", "lora_b"))


def _select(tree: dict, keep, prefix: tuple = ()) -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            sub = _select(value, keep, prefix + (key,))
            if sub:
                out[key] = sub
        elif keep(prefix + (key,)):
            out[key] = value
    return out


def load_run(path: Path) -> RunCheckpoint:
    """One run step's params and config, verified against the digests saved with them: a damaged step
    (flipped or truncated data, a missing file) is refused in one line, never exported."""
    logging.info("restoring params from %s", path)
    try:
        step = read_params(path)
    except CheckpointError as e:
        raise ConvertError(f"{e}. Nothing was exported; pass an earlier step directory ({path.parent}/<step>)") from e
    if step.params is None:
        raise ConvertError(f"{path} saved no parameters (its trainable state was empty); nothing to export")
    return RunCheckpoint(path=path, step=step.step, params=step.params, config=step.config)


def base_model_dir(run: RunCheckpoint, base_model: str = "") -> str:
    """The HF directory of the run's base model: `base_model` if given, else the config's model.path."""
    path = base_model or (run.config.get("model") or {}).get("path", "")
    flag = "--base_model" if base_model else f"model.path in {run.path / 'config' / 'config.json'}"
    if not path:
        raise ConvertError(f"the run config of {run.path} names no model.path; pass --base_model=DIR, the "
                           "HF-format model the run started from")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConvertError(f"base model {path} (from {flag}) has no config.json; pass --base_model=DIR, the "
                           "HF-format model the run started from")
    return path


def lora_alpha(config: dict) -> float | None:
    """The run's LoRA alpha, wherever the run config keeps its `lora` section (top level or under a
    mode section such as `rl` or `model`)."""
    sections = [config.get("lora")] + [v.get("lora") for v in config.values() if isinstance(v, dict)]
    for section in sections:
        if isinstance(section, dict) and section.get("alpha") is not None:
            return float(section["alpha"])
    return None


def _lora_paths(tree: dict, prefix: tuple = ()) -> list[tuple[str, ...]]:
    """Module paths that hold an adapter pair, e.g. ("layers", "attn", "q_proj")."""
    if "lora_a" in tree or "lora_b" in tree:
        return [prefix]
    return [p for k, v in tree.items() if isinstance(v, dict) for p in _lora_paths(v, prefix + (k,))]


def model_from_run(run: RunCheckpoint, base_dir: str, dtype: str = "", *, merge: bool, alpha: float | None = None
                   ) -> Qwen3:
    """The model a run checkpoint describes: the base model from `base_dir`, overlaid with the run's
    trained params; with `merge`, adapters folded into the kernels.

    A LoRA checkpoint without `merge` is an error: the caller chooses how adapters leave (merged
    weights here; a PEFT adapter export is a separate path that needs only `run.lora`).
    """
    lora = run.lora
    if lora and not merge:
        raise ConvertError(
            f"{run.path} holds LoRA adapters. Pass --merge_lora to fold them into the base model and export "
            "full weights, or --adapter_only to export the adapters alone (PEFT format)")
    dtype = dtype or stored_dtype(base_dir)
    base = run.base
    if base:
        # Full-parameter run: every weight is in the checkpoint; base_dir supplies the shapes only.
        config = Qwen3Config.from_dir(base_dir, dtype=dtype_from_name(dtype), param_dtype=dtype_from_name(dtype))
        model = nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(0)))
        logging.info("full-parameter checkpoint; shapes from %s", base_dir)
        _overlay(model, nnx.Param, base, run.path, fill_all=True)
    else:
        logging.info("loading the base model %s as %s", base_dir, dtype)
        model = from_pretrained(base_dir, dtype=dtype_from_name(dtype))
    if lora:
        paths = _lora_paths(lora)
        ranks = {np.shape(_get(lora, p)["lora_a"])[-1] for p in paths}
        if len(ranks) != 1:
            raise ConvertError(f"{run.path} has adapters of different ranks {sorted(ranks)}; jaxmath writes one rank")
        alpha = alpha if alpha is not None else lora_alpha(run.config)
        if alpha is None:
            raise ConvertError(f"the run config of {run.path} has no lora.alpha; pass --lora_alpha=ALPHA as the "
                               "run used it (the scale of the merged update is alpha / rank)")
        head = ("head_lora",) in paths  # the LM head's adapter (lora.train_unembed)
        projections_paths = [p for p in paths if p != ("head_lora",)]
        targets = "^(" + "|".join(re.escape(".".join(p)) for p in projections_paths) + ")$"
        apply_lora(model, LoRAConfig(rank=ranks.pop(), alpha=alpha, targets=targets, train_unembed=head))
        _overlay(model, LoRAParam, lora, run.path, fill_all=True)
        merged = merge_lora(model)
        logging.info("merged %d LoRA projections (alpha %g)", merged, alpha)
    if has_lora(model):
        raise ConvertError("internal: adapters left after merging; report this with the checkpoint layout")
    return model


# --- export ----------------------------------------------------------------------------------------


def export_hf(ckpt: str, out: str, *, dtype: str = "", merge_lora: bool = False, base_model: str = "",
              lora_alpha: float | None = None) -> dict[str, Any]:
    """Export `ckpt` (converted or run checkpoint) as an HF directory `out`; returns a summary.

    The one place that decides how each checkpoint kind leaves, so another export mode (an
    adapter-only PEFT export) is one more flag and branch here.
    """
    source = find_source(ckpt)
    if source.kind == "converted":
        model = load_converted(source.path)
        tokenizer_dir = source.path
        summary: dict[str, Any] = {"source": "converted"}
    else:
        run = load_run(source.path)
        base_dir = base_model_dir(run, base_model)
        model = model_from_run(run, base_dir, dtype, merge=merge_lora, alpha=lora_alpha)
        tokenizer_dir = Path(base_dir)
        summary = {"source": "run", "step": run.step, "base_model": base_dir, "lora_merged": bool(run.lora)}
    logging.info("writing %s", out)
    written = save_pretrained(model, out, dtype=dtype_from_name(dtype) if dtype else None,
                              tokenizer_dir=str(tokenizer_dir))
    return {**summary, "out": out, "files": written}


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _overlay(model: Qwen3, var_type: type, values: dict, where: Path, fill_all: bool) -> None:
    """Set every `var_type` variable of `model` from the pure dict `values`, cast to the variable's
    dtype; a missing, extra or mis-shaped entry is an error naming the path."""
    state = nnx.state(model, var_type)
    expected = {path: var for path, var in nnx.to_flat_state(state)}
    given = {tuple(str(k) for k in path): leaf for path, leaf in _flatten(values)}
    missing = sorted(".".join(map(str, p)) for p in expected if tuple(map(str, p)) not in given)
    extra = sorted(".".join(p) for p in given if p not in {tuple(map(str, q)) for q in expected})
    if (missing and fill_all) or extra:
        raise ConvertError(f"{where} does not match the base model: missing {missing[:5]}, unexpected {extra[:5]}; "
                           "pass --base_model=DIR with the model the run was trained from")
    for path, var in expected.items():
        value = np.asarray(given[tuple(map(str, path))])
        target = var.get_value()
        if value.shape != tuple(target.shape):
            raise ConvertError(f"{where}: {'.'.join(map(str, path))} has shape {value.shape}, the base model "
                               f"expects {tuple(target.shape)}; pass the --base_model the run was trained from")
        var.set_value(jnp.asarray(value, dtype=target.dtype))
    nnx.update(model, state)


def _flatten(tree: dict, prefix: tuple = ()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, prefix + (key,))
        else:
            yield prefix + (key,), value
