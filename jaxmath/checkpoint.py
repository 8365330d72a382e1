"""Orbax save and restore of the whole train state, so a run continues exactly.

One step directory `<directory>/<step>/` holds everything a GRPO or SFT loop needs to resume:

    params/             trainable params (full or LoRA-only), orbax PyTree (OCDBT)
    opt_state/          optax state, orbax PyTree
    rng/                PRNG key data (uint32), orbax PyTree
    meta/meta.json      step, data cursor, how to rebuild the key and the params container
    config/config.json  the run config, readable by people and by `main.py` on resume
    metrics/metrics     the metrics given to `save`, when a best_metric ranks steps (orbax writes it)

Orbax writes each step into `<step>.orbax-checkpoint-tmp*` and renames it when complete, so a save
killed half-way is never listed as a step. This module makes a checkpoint prove itself:

- meta.json records, for every saved array, its dtype, shape and a digest of its bits
  (`jaxmath.checksum`), a digest of config.json, and a digest of itself. A restore recomputes them
  and refuses values that differ (orbax and TensorStore do not check the data they read: flipped
  bytes in a parameter file restore as wrong numbers, NaN among them).
- A damaged or partial newest step (missing files, unreadable data, a wrong digest) is reported in
  one line and the restore falls back to the newest good step; the damaged directory is renamed to
  `<step>.damaged` (kept for inspection, out of the way of the steps the run writes next), never
  deleted. `on_damaged="refuse"` raises instead.
- A write that fails (full disk, quota, permissions) raises one `CheckpointError` line naming the
  step directory and the reason; the partial write is removed and the previous step stays intact.

Errors meant for the user are `CheckpointError`s whose message is one line saying what to do; the
orbax exception stays chained behind it (`__cause__`) for debugging. `jaxmath.orbax_calls` makes every
orbax call finish all the reads and writes it started, also when it fails (so a failed restore or
save leaves nothing running behind it), and holds back orbax's own error logs during the call.

Boundary: this module knows pytrees, JSON and `nnx.State`, nothing about models or loops. It does
not decide when to save; the loops call `save` at their own cadence.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging as pylogging
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx
from orbax.checkpoint import checkpoint_managers as ocp_managers

from jaxmath import checksum, orbax_calls
from jaxmath.orbax_calls import one_line, os_errno, reason

# Bump when the on-disk layout changes, so an old checkpoint fails with a message, not a KeyError.
# 2 added the digests in meta.json; a version-1 checkpoint still restores, unverified.
FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)

# What restore() does when the newest step is damaged (see CheckpointManager); config keys
# rl.on_damaged and sft.on_damaged take these values.
ON_DAMAGED = ("fall_back", "refuse")
OnDamaged = Literal["fall_back", "refuse"]

# A file without digests (a version-1 step, a pytree saved before digests were recorded, or by another
# tool) cannot prove its data; it is refused unless the user accepts it (`python -m jaxmath.main
# --allow_unverified`, `jax_to_hf --allow_unverified`), which sets this for the process.
_accept_unverified = False


def accept_unverified(accept: bool = True) -> None:
    """Lets restores in this process read files that carry no digests (with a warning each), instead of
    refusing them."""
    global _accept_unverified
    _accept_unverified = bool(accept)


def _unverifiable(path: Path, why: str) -> None:
    """Refuses a file without digests in one line, or warns and goes on where the user accepted that."""
    if _accept_unverified:
        logging.warning("%s %s: restoring it unverified (--allow_unverified)", path, why)
        return
    raise CheckpointError(f"{path} {why}, so its data cannot be verified; re-create it with this jaxmath, or "
                          "rerun with --allow_unverified to restore it anyway")


_ARRAY_ITEMS = ("params", "opt_state", "rng")
_JSON_ITEMS = {"meta": "meta.json", "config": "config.json"}
_ITEMS = _ARRAY_ITEMS + tuple(_JSON_ITEMS)
# Orbax's per-step commit record; a step directory without it was not written by a finished save.
_STEP_METADATA_FILE = "_CHECKPOINT_METADATA"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message is one line saying what to do."""


class DamagedCheckpointError(CheckpointError):
    """A step directory that is partial or corrupt (as opposed to one that does not fit the target)."""

    def __init__(self, path: Path, what: str):
        self.path = path
        self.what = what
        super().__init__(f"checkpoint {path} is damaged: {what}")


_WRITE_ADVICE = {
    errno.ENOSPC: "free space on that disk (or move the workdir)",
    errno.EDQUOT: "free space within your quota (or move the workdir)",
    errno.EFBIG: "raise the file-size limit (`ulimit -f`)",
    errno.EACCES: "make the directory writable",
    errno.EPERM: "make the directory writable",
    errno.EROFS: "move the workdir to a writable file system",
}


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


def _json_digest(value: Any) -> str:
    """sha256 of a JSON value as it reads back from disk (tuples as lists, keys as strings, sorted)."""
    normalized = json.loads(json.dumps(value))
    return hashlib.sha256(json.dumps(normalized, sort_keys=True).encode()).hexdigest()


def _layout(tree: Any) -> dict[str, tuple[int, ...]]:
    """{path: shape} of a tree of arrays or ShapeDtypeStructs, paths as `checksum.path_name` writes them."""
    return {checksum.path_name(path): tuple(int(n) for n in np.shape(leaf))
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _layout_difference(recorded: dict[str, list], wanted: dict[str, tuple[int, ...]]) -> str | None:
    """How a checkpoint item's arrays differ from the target's, or None when paths and shapes agree."""
    for path in sorted(set(recorded) | set(wanted)):
        if path not in wanted:
            return f"it has {path!r}, which this run does not"
        if path not in recorded:
            return f"it lacks {path!r}, which this run has"
        if tuple(recorded[path][1]) != wanted[path]:
            return f"{path!r} has shape {tuple(recorded[path][1])} there and {wanted[path]} here"
    return None


def _best_fn(metric: str, mode: str):
    """A ranking function that puts checkpoints lacking the metric (or with NaN) last."""
    worst = -math.inf if mode == "max" else math.inf

    def fn(metrics: Mapping[str, Any]) -> float:
        value = metrics.get(metric) if isinstance(metrics, Mapping) else None
        if value is None or not math.isfinite(float(value)):
            return worst
        return float(value)

    return fn


def _check_step_files(path: Path) -> None:
    """Fails early, naming the directory, if a step directory lacks files a finished save writes."""
    missing = [name for name in _ITEMS if not (path / name).is_dir()]
    if not (path / _STEP_METADATA_FILE).is_file():
        missing.append(_STEP_METADATA_FILE)
    for name, filename in _JSON_ITEMS.items():
        if (path / name).is_dir() and not (path / name / filename).is_file():
            missing.append(f"{name}/{filename}")
    if missing:
        raise DamagedCheckpointError(path, f"it is missing {', '.join(missing)} (cut short by a full disk or "
                                           "an interrupted copy?)")


def _read_step_json(path: Path, item: str) -> Any:
    try:
        return json.loads((path / item / _JSON_ITEMS[item]).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DamagedCheckpointError(path, f"{item}/{_JSON_ITEMS[item]} is unreadable ({reason(e)})") from e


def _read_meta_and_config(path: Path) -> tuple[dict, Any, bool]:
    """(meta without its own digest, config, whether the step carries digests), both JSON files checked
    against their digests."""
    meta = _read_step_json(path, "meta")
    if not isinstance(meta, dict):
        raise DamagedCheckpointError(path, "meta/meta.json is not a JSON object")
    version = meta.get("format_version")
    if version not in _READABLE_VERSIONS:
        raise CheckpointError(
            f"checkpoint {path} has format_version {version}, this jaxmath reads {_READABLE_VERSIONS}; "
            "restore it with the jaxmath version that wrote it"
        )
    verified = version >= 2
    if verified:
        recorded_digest = meta.pop("meta_sha256", None)
        if recorded_digest != _json_digest(meta):
            raise DamagedCheckpointError(path, "meta/meta.json does not match its checksum")
    else:
        _unverifiable(path, "predates checksums (format_version 1)")
    config = _read_step_json(path, "config")
    if verified and _json_digest(config) != meta["config_sha256"]:
        raise DamagedCheckpointError(path, "config/config.json does not match its checksum")
    return meta, config, verified


def _verify(path: Path, recorded: dict[str, dict[str, list]], arrays: dict[str, Any]) -> None:
    """Raises DamagedCheckpointError naming the first array whose bits differ from the saved ones.

    recorded and arrays: {item name: ...} for the items read, in the dtypes they were saved in (a
    target that asks for a cast is restored in the saved dtype, compared, then cast: `_saved_dtypes`)."""
    wrong = []
    for name, tree in arrays.items():
        found = checksum.digests(tree)
        for array_path, (dtype, shape, digest) in recorded[name].items():
            got = found.get(array_path)
            if got is None:
                wrong.append(f"{name}/{array_path} (missing)")
            elif got[0] != dtype or list(got[1]) != list(shape) or got[2] != digest:
                wrong.append(f"{name}/{array_path}")
    if wrong:
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise DamagedCheckpointError(path, f"array {wrong[0]}{more} differs from its saved checksum (flipped "
                                           "or truncated data)")


def _saved_dtypes(target: Any, recorded: dict[str, list]) -> Any:
    """`target` with each leaf in the dtype it was saved in (recorded: {path: [dtype, shape, digest]}), so
    the restored bits can be compared with their digests before any cast."""
    import jax.numpy as jnp

    def leaf(path, x):
        entry = recorded.get(checksum.path_name(path))
        if entry is None or str(x.dtype) == entry[0]:
            return x
        if isinstance(x, np.ndarray):
            return np.empty(x.shape, jnp.dtype(entry[0]))
        return jax.ShapeDtypeStruct(x.shape, jnp.dtype(entry[0]), sharding=getattr(x, "sharding", None))

    return jax.tree_util.tree_map_with_path(leaf, target)


def _cast_like(restored: Any, target: Any) -> Any:
    """Each restored leaf in its target leaf's dtype (a cast the target asked for, after verification)."""
    def leaf(x, t):
        return x if x.dtype == t.dtype else x.astype(t.dtype)

    return jax.tree.map(leaf, restored, target)


class CheckpointManager:
    """Saves and restores `TrainState`s under one directory, one subdirectory per step.

    keep_last: newest steps always kept (at least 1, so there is always something to resume from).
    keep_best: additionally keep this many steps with the best `metrics[best_metric]`.
    best_mode: 'max' if a higher metric is better (accuracy, reward), 'min' for a loss.
    async_save: write in a background thread; call `wait_until_finished` or `close` before exiting.
    on_damaged: what `restore()` of the latest step does when that step is damaged: "fall_back" (log
      one line, rename it to `<step>.damaged`, restore the newest good step) or "refuse" (raise a
      `DamagedCheckpointError` and change nothing).
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
        on_damaged: OnDamaged = "fall_back",
    ):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 so a run can always resume; got {keep_last}")
        if keep_best > 0 and best_metric is None:
            raise ValueError("keep_best > 0 needs best_metric, the metrics key that ranks steps")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min'; got {best_mode!r}")
        if on_damaged not in ON_DAMAGED:
            raise ValueError(f"on_damaged must be one of {ON_DAMAGED}; got {on_damaged!r}")
        orbax_calls.install()
        self.directory = Path(directory).absolute()
        self.best_metric = best_metric
        self.on_damaged = on_damaged
        self._async_save = async_save
        # An async save not yet known to be on disk, and orbax's error logs since it began: orbax
        # reports a failed background write only in its logs, so they are held until we know.
        self._unconfirmed: tuple[int, list[pylogging.LogRecord]] | None = None
        policies: list[Any] = [ocp_managers.LatestN(n=keep_last)]
        # Orbax records metrics only with a best_fn, and then asks for them on every save (warning
        # "Requested `tracked_metric`" when given none); so both exist only when a metric ranks steps.
        best_fn = None
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
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        except OSError as e:
            raise CheckpointError(f"cannot use {self.directory} for checkpoints: {reason(e)}; choose a "
                                  "writable workdir") from e

    # -- saving -----------------------------------------------------------------------------------

    def save(self, step: int, state: TrainState, metrics: dict | None = None, force: bool = False) -> bool:
        """Writes `state` as step `step`; returns False if that step is already saved.

        metrics: scalars recorded with the step when the manager has a best_metric (which ranks it
          for keep_best; a step without it ranks last); ignored otherwise (the loops log them anyway).
        force: save even if orbax's save policy would skip this step (it never overwrites).
        Raises CheckpointError (one line) when the write fails; the previous step is left intact.
        """
        if int(step) != int(state.step):
            raise ValueError(f"save(step={step}) got a TrainState with step={state.step}; pass the same step")
        self._confirm_async_save()
        key = state.rng_key
        meta: dict[str, Any] = {
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
        trees["rng"] = {"key_data": key_data}
        # Digests go in meta.json, which orbax commits with the arrays in one rename: a step on disk
        # always carries the digests of its own arrays.
        meta["arrays"] = {name: {path: list(d) for path, d in checksum.digests(tree).items()}
                          for name, tree in trees.items()}
        meta["config_sha256"] = _json_digest(state.config)
        meta["meta_sha256"] = _json_digest(meta)
        args = ocp.args.Composite(
            params=ocp.args.PyTreeSave(trees["params"]),
            opt_state=ocp.args.PyTreeSave(trees["opt_state"]),
            rng=ocp.args.PyTreeSave(trees["rng"]),
            meta=ocp.args.JsonSave(meta),
            config=ocp.args.JsonSave(state.config),
        )
        clean_metrics = None
        if self.best_metric is not None:
            # JSON has no NaN/inf; None keeps the file valid and ranks the step last (so does {}).
            clean_metrics = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in (metrics or {}).items()}
        background: list[pylogging.LogRecord] = []
        if self._async_save:
            orbax_calls.hold(background)
        try:
            with orbax_calls.holding_errors():
                saved = self._manager.save(int(step), args=args, metrics=clean_metrics, force=force)
        except Exception as e:
            orbax_calls.release(background)
            raise self._write_failed(int(step), e) from e
        if saved and self._async_save:
            self._unconfirmed = (int(step), background)
        else:
            orbax_calls.release(background)
        return saved

    def _write_failed(self, step: int, error: BaseException) -> CheckpointError:
        """Removes the partial write of `step` and says what happened, in one line."""
        with orbax_calls.holding_errors():  # orbax's writer threads may still be busy with the partial step
            try:
                self._manager.wait_until_finished()
            except Exception:  # noqa: BLE001 - the same failure, already being reported
                pass
            orbax_calls.join_background_work()
        if jax.process_index() == 0:
            for partial in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                shutil.rmtree(partial, ignore_errors=True)
        self._manager.reload()
        earlier = [s for s in self.all_steps() if s != step]
        if earlier:
            previous = f"the previous checkpoint ({self.step_dir(earlier[-1])}) is intact"
        else:
            previous = "there is no earlier checkpoint"
        number = os_errno(error)
        free = ""
        if number in (errno.ENOSPC, errno.EDQUOT):
            try:
                free = f", {shutil.disk_usage(self.directory).free / 2**20:.1f} MiB free there"
            except OSError:
                pass
        advice = _WRITE_ADVICE.get(number, "fix the cause")
        return CheckpointError(
            f"could not write checkpoint step {step} to {self.step_dir(step)}: {reason(error)}{free}; "
            f"{previous}. To resume from it, {advice} and rerun the same command"
        )

    def _confirm_async_save(self) -> None:
        """Waits for the last async save; raises CheckpointError if it did not reach the disk."""
        if self._unconfirmed is None:
            return
        (step, background), self._unconfirmed = self._unconfirmed, None
        with orbax_calls.holding_errors() as held:
            try:
                self._manager.wait_until_finished()
                self._manager.check_for_errors()
                error = None
            except Exception as e:  # noqa: BLE001 - reported as one line below
                error = e
        orbax_calls.release(background)
        held = background + held
        if error is None and (self.step_dir(step) / _STEP_METADATA_FILE).is_file():
            for record in held:  # the step is safe; what orbax complained about is still shown
                logging.warning("orbax: %s", one_line(record.getMessage()))
            return
        if error is None:
            error = RuntimeError(held[-1].getMessage() if held else "orbax did not commit it")
        raise self._write_failed(step, error) from error

    def wait_until_finished(self) -> None:
        """Blocks until an async save has been committed to disk; raises CheckpointError if it failed."""
        if self._unconfirmed is not None:
            self._confirm_async_save()
        else:
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Finishes pending saves and releases orbax's threads."""
        try:
            self._confirm_async_save()
        finally:
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
        """The newest completed step, or None if there is none (it may still prove damaged on restore)."""
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

    def restore(self, step: int | None = None, target: TrainState | None = None) -> TrainState:
        """Reads a step (default: the newest good one) back into a `TrainState`, verified.

        target: gives structure, dtypes and shardings; each restored array lands on the sharding
          of the matching target leaf (jax.Array or jax.ShapeDtypeStruct with a sharding), so a
          4B model is never gathered on one device. Its step, cursor and config are ignored.
        With target=None, arrays come back as host numpy arrays in nested dicts/lists (optax
          namedtuples become dicts), the typed key as a jax key; useful for inspection.
        With step=None, damaged steps newer than the newest good one are handled by `on_damaged`.
        Raises DamagedCheckpointError for a damaged `step` (or, with on_damaged="refuse", a damaged
        latest step) and CheckpointError when the checkpoint does not fit the target.
        """
        # An async save of the step we are about to read may still be in flight.
        self.wait_until_finished()
        if step is not None:
            return self._restore_step(int(step), target)
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no completed checkpoint in {self.directory}")
        damaged: list[DamagedCheckpointError] = []
        for candidate in reversed(steps):
            try:
                state = self._restore_step(candidate, target)
            except DamagedCheckpointError as e:
                if self.on_damaged == "refuse":
                    older = [s for s in steps if s < candidate]
                    raise DamagedCheckpointError(
                        e.path, f"{e.what}. Not resuming (on_damaged='refuse'): move {e.path} away to resume "
                        f"from the newest good one of steps {older}" if older else
                        f"{e.what}. There is no earlier step to resume from") from e
                damaged.append(e)
                continue
            for e in damaged:
                aside = self._set_aside(e.path)
                logging.warning("checkpoint %s is damaged (%s); renamed it to %s and resuming from step %d",
                                e.path, e.what, aside.name, state.step)
            return state
        raise CheckpointError(
            f"no intact checkpoint in {self.directory} ({'; '.join(map(str, damaged))}). Nothing was moved or "
            "deleted; restore a copy of the directory, or start over in a new workdir"
        )

    def _set_aside(self, path: Path) -> Path:
        """Renames a damaged step directory to `<step>.damaged[-n]`, which orbax neither lists nor cleans."""
        aside = path.with_name(path.name + ".damaged")
        n = 1
        while aside.exists():
            n += 1
            aside = path.with_name(f"{path.name}.damaged-{n}")
        if jax.process_index() == 0:
            path.rename(aside)
        if jax.process_count() > 1:
            ocp.multihost.sync_global_processes(f"jaxmath_set_aside_{path.name}")
        self._manager.reload()
        return aside

    def _check_complete(self, step: int) -> Path:
        path = self.step_dir(step)
        if not path.is_dir():
            raise CheckpointError(
                f"no checkpoint at {path}; available steps in {self.directory}: {self.all_steps()}"
            )
        _check_step_files(path)
        return path

    def _restore_step(self, step: int, target: TrainState | None) -> TrainState:
        path = self._check_complete(step)
        meta, config, verified = _read_meta_and_config(path)
        empty_items = set(meta.get("empty_items", []))
        if target is not None:
            targets = {
                name: _EMPTY_PLACEHOLDER if name in empty_items else _to_savable(getattr(target, name))
                for name in ("params", "opt_state")
            }
            targets["rng"] = {"key_data": _key_data_target(target.rng_key)}
            if verified:
                for name in _ARRAY_ITEMS:
                    difference = _layout_difference(meta["arrays"][name], _layout(targets[name]))
                    if difference:
                        raise CheckpointError(
                            f"checkpoint {path} does not fit this run: in {name}, {difference}. Resume with the "
                            "model, LoRA and optimizer settings it was saved with, or use a new workdir"
                        )
            wanted = targets
            if verified:
                targets = {name: _saved_dtypes(tree, meta["arrays"][name]) for name, tree in targets.items()}
            array_args = {name: self._pytree_restore(tree) for name, tree in targets.items()}
        else:
            try:
                with orbax_calls.holding_errors():
                    item_meta = self._manager.item_metadata(step)
                array_args = {
                    name: ocp.args.PyTreeRestore(restore_args=_numpy_restore_args(item_meta[name].tree))
                    for name in _ARRAY_ITEMS
                }
            except Exception as e:
                raise DamagedCheckpointError(path, f"orbax cannot read its metadata ({reason(e)})") from e
        try:
            with orbax_calls.holding_errors():
                restored = self._manager.restore(step, args=ocp.args.Composite(**array_args))
        except Exception as e:
            if not verified:  # without recorded shapes, a target that does not fit looks the same
                raise CheckpointError(
                    f"checkpoint {path} could not be read ({reason(e)}): it is damaged, or the model, LoRA or "
                    "optimizer settings differ from the ones it was saved with"
                ) from e
            raise DamagedCheckpointError(path, f"orbax cannot read its arrays ({reason(e)})") from e
        arrays = {name: getattr(restored, name) for name in _ARRAY_ITEMS}
        if verified:
            _verify(path, meta["arrays"], arrays)
            if target is not None:
                arrays = {name: _cast_like(tree, wanted[name]) for name, tree in arrays.items()}
        key_data = arrays["rng"]["key_data"]
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
                trees[name] = _from_savable(arrays[name], getattr(target, name))
            else:
                trees[name] = arrays[name]
        return TrainState(
            params=trees["params"],
            opt_state=trees["opt_state"],
            step=int(meta["step"]),
            data_cursor=meta["data_cursor"],
            rng_key=key,
            config=config,
        )

    @staticmethod
    def _pytree_restore(target: Any) -> ocp.args.PyTreeRestore:
        return ocp.args.PyTreeRestore(item=target, restore_args=_restore_args_for(target))


def restore_or_none(directory: str | Path, target: TrainState | None = None, *,
                    on_damaged: OnDamaged = "fall_back") -> TrainState | None:
    """Auto-resume: the newest good TrainState in `directory`, or None when there is nothing to resume."""
    if not Path(directory).is_dir():
        return None
    manager = CheckpointManager(directory, on_damaged=on_damaged)
    try:
        if manager.latest_step() is None:
            return None
        return manager.restore(target=target)
    finally:
        manager.close()


# The digests of a standalone pytree (`save_pytree`), written beside orbax's files once they are in place.
PYTREE_DIGESTS_FILE = "jaxmath_digests.json"


def save_pytree(path: str | Path, tree: Any) -> None:
    """Writes one pytree (e.g. converted params) as a standalone orbax checkpoint at `path`, with the
    digest of every array in `path`/jaxmath_digests.json (`load_pytree` checks them).

    `path` must not exist yet; orbax writes it atomically (tmp dir, then rename), and the digests
    follow, so a write cut short between the two is refused as unverifiable on restore, never trusted.
    """
    orbax_calls.install()
    path = Path(path).absolute()
    savable = _to_savable(tree)
    arrays = {array_path: list(d) for array_path, d in checksum.digests(savable).items()}
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(path, savable)
    record = {"format_version": FORMAT_VERSION, "arrays": arrays}
    record["sha256"] = _json_digest(record)
    if jax.process_index() == 0:
        (path / PYTREE_DIGESTS_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
    if jax.process_count() > 1:
        ocp.multihost.sync_global_processes(f"jaxmath_pytree_digests_{path.name}")


def _pytree_digests(path: Path) -> dict[str, list] | None:
    """{array path: [dtype, shape, digest]} recorded by `save_pytree`, checked against its own digest;
    None (after `_unverifiable`) where the pytree has none."""
    file = path / PYTREE_DIGESTS_FILE
    if not file.is_file():
        _unverifiable(path, f"has no {PYTREE_DIGESTS_FILE} (written before jaxmath recorded digests, or by "
                            "another tool)")
        return None
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
        recorded_digest = record.pop("sha256")
        arrays = record["arrays"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DamagedCheckpointError(path, f"{PYTREE_DIGESTS_FILE} is unreadable ({reason(e)})") from e
    if recorded_digest != _json_digest(record):
        raise DamagedCheckpointError(path, f"{PYTREE_DIGESTS_FILE} does not match its checksum")
    return arrays


def load_pytree(path: str | Path, target: Any = None) -> Any:
    """Reads a pytree written by `save_pytree`, verified against the digests saved with it.

    target: structure, dtypes and shardings to restore into (arrays or ShapeDtypeStructs, or an
      nnx.State); with None, leaves come back as host numpy arrays in nested dicts. Arrays are read in
      the dtype they were saved in, compared with their digests, then cast to the target's.
    Raises DamagedCheckpointError when the data differs from its digests, CheckpointError when the
    pytree is missing, unreadable or does not fit the target, or carries no digests (unless
    `accept_unverified`).
    """
    orbax_calls.install()
    path = Path(path).absolute()
    if not path.is_dir():
        raise CheckpointError(f"no pytree checkpoint at {path}; write one with save_pytree or convert/hf_to_jax")
    recorded = _pytree_digests(path)
    savable = None if target is None else _to_savable(target)
    try:
        if target is None:
            restored = _read_numpy_tree(path)
        else:
            read_as = savable if recorded is None else _saved_dtypes(savable, recorded)
            with orbax_calls.holding_errors(), ocp.PyTreeCheckpointer() as checkpointer:
                restored = checkpointer.restore(path, item=read_as, restore_args=_restore_args_for(read_as))
    except Exception as e:
        raise CheckpointError(
            f"could not read pytree checkpoint {path} ({reason(e)}); it may be partial or corrupt (re-create it) "
            "or not match target's structure"
        ) from e
    if recorded is not None:
        _verify(path, {"pytree": recorded}, {"pytree": restored})
    if target is None:
        return restored
    return _from_savable(_cast_like(restored, savable), target)


def _read_numpy_tree(path: Path) -> Any:
    """The orbax PyTree at `path` as host numpy arrays in nested dicts, whatever topology saved it."""
    orbax_calls.install()
    # The handler, not a Checkpointer: an item directory of a step (`<step>/params`) has no step
    # metadata file, which a Checkpointer would warn about.
    handler = ocp.PyTreeCheckpointHandler()
    try:
        with orbax_calls.holding_errors():
            tree = handler.metadata(path).tree
            return handler.restore(path, args=ocp.args.PyTreeRestore(restore_args=_numpy_restore_args(tree)))
    finally:
        handler.close()


@dataclasses.dataclass(frozen=True)
class StepParams:
    """The trainable params of one step: host numpy arrays in nested dicts (None if the step saved
    none), with the step number and the run config saved beside them."""

    step: int
    params: Any
    config: Any


def read_params(step_dir: str | Path) -> StepParams:
    """The params of one step directory, verified against their saved digests, read without a
    CheckpointManager: for tools that read a run which may still be training (the exporters), since
    opening a manager on the run directory removes its in-flight temporary step.

    Raises DamagedCheckpointError (one line) when the step is partial, unreadable or its data differs
    from the digests; CheckpointError when it is not a step directory or its format is unknown.
    """
    path = Path(step_dir).absolute()
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint step at {path}; pass a step directory <run>/checkpoints/<step>")
    _check_step_files(path)
    meta, config, verified = _read_meta_and_config(path)
    if "params" in meta.get("empty_items", []):
        return StepParams(step=int(meta["step"]), params=None, config=config)
    try:
        params = _read_numpy_tree(path / "params")
    except Exception as e:
        raise DamagedCheckpointError(path, f"orbax cannot read its params ({reason(e)})") from e
    if verified:
        _verify(path, {"params": meta["arrays"]["params"]}, {"params": params})
    return StepParams(step=int(meta["step"]), params=params, config=config)
