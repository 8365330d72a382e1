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


def canonical(sharding: NamedSharding) -> NamedSharding:
    """The same placement in the form compiled steps return: mesh axes of size 1 and trailing
    unsharded dimensions dropped from the spec. P(None, "fsdp", "tp", None) on a tp=1 mesh and
    P(None, "fsdp") place data identically but are different jit cache keys, so an input in the
    long form makes the second step compile again."""
    sizes = sharding.mesh.shape
    spec = []
    for entry in sharding.spec:
        names = [n for n in ((entry,) if isinstance(entry, str) else tuple(entry or ())) if sizes[n] > 1]
        spec.append(tuple(names) if len(names) > 1 else (names[0] if names else None))
    while spec and spec[-1] is None:
        spec.pop()
    return NamedSharding(sharding.mesh, PartitionSpec(*spec), memory_kind=sharding.memory_kind)


def shard_state(state: Any, mesh: Mesh) -> Any:
    """Place every variable of `state` on `mesh` according to its logical axes (canonical specs, so
    a jitted step taking the state and returning its update compiles once)."""
    return jax.tree.map(lambda v: v.replace(jax.device_put(v.get_value(), canonical(variable_sharding(v, mesh))))
                        if _is_var(v) else v, state, is_leaf=_is_var)


def mesh_of(tree: Any) -> Mesh | None:
    """The mesh of the first NamedSharding leaf of `tree` (None when no leaf is on a mesh). Lets the
    loops find the mesh their model was placed on without another argument."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return None


def batch_sharding(mesh: Mesh, shape: Sequence[int], batch_dim: int = 0) -> NamedSharding:
    """Rows (dimension `batch_dim`) split over the mesh's batch axes ("data", "fsdp") when they
    divide evenly, over as many of them as divide otherwise (`logical_to_spec` drops the rest);
    every other dimension replicated."""
    axes = [None] * len(shape)
    if len(shape) > batch_dim:
        axes[batch_dim] = "batch"
    return NamedSharding(mesh, logical_to_spec(axes, mesh, shape))


def shard_batch(tree: Any, mesh: Mesh | None, *, batch_dim: int = 0, process_local: bool = False) -> Any:
    """Put every array leaf of a host batch on `mesh`, its rows split over ("data", "fsdp").

    tree: a pytree of numpy / jax arrays, each [rows, ...] (or [accum, rows, ...] with batch_dim=1);
      None leaves stay None and scalars are replicated.
    process_local: each process holds only its own slice of the rows (multi-host data loading); the
      global batch, rows = local rows x process count, is assembled with
      `jax.make_array_from_process_local_data` (each process's rows land on its own devices, so their
      position follows the mesh's device order; losses sum over rows). Otherwise every process holds
      the whole batch.
    Without a mesh the leaves become jax arrays on the default device.
    """
    if mesh is None:
        return jax.tree.map(jax.numpy.asarray, tree)

    def put(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if process_local and jax.process_count() > 1:
            shape = list(x.shape)
            shape[batch_dim] *= jax.process_count()
            return jax.make_array_from_process_local_data(batch_sharding(mesh, shape, batch_dim), np.asarray(x),
                                                          tuple(shape))
        sharding = batch_sharding(mesh, x.shape, batch_dim)
        if jax.process_count() > 1:
            # device_put of host data onto devices of other processes is not defined; each process
            # fills its own shards from its (identical) copy.
            host = np.asarray(x)
            return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
        return jax.device_put(x, sharding)

    return jax.tree.map(put, tree)


def _path_keys(path: tuple) -> tuple:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def like_params_shardings(abstract: Any, params: Any, mesh: Mesh) -> Any:
    """Shardings for a tree derived from `params` (an optimizer state: Adam moments, an fp32 master
    copy), same structure as `abstract`: a leaf whose key path ends with a parameter's key path and
    has that parameter's shape takes the parameter's sharding; every other leaf (step counters,
    empty states) is replicated. Without this, zeros created inside `optimizer.init` under jit have
    no data dependence on the parameters and XLA may replicate them: a full copy per device."""
    by_path = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        sharding = getattr(leaf, "sharding", None)
        if not isinstance(sharding, NamedSharding):
            sharding = NamedSharding(mesh, PartitionSpec())
        by_path[_path_keys(path)] = (tuple(leaf.shape), canonical(sharding))
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path, leaf):
        keys = _path_keys(path)
        for start in range(len(keys)):
            hit = by_path.get(keys[start:])
            if hit is not None and hit[0] == tuple(leaf.shape):
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract)


def init_optimizer_state(optimizer: Any, params: Any, mesh: Mesh | None = None) -> Any:
    """`optimizer.init(params)` computed under jit straight into the parameters' shardings (every
    leaf on the mesh, counters replicated), so no state is ever whole on one device and the step's
    outputs have the same shardings as its inputs (no recompilation on the second step)."""
    mesh = mesh or mesh_of(params)
    if mesh is None:
        return jax.jit(optimizer.init)(params)
    abstract = jax.eval_shape(optimizer.init, params)
    return jax.jit(optimizer.init, out_shardings=like_params_shardings(abstract, params, mesh))(params)


def constrain_state(tree: Any) -> Any:
    """Inside a jitted step: pin every NNX variable of `tree` (updated params, and optimizer moments,
    which keep their parameter's Variable and axes) to the sharding its logical axes give on the
    current mesh. Without it XLA picks the outputs' shardings itself, and may return a parameter
    replicated over `tp` that came in split (more memory, and the next step compiles again)."""
    mesh = _CURRENT_MESH[0]
    if mesh is None:
        return tree

    def pin(v):
        if not _is_var(v):
            return v
        value = v.get_value()
        spec = logical_to_spec(v.get_metadata().get("axes"), mesh, value.shape)
        return v.replace(jax.lax.with_sharding_constraint(value, canonical(NamedSharding(mesh, spec))))

    return jax.tree.map(pin, tree, is_leaf=_is_var)
