"""Weight helpers shared by the tests that compare engines on a random model."""

import jax
from flax import nnx


def randomize(model, seed: int, scale: float = 0.2) -> None:
    """Weights of std `scale` (norm scales near 1): peaked, varied greedy paths, unlike the 0.02 init."""
    state = nnx.state(model, nnx.Param)
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    keys = jax.random.split(jax.random.key(seed), len(flat))
    new = [1.0 + 0.2 * jax.random.normal(k, x.shape) if "scale" in jax.tree_util.keystr(p)
           else scale * jax.random.normal(k, x.shape) for k, (p, x) in zip(keys, flat)]
    nnx.update(model, jax.tree.unflatten(treedef, new))
