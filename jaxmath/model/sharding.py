"""One table from logical axes to mesh axes, and the helpers that apply it.

Every parameter declares its logical axes (`axes=("embed", "ffw")` metadata on its NNX variable);
activations are constrained by `constrain(x, axes)`. `RULES` maps those names to the mesh axes
`data`, `fsdp` and `tp`. On one device every mesh axis has size 1 and all of this is a no-op, so the
same code runs on a laptop CPU, one GPU, 8 fake CPU devices in tests, and many hosts.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tp")

# logical axis -> mesh axis (or axes, or None for replicated)
RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "seq": None,
    "embed": "fsdp",
    "vocab": "tp",
    "heads": "tp",
    "kv_heads": "tp",
    "head_dim": None,
    "ffw": "tp",
    "layers": None,
    "lora_rank": None,
    "cache_seq": None,
}

_CURRENT_MESH: list[Mesh | None] = [None]


def make_mesh(data: int = 1, fsdp: int = 1, tp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tp) mesh; one axis may be -1 to take the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tp]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tp={tp}")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split into data={data} fsdp={fsdp} tp={tp}")
        sizes[sizes.index(-1)] = len(devices) // known
    if any(s < 1 for s in sizes):
        raise ValueError(f"mesh axis sizes must be >= 1 or -1, got data={data} fsdp={fsdp} tp={tp}")
    total = math.prod(sizes)
    if total > len(devices):
        raise ValueError(f"mesh data={sizes[0]} fsdp={sizes[1]} tp={sizes[2]} needs {total} devices, "
                         f"only {len(devices)} are visible")
    return Mesh(np.asarray(devices[:total]).reshape(sizes), MESH_AXES)


def logical_to_spec(axes: Sequence[str | None] | None, mesh: Mesh | None = None,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
    """PartitionSpec for logical `axes`. A mesh axis is used at most once per array (first wins), and
    with a `shape` an axis that does not divide its dimension is dropped (replicated) instead of failing."""
    if axes is None:
        return PartitionSpec()
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        target = RULES.get(name) if name is not None else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        keep = []
        for n in names:
            if n in used:
                continue
            if mesh is not None and shape is not None:
                size = mesh.shape[n] * math.prod(mesh.shape[k] for k in keep)
                if shape[i] % size:
                    continue
            keep.append(n)
        used.update(keep)
        spec.append(tuple(keep) if len(keep) > 1 else (keep[0] if keep else None))
    return PartitionSpec(*spec)


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None) -> Iterator[Mesh | None]:
    """Within this context `constrain` applies sharding constraints on `mesh`."""
    prev = _CURRENT_MESH[0]
    _CURRENT_MESH[0] = mesh
    try:
        yield mesh
    finally:
        _CURRENT_MESH[0] = prev


def current_mesh() -> Mesh | None:
    return _CURRENT_MESH[0]


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Constrain an activation's sharding by logical axes (no-op without a multi-device mesh)."""
    mesh = _CURRENT_MESH[0]
    if mesh is None or mesh.size == 1:
        return x
    spec = logical_to_spec(axes, mesh, x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def variable_sharding(var: nnx.Variable, mesh: Mesh) -> NamedSharding:
    axes = var.get_metadata().get("axes")
    return NamedSharding(mesh, logical_to_spec(axes, mesh, var.get_value().shape))


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """The NamedSharding of every variable of an (abstract or concrete) NNX state, same structure."""
    return jax.tree.map(lambda v: v.replace(variable_sharding(v, mesh)) if _is_var(v) else
                        NamedSharding(mesh, PartitionSpec()), state, is_leaf=_is_var)


def shard_state(state: Any, mesh: Mesh) -> Any:
    """Place every variable of `state` on `mesh` according to its logical axes."""
    return jax.tree.map(lambda v: v.replace(jax.device_put(v.get_value(), variable_sharding(v, mesh))) if _is_var(v)
                        else v, state, is_leaf=_is_var)
