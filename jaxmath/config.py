"""Typed, frozen configuration: the defaults of every run setting, and the dataclasses built from a
config file once.

Defaults live in one place, the dataclasses. `defaults(mode)` turns a mode's dataclasses (`MODES`:
which dataclass each config section is) into the full ConfigDict, every field a key with its
default, so a config file (configs/*.py, loaded by path) starts from it and states only what
differs, and `--config.<section>.<key>=value` reaches every key. A field jaxmath fills from
another key (`Section.derived`, e.g. `eval.data_dir` from `data.dir`) is not a key: each setting
has one home.

Only the entry point reads ConfigDicts (`jaxmath.sections`, `jaxmath.validate`, `jaxmath.runs`, behind
`jaxmath.main`): it calls `build(SomeDataclass, cfg.section)` for each section
and passes the dataclasses to library code. `build` is strict: an unknown key, a missing required
key, a value of the wrong type, or a key that jaxmath derives from another one is an error naming
the key, never a silent default.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import math
import os
import types
import typing
from typing import Any, Mapping, Sequence, TypeVar

import ml_collections
from ml_collections import config_dict

from jaxmath.data.prompts import FEW_SHOT

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the key."""


@functools.lru_cache(maxsize=None)
def _type_hints(cls: type) -> dict[str, Any]:
    """A dataclass's field types, resolved once (the annotations are strings, and resolving them costs
    more than the rest of building a config)."""
    return typing.get_type_hints(cls)


def _to_plain(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return value


def _coerce(name: str, annotation: Any, value: Any, default: Any = dataclasses.MISSING) -> Any:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        base = default if dataclasses.is_dataclass(default) else None
        return build(annotation, value, prefix=name, base=base)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(name, option, value)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{name}={value!r} matches none of {annotation}")
    if origin is tuple:
        args = typing.get_args(annotation)
        inner = args[0] if args else Any
        if isinstance(value, str):
            value = [_parse_number(inner, v.strip()) for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list or comma-separated string, got {value!r}")
        return tuple(_coerce(f"{name}[{i}]", inner, v) for i, v in enumerate(value))
    if origin is dict or annotation is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name} must be a mapping, got {value!r}")
        return dict(value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    return value


def _parse_number(annotation: Any, text: str) -> Any:
    """An item of a comma-separated string, as the tuple's item type (int or float) when it parses."""
    try:
        return annotation(text) if annotation in (int, float) else text
    except ValueError:
        return text


def build(cls: type[T], section: Mapping[str, Any] | Any, *, prefix: str = "", base: Any = None, **extra: Any) -> T:
    """Instantiate dataclass `cls` from a ConfigDict section (plus `extra` fields), strictly.

    base: an instance of `cls` whose values stand in for keys the section leaves out (a nested
    dataclass field's default, e.g. SFTConfig.optimizer); otherwise the class defaults do.
    """
    section = dict(_to_plain(section) or {})
    where = prefix or cls.__name__
    derived = sorted(set(section) & set(extra))
    if derived:
        raise ConfigError(f"{where}.{derived[0]} is not a key: jaxmath sets it from another setting "
                          f"(see jaxmath.config.MODES); remove it from the config")
    section.update(extra)
    hints = _type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(section) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config keys {unknown} in {where}; valid keys: {sorted(fields)}")
    kwargs = {}
    for name, field in fields.items():
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        if name in section and section[name] is None and required:
            raise ConfigError(f"{where}.{name} is required: set it in the config or with --config.{where}.{name}=...")
        if name in section:
            kwargs[name] = _coerce(f"{where}.{name}", hints[name], _to_plain(section[name]), field.default)
        elif base is not None:
            kwargs[name] = getattr(base, name)
        elif required:
            raise ConfigError(f"{where}.{name} is required")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which model and its numerics.

    path:           an HF-format Qwen3 directory (config.json + safetensors + tokenizer files)
    preset:         instead of `path`, a randomly initialised preset (e.g. "tiny"; the demo builds its own)
    dtype:          the dtype the model computes in ("bfloat16", "float16" or "float32")
    param_dtype:    the dtype its weights are stored in; empty: same as dtype
    remat:          what the backward pass recomputes instead of storing: "full" (each layer's
                    activations), "dots" (all but the matmul outputs), "none", "attention" (all but
                    the q, k, v projections, the attention's output and the residual after it),
                    "attention_mlp" (those and the MLP's gate and up projections), or "offload" ("full"
                    with each layer's input in host memory). On a GPU the GRPO run's plan weighs
                    "full" against "attention" and "attention_mlp" at the rows each fits and takes the
                    fastest by the roofline model, or switches to "offload" where not even one row
                    fits otherwise (`jaxmath.aot.fit`), before weights load
    attention_impl: "" = auto (cuDNN for training on a GPU, XLA elsewhere); "xla" or "cudnn"
    """

    path: str = ""
    preset: str = ""
    dtype: str = "bfloat16"
    param_dtype: str = ""
    remat: str = "full"
    attention_impl: str = ""

    def __post_init__(self):
        if self.preset:
            from jaxmath.model.config import PRESETS

            if self.preset not in PRESETS:
                raise ValueError(f"model.preset {self.preset!r} is not one of {list(PRESETS)}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes; one may be -1 to take the remaining devices (by default FSDP over all).

    data: data-parallel replicas (each holds a full copy of the weights)
    fsdp: devices the weights and optimizer state are sharded over (fully sharded data parallel)
    tp:   tensor-parallel devices (each layer's heads and MLP columns split across them)
    """

    data: int = 1
    fsdp: int = -1
    tp: int = 1

    def __post_init__(self):
        sizes = {"data": self.data, "fsdp": self.fsdp, "tp": self.tp}
        bad = [f"mesh.{k}={v}" for k, v in sizes.items() if v == 0 or v < -1]
        if bad:
            raise ValueError(f"{bad[0]}: a mesh size must be >= 1, or -1 to take the remaining devices")
        if list(sizes.values()).count(-1) > 1:
            raise ValueError("at most one of mesh.data, mesh.fsdp and mesh.tp may be -1")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The top level of every config: the mode `jaxmath.main` runs and its run directory.

    mode:    what the run does: "grpo", "sft", "eval", "distill" or "demo" (set by the config file)
    workdir: "" = runs/<config file stem> (the --workdir flag wins over both)
    resume:  a workdir that holds a run continues it when the settings match (config.json; more
             steps or another eval limit are fine, see RESUMABLE); false moves the old run aside
             to <workdir>.old-<time> and starts over
    """

    mode: str
    workdir: str = ""
    resume: bool = True


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the data files are and, for GRPO, the training set.

    dir:   the folder of the JSONL data files (`python -m jaxmath.data.datasets --out data` writes them)
    train: GRPO's training set, a name of jaxmath.data.datasets (math_train, math_train_hard,
           gsm8k_train)
    limit: > 0 keeps the training set's first `limit` problems only; 0 keeps them all
    """

    dir: str = "data"
    train: str = "math_train"
    limit: int = 0

    def __post_init__(self):
        from jaxmath.data.datasets import FILES

        if self.train not in FILES:
            raise ValueError(f"data.train {self.train!r} is not a data set; choose one of {sorted(FILES)}")


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    """GRPO's training prompts.

    few_shot:        worked examples in the prompt's prefix (0: zero-shot, as the study trains)
    system:          a system turn before the problem; empty: none
    enable_thinking: the hybrid Qwen3 chat template's thinking switch (off: the Instruct-2507 models
                     answer without a <think> block)
    """

    few_shot: int = 0
    system: str = ""
    enable_thinking: bool = False


@dataclasses.dataclass(frozen=True)
class InitConfig:
    """Where a GRPO run starts.

    checkpoint: an earlier run's workdir to start from (its latest trainable params, a fresh optimizer
                state; GRPO v3 continues v2); empty starts from model.path
    """

    checkpoint: str = ""


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """Where a GRPO run generates.

    engine: the engine of the rollouts and of the periodic evaluation: "vllm" (`vllm.*`; the study
            configs, as the design card says) or "jax" (the in-process sampler, `sampler.*`; nothing
            more to install).
    """

    engine: str = "jax"

    def __post_init__(self):
        if self.engine not in ("jax", "vllm"):
            raise ValueError(f"rollout.engine must be 'jax' or 'vllm', got {self.engine!r}")


# --- the config of each mode --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Section:
    """One section of a mode's config: the dataclass whose fields are its keys.

    name:     the section's key ("" for the top level)
    cls:      "module:Class"
    top:      fields that are keys of the top level instead (a run's seed, steps, checkpoint_every)
    derived:  (field, source) of fields `jaxmath.sections` fills from another setting, so they are not
              keys (eval.data_dir from data.dir); a source that is a key names it
    only:     when set, the fields that are keys (the rest keep their defaults)
    base:     "module:Class.field": a default instance whose values are this section's defaults
              (SFTConfig.optimizer: SFT's own optimizer defaults)
    """

    name: str
    cls: str
    top: tuple[str, ...] = ()
    derived: tuple[tuple[str, str], ...] = ()
    only: tuple[str, ...] = ()
    base: str = ""

    def dataclass(self) -> type:
        module, _, name = self.cls.partition(":")
        return getattr(importlib.import_module(module), name)

    def default_instance(self) -> Any:
        if not self.base:
            return None
        owner, _, field = self.base.rpartition(".")
        module, _, name = owner.partition(":")
        return getattr(getattr(importlib.import_module(module), name), field)

    def keys(self) -> list[str]:
        """The section's keys, in field order."""
        names = [f.name for f in dataclasses.fields(self.dataclass()) if f.init]
        skip = set(self.top) | {name for name, _ in self.derived}
        return [n for n in names if n not in skip and (not self.only or n in self.only)]


_RUN = Section("", "jaxmath.config:RunConfig")
_MODEL = Section("model", "jaxmath.config:ModelConfig")
_MESH = Section("mesh", "jaxmath.config:MeshConfig")
_DATA_DIR = Section("data", "jaxmath.config:DataConfig", only=("dir",))
_VLLM = Section("vllm", "jaxmath.rollout.vllm.config:VLLMConfig", derived=(
    ("model_path", "model.path"), ("enable_lora", "lora.rank > 0, unless colocated and synced in memory (merged) or lora.train_unembed"), ("max_lora_rank", "lora.rank"),
    ("kv_cache_memory_bytes", "the device plan"), ("max_num_seqs", "the device plan")))
_RUN_LENGTH = ("steps", "seed", "checkpoint_every")
_GRPO = Section("rl", "jaxmath.rl.loop:GRPOConfig", top=_RUN_LENGTH)
_GRPO_LOSS = (_GRPO, Section("loss", "jaxmath.rl.step:LossConfig"),
              Section("optimizer", "jaxmath.optim:OptimizerConfig"))

MODES: dict[str, tuple[Section, ...]] = {
    "grpo": (_RUN, _MODEL, _MESH, Section("data", "jaxmath.config:DataConfig"),
             Section("init", "jaxmath.config:InitConfig"), Section("prompt", "jaxmath.config:PromptConfig"),
             *_GRPO_LOSS, Section("lora", "jaxmath.model.lora:LoRAConfig"),
             Section("rollout", "jaxmath.config:RolloutConfig"),
             Section("sampler", "jaxmath.rollout.jax_sampler:SamplerConfig"), _VLLM,
             Section("eval", "jaxmath.eval.run:EvalConfig",
                     derived=(("data_dir", "data.dir"), ("progress", "off during training"),
                              ("backend", "rollout.engine")))),
    "sft": (_RUN, _MODEL, _MESH, _DATA_DIR,
            Section("sft", "jaxmath.sft.loop:SFTConfig", top=_RUN_LENGTH,
                    derived=(("lora", "the lora section"), ("optimizer", "the optimizer section"))),
            Section("lora", "jaxmath.model.lora:LoRAConfig", base="jaxmath.sft.loop:SFTConfig.lora"),
            Section("optimizer", "jaxmath.optim:OptimizerConfig", base="jaxmath.sft.loop:SFTConfig.optimizer")),
    "eval": (_RUN, _MODEL, _MESH, _DATA_DIR, Section("sampler", "jaxmath.rollout.jax_sampler:SamplerConfig"), _VLLM,
             Section("eval", "jaxmath.eval.run:EvalConfig", derived=(("data_dir", "data.dir"),))),
    "distill": (_RUN, _DATA_DIR,
                Section("distill", "jaxmath.distill:DistillConfig", derived=(("data_dir", "data.dir"),))),
    "demo": (_RUN, _MESH, Section("demo", "jaxmath.demo:DemoConfig"), *_GRPO_LOSS),
}


def _config_value(annotation: Any, default: Any) -> Any:
    """A dataclass default as a ConfigDict value: tuples as comma-separated strings (what `build`
    reads back), a required field as a typed placeholder that the config must fill."""
    if default is dataclasses.MISSING:
        kind = next((t for t in (float, int, bool, str) if t is annotation or t in typing.get_args(annotation)), str)
        return config_dict.placeholder(kind)
    if isinstance(default, tuple):
        return ",".join(str(v) for v in default)
    return default


def section_defaults(section: Section) -> dict[str, Any]:
    """{key: default} of one section (top-level keys included, under their own names)."""
    cls = section.dataclass()
    base = section.default_instance()
    hints = _type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for name in section.keys() + list(section.top):
        field = fields[name]
        default = getattr(base, name) if base is not None else field.default
        if default is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        out[name] = _config_value(hints[name], default)
    return out


def defaults(mode: str) -> ml_collections.ConfigDict:
    """The full config of `mode` ("grpo", "sft", "eval", "distill", "demo"), every key at its
    dataclass default; config files start here and set what differs. Required fields without a
    default (optimizer.learning_rate, distill.endpoint) are typed placeholders the config must fill."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; one of {sorted(MODES)}")
    config = ml_collections.ConfigDict()
    config.mode = mode
    sections = MODES[mode]
    for section in sections:  # the top level first, so config.json reads from the top down
        if not section.name:
            values = section_defaults(section)
            values.pop("mode")
            config.update(values)
        else:
            config.update({k: v for k, v in section_defaults(section).items() if k in section.top})
    for section in sections:
        if section.name:
            values = section_defaults(section)
            config[section.name] = ml_collections.ConfigDict({k: values[k] for k in section.keys()})
    return config


def config_module(config_file: str, name: str) -> types.ModuleType:
    """A config file beside `config_file` (pass `__file__`), loaded by path: how configs/*.py share
    a base (configs/grpo_common.py) without configs/ being an installed package, from any cwd."""
    return load_module(os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py"))


def load_module(path: str) -> types.ModuleType:
    """The Python file at `path` as a fresh module (not cached in sys.modules)."""
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    if spec is None or spec.loader is None or not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} not found; pass e.g. configs/grpo_v2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- settings checked before any work ---------------------------------------------------------------

# Invariants of the keys a user sets, by their dotted name (a top-level key without a section), checked
# by `check_settings` before anything loads: a Range, or a tuple of the allowed values. The dataclasses'
# __post_init__ add their cross-field rules; this table is the one place for the range of each key.
class Range(typing.NamedTuple):
    """Inclusive bounds (None: open); `text` says the bound when low/high do not (e.g. "> 0")."""

    low: float | None
    high: float | None = None
    text: str = ""

    def bound(self) -> str:
        if self.text:
            return self.text
        return f">= {self.low}" if self.high is None else f"in [{self.low}, {self.high}]"


_AT_LEAST_1, _AT_LEAST_0, _FRACTION = Range(1), Range(0), Range(0.0, 1.0)
_POSITIVE = Range(1e-300, None, "> 0")
_UNIT = Range(1e-300, 1.0, "in (0, 1]")
_BELOW_1 = Range(0.0, 1.0 - 1e-12, "in [0, 1)")
_SEED = Range(0, 2 ** 32 - 1)
_FEW_SHOT = len(FEW_SHOT)
RULES: dict[str, tuple] = {
    "steps": Range(1),
    **{k: _SEED for k in ("seed", "eval.seed", "vllm.seed")},
    **{f"mesh.{k}": Range(-1, None, ">= 1, or -1 to take the remaining devices") for k in ("data", "fsdp", "tp")},
    "checkpoint_every": Range(0, None, ">= 1, or 0 to save at the end only"),
    "model.dtype": ("bfloat16", "float16", "float32"),
    "model.param_dtype": ("", "bfloat16", "float16", "float32"),
    "model.remat": ("none", "full", "dots", "offload", "attention", "attention_mlp"),
    "model.attention_impl": ("", "xla", "cudnn"),
    "data.limit": _AT_LEAST_0,
    "prompt.few_shot": Range(0, _FEW_SHOT, f"in [0, {_FEW_SHOT}] (the stored worked examples)"),
    "rollout.engine": ("jax", "vllm"),
    "sampler.cache_dtype": ("", "bfloat16", "float16", "float32"),
    "vllm.dtype": ("auto", "bfloat16", "float16", "float32", "half", "float"),
    **{f"rl.{k}": _AT_LEAST_1 for k in ("prompts_per_step", "max_prompt_tokens", "max_completion_tokens",
                                         "prompt_bucket", "keep_last", "early_stop_patience")},
    **{f"rl.{k}": _AT_LEAST_0 for k in ("keep_best", "eval_every", "plot_every", "reward_workers", "adv_eps",
                                         "early_stop_reward", "early_stop_grad_norm", "early_stop_ratio")},
    "rl.num_generations": Range(2, None, ">= 2 (GRPO compares the completions of a prompt)"),
    "rl.num_iterations": _AT_LEAST_1,
    "rl.rollout_devices": Range(0, None, ">= 0 (0: the sampler shares the trainer's devices)"),
    "rl.max_staleness": Range(0, 1, "0 (synchronous) or 1 (the next rollout overlaps this step's training)"),
    "rl.temperature": Range(1e-300, None, "> 0 (greedy rollouts have no policy gradient)"),
    "rl.oversample": Range(1.0, None, ">= 1.0 (prompts sampled per group kept)"),
    "rl.adv_scale": ("group_std", "none"),
    "rl.adv_std": ("sample", "population"),
    "rl.answer_fallback": ("", "gsm8k", "answer_is"),  # jaxmath.reward.extract_answer's: "" = \boxed{} only
    "rl.reward_timeout": _POSITIVE,
    "rl.warn_truncation": _FRACTION,
    "rl.warn_zero_std": _FRACTION,
    **{f"loss.{k}": _AT_LEAST_0 for k in ("eps_low", "eps_high", "beta", "micro_batch_rows")},
    "loss.logprob_chunk": _AT_LEAST_1,
    "loss.tis_cap": _AT_LEAST_0,
    "optimizer.warmup_steps": _AT_LEAST_0,
    "lora.rank": _AT_LEAST_0,
    "lora.dropout": _BELOW_1,
    **{f"sampler.{k}": _AT_LEAST_1 for k in ("max_batch_rows", "min_bucket")},
    **{f"sampler.{k}": _AT_LEAST_0 for k in ("vocab_chunk", "decode_window", "memory_budget_bytes", "compact_min_rows")},
    "optimizer.learning_rate": _AT_LEAST_0,
    "optimizer.total_steps": _AT_LEAST_0,
    "optimizer.end_lr_ratio": _FRACTION,
    "optimizer.b1": _FRACTION,
    "optimizer.b2": _FRACTION,
    "optimizer.eps": _AT_LEAST_0,
    "optimizer.weight_decay": _AT_LEAST_0,
    "optimizer.max_grad_norm": _AT_LEAST_0,
    "lora.alpha": _POSITIVE,
    "eval.limit": _AT_LEAST_0,
    "eval.temperature": _AT_LEAST_0,
    "eval.top_p": _UNIT,
    **{f"eval.{k}": _AT_LEAST_1 for k in ("num_samples", "max_new_tokens", "max_prompt_tokens", "batch_size")},
    "eval.few_shot": Range(0, _FEW_SHOT, f"in [0, {_FEW_SHOT}] (the stored worked examples)"),
    "eval.workers": _AT_LEAST_0,
    "eval.timeout": _POSITIVE,
    "vllm.max_model_len": Range(0, None, ">= 0 (0 fits it to the longest request)"),
    "vllm.gpu_memory_utilization": _FRACTION,
    "vllm.request_timeout_s": _POSITIVE,
    "vllm.max_concurrent_requests": _AT_LEAST_1,
    "vllm.sync_bucket_mb": _AT_LEAST_1,
    "vllm.cpu_kvcache_gib": _AT_LEAST_0,
    **{f"sft.{k}": _AT_LEAST_1 for k in ("batch_size", "keep_last", "chunk_size", "max_seq_len")},
    "sft.eval_fraction": _BELOW_1,
    **{f"sft.{k}": _AT_LEAST_0 for k in ("micro_batch_size", "epochs", "eval_every", "log_every",
                                          "max_trace_chars", "max_documents")},
    **{f"distill.{k}": _AT_LEAST_0 for k in ("limit", "max_retries", "backoff_seconds", "temperature")},
    **{f"distill.{k}": _AT_LEAST_1 for k in ("concurrency", "max_tokens")},
    "distill.timeout": _POSITIVE,
    "distill.grade_timeout": _POSITIVE,
    "distill.top_p": _UNIT,
    **{f"demo.{k}": _AT_LEAST_1 for k in ("digits", "num_train", "num_eval", "hidden_size", "intermediate_size",
                                           "num_layers", "num_heads", "num_kv_heads", "head_dim", "min_sft_steps",
                                           "default_steps", "sft_eval_every", "sft_batch_size")},
    **{f"demo.{k}": _AT_LEAST_0 for k in ("sft_steps", "sft_warmup_steps")},
    "demo.drop_carry": _FRACTION,
    "demo.drop_chained_carry": _FRACTION,
    "demo.sft_learning_rate": _POSITIVE,
}
# Per mode: SFT's steps may be 0 (= run sft.epochs passes).
_MODE_RULES = {"sft": {"steps": Range(0, None, ">= 0 (0 runs sft.epochs passes)")}}


def flat_items(config: Mapping[str, Any] | Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of a (nested) ConfigDict or dict."""
    out = {}
    for key, value in dict(_to_plain(config) or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_items(value, f"{name}."))
        else:
            out[name] = value
    return out


def _violation(key: str, value: Any, rule: Range | tuple | None) -> str | None:
    """What is wrong with `key=value` under `rule`, or None (a required key left unset is build's to say)."""
    if value is None:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"{key}={value!r} is not a finite number"
    if rule is None:
        return None
    if isinstance(rule, Range):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{key} must be a number, got {value!r}"
        if (rule.low is not None and value < rule.low) or (rule.high is not None and value > rule.high):
            return f"{key}={value!r} is out of range: it must be {rule.bound()}"
        return None
    if value not in rule:
        return f"{key}={value!r} is not one of {list(rule)}"
    return None


def rule(key: str, mode: str) -> Range | tuple | None:
    """The rule of `key` in a run of `mode` (RULES, where the mode does not have its own), or None."""
    return _MODE_RULES.get(mode, {}).get(key, RULES.get(key))


def check_settings(config: Mapping[str, Any] | Any) -> None:
    """Raises ConfigError naming the first key whose value breaks its rule (`RULES`), before any work."""
    values = flat_items(config)
    for key, value in values.items():
        key_rule = rule(key, values.get("mode", ""))
        if key_rule is not None or isinstance(value, float):  # NaN and inf pass every comparison: refused
            problem = _violation(key, value, key_rule)
            if problem:
                raise ConfigError(f"{problem}; set --config.{key}=...")


def nearest_key(key: str, keys: Sequence[str]) -> str | None:
    """The valid key closest to a mistyped one (difflib), e.g. "stepz" -> "steps"."""
    import difflib

    tail = key.rsplit(".", 1)[-1]
    matches = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not matches:  # a right name in the wrong section: match on the last part
        by_tail = {k.rsplit(".", 1)[-1]: k for k in keys}
        matches = [by_tail[m] for m in difflib.get_close_matches(tail, list(by_tail), n=1, cutoff=0.7)]
    return matches[0] if matches else None


def key_docs(cls: type) -> dict[str, str]:
    """{field: meaning} from a dataclass's docstring (`name: text` lines, also `a/b:` and `a, b:`) and the
    comments beside its fields."""
    import inspect
    import re

    docs: dict[str, str] = {}
    names = [f.name for f in dataclasses.fields(cls)]
    current: list[str] = []
    for line in (inspect.getdoc(cls) or "").splitlines():
        head = re.match(r"^\s*([\w ,/.]+?):\s+(\S.*)$", line)
        listed = re.split(r"[,/ ]+|\s*\.\.\s*", head.group(1).strip()) if head else []
        if head and all(n in names for n in listed if n):
            if ".." in head.group(1):  # `a .. b`: every field from a to b
                first, last = names.index(listed[0]), names.index(listed[-1])
                listed = names[first:last + 1]
            current = [n for n in listed if n]
            for n in current:
                docs[n] = head.group(2).strip()
        elif current and line.startswith(" ") and line.strip():
            for n in current:
                docs[n] += " " + line.strip()
        else:
            current = []
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        source = ""
    for name, comment in re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+)$", source, flags=re.M):
        if name in names and name not in docs:
            docs[name] = comment.strip()
    return docs


def describe_keys(config: Mapping[str, Any] | Any) -> list[tuple[str, Any, str]]:
    """(dotted key, value, meaning) of every key of `config` (a mode's config), in section order."""
    mode = config["mode"]
    values = flat_items(config)
    rows, seen = [], set()
    for section in MODES[mode]:
        docs = key_docs(section.dataclass())
        for name in list(section.top) + section.keys():
            key = f"{section.name}.{name}" if section.name and name not in section.top else name
            if key in values and key not in seen:
                seen.add(key)
                rows.append((key, values[key], docs.get(name, "")))
    rows += [(k, v, "") for k, v in values.items() if k not in seen]
    return rows


def load_config(spec: str) -> ml_collections.ConfigDict:
    """The ConfigDict of `path.py` or `path.py:arg` (what --config=... names), for tools other than
    main (benchmarks, the sweep, tests)."""
    path, _, arg = spec.partition(":")
    module = load_module(path)
    return module.get_config(arg) if arg else module.get_config()


# --- what a rerun in the same workdir may change --------------------------------------------------

# Keys whose change still resumes the run a workdir holds (anything else is refused, naming the keys):
# `steps` only upwards (a longer run continues the checkpoints), the evaluation's size, how often to
# plot and log, distillation's problem set (a later pass adds to the journal: another source, more
# problems), and the run directory / resume switch themselves.
RESUMABLE = ("steps", "eval.limit", "rl.plot_every", "sft.log_every", "distill.sources", "distill.limit",
             "workdir", "resume")


def resume_conflicts(saved: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """'key: old -> new' for each setting that differs between a workdir's saved config and this run's
    and that resuming does not allow (see RESUMABLE); empty when the run may continue."""
    old, now = flat_items(saved), flat_items(new)
    conflicts = []
    for key in sorted(set(old) | set(now)):
        before, after = old.get(key, "<absent>"), now.get(key, "<absent>")
        if before == after:
            continue
        if key == "steps" and isinstance(before, int) and isinstance(after, int) and after > before:
            continue
        if key in RESUMABLE and key != "steps":
            continue
        note = " (fewer steps)" if key == "steps" and isinstance(before, int) and isinstance(after, int) else ""
        conflicts.append(f"{key}: {before!r} -> {after!r}{note}")
    return conflicts
