"""A LoRA projection in one matmul: x @ W + (scale * x @ A) @ B as [x, scale * x @ A] @ [W; B].

Computed as two products, a LoRA projection whose output is wider than its input (Qwen3's q, gate and
up projections) writes its low-rank term at the output's full width, reads it back to add it, and its
backward pass reads the output's gradient once more for the low-rank path: on an H100 those passes
cost more than the low-rank matmuls' arithmetic (docs/BENCHMARKS.md, "Speed on the H100, modeled from
the compiled programs"). Joined to the input along the contracted axis, the low-rank activations
ride in the base matmul: the extra traffic is a copy of the input. The hand-written backward takes
the gradient of [x, low] in one matmul with [W; B] and a gradient of W only where W trains (never
under LoRA), where autodiff of the joined matmul would compute all of [W; B]'s and drop W's.

The sum is taken inside the matmul in float32 and rounded once, where the two products round each
of theirs (the LM head's adapter is applied the same way, `Qwen3.head_operands`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


def joins(equation: str, kernel_shape: tuple[int, ...], rank: int, tokens: int) -> bool:
    """Whether the joined matmul moves fewer bytes than two products for a projection `equation`
    (one contracted axis) with kernel [in, out...] at `tokens` input rows: it saves writing and
    reading the [tokens, out] low-rank term and one read of the output's gradient, and copies the
    input [tokens, in + rank] and the kernel [in + rank, out] (so a decode step's few rows never join)."""
    lhs, rest = equation.split(",")
    kernel = rest.split("->")[0]
    if len(kernel) != len(kernel_shape) or lhs[-1] != kernel[0] or any(axis in lhs for axis in kernel[1:]):
        return False
    d_in, d_out = kernel_shape[0], math.prod(kernel_shape[1:])
    return tokens * 3 * d_out > tokens * 2 * (d_in + rank) + 4 * (d_in + rank) * d_out


def _joined(equation, x, low, w, b):
    return jnp.einsum(equation, jnp.concatenate([x, low], axis=-1), jnp.concatenate([w, b], axis=0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def joined_matmul(equation: str, x: jax.Array, low: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """einsum(equation, [x, low], [w; b]), joined along the contracted axis: x's last, w's first.
    x [..., in], low [..., rank], w [in, out...], b [rank, out...], one dtype."""
    return _joined(equation, x, low, w, b)


def _joined_fwd(equation, x, low, w, b):
    xv, lv, wv, bv = x.value, low.value, w.value, b.value
    # The operands each gradient needs; () where that gradient is not wanted (symbolic zeros).
    return _joined(equation, xv, lv, wv, bv), (xv.shape[-1], wv, bv, (xv,) if w.perturbed else (),
                                               (lv,) if b.perturbed else ())


def _joined_bwd(equation, residuals, dy):
    width, w, b, x_for_w, low_for_b = residuals
    lhs, rest = equation.split(",")
    kernel, out = rest.split("->")
    dxl = jnp.einsum(f"{out},{kernel}->{lhs}", dy, jnp.concatenate([w, b], axis=0))
    dw = jnp.einsum(f"{lhs},{out}->{kernel}", x_for_w[0], dy) if x_for_w else None
    db = jnp.einsum(f"{lhs},{out}->{kernel}", low_for_b[0], dy) if low_for_b else None
    return dxl[..., :width], dxl[..., width:], dw, db


joined_matmul.defvjp(_joined_fwd, _joined_bwd, symbolic_zeros=True)
