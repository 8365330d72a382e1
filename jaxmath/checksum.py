"""Bit-exact digests of arrays, independent of how they are sharded, so a checkpoint can prove itself.

    digests({"w": w, "opt": {"mu": mu}})  ->  {"w": ("bfloat16", (4, 8), "9f0c...e1"), "opt/mu": (...)}

Each array's digest is two 32-bit sums over its elements' bits, every element mixed with its position
(a murmur3 finalizer, a bijection on uint32), so any change to one element changes the digest and two
changes cancel with probability about 2^-64; a transposed or reordered array changes it too. The sums
are taken in uint32 arithmetic, which wraps and does not depend on reduction order, so the same
values give the same digest on one device, on eight, or as host numpy. The digest runs under one jit
over the whole tree: nothing is gathered to one device, and it costs one read of each array.

Not a defence against someone forging a checkpoint; it finds flipped bits, truncated or stale data
and decoding bugs. Paths name dict keys, attributes and indices alike ("0/mu/embed"), so an optax
namedtuple saved and a plain dict restored without a target give the same path.

Boundary: pure functions of arrays; jaxmath.checkpoint decides what is digested and when.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Digest = tuple[str, tuple[int, ...], str]  # (dtype name, shape, 16 hex digits)

_WORD_MASK = (1 << 32) - 1
_SECOND_SEED = np.uint32(0x9E3779B9)


def _fmix32(h):
    """murmur3's finalizer: a bijection on uint32 that spreads every input bit over the output (jax
    or numpy uint32 arrays; both wrap on overflow)."""
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
    """The bits of x as uint32 words: same shape for 8/16/32-bit dtypes, one trailing axis of 2 for
    64-bit ones."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    width = x.dtype.itemsize * 8
    if width == 64:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    unsigned = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}[width]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _array_digest(x: jax.Array) -> jax.Array:
    """[2] uint32 for one array (any shape, any sharding)."""
    words = _words(x)
    # Row-major element position, built from iotas so a sharded array is never reshaped (a reshape
    # of a sharded array can move data between devices). Strides wrap mod 2^32, as the sums do.
    position = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):
        position = position + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * np.uint32(stride)
        stride = (stride * words.shape[axis]) & _WORD_MASK
    first = jnp.sum(_fmix32(words ^ _fmix32(position)), dtype=jnp.uint32)
    second = jnp.sum(_fmix32(words + _fmix32(position ^ _SECOND_SEED)), dtype=jnp.uint32)
    return jnp.stack([first, second])


_tree_digest = jax.jit(lambda leaves: [_array_digest(x) for x in leaves])


def _host_digest(x: np.ndarray) -> tuple[int, int]:
    """The same two sums for a host array, in numpy (restores without a target, keys kept on the host)."""
    flat = np.ascontiguousarray(x).reshape(-1)
    if flat.dtype == np.bool_:
        words = flat.astype(np.uint32)
    elif flat.dtype.itemsize == 8:
        words = flat.view(np.uint32)  # the same words, in the same order, as the jax path's trailing axis
    else:
        words = flat.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[flat.dtype.itemsize]).astype(np.uint32)
    position = (np.arange(words.size, dtype=np.uint64) & _WORD_MASK).astype(np.uint32)
    first = np.sum(_fmix32(words ^ _fmix32(position)), dtype=np.uint32)
    second = np.sum(_fmix32(words + _fmix32(position ^ _SECOND_SEED)), dtype=np.uint32)
    return int(first), int(second)


def path_name(path: tuple) -> str:
    """"0/mu/embed" for a jax key path, whatever the containers (dict, namedtuple, list)."""
    parts = []
    for entry in path:
        for attribute in ("key", "name", "idx"):
            if hasattr(entry, attribute):
                parts.append(str(getattr(entry, attribute)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def digests(tree: Any) -> dict[str, Digest]:
    """{path: (dtype, shape, hex digest)} for every array leaf of `tree` (jax or numpy arrays).

    Every process of a multi-host run must call it together (it runs one jit over global arrays).
    """
    leaves_with_paths = jax.tree_util.tree_leaves_with_path(tree)
    if not leaves_with_paths:
        return {}
    paths = [path_name(path) for path, _ in leaves_with_paths]
    leaves = [x if isinstance(x, (jax.Array, np.ndarray)) else np.asarray(x) for _, x in leaves_with_paths]
    # Device arrays under one jit; host arrays too on one host (10x faster than numpy), but in numpy
    # on many hosts (a host array beside global ones is refused there) or when 64-bit (jax would
    # narrow it unless x64 is on).
    one_host = jax.process_count() == 1
    on_device = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array)
                 or (one_host and x.dtype.itemsize <= 4)]
    values: list[Any] = [None] * len(leaves)
    for i, v in zip(on_device, jax.device_get(_tree_digest([leaves[i] for i in on_device])) if on_device else []):
        values[i] = (int(v[0]), int(v[1]))
    for i, x in enumerate(leaves):
        if values[i] is None:
            values[i] = _host_digest(x)
    return {
        path: (str(x.dtype), tuple(int(n) for n in x.shape), f"{v[0]:08x}{v[1]:08x}")
        for path, x, v in zip(paths, leaves, values)
    }
