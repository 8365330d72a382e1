"""The tables from logical axes to mesh axes, and the helpers that apply them.

Every parameter declares its logical axes (`axes=("embed", "ffw")` metadata on its NNX variable);
activations are constrained by `constrain(x, axes)`. `PARAM_RULES` and `ACTIVATION_RULES` map those
names to the mesh axes `data`, `fsdp` and `tp`: parameters are split over `fsdp` (their embed
dimension) and `tp`; activations over the batch axes (`data`, `fsdp`) and `tp`, their embed
dimension whole, as in jax-llm-examples' `act_embed`. A name missing from the table, or two axes
of one array taking the same mesh axis, is an error, never a silent replication.

Which mesh: the one the arrays are on. The trainers' jitted steps are built with `jit_on_mesh`, which
traces and runs them under the mesh of their arguments, so no call can forget it; other traced
code declares it with `use_mesh(mesh)` (`use_mesh(None)`: one device). `constrain` applied eagerly
outside a mesh to an array on several devices raises. On one device every mesh axis has size 1
and all of this is a no-op, so the same code runs on a laptop CPU, one GPU, 8 fake CPU devices in
tests, and many hosts.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tp")

# logical axis -> mesh axis (or axes, or None for replicated)
PARAM_RULES: dict[str, Any] = {
    "layers": None,
    "vocab": "tp",
    "embed": "fsdp",
    "heads": "tp",
    "kv_heads": "tp",
    "head_dim": None,
    "ffw": "tp",
    "lora_rank": None,
}
ACTIVATION_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "seq": None,
    "embed": None,
    "vocab": "tp",
    "heads": "tp",
    "kv_heads": "tp",
    "head_dim": None,
    "ffw": "tp",
}

_UNSET = object()  # no use_mesh around: eager constraints check the array's placement
_MESH: contextvars.ContextVar[Any] = contextvars.ContextVar("jaxmath_mesh", default=_UNSET)


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


def _mesh_axes(name: str | None, rules: Mapping[str, Any]) -> tuple[str, ...]:
    if name is None:
        return ()
    if name not in rules:
        raise ValueError(f"logical axis {name!r} is not in the sharding table {sorted(rules)}; add it to "
                         "jaxmath.model.sharding's PARAM_RULES or ACTIVATION_RULES")
    target = rules[name]
    return (target,) if isinstance(target, str) else tuple(target or ())


def logical_to_spec(axes: Sequence[str | None] | None, mesh: Mesh | None = None, shape: Sequence[int] | None = None,
                    *, rules: Mapping[str, Any] = PARAM_RULES) -> PartitionSpec:
    """PartitionSpec for logical `axes` under `rules`. With a mesh and a `shape`, a mesh axis that
    does not divide its dimension is dropped (replicated) instead of failing.

    Raises ValueError for a logical axis the table does not know, and for two axes of one array that
    map to the same mesh axis (a table that would shard one array twice over it)."""
    if axes is None:
        return PartitionSpec()
    targets = [_mesh_axes(name, rules) for name in axes]
    flat = [n for names in targets for n in names]
    if len(flat) != len(set(flat)):
        raise ValueError(f"logical axes {tuple(axes)} map to mesh axes {targets}: a mesh axis may shard one "
                         "dimension of an array only; fix the sharding table")
    spec = []
    for i, names in enumerate(targets):
        keep: list[str] = []
        for n in names:
            if mesh is not None and shape is not None and shape[i] % math.prod(mesh.shape[k] for k in keep + [n]):
                continue
            keep.append(n)
        spec.append(tuple(keep) if len(keep) > 1 else (keep[0] if keep else None))
    return PartitionSpec(*spec)


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None) -> Iterator[Mesh | None]:
    """Within this context `constrain` and `constrain_state` apply constraints on `mesh` (None: one
    device, constraints are no-ops)."""
    token = _MESH.set(mesh)
    try:
        yield mesh
    finally:
        _MESH.reset(token)


def current_mesh() -> Mesh | None:
    mesh = _MESH.get()
    return None if mesh is _UNSET else mesh


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Constrain an activation's sharding by logical axes (no-op without a multi-device mesh).

    Outside `use_mesh`, an array that lives on several devices raises: its constraints would be
    dropped. (A traced array carries no placement; the steps built by `jit_on_mesh` always trace
    under their arguments' mesh.)"""
    mesh = _MESH.get()
    if mesh is _UNSET:
        devices = getattr(getattr(x, "sharding", None), "device_set", ())
        if len(devices) > 1:
            raise ValueError(f"constrain{tuple(axes)} outside a mesh on an array placed on {len(devices)} devices; "
                             "run the computation under sharding.use_mesh(mesh) or build it with "
                             "sharding.jit_on_mesh")
        mesh = None
    spec = logical_to_spec(axes, mesh, x.shape, rules=ACTIVATION_RULES)  # unknown names raise on any mesh
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


class _JitOnMesh:
    """A jitted function that traces, lowers and runs under the mesh its arguments are on."""

    def __init__(self, fn: Callable, **jit_kwargs: Any):
        self._jitted = jax.jit(fn, **jit_kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with use_mesh(mesh_of((args, kwargs))):
            return self._jitted(*args, **kwargs)

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        with use_mesh(mesh_of((args, kwargs))):
            return self._jitted.lower(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # eval_shape, _cache_size, ...
        return getattr(self._jitted, name)


def jit_on_mesh(fn: Callable, **jit_kwargs: Any) -> Callable:
    """`jax.jit(fn, **jit_kwargs)` that traces and runs under the mesh of its arguments (their first
    leaf on a NamedSharding; none: one device), so the activation and state constraints inside apply
    on the mesh the state lives on, whoever calls it. `.lower(...)` takes arrays or
    ShapeDtypeStructs with shardings alike."""
    return _JitOnMesh(fn, **jit_kwargs)


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def variable_sharding(var: nnx.Variable, mesh: Mesh) -> NamedSharding:
    """A parameter's (or optimizer moment's) sharding from its `axes` metadata and PARAM_RULES."""
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
    return NamedSharding(mesh, logical_to_spec(axes, mesh, shape, rules=ACTIVATION_RULES))


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
    mesh = current_mesh()
    if mesh is None:
        return tree

    def pin(v):
        if not _is_var(v):
            return v
        value = v.get_value()
        spec = logical_to_spec(v.get_metadata().get("axes"), mesh, value.shape)
        return v.replace(jax.lax.with_sharding_constraint(value, canonical(NamedSharding(mesh, spec))))

    return jax.tree.map(pin, tree, is_leaf=_is_var)
