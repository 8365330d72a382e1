"""What a restore does when the newest step is damaged: fall back to the newest good one, setting the
damaged ones aside as `<step>.damaged` (kept for inspection, out of the way of the steps the run writes
next, never deleted), or refuse and change nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Literal, TypeVar

import jax
import orbax.checkpoint as ocp
from absl import logging

from jaxmath.checkpoint.format import CheckpointError, DamagedCheckpointError

# What restore() does when the newest step is damaged; config keys rl.on_damaged and sft.on_damaged
# take these values.
ON_DAMAGED = ("fall_back", "refuse")
OnDamaged = Literal["fall_back", "refuse"]

T = TypeVar("T")


def newest_good(steps: list[int], read: Callable[[int], T], *, on_damaged: OnDamaged, directory: Path,
                set_aside: Callable[[Path], Path]) -> T:
    """read(step) of the newest step that reads back intact (steps ascending). Damaged newer ones are set
    aside (one warning line each) once a good one is found; with on_damaged="refuse" the first damaged
    one raises instead and nothing is moved. No intact step at all: CheckpointError, nothing moved."""
    damaged: list[DamagedCheckpointError] = []
    for candidate in reversed(steps):
        try:
            state = read(candidate)
        except DamagedCheckpointError as e:
            if on_damaged == "refuse":
                older = [s for s in steps if s < candidate]
                raise DamagedCheckpointError(
                    e.path, f"{e.what}. Not resuming (on_damaged='refuse'): move {e.path} away to resume "
                    f"from the newest good one of steps {older}" if older else
                    f"{e.what}. There is no earlier step to resume from") from e
            damaged.append(e)
            continue
        for e in damaged:
            aside = set_aside(e.path)
            logging.warning("checkpoint %s is damaged (%s); renamed it to %s and resuming from step %d",
                            e.path, e.what, aside.name, candidate)
        return state
    raise CheckpointError(
        f"no intact checkpoint in {directory} ({'; '.join(map(str, damaged))}). Nothing was moved or "
        "deleted; restore a copy of the directory, or start over in a new workdir"
    )


def set_aside(path: Path) -> Path:
    """Renames a damaged step directory to `<step>.damaged[-n]`, which orbax neither lists nor cleans (the
    caller reloads orbax's step list)."""
    aside = path.with_name(path.name + ".damaged")
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.damaged-{n}")
    if jax.process_index() == 0:
        path.rename(aside)
    if jax.process_count() > 1:
        ocp.multihost.sync_global_processes(f"jaxmath_set_aside_{path.name}")
    return aside
