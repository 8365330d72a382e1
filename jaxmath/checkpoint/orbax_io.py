"""The orbax calls of a checkpoint: the orbax CheckpointManager a `jaxmath.checkpoint.CheckpointManager`
drives (retention policies, item handlers), the restore arguments that put each array on its target's
sharding and dtype, reading a pytree as host numpy, and cleaning up after a write that failed.

`jaxmath.orbax_calls` makes every orbax call finish the reads and writes it started, also when it
fails, and holds back orbax's own error logs during the call; this module is where the checkpoint
code meets orbax's API.
"""

from __future__ import annotations

import errno
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_managers

from jaxmath import orbax_calls
from jaxmath.checkpoint.format import ARRAY_ITEMS, JSON_ITEMS, CheckpointError
from jaxmath.orbax_calls import os_errno, reason

WRITE_ADVICE = {
    errno.ENOSPC: "free space on that disk (or move the workdir)",
    errno.EDQUOT: "free space within your quota (or move the workdir)",
    errno.EFBIG: "raise the file-size limit (`ulimit -f`)",
    errno.EACCES: "make the directory writable",
    errno.EPERM: "make the directory writable",
    errno.EROFS: "move the workdir to a writable file system",
}


def best_fn(metric: str, mode: str):
    """A ranking function that puts checkpoints lacking the metric (or with NaN) last."""
    worst = -math.inf if mode == "max" else math.inf

    def fn(metrics: Mapping[str, Any]) -> float:
        value = metrics.get(metric) if isinstance(metrics, Mapping) else None
        if value is None or not math.isfinite(float(value)):
            return worst
        return float(value)

    return fn


def make_manager(directory: Path, *, keep_last: int, keep_best: int, best_metric: str | None, best_mode: str,
                 async_save: bool) -> ocp.CheckpointManager:
    """Orbax's manager for `directory`: the newest keep_last steps kept, and keep_best by best_metric."""
    policies: list[Any] = [ocp_managers.LatestN(n=keep_last)]
    # Orbax records metrics only with a best_fn, and then asks for them on every save (warning
    # "Requested `tracked_metric`" when given none); so both exist only when a metric ranks steps.
    ranking = None
    if best_metric is not None:
        ranking = best_fn(best_metric, best_mode)
        if keep_best > 0:
            # BestN keeps the tail of an ascending sort; reverse=True makes that tail the minima.
            policies.append(ocp_managers.BestN(get_metric_fn=ranking, reverse=best_mode == "min", n=keep_best,
                                               keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        # best_fn here only makes orbax record metrics and answer best_step(); which steps
        # survive is decided by the preservation policy alone.
        best_fn=ranking,
        best_mode=best_mode,
        preservation_policy=ocp_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save,
        create=True,
        # Leftovers of a killed save are never steps; removing them keeps the directory honest.
        cleanup_tmp_directories=True,
    )
    handlers = {name: ocp.PyTreeCheckpointHandler() for name in ARRAY_ITEMS}
    handlers.update({name: ocp.JsonCheckpointHandler(filename=f) for name, f in JSON_ITEMS.items()})
    try:
        return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)
    except OSError as e:
        raise CheckpointError(f"cannot use {directory} for checkpoints: {reason(e)}; choose a "
                              "writable workdir") from e


def save_args(meta: dict, config: Any, trees: dict[str, Any]) -> ocp.args.Composite:
    return ocp.args.Composite(
        params=ocp.args.PyTreeSave(trees["params"]),
        opt_state=ocp.args.PyTreeSave(trees["opt_state"]),
        rng=ocp.args.PyTreeSave(trees["rng"]),
        meta=ocp.args.JsonSave(meta),
        config=ocp.args.JsonSave(config),
    )


def restore_args_for(target: Any) -> Any:
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


def pytree_restore(target: Any) -> ocp.args.PyTreeRestore:
    return ocp.args.PyTreeRestore(item=target, restore_args=restore_args_for(target))


def numpy_restore_args(metadata: Any) -> Any:
    """Restore args that load every array leaf as host numpy, whatever the saving topology was."""
    return jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)


def read_numpy_tree(path: Path) -> Any:
    """The orbax PyTree at `path` as host numpy arrays in nested dicts, whatever topology saved it."""
    orbax_calls.install()
    # The handler, not a Checkpointer: an item directory of a step (`<step>/params`) has no step
    # metadata file, which a Checkpointer would warn about.
    handler = ocp.PyTreeCheckpointHandler()
    try:
        with orbax_calls.holding_errors():
            tree = handler.metadata(path).tree
            return handler.restore(path, args=ocp.args.PyTreeRestore(restore_args=numpy_restore_args(tree)))
    finally:
        handler.close()


def write_failed(manager: ocp.CheckpointManager, directory: Path, step: int, error: BaseException) -> CheckpointError:
    """Removes the partial write of `step` and says what happened, in one line."""
    with orbax_calls.holding_errors():  # orbax's writer threads may still be busy with the partial step
        try:
            manager.wait_until_finished()
        except Exception:  # noqa: BLE001 - the same failure, already being reported
            pass
        orbax_calls.join_background_work()
    if jax.process_index() == 0:
        for partial in directory.glob(f"{step}.orbax-checkpoint-tmp*"):
            shutil.rmtree(partial, ignore_errors=True)
    manager.reload()
    earlier = [s for s in sorted(manager.all_steps()) if s != step]
    if earlier:
        previous = f"the previous checkpoint ({directory / str(earlier[-1])}) is intact"
    else:
        previous = "there is no earlier checkpoint"
    number = os_errno(error)
    free = ""
    if number in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f", {shutil.disk_usage(directory).free / 2**20:.1f} MiB free there"
        except OSError:
            pass
    advice = WRITE_ADVICE.get(number, "fix the cause")
    return CheckpointError(
        f"could not write checkpoint step {step} to {directory / str(step)}: {reason(error)}{free}; "
        f"{previous}. To resume from it, {advice} and rerun the same command"
    )
