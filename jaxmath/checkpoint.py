"""Orbax save and restore of the whole train state, so a run continues exactly.

One step directory `<directory>/<step>/` holds everything a GRPO or SFT loop needs to resume:

    params/             trainable params (full or LoRA-only), orbax PyTree (OCDBT)
    opt_state/          optax state, orbax PyTree
    rng/                PRNG key data (uint32), orbax PyTree
    meta/meta.json      step, data cursor, how to rebuild the key and the params container
    config/config.json  the run config, readable by people and by `main.py` on resume
    metrics/metrics     the metrics given to `save` (orbax writes it; used to pick the best step)

Orbax writes each step into `<step>.orbax-checkpoint-tmp-*` and renames it when complete, so a save
killed half-way is never listed as a step; this module adds a completeness check and clear errors
for step directories damaged after the fact (disk full, partial copy, manual edits).

Boundary: this module knows pytrees, JSON and `nnx.State`, nothing about models or loops. It does
not decide when to save; the loops call `save` at their own cadence.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint import checkpoint_managers as ocp_managers

# Bump when the on-disk layout changes, so an old checkpoint fails with a message, not a KeyError.
FORMAT_VERSION = 1

_ARRAY_ITEMS = ("params", "opt_state", "rng")
_JSON_ITEMS = {"meta": "meta.json", "config": "config.json"}
_ITEMS = _ARRAY_ITEMS + tuple(_JSON_ITEMS)
# Orbax's per-step commit record; a step directory without it was not written by a finished save.
_STEP_METADATA_FILE = "_CHECKPOINT_METADATA"


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, partial, corrupt or does not match the target."""


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


def _to_savable(tree: Any) -> Any:
    """nnx.State -> nested dict, so the files carry parameter names, not Variable internals."""
    if isinstance(tree, nnx.State):
        return nnx.to_pure_dict(tree)
    return tree


# Orbax refuses a pytree without leaves ("Found empty item"), which is what a stateless optimizer
# (optax.sgd without momentum, set_to_zero) gives; a placeholder leaf keeps every item directory
# present, so the completeness check stays uniform.
_EMPTY_PLACEHOLDER = {"__empty_pytree__": np.zeros((), np.int8)}


def _is_empty(tree: Any) -> bool:
    return not jax.tree.leaves(tree)


def _from_savable(restored: Any, target: Any) -> Any:
    """Puts restored pure arrays back into the container type of `target`."""
    if isinstance(target, nnx.State):
        # tree.map copies the Variables, so the caller's target is left untouched.
        out = jax.tree.map(lambda x: x, target)
        nnx.replace_by_pure_dict(out, restored)
        return out
    return restored


def _is_typed_key(key: Any) -> bool:
    return hasattr(key, "dtype") and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)


def _key_data_target(key: Any) -> Any:
    """The uint32 data array (or its shape and sharding) that a typed or raw key target restores to."""
    if not _is_typed_key(key):
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


def _restore_args_for(target: Any) -> Any:
    """Restore args that put every leaf on the target's sharding and dtype.

    An abstract leaf without a sharding (plain `jax.eval_shape` output) lands on the default
    device, as `jnp.asarray` would put it; a numpy leaf stays numpy.
    """
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def with_sharding(leaf):
        if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None:
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=default)
        return leaf

    return ocp.checkpoint_utils.construct_restore_args(jax.tree.map(with_sharding, target))


def _numpy_restore_args(metadata: Any) -> Any:
    """Restore args that load every array leaf as host numpy, whatever the saving topology was."""
    return jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)


def _best_fn(metric: str, mode: str):
    """A ranking function that puts checkpoints lacking the metric (or with NaN) last."""
    worst = -math.inf if mode == "max" else math.inf

    def fn(metrics: Mapping[str, Any]) -> float:
        value = metrics.get(metric) if isinstance(metrics, Mapping) else None
        if value is None or not math.isfinite(float(value)):
            return worst
        return float(value)

    return fn


class CheckpointManager:
    """Saves and restores `TrainState`s under one directory, one subdirectory per step.

    keep_last: newest steps always kept (at least 1, so there is always something to resume from).
    keep_best: additionally keep this many steps with the best `metrics[best_metric]`.
    best_mode: 'max' if a higher metric is better (accuracy, reward), 'min' for a loss.
    async_save: write in a background thread; call `wait_until_finished` or `close` before exiting.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        keep_last: int = 3,
        keep_best: int = 0,
        best_metric: str | None = None,
        best_mode: Literal["max", "min"] = "max",
        async_save: bool = False,
    ):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 so a run can always resume; got {keep_last}")
        if keep_best > 0 and best_metric is None:
            raise ValueError("keep_best > 0 needs best_metric, the metrics key that ranks steps")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min'; got {best_mode!r}")
        self.directory = Path(directory).absolute()
        self.best_metric = best_metric
        policies: list[Any] = [ocp_managers.LatestN(n=keep_last)]
        # Orbax records a step's metrics only when a best_fn is set; a constant one keeps them on
        # disk for people even when nothing is ranked.
        best_fn = lambda metrics: 0.0  # noqa: E731
        if best_metric is not None:
            best_fn = _best_fn(best_metric, best_mode)
            if keep_best > 0:
                # BestN keeps the tail of an ascending sort; reverse=True makes that tail the minima.
                policies.append(
                    ocp_managers.BestN(
                        get_metric_fn=best_fn,
                        reverse=best_mode == "min",
                        n=keep_best,
                        keep_checkpoints_without_metrics=False,
                    )
                )
        options = ocp.CheckpointManagerOptions(
            # best_fn here only makes orbax record metrics and answer best_step(); which steps
            # survive is decided by the preservation policy alone.
            best_fn=best_fn,
            best_mode=best_mode,
            preservation_policy=ocp_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            create=True,
            # Leftovers of a killed save are never steps; removing them keeps the directory honest.
            cleanup_tmp_directories=True,
        )
        handlers = {name: ocp.PyTreeCheckpointHandler() for name in _ARRAY_ITEMS}
        handlers.update({name: ocp.JsonCheckpointHandler(filename=f) for name, f in _JSON_ITEMS.items()})
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    # -- saving -----------------------------------------------------------------------------------

    def save(self, step: int, state: TrainState, metrics: dict | None = None, force: bool = False) -> bool:
        """Writes `state` as step `step`; returns False if that step is already saved.

        metrics: scalars recorded with the step; `metrics[best_metric]` ranks it for keep_best.
        force: save even if orbax's save policy would skip this step (it never overwrites).
        """
        if int(step) != int(state.step):
            raise ValueError(f"save(step={step}) got a TrainState with step={state.step}; pass the same step")
        key = state.rng_key
        meta = {
            "format_version": FORMAT_VERSION,
            "step": int(state.step),
            "data_cursor": state.data_cursor,
            "rng_impl": str(jax.random.key_impl(key)) if _is_typed_key(key) else None,
            "params_container": "nnx.State" if isinstance(state.params, nnx.State) else "pytree",
            "empty_items": [name for name in ("params", "opt_state") if _is_empty(getattr(state, name))],
        }
        trees = {
            name: _EMPTY_PLACEHOLDER if name in meta["empty_items"] else _to_savable(getattr(state, name))
            for name in ("params", "opt_state")
        }
        key_data = jax.random.key_data(key) if _is_typed_key(key) else key
        if jax.process_count() > 1 and getattr(key_data, "is_fully_addressable", False):
            # A key made on one host's device is not a global array; every process holds the same
            # key, so orbax writes it from the primary host as a numpy array.
            key_data = np.asarray(key_data)
        args = ocp.args.Composite(
            params=ocp.args.PyTreeSave(trees["params"]),
            opt_state=ocp.args.PyTreeSave(trees["opt_state"]),
            rng=ocp.args.PyTreeSave({"key_data": key_data}),
            meta=ocp.args.JsonSave(meta),
            config=ocp.args.JsonSave(state.config),
        )
        clean_metrics = None
        if metrics is not None:
            # JSON has no NaN/inf; None keeps the file valid and ranks the step last.
            clean_metrics = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()}
        return self._manager.save(int(step), args=args, metrics=clean_metrics, force=force)

    def wait_until_finished(self) -> None:
        """Blocks until an async save has been committed to disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finishes pending saves and releases orbax's threads."""
        self._manager.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- listing ----------------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Saved steps, ascending (with async_save, including one still being written).

        Orbax's cached list, not a fresh directory scan: re-reading the directory during an async
        save would drop the in-flight step from orbax's bookkeeping.
        """
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest completed step, or None if there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The step with the best `metrics[best_metric]`; the latest step if no metric is tracked."""
        if self.best_metric is None:
            return self.latest_step()
        return self._manager.best_step()

    def metrics(self, step: int) -> dict | None:
        """The metrics saved with `step` (NaN/inf as None), or None if none were given."""
        metrics = self._manager.metadata(step).metrics
        return dict(metrics) if metrics else None

    # -- restoring --------------------------------------------------------------------------------

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def _check_complete(self, step: int) -> Path:
        """Fails early, naming the directory, if a step directory lacks files a finished save writes."""
        path = self.step_dir(step)
        if not path.is_dir():
            raise CheckpointError(
                f"no checkpoint at {path}; available steps in {self.directory}: {self.all_steps()}"
            )
        missing = [name for name in _ITEMS if not (path / name).is_dir()]
        if not (path / _STEP_METADATA_FILE).is_file():
            missing.append(_STEP_METADATA_FILE)
        for name, filename in _JSON_ITEMS.items():
            if (path / name).is_dir() and not (path / name / filename).is_file():
                missing.append(f"{name}/{filename}")
        if missing:
            raise CheckpointError(self._damaged_message(path, f"it is missing {', '.join(missing)}"))
        return path

    def _damaged_message(self, path: Path, what: str) -> str:
        others = [s for s in self.all_steps() if str(s) != path.name]
        return (
            f"checkpoint {path} is partial or corrupt: {what}. It was probably cut short (killed run, "
            f"full disk, interrupted copy). Delete {path} to resume from the previous step, or call "
            f"restore(step=...) with one of the other steps: {others}."
        )

    def restore(self, step: int | None = None, target: TrainState | None = None) -> TrainState:
        """Reads a step (default: the latest) back into a `TrainState`.

        target: gives structure, dtypes and shardings; each restored array lands on the sharding
          of the matching target leaf (jax.Array or jax.ShapeDtypeStruct with a sharding), so a
          4B model is never gathered on one device. Its step, cursor and config are ignored.
        With target=None, arrays come back as host numpy arrays in nested dicts/lists (optax
          namedtuples become dicts), the typed key as a jax key; useful for inspection.
        """
        # An async save of the step we are about to read may still be in flight.
        self._manager.wait_until_finished()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"no completed checkpoint in {self.directory}")
        path = self._check_complete(step)
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:  # orbax raises many types for bad JSON/paths; all mean the same here
            raise CheckpointError(self._damaged_message(path, f"meta.json is unreadable ({e})")) from e
        if meta.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint {path} has format_version {meta.get('format_version')}, this jaxmath "
                f"reads {FORMAT_VERSION}; restore it with the jaxmath version that wrote it"
            )
        empty_items = set(meta.get("empty_items", []))
        if target is not None:
            array_args = {
                name: self._pytree_restore(
                    _EMPTY_PLACEHOLDER if name in empty_items else _to_savable(getattr(target, name))
                )
                for name in ("params", "opt_state")
            }
            array_args["rng"] = self._pytree_restore({"key_data": _key_data_target(target.rng_key)})
        else:
            item_meta = self._manager.item_metadata(step)
            array_args = {
                name: ocp.args.PyTreeRestore(restore_args=_numpy_restore_args(item_meta[name].tree))
                for name in _ARRAY_ITEMS
            }
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(**array_args, config=ocp.args.JsonRestore())
            )
        except Exception as e:
            raise CheckpointError(
                self._damaged_message(path, f"orbax could not read it ({type(e).__name__}: {e})")
                + " If instead the target's structure differs from the checkpoint (changed model, "
                "LoRA or optimizer settings), restore with the config the checkpoint was saved with."
            ) from e
        key_data = restored.rng["key_data"]
        if meta["rng_impl"] is not None:
            key = jax.random.wrap_key_data(key_data, impl=meta["rng_impl"])
        else:
            key = key_data
        trees = {}
        for name in ("params", "opt_state"):
            if name in empty_items:
                # Nothing was stored: the target's (leafless) tree is the value; without one, None.
                trees[name] = getattr(target, name) if target is not None else None
            elif target is not None:
                trees[name] = _from_savable(getattr(restored, name), getattr(target, name))
            else:
                trees[name] = getattr(restored, name)
        params, opt_state = trees["params"], trees["opt_state"]
        return TrainState(
            params=params,
            opt_state=opt_state,
            step=int(meta["step"]),
            data_cursor=meta["data_cursor"],
            rng_key=key,
            config=restored.config,
        )

    @staticmethod
    def _pytree_restore(target: Any) -> ocp.args.PyTreeRestore:
        return ocp.args.PyTreeRestore(item=target, restore_args=_restore_args_for(target))


def restore_or_none(directory: str | Path, target: TrainState | None = None) -> TrainState | None:
    """Auto-resume: the latest TrainState in `directory`, or None when there is nothing to resume."""
    if not Path(directory).is_dir():
        return None
    manager = CheckpointManager(directory)
    try:
        if manager.latest_step() is None:
            return None
        return manager.restore(target=target)
    finally:
        manager.close()


def save_pytree(path: str | Path, tree: Any) -> None:
    """Writes one pytree (e.g. converted params) as a standalone orbax checkpoint at `path`.

    `path` must not exist yet; orbax writes it atomically (tmp dir, then rename).
    """
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(Path(path).absolute(), _to_savable(tree))


def load_pytree(path: str | Path, target: Any = None) -> Any:
    """Reads a pytree written by `save_pytree`.

    target: structure, dtypes and shardings to restore into (arrays or ShapeDtypeStructs, or an
      nnx.State); with None, leaves come back as host numpy arrays in nested dicts.
    """
    path = Path(path).absolute()
    if not path.is_dir():
        raise CheckpointError(f"no pytree checkpoint at {path}; write one with save_pytree or convert/hf_to_jax")
    with ocp.PyTreeCheckpointer() as checkpointer:
        try:
            if target is None:
                metadata = checkpointer.metadata(path)
                tree = getattr(metadata, "item_metadata", metadata)
                tree = getattr(tree, "tree", tree)
                return checkpointer.restore(path, restore_args=_numpy_restore_args(tree))
            savable = _to_savable(target)
            restored = checkpointer.restore(path, item=savable, restore_args=_restore_args_for(savable))
        except Exception as e:
            raise CheckpointError(
                f"could not read pytree checkpoint {path} ({type(e).__name__}: {e}); it may be partial "
                "or corrupt (re-create it) or not match target's structure"
            ) from e
    return _from_savable(restored, target)
