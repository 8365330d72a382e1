"""What a checkpoint step is on disk, and the errors for one that is not.

One step directory `<directory>/<step>/` holds everything a GRPO or SFT loop needs to resume:

    params/             trainable params (full or LoRA-only), orbax PyTree (OCDBT)
    opt_state/          optax state, orbax PyTree
    rng/                PRNG key data (uint32), orbax PyTree
    meta/meta.json      step, data cursor, how to rebuild the key and the params container, the digests
    config/config.json  the run config, readable by people and by `jaxmath.workdir` on resume
    metrics/metrics     the metrics given to `save`, when a best_metric ranks steps (orbax writes it)

`step_trees` turns a TrainState into those items, `train_state` turns them back; the rest checks that a
step directory is complete and fits the run reading it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxmath import checksum
from jaxmath.orbax_calls import reason

# Bump when the on-disk layout changes, so an old checkpoint fails with a message, not a KeyError.
# 2 added the digests in meta.json; a version-1 checkpoint restores only when the user accepts it
# unverified (`jaxmath.checkpoint.digests.accept_unverified`).
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)

ARRAY_ITEMS = ("params", "opt_state", "rng")
JSON_ITEMS = {"meta": "meta.json", "config": "config.json"}
ITEMS = ARRAY_ITEMS + tuple(JSON_ITEMS)
# Orbax's per-step commit record; a step directory without it was not written by a finished save.
STEP_METADATA_FILE = "_CHECKPOINT_METADATA"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message is one line saying what to do."""


class DamagedCheckpointError(CheckpointError):
    """A step directory that is partial or corrupt (as opposed to one that does not fit the target)."""

    def __init__(self, path: Path, what: str):
        self.path = path
        self.what = what
        super().__init__(f"checkpoint {path} is damaged: {what}")


@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a training loop needs to continue exactly where it stopped.

    params: pytree of arrays or `nnx.State` (full params, or LoRA params only).
    opt_state: optax state for `params` (namedtuples, int counters and all).
    step: number of optimizer steps taken.
    data_cursor: JSON-able position of the data iterator, e.g. {"epoch": 1, "index": 37}.
    rng_key: a typed `jax.random.key` or a raw uint32 key array.
    config: JSON-able run config.
    """

    params: Any
    opt_state: Any
    step: int
    data_cursor: dict
    rng_key: Any
    config: dict


def to_savable(tree: Any) -> Any:
    """nnx.State -> nested dict, so the files carry parameter names, not Variable internals."""
    if isinstance(tree, nnx.State):
        return nnx.to_pure_dict(tree)
    return tree


# Orbax refuses a pytree without leaves ("Found empty item"), which is what a stateless optimizer
# (optax.sgd without momentum, set_to_zero) gives; a placeholder leaf keeps every item directory
# present, so the completeness check stays uniform.
EMPTY_PLACEHOLDER = {"__empty_pytree__": np.zeros((), np.int8)}


def is_empty(tree: Any) -> bool:
    return not jax.tree.leaves(tree)


def from_savable(restored: Any, target: Any) -> Any:
    """Puts restored pure arrays back into the container type of `target`."""
    if isinstance(target, nnx.State):
        # tree.map copies the Variables, so the caller's target is left untouched.
        out = jax.tree.map(lambda x: x, target)
        nnx.replace_by_pure_dict(out, restored)
        return out
    return restored


def is_typed_key(key: Any) -> bool:
    return hasattr(key, "dtype") and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)


def key_data_target(key: Any) -> Any:
    """The uint32 data array (or its shape and sharding) that a typed or raw key target restores to."""
    if not is_typed_key(key):
        return key
    if isinstance(key, jax.Array):
        return jax.random.key_data(key)
    # Abstract typed key: the data has one more (trailing, unsplit) axis than the key, so a
    # NamedSharding gets a None appended; other shardings fall back to the default device.
    data = jax.eval_shape(jax.random.key_data, key)
    sharding = getattr(key, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (data.ndim - len(sharding.spec))
        sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
    elif not isinstance(sharding, jax.sharding.SingleDeviceSharding):
        sharding = None
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)


def step_trees(state: TrainState) -> tuple[dict[str, Any], dict[str, Any]]:
    """(meta without its digests, {item: tree}) of `state`: the arrays orbax writes for each item and
    what meta.json says about them."""
    key = state.rng_key
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "step": int(state.step),
        "data_cursor": state.data_cursor,
        "rng_impl": str(jax.random.key_impl(key)) if is_typed_key(key) else None,
        "params_container": "nnx.State" if isinstance(state.params, nnx.State) else "pytree",
        "empty_items": [name for name in ("params", "opt_state") if is_empty(getattr(state, name))],
    }
    trees = {
        name: EMPTY_PLACEHOLDER if name in meta["empty_items"] else to_savable(getattr(state, name))
        for name in ("params", "opt_state")
    }
    key_data = jax.random.key_data(key) if is_typed_key(key) else key
    if jax.process_count() > 1 and getattr(key_data, "is_fully_addressable", False):
        # A key made on one host's device is not a global array; every process holds the same
        # key, so orbax writes it from the primary host as a numpy array.
        key_data = np.asarray(key_data)
    trees["rng"] = {"key_data": key_data}
    return meta, trees


def restore_targets(meta: dict, target: TrainState) -> dict[str, Any]:
    """{item: the tree to restore it into} for a target TrainState (a placeholder for an item saved empty)."""
    empty_items = set(meta.get("empty_items", []))
    targets = {
        name: EMPTY_PLACEHOLDER if name in empty_items else to_savable(getattr(target, name))
        for name in ("params", "opt_state")
    }
    targets["rng"] = {"key_data": key_data_target(target.rng_key)}
    return targets


def train_state(meta: dict, config: Any, arrays: dict[str, Any], target: TrainState | None) -> TrainState:
    """The TrainState of a step read back: its arrays put into the target's containers (or left as read)."""
    empty_items = set(meta.get("empty_items", []))
    key_data = arrays["rng"]["key_data"]
    key = jax.random.wrap_key_data(key_data, impl=meta["rng_impl"]) if meta["rng_impl"] is not None else key_data
    trees = {}
    for name in ("params", "opt_state"):
        if name in empty_items:
            # Nothing was stored: the target's (leafless) tree is the value; without one, None.
            trees[name] = getattr(target, name) if target is not None else None
        elif target is not None:
            trees[name] = from_savable(arrays[name], getattr(target, name))
        else:
            trees[name] = arrays[name]
    return TrainState(params=trees["params"], opt_state=trees["opt_state"], step=int(meta["step"]),
                      data_cursor=meta["data_cursor"], rng_key=key, config=config)


def layout(tree: Any) -> dict[str, tuple[int, ...]]:
    """{path: shape} of a tree of arrays or ShapeDtypeStructs, paths as `checksum.path_name` writes them."""
    return {checksum.path_name(path): tuple(int(n) for n in np.shape(leaf))
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def layout_difference(recorded: dict[str, list], wanted: dict[str, tuple[int, ...]]) -> str | None:
    """How a checkpoint item's arrays differ from the target's, or None when paths and shapes agree."""
    for path in sorted(set(recorded) | set(wanted)):
        if path not in wanted:
            return f"it has {path!r}, which this run does not"
        if path not in recorded:
            return f"it lacks {path!r}, which this run has"
        if tuple(recorded[path][1]) != wanted[path]:
            return f"{path!r} has shape {tuple(recorded[path][1])} there and {wanted[path]} here"
    return None


def check_step_files(path: Path) -> None:
    """Fails early, naming the directory, if a step directory lacks files a finished save writes."""
    missing = [name for name in ITEMS if not (path / name).is_dir()]
    if not (path / STEP_METADATA_FILE).is_file():
        missing.append(STEP_METADATA_FILE)
    for name, filename in JSON_ITEMS.items():
        if (path / name).is_dir() and not (path / name / filename).is_file():
            missing.append(f"{name}/{filename}")
    if missing:
        raise DamagedCheckpointError(path, f"it is missing {', '.join(missing)} (cut short by a full disk or "
                                           "an interrupted copy?)")


def read_step_json(path: Path, item: str) -> Any:
    try:
        return json.loads((path / item / JSON_ITEMS[item]).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DamagedCheckpointError(path, f"{item}/{JSON_ITEMS[item]} is unreadable ({reason(e)})") from e
