"""Standalone pytrees: one tree of arrays as an orbax checkpoint of its own (the demo's branch weights,
`jaxmath.convert.hf_to_jax`'s output), its digests beside it; and one run step's params read without a
CheckpointManager (`read_params`, for the exporters)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxmath import orbax_calls
from jaxmath.checkpoint.digests import (PYTREE_DIGESTS_FILE, cast_like, pytree_record, read_meta_and_config,
                                        read_pytree_digests, saved_dtypes, verify)
from jaxmath.checkpoint.format import (CheckpointError, DamagedCheckpointError, check_step_files, from_savable,
                                       to_savable)
from jaxmath.checkpoint.orbax_io import read_numpy_tree, restore_args_for
from jaxmath.orbax_calls import reason


def save_pytree(path: str | Path, tree: Any) -> None:
    """Writes one pytree (e.g. converted params) as a standalone orbax checkpoint at `path`, with the
    digest of every array in `path`/jaxmath_digests.json (`load_pytree` checks them).

    `path` must not exist yet; orbax writes it atomically (tmp dir, then rename), and the digests
    follow, so a write cut short between the two is refused as unverifiable on restore, never trusted.
    """
    orbax_calls.install()
    path = Path(path).absolute()
    savable = to_savable(tree)
    record = pytree_record(savable)
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(path, savable)
    if jax.process_index() == 0:
        (path / PYTREE_DIGESTS_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
    if jax.process_count() > 1:
        ocp.multihost.sync_global_processes(f"jaxmath_pytree_digests_{path.name}")


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
    recorded = read_pytree_digests(path)
    savable = None if target is None else to_savable(target)
    try:
        if target is None:
            restored = read_numpy_tree(path)
        else:
            read_as = savable if recorded is None else saved_dtypes(savable, recorded)
            with orbax_calls.holding_errors(), ocp.PyTreeCheckpointer() as checkpointer:
                restored = checkpointer.restore(path, item=read_as, restore_args=restore_args_for(read_as))
    except Exception as e:
        raise CheckpointError(
            f"could not read pytree checkpoint {path} ({reason(e)}); it may be partial or corrupt (re-create it) "
            "or not match target's structure"
        ) from e
    if recorded is not None:
        verify(path, {"pytree": recorded}, {"pytree": restored})
    if target is None:
        return restored
    return from_savable(cast_like(restored, savable), target)


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
    from the digests; CheckpointError when it is not a step directory, its format is unknown, or it
    carries no digests (unless `accept_unverified`).
    """
    path = Path(step_dir).absolute()
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint step at {path}; pass a step directory <run>/checkpoints/<step>")
    check_step_files(path)
    meta, config, verified = read_meta_and_config(path)
    if "params" in meta.get("empty_items", []):
        return StepParams(step=int(meta["step"]), params=None, config=config)
    try:
        params = read_numpy_tree(path / "params")
    except Exception as e:
        raise DamagedCheckpointError(path, f"orbax cannot read its params ({reason(e)})") from e
    if verified:
        verify(path, {"params": meta["arrays"]["params"]}, {"params": params})
    return StepParams(step=int(meta["step"]), params=params, config=config)
