"""`CheckpointManager`: saves and restores `TrainState`s under one directory, one subdirectory per step.

It joins the parts: the step's layout (`format`), its digests (`digests`), what a damaged newest step
means (`fallback`), and the orbax calls that write and read it (`orbax_io`).
"""

from __future__ import annotations

import logging as pylogging
import math
from pathlib import Path
from typing import Any, Literal

import orbax.checkpoint as ocp
from absl import logging

from jaxmath import orbax_calls
from jaxmath.checkpoint import fallback, orbax_io
from jaxmath.checkpoint.digests import array_digests, cast_like, json_digest, read_meta_and_config, saved_dtypes, verify
from jaxmath.checkpoint.fallback import ON_DAMAGED, OnDamaged
from jaxmath.checkpoint.format import (ARRAY_ITEMS, STEP_METADATA_FILE, CheckpointError, DamagedCheckpointError,
                                       TrainState, check_step_files, layout, layout_difference, restore_targets,
                                       step_trees, train_state)
from jaxmath.orbax_calls import one_line, reason


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
        self._manager = orbax_io.make_manager(self.directory, keep_last=keep_last, keep_best=keep_best,
                                              best_metric=best_metric, best_mode=best_mode, async_save=async_save)

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
        meta, trees = step_trees(state)
        # Digests go in meta.json, which orbax commits with the arrays in one rename: a step on disk
        # always carries the digests of its own arrays.
        meta["arrays"] = array_digests(trees)
        meta["config_sha256"] = json_digest(state.config)
        meta["meta_sha256"] = json_digest(meta)
        clean_metrics = None
        if self.best_metric is not None:
            # JSON has no NaN/inf; None keeps the file valid and ranks the step last (so does {}).
            clean_metrics = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in (metrics or {}).items()}
        background: list[pylogging.LogRecord] = []
        if self._async_save:
            orbax_calls.hold(background)
        try:
            with orbax_calls.holding_errors():
                saved = self._manager.save(int(step), args=orbax_io.save_args(meta, state.config, trees),
                                           metrics=clean_metrics, force=force)
        except Exception as e:
            orbax_calls.release(background)
            raise orbax_io.write_failed(self._manager, self.directory, int(step), e) from e
        if saved and self._async_save:
            self._unconfirmed = (int(step), background)
        else:
            orbax_calls.release(background)
        return saved

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
        if error is None and (self.step_dir(step) / STEP_METADATA_FILE).is_file():
            for record in held:  # the step is safe; what orbax complained about is still shown
                logging.warning("orbax: %s", one_line(record.getMessage()))
            return
        if error is None:
            error = RuntimeError(held[-1].getMessage() if held else "orbax did not commit it")
        raise orbax_io.write_failed(self._manager, self.directory, step, error) from error

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
        With step=None, damaged steps newer than the newest good one are handled by `on_damaged`
          (`jaxmath.checkpoint.fallback`).
        Raises DamagedCheckpointError for a damaged `step` (or, with on_damaged="refuse", a damaged
        latest step) and CheckpointError when the checkpoint does not fit the target.
        """
        # An async save of the step we are about to read may still be in flight.
        self.wait_until_finished()
        if step is not None:
            return self._read_step(int(step), target)
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no completed checkpoint in {self.directory}")
        return fallback.newest_good(steps, lambda s: self._read_step(s, target), on_damaged=self.on_damaged,
                                    directory=self.directory, set_aside=self._set_aside)

    def _set_aside(self, path: Path) -> Path:
        aside = fallback.set_aside(path)
        self._manager.reload()
        return aside

    def _read_step(self, step: int, target: TrainState | None) -> TrainState:
        """One step read back and verified: complete, fitting the target, its bits equal to its digests."""
        path = self.step_dir(step)
        if not path.is_dir():
            raise CheckpointError(f"no checkpoint at {path}; available steps in {self.directory}: {self.all_steps()}")
        check_step_files(path)
        meta, config, verified = read_meta_and_config(path)
        wanted = None
        if target is not None:
            wanted = restore_targets(meta, target)
            if verified:
                for name in ARRAY_ITEMS:
                    difference = layout_difference(meta["arrays"][name], layout(wanted[name]))
                    if difference:
                        raise CheckpointError(
                            f"checkpoint {path} does not fit this run: in {name}, {difference}. Resume with the "
                            "model, LoRA and optimizer settings it was saved with, or use a new workdir"
                        )
            # Read each array in the dtype it was saved in, so its bits can be compared before any cast.
            read_as = {name: saved_dtypes(tree, meta["arrays"][name]) if verified else tree
                       for name, tree in wanted.items()}
            array_args = {name: orbax_io.pytree_restore(tree) for name, tree in read_as.items()}
        else:
            try:
                with orbax_calls.holding_errors():
                    item_meta = self._manager.item_metadata(step)
                array_args = {
                    name: ocp.args.PyTreeRestore(restore_args=orbax_io.numpy_restore_args(item_meta[name].tree))
                    for name in ARRAY_ITEMS
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
        arrays: dict[str, Any] = {name: getattr(restored, name) for name in ARRAY_ITEMS}
        if verified:
            verify(path, meta["arrays"], arrays)
            if wanted is not None:
                arrays = {name: cast_like(tree, wanted[name]) for name, tree in arrays.items()}
        return train_state(meta, config, arrays, target)


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
