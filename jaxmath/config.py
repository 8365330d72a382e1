"""Typed, frozen configuration built once from the ml_collections ConfigDict.

Only `jaxmath.main` reads ConfigDicts: it calls `build(SomeDataclass, cfg.section)` for each section
and passes the dataclasses to library code. `build` is strict: an unknown key, a missing required
key or a value of the wrong type is an error naming the key, never a silent default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the key."""


def _to_plain(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return value


def _coerce(name: str, annotation: Any, value: Any) -> Any:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if dataclasses.is_dataclass(annotation):
        return build(annotation, value, prefix=name)
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
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list or comma-separated string, got {value!r}")
        args = typing.get_args(annotation)
        inner = args[0] if args else Any
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


def build(cls: type[T], section: Mapping[str, Any] | Any, *, prefix: str = "", **extra: Any) -> T:
    """Instantiate dataclass `cls` from a ConfigDict section (plus `extra` fields), strictly."""
    section = dict(_to_plain(section) or {})
    section.update(extra)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(section) - set(fields))
    where = prefix or cls.__name__
    if unknown:
        raise ConfigError(f"unknown config keys {unknown} in {where}; valid keys: {sorted(fields)}")
    kwargs = {}
    for name, field in fields.items():
        if name in section:
            kwargs[name] = _coerce(f"{where}.{name}", hints[name], _to_plain(section[name]))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}.{name} is required")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which model and its numerics.

    path:   an HF-format Qwen3 directory (config.json + safetensors + tokenizer files)
    preset: instead of `path`, a randomly initialised preset (e.g. "tiny"; the demo builds its own)
    """

    path: str = ""
    preset: str = ""
    dtype: str = "bfloat16"
    param_dtype: str = ""  # empty: same as dtype
    remat: str = "full"
    attention_impl: str = ""  # "" = auto (cuDNN for training on a GPU, XLA elsewhere); "xla" or "cudnn"


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes; one may be -1 to take the remaining devices."""

    data: int = 1
    fsdp: int = 1
    tp: int = 1
