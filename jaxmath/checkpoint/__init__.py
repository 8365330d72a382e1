"""Orbax save and restore of the whole train state, so a run continues exactly, and of standalone
pytrees; every file restored proves its data against digests written when it was saved.

Orbax writes each step into `<step>.orbax-checkpoint-tmp*` and renames it when complete, so a save
killed half-way is never listed as a step. On top of that:

- meta.json records, for every saved array, its dtype, shape and a digest of its bits
  (`jaxmath.checksum`), a digest of config.json, and a digest of itself. A restore recomputes them
  and refuses values that differ (orbax and TensorStore do not check the data they read: flipped
  bytes in a parameter file restore as wrong numbers, NaN among them). A standalone pytree carries
  the same digests in `jaxmath_digests.json`. A file without digests is refused as unverifiable
  unless the user accepts it (`accept_unverified`, `--allow_unverified`).
- A damaged or partial newest step (missing files, unreadable data, a wrong digest) is reported in
  one line and the restore falls back to the newest good step; the damaged directory is renamed to
  `<step>.damaged`, never deleted. `on_damaged="refuse"` raises instead.
- A write that fails (full disk, quota, permissions) raises one `CheckpointError` line naming the
  step directory and the reason; the partial write is removed and the previous step stays intact.

The parts, each a file to read on its own:

    format.py     what a step is on disk (its items, meta.json, TrainState), the errors, fit checks
    digests.py    the digests recorded at save and compared at restore; the unverifiable-file rule
    fallback.py   a damaged newest step: fall back to the newest good one, or refuse
    orbax_io.py   the orbax calls: the orbax manager and its policies, restore arguments, failed writes
    manager.py    CheckpointManager, which joins them; restore_or_none
    pytree.py     save_pytree / load_pytree (standalone trees) and read_params (one step's params)

Errors meant for the user are `CheckpointError`s whose message is one line saying what to do; the
orbax exception stays chained behind it (`__cause__`) for debugging. `jaxmath.orbax_calls` makes every
orbax call finish all the reads and writes it started, also when it fails (so a failed restore or
save leaves nothing running behind it), and holds back orbax's own error logs during the call.

Boundary: this package knows pytrees, JSON and `nnx.State`, nothing about models or loops. It does
not decide when to save; the loops call `save` at their own cadence.
"""

from jaxmath.checkpoint.digests import PYTREE_DIGESTS_FILE, accept_unverified
from jaxmath.checkpoint.fallback import ON_DAMAGED, OnDamaged
from jaxmath.checkpoint.format import FORMAT_VERSION, CheckpointError, DamagedCheckpointError, TrainState
from jaxmath.checkpoint.manager import CheckpointManager, restore_or_none
from jaxmath.checkpoint.pytree import StepParams, load_pytree, read_params, save_pytree

__all__ = [
    "FORMAT_VERSION", "ON_DAMAGED", "PYTREE_DIGESTS_FILE", "CheckpointError", "CheckpointManager",
    "DamagedCheckpointError", "OnDamaged", "StepParams", "TrainState", "accept_unverified", "load_pytree",
    "read_params", "restore_or_none", "save_pytree",
]
