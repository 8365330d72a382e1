"""Digests that a restore checks: every array's (`jaxmath.checksum`), config.json's and meta.json's own,
recorded when a step or a pytree is saved and compared with what is read back.

Orbax and TensorStore do not check the data they read: flipped bytes in a parameter file restore as
wrong numbers, NaN among them. A run step's digests live in its meta.json (committed with the arrays in
one rename); a standalone pytree's (`save_pytree`) in `jaxmath_digests.json` beside orbax's files.
Arrays are compared in the dtype they were saved in, before any cast the target asks for. A file
without digests (a version-1 step, a pytree from an older jaxmath or another tool) cannot prove its
data: it is refused in one line unless the user accepts it (`--allow_unverified`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging

from jaxmath import checksum
from jaxmath.checkpoint.format import (FORMAT_VERSION, READABLE_VERSIONS, CheckpointError, DamagedCheckpointError,
                                       read_step_json)
from jaxmath.orbax_calls import reason

# A file without digests is refused unless the user accepts it (`python -m jaxmath.main
# --allow_unverified`, `jax_to_hf --allow_unverified`), which sets this for the process.
_accept_unverified = False
# The digests of a standalone pytree (`save_pytree`), written beside orbax's files once they are in place.
PYTREE_DIGESTS_FILE = "jaxmath_digests.json"


def accept_unverified(accept: bool = True) -> None:
    """Lets restores in this process read files that carry no digests (with a warning each), instead of
    refusing them."""
    global _accept_unverified
    _accept_unverified = bool(accept)


def unverifiable(path: Path, why: str) -> None:
    """Refuses a file without digests in one line, or warns and goes on where the user accepted that."""
    if _accept_unverified:
        logging.warning("%s %s: restoring it unverified (--allow_unverified)", path, why)
        return
    raise CheckpointError(f"{path} {why}, so its data cannot be verified; re-create it with this jaxmath, or "
                          "rerun with --allow_unverified to restore it anyway")


def json_digest(value: Any) -> str:
    """sha256 of a JSON value as it reads back from disk (tuples as lists, keys as strings, sorted)."""
    normalized = json.loads(json.dumps(value))
    return hashlib.sha256(json.dumps(normalized, sort_keys=True).encode()).hexdigest()


def array_digests(trees: dict[str, Any]) -> dict[str, dict[str, list]]:
    """{item: {array path: [dtype, shape, digest]}} of the trees a save writes."""
    return {name: {path: list(d) for path, d in checksum.digests(tree).items()} for name, tree in trees.items()}


def read_meta_and_config(path: Path) -> tuple[dict, Any, bool]:
    """(meta without its own digest, config, whether the step carries digests), both JSON files checked
    against their digests."""
    meta = read_step_json(path, "meta")
    if not isinstance(meta, dict):
        raise DamagedCheckpointError(path, "meta/meta.json is not a JSON object")
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"checkpoint {path} has format_version {version}, this jaxmath reads {READABLE_VERSIONS}; "
            "restore it with the jaxmath version that wrote it"
        )
    verified = version >= 2
    if verified:
        recorded_digest = meta.pop("meta_sha256", None)
        if recorded_digest != json_digest(meta):
            raise DamagedCheckpointError(path, "meta/meta.json does not match its checksum")
    else:
        unverifiable(path, "predates checksums (format_version 1)")
    config = read_step_json(path, "config")
    if verified and json_digest(config) != meta["config_sha256"]:
        raise DamagedCheckpointError(path, "config/config.json does not match its checksum")
    return meta, config, verified


def verify(path: Path, recorded: dict[str, dict[str, list]], arrays: dict[str, Any]) -> None:
    """Raises DamagedCheckpointError naming the first array whose bits differ from the saved ones.

    recorded and arrays: {item name: ...} for the items read, in the dtypes they were saved in (a
    target that asks for a cast is restored in the saved dtype, compared, then cast: `saved_dtypes`)."""
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


def saved_dtypes(target: Any, recorded: dict[str, list]) -> Any:
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


def cast_like(restored: Any, target: Any) -> Any:
    """Each restored leaf in its target leaf's dtype (a cast the target asked for, after verification)."""
    def leaf(x, t):
        return x if x.dtype == t.dtype else x.astype(t.dtype)

    return jax.tree.map(leaf, restored, target)


def pytree_record(tree: Any) -> dict:
    """What `jaxmath_digests.json` holds for a standalone pytree: every array's digest, and its own."""
    record = {"format_version": FORMAT_VERSION, "arrays": array_digests({"pytree": tree})["pytree"]}
    record["sha256"] = json_digest(record)
    return record


def read_pytree_digests(path: Path) -> dict[str, list] | None:
    """{array path: [dtype, shape, digest]} recorded by `save_pytree`, checked against its own digest;
    None (after `unverifiable`) where the pytree has none."""
    file = path / PYTREE_DIGESTS_FILE
    if not file.is_file():
        unverifiable(path, f"has no {PYTREE_DIGESTS_FILE} (written before jaxmath recorded digests, or by "
                            "another tool)")
        return None
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
        recorded_digest = record.pop("sha256")
        arrays = record["arrays"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DamagedCheckpointError(path, f"{PYTREE_DIGESTS_FILE} is unreadable ({reason(e)})") from e
    if recorded_digest != json_digest(record):
        raise DamagedCheckpointError(path, f"{PYTREE_DIGESTS_FILE} does not match its checksum")
    return arrays
