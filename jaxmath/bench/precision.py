"""`python -m jaxmath.bench precision`: how far each way of storing a full-parameter AdamW step drifts
from float32 AdamW, and what local_full's GRPO step needs compiled for an H100. The numbers behind
docs/PRECISION.md.

Three measurements, each a flag:

  (default)   a synthetic gradient stream, no model: `--weights` bf16 weights ~ N(0, 0.02), per-weight
              gradient scales log-uniform over four decades, gradient = scale x (fixed mean + unit
              noise) split into `--micro` micro-batches, `--steps` updates at `--lr`. Every layout sees
              the same gradients, so only storage differs: weights (float32, bf16 + float32 master,
              bf16 + bf16 Kahan compensation, bf16 rounded to nearest or stochastically), moments
              (float32, bf16 stochastically rounded, bf16 rounded to nearest) and the accumulator
              (float32, bf16). Error = |weight change - float32 change| / |float32 change|.
  --model     the layouts `OptimizerConfig` can express, through the real SFT step of a tiny Qwen3
              computing in bf16 (4 micro-batches of 2 rows x 32 tokens), against float32 weights.
  --h100 4,8  local_full's GRPO step (Qwen3-4B full-parameter, 64 rows, prompt 1,025 + 2,048 tokens,
              cuDNN attention) compiled for `../shared/aot/h100.textproto` at these micro-batch rows;
              needs `jax[cuda12]` at jax's version (../shared/aot/README.md). Arguments, temporaries
              and the peak from XLA's buffer assignment; nothing runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path
from typing import Any

H100_DESCRIPTION = Path(__file__).resolve().parents[3] / "shared" / "aot" / "h100.textproto"


@dataclasses.dataclass(frozen=True)
class Layout:
    """weights: "float32" | "master" (bf16 + float32 master) | "kahan" (bf16 + bf16 compensation) |
    "nearest" | "stochastic" (bf16 updated in place); moments: "float32" | "stochastic" | "nearest"
    (bf16); second_moment overrides moments for v; accumulator: "float32" | "bfloat16"."""

    name: str
    weights: str
    moments: str
    accumulator: str
    second_moment: str = ""


LAYOUTS = (
    Layout("float32 AdamW (reference)", "float32", "float32", "float32"),
    Layout("before: master, float32 moments, float32 accumulator", "master", "float32", "float32"),
    Layout("chosen: master, bf16 stochastic moments, bf16 accumulator", "master", "stochastic", "bfloat16"),
    Layout("master, bf16 stochastic moments, float32 accumulator", "master", "stochastic", "float32"),
    Layout("master, bf16 round-to-nearest moments, bf16 accumulator", "master", "nearest", "bfloat16"),
    Layout("Kahan bf16 weights, float32 v, bf16 stochastic m, bf16 accumulator", "kahan", "stochastic", "bfloat16",
           second_moment="float32"),
    Layout("no master: bf16 weights, float32 moments", "nearest", "float32", "bfloat16"),
    Layout("no master: stochastic bf16 weights, float32 moments", "stochastic", "float32", "bfloat16"),
)


def synthetic_problem(weights: int, seed: int = 0):
    """The synthetic stream's key, starting bf16 weights ~ N(0, 0.02), per-weight gradient scales
    (log-uniform over four decades) and fixed gradient means."""
    import jax
    import jax.numpy as jnp

    key = jax.random.key(seed)
    w0 = (0.02 * jax.random.normal(jax.random.fold_in(key, 1), (weights,))).astype(jnp.bfloat16).astype(jnp.float32)
    scale = 10.0 ** jax.random.uniform(jax.random.fold_in(key, 2), (weights,), minval=-6, maxval=-2)
    mean = 0.5 * jax.random.normal(jax.random.fold_in(key, 3), (weights,))
    return key, w0, scale, mean


def micro_gradient(key, scale, mean, t, j: int, micro: int):
    """Micro-batch j's float32 gradient at step t: scale x (mean + unit noise) / micro."""
    import jax

    noise = jax.random.normal(jax.random.fold_in(key, 10 * (100 + t) + j), scale.shape)
    return scale * (mean + noise) / micro


def synthetic_weights(layout: Layout, steps: int, lr: float, weights: int, micro: int, seed: int = 0):
    """(w0, precise, low): the starting weights and, after `steps` AdamW updates stored as `layout` says,
    the precise weights (float32 or master) and the bf16 ones."""
    import jax
    import jax.numpy as jnp

    from jaxmath.optim import stochastic_round

    f32, bf16 = jnp.float32, jnp.bfloat16
    b1, b2, eps = 0.9, 0.999, 1e-8
    key, w0, scale, mean = synthetic_problem(weights, seed)

    def round_to(x, how, t, salt):
        if how == "float32":
            return x
        if how == "nearest":
            return x.astype(bf16).astype(f32)
        bits = jax.random.bits(jax.random.fold_in(jax.random.fold_in(key, 1000 + t), salt), x.shape, jnp.uint32)
        return stochastic_round(x, bits, bf16).astype(f32)

    def body(t, carry):
        precise, low, m, v = carry
        total = jnp.zeros((weights,), f32)
        for j in range(micro):  # micro-batch gradients: bf16, as autodiff returns them for bf16 weights
            g = micro_gradient(key, scale, mean, t, j, micro)
            total = total + (g if layout.weights == "float32" else g.astype(bf16).astype(f32))
            total = total if layout.accumulator == "float32" else total.astype(bf16).astype(f32)
        m = b1 * m + (1 - b1) * total
        v = b2 * v + (1 - b2) * total * total
        update = -lr * (m / (1 - b1 ** (t + 1))) / (jnp.sqrt(v / (1 - b2 ** (t + 1))) + eps)
        m = round_to(m, layout.moments, t, 1)
        v = round_to(v, layout.second_moment or layout.moments, t, 2)
        if layout.weights in ("float32", "master"):
            precise = precise + update
            low = precise if layout.weights == "float32" else precise.astype(bf16).astype(f32)
        elif layout.weights == "kahan":  # precise holds the negated compensation here
            y = update - precise
            new = (low + y).astype(bf16).astype(f32)
            precise, low = ((new - low) - y).astype(bf16).astype(f32), new
        else:
            low = round_to(low + update, layout.weights, t, 3)
            precise = low
        return precise, low, m, v

    zeros = jnp.zeros((weights,), f32)
    first = zeros if layout.weights == "kahan" else w0
    precise, low, _, _ = jax.jit(lambda c: jax.lax.fori_loop(0, steps, body, c))((first, w0, zeros, zeros))
    return w0, (low - precise if layout.weights == "kahan" else precise), low


def synthetic(steps: int, lr: float, weights: int, micro: int, seed: int = 0,
              layouts: tuple[Layout, ...] = LAYOUTS) -> dict[str, dict[str, float]]:
    """{layout name: {"error": of the precise weights, "bf16_error": of the bf16 weights}}; the first
    layout is the reference the others are measured against."""
    import jax.numpy as jnp

    f32, bf16 = jnp.float32, jnp.bfloat16
    results, reference = {}, None
    for layout in layouts:
        w0, precise, low = synthetic_weights(layout, steps, lr, weights, micro, seed)
        if reference is None:
            reference = precise - w0

        def error(x):
            return float(jnp.linalg.norm((x - w0) - reference) / jnp.linalg.norm(reference))

        results[layout.name] = {"error": error(precise), "bf16_error": error(low)}
    floor = (w0 + reference).astype(bf16).astype(f32)
    results["float32 AdamW rounded to bf16 (floor)"] = {"error": None, "bf16_error":
                                                       float(jnp.linalg.norm(floor - w0 - reference)
                                                             / jnp.linalg.norm(reference))}
    return results


def tiny_model_holding(base, param_dtype, dtype, vocab: int):
    """The tiny Qwen3 in `param_dtype` weights computing in `dtype`, holding `base`'s values (bf16 ones, so
    exact in either dtype)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jaxmath.model as jm

    model = nnx.eval_shape(lambda: jm.Qwen3(jm.preset("tiny", vocab_size=vocab, dtype=dtype, param_dtype=param_dtype),
                                            rngs=nnx.Rngs(0)))
    nnx.update(model, jax.tree.map(lambda x: jnp.array(x, dtype=param_dtype, copy=True), base))
    return model


def random_sft_batches(count: int, rows: int, seq: int, vocab: int, accum: int) -> list[dict[str, Any]]:
    """`count` SFT batches of seeded random token ids, every position trained, each as `accum` micro-batches."""
    import numpy as np

    from jaxmath import sft

    rng = np.random.RandomState(0)
    out = []
    for _ in range(count):
        ids = rng.randint(1, vocab, (rows, seq + 1)).astype(np.int32)
        out.append(sft.stack_micro({"input_ids": ids[:, :-1], "targets": ids[:, 1:],
                                    "segment_ids": np.ones((rows, seq), np.int32),
                                    "positions": np.tile(np.arange(seq, dtype=np.int32), (rows, 1)),
                                    "loss_mask": np.ones((rows, seq), bool)}, accum))
    return out


def sft_updates(model, cfg, batches: list, steps: int, chunk_size: int):
    """(trainable, optimizer state, the jitted step) after `steps` SFT updates cycling through `batches`,
    placed on a one-device mesh as the SFT loop places them (so the step compiles once)."""
    import jax

    from jaxmath import optim, sft
    from jaxmath.model import sharding

    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    graphdef, trainable, frozen = sft.split_trainable(model)
    trainable, frozen = sharding.shard_state(trainable, mesh), sharding.shard_state(frozen, mesh)
    optimizer = optim.make_optimizer(cfg)
    state = sharding.init_optimizer_state(optimizer, trainable, mesh)
    step = sft.make_sft_step(graphdef, optimizer, chunk_size=chunk_size, remat=False)
    with sharding.use_mesh(mesh):
        for t in range(steps):
            trainable, state, _ = step(trainable, frozen, state, batches[t % len(batches)])
    return trainable, state, step


def model(steps: int = 50, lr: float = 5e-6) -> dict[str, dict[str, float]]:
    """The OptimizerConfig layouts through the SFT step of a tiny Qwen3, against float32 weights."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import jaxmath.model as jm
    from jaxmath import optim

    seq, vocab, rows, accum = 32, 256, 8, 4
    base = nnx.state(jm.init_model(jm.preset("tiny", vocab_size=vocab, dtype=jnp.bfloat16,
                                             param_dtype=jnp.bfloat16), seed=0))
    batches = random_sft_batches(5, rows, seq, vocab, accum)

    def train(param_dtype, cfg):
        m = tiny_model_holding(base, param_dtype, jnp.bfloat16, vocab)
        trainable, state, _ = sft_updates(m, cfg, batches, steps, chunk_size=seq)
        precise = state.master if cfg.master_fp32 else trainable
        return [np.asarray(x, np.float64) for x in jax.tree.leaves(precise)], \
            [np.asarray(x, np.float64) for x in jax.tree.leaves(trainable)]

    start = [np.asarray(x, np.float64) for x in jax.tree.leaves(base)]
    reference = [r - s for r, s in zip(train(jnp.float32, optim.OptimizerConfig(lr))[0], start)]

    def error(leaves):
        diff = sum(np.sum((x - s - r) ** 2) for x, s, r in zip(leaves, start, reference))
        return float(np.sqrt(diff / sum(np.sum(r * r) for r in reference)))

    results = {}
    for name, cfg in (("chosen: master, bf16 stochastic moments (moment_dtype auto)",
                       optim.OptimizerConfig(lr, master_fp32=True)),
                      ("master, float32 moments (moment_dtype float32)",
                       optim.OptimizerConfig(lr, master_fp32=True, moment_dtype="float32")),
                      ("no master: bf16 weights, float32 moments", optim.OptimizerConfig(lr, moment_dtype="float32"))):
        precise, low = train(jnp.bfloat16, cfg)
        results[name] = {"error": error(precise), "bf16_error": error(low)}
    return results


def h100(micro_rows: list[int]) -> dict[str, dict[str, float]]:
    """Arguments, temporaries and peak (bytes) of local_full's GRPO step compiled for an H100."""
    import jax
    import jax.numpy as jnp

    try:
        from jax.experimental import topologies
        topology = topologies.get_topology_desc(platform="cuda", target_config=H100_DESCRIPTION.read_text(),
                                                topology="1x1x1")
    except Exception as e:  # no CUDA plugin, or an old one
        raise SystemExit(f"--h100 compiles for a GPU that is not here and needs the CUDA plugin: pip install "
                         f"\"jax[cuda12]=={jax.__version__}\" (../shared/aot/README.md); got: {e}") from e
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxmath.bench import memory
    from jaxmath.model import preset
    from jaxmath.rl import step as step_lib

    on_h100 = NamedSharding(topologies.make_mesh(topology, (1,), ("x",)), PartitionSpec())
    config = preset("qwen3-4b", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, remat="full", attention_impl="cudnn")
    graphdef, trainable, frozen, opt_state, optimizer = memory.abstract_state(config, 0, True)

    def placed(tree):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_h100), tree)

    rows, prompt, completion = 64, 1025, 2048

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=on_h100)

    batch = step_lib.Batch(tokens=spec((rows, prompt + completion), jnp.int32),
                           valid=spec((rows, prompt + completion), jnp.bool_),
                           completion_mask=spec((rows, completion), jnp.bool_), advantages=spec((rows,), jnp.float32),
                           old_logprobs=spec((rows, completion), jnp.float32),
                           engine_logprobs=spec((rows, completion), jnp.float32))
    results = {}
    for micro in micro_rows:
        step = step_lib.make_train_step(graphdef, optimizer, step_lib.LossConfig(micro_batch_rows=micro),
                                        on_policy=True)
        began = time.perf_counter()
        compiled = step.lower(placed(trainable), placed(frozen), placed(opt_state), batch).compile()
        stats = compiled.memory_analysis()
        peak = (stats.argument_size_in_bytes + stats.temp_size_in_bytes + stats.output_size_in_bytes
                - stats.alias_size_in_bytes)
        results[f"micro {micro}"] = {"arguments": stats.argument_size_in_bytes, "temp": stats.temp_size_in_bytes,
                                     "peak": peak, "cudnn": "cudnn" in compiled.as_text(),
                                     "compile_seconds": round(time.perf_counter() - began, 1)}
        print(f"  micro {micro}: arguments {stats.argument_size_in_bytes / 1e9:.2f} GB, temporaries "
              f"{stats.temp_size_in_bytes / 1e9:.2f} GB, peak {peak / 1e9:.2f} GB", flush=True)
    return results


def _print(results: dict[str, dict[str, float]]) -> None:
    print("| layout | error of the precise weights | error of the bf16 weights |\n|---|---|---|")
    for name, row in results.items():
        error = "" if row["error"] is None else f"{row['error']:.2%}"
        print(f"| {name} | {error} | {row['bf16_error']:.2%} |")


def main(argv: list[str]) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m jaxmath.bench precision", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--weights", type=int, default=200_000)
    p.add_argument("--micro", type=int, default=4, help="micro-batches summed into each step's gradient")
    p.add_argument("--model", action="store_true", help="the tiny-model SFT comparison (50 steps by default)")
    p.add_argument("--h100", default="", help="comma list of micro-batch rows: compile local_full's step for an H100")
    args = p.parse_args(argv)
    if args.h100:
        # The CUDA plugin must not look for a device (there is none), and the CPU stays the default backend.
        os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        print("local_full's GRPO step compiled for an H100:")
        return h100([int(x) for x in args.h100.split(",")])
    began = time.perf_counter()
    if args.model:
        results = model(steps=args.steps if args.steps != 1000 else 50, lr=args.lr)
        print(f"tiny Qwen3, SFT step, lr {args.lr}:")
    else:
        results = synthetic(args.steps, args.lr, args.weights, args.micro)
        print(f"synthetic stream: {args.weights} weights, {args.steps} steps, lr {args.lr}, {args.micro} micro-batches:")
    _print(results)
    print(f"({time.perf_counter() - began:.0f} s)")
    return results
