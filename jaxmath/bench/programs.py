"""`python -m jaxmath.bench programs --config=configs/grpo_v2.py [--phases=train/step,rollout/decode]`: runs
the run's own device programs on this machine's device and puts the measurement beside the plan and
the model: seconds against the roofline's modeled seconds (`jaxmath.aot.cost`), peak device memory
against the compiled plan's (`jaxmath.aot.plan`), and for training programs the MFU, for the decode
loop tokens per second and the fraction of the bandwidth roofline.

Each phase is compiled exactly as `python -m jaxmath.bench memory` and `roofline` compile it (same
flags: `--micro_batch_rows`, `--sampler_rows`, `--sft_micro`, `--preset`, `--phases`, config overrides),
but for this process's device, and run on inputs of its shapes filled by a fixed rule (weights and
other floats 0.01, float scalars 1.0 (temperature, top-p), token ids 1, masks True, the decode loop's
stop table all False so every row runs to `max_new_tokens`: fixed lengths). Timing: the median of `--repeats`
runs after one warm-up, each closed by `block_until_ready`. Peak memory: the device's
`peak_bytes_in_use` after the phase (not reset between phases; None on a CPU, which reports none).
The roofline uses the peaks of `--peaks` (default: the H200's for an H200, else the H100's); on a
CPU (`launch/gpu_checks.sh --smoke`) the numbers say only that the pipeline runs.

A config that rolls out on vLLM is run with the JAX sampler's programs in its place, as `roofline`
does. The last line is one JSON object: {"device", "peaks_of", "phases": {name: {...}}}.
"""

from __future__ import annotations

import statistics
import time


def _fill(info, sharding):
    """A concrete input for one abstract argument (the fill rule of the module docstring)."""
    import jax
    import jax.numpy as jnp

    shape, dtype = info.shape, info.dtype
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        n = 1
        for d in shape:
            n *= d
        value = jax.random.split(jax.random.key(0), n).reshape(shape)
    elif dtype == jnp.bool_:
        value = jnp.ones(shape, dtype)
    elif jnp.issubdtype(dtype, jnp.integer):
        value = jnp.full(shape, 0 if shape == () else 1, dtype)
    else:
        value = jnp.full(shape, 1.0 if shape == () else 0.01, dtype)
    return value if sharding is None else jax.device_put(value, sharding)


def _inputs(compiled):
    import jax

    args, kwargs = compiled.args_info
    leaves, tree = jax.tree.flatten(args)
    placements = jax.tree.leaves(compiled.input_shardings[0], is_leaf=lambda x: x is None)
    placements = [p for p in placements if p is not None]
    if len(placements) != len(leaves):  # place them on the default device; the call moves them if it must
        placements = [None] * len(leaves)
    filled = [_fill(info, sharding) for info, sharding in zip(leaves, placements)]
    return jax.tree.unflatten(tree, filled), kwargs


def _peak_bytes():
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def _time(compiled, repeats: int, make_inputs=None) -> float:
    """The median seconds of `repeats` runs of `compiled` after one warm-up, on fresh inputs each time
    (donated inputs are consumed)."""
    import jax

    make_inputs = make_inputs or (lambda: _inputs(compiled))
    seconds = []
    for i in range(repeats + 1):
        args, kwargs = make_inputs()
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args, **kwargs))
        if i:
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def _decode_windows(plan, name: str, largest, target, rates: dict, repeats: int) -> list[dict]:
    """Each attention window's decode program, run from the step its window starts at to the step it
    ends at, every slot live (no stop id matches): its measured and modeled seconds and per step what
    it must read. `largest` is the compiled program of the last window."""
    import dataclasses

    import jax.numpy as jnp

    from jaxmath.aot import cost
    from jaxmath.aot import plan as plan_lib
    from jaxmath.bench import memory
    from jaxmath.rollout.jax_sampler import Slots

    windows = memory.decode_windows_of(plan, name)
    rows, start, out = plan.phases[name], 0, []
    for steps_to, window in windows:
        m = largest if window == windows[-1][1] else plan_lib.compile_phase(plan, name, rows, target, keep=True,
                                                                           window=window)
        bucket = windows[-1][1] - windows[-1][0]

        def inputs(compiled=m.compiled, first=start):
            args, kwargs = _inputs(compiled)
            live = []
            for a in args:
                if isinstance(a, Slots):  # every slot live, at the window's first step
                    a = dataclasses.replace(a, finished=jnp.zeros_like(a.finished), steps=jnp.full_like(a.steps, first),
                                            cache=dataclasses.replace(a.cache, index=jnp.full_like(a.cache.index,
                                                                                                   bucket + first)))
                elif getattr(a, "shape", None) == () and jnp.issubdtype(a.dtype, jnp.integer):
                    a = jnp.full((), a.dtype.type(rows + 1))  # exit_free: never hand back for a refill
                elif getattr(a, "ndim", None) == 1 and a.dtype == jnp.bool_:
                    a = jnp.zeros_like(a)  # the stop table: no stop id, every row runs to the window's end
                live.append(a)
            return tuple(live), kwargs

        loop = cost.program_cost(m.compiled.as_text(), rates)["loops"][0]
        out.append({"window": window, "steps": steps_to - start, "measured_s": _time(m.compiled, repeats, inputs),
                    "modeled_step_s": loop["modeled_s"],
                    "must_read": memory.decode_must_read(plan, name, window)})
        start = steps_to
    return out


def report(cfg, fv, repeats: int = 2, peaks: str = "") -> dict:
    import jax

    from jaxmath.aot import cost, fit
    from jaxmath.aot import plan as plan_lib
    from jaxmath.aot import targets
    from jaxmath.bench import memory
    from jaxmath.bench.roofline import _model_flops, jax_programs

    device = jax.devices()[0]
    local = fit.local_target() or targets.load_target("cpu")
    peaks_of = peaks or ("h200" if "H200" in device.device_kind.upper() else "h100")
    rates = targets.peaks(peaks_of)
    model_name, plan, names = jax_programs(cfg, fv, local)
    print(f"programs: the {cfg.mode} run of {fv['config'].config_filename} with {model_name} on {device.device_kind} "
          f"({local.name}); roofline with {peaks_of}'s peaks; phases {', '.join(names)}", flush=True)
    out = {}
    for name in names:
        m = plan_lib.compile_phase(plan, name, plan.phases[name], local, keep=True)
        modeled = cost.program_cost(m.compiled.as_text(), rates)
        if name.endswith("/decode"):
            windows = _decode_windows(plan, name, m, local, rates, repeats)
            measured = sum(w["measured_s"] for w in windows)
        else:
            measured = _time(m.compiled, repeats)
        row = {"rows": m.rows, "measured_s": measured, "modeled_s": modeled["modeled_s"],
               "modeled_over_measured": modeled["modeled_s"] / measured, "planned_peak_bytes": m.peak_bytes,
               "measured_peak_bytes": _peak_bytes(), "flops": modeled["flops"], "bytes": modeled["bytes"],
               "top_kernels": modeled["top_kernels"]}
        flops = _model_flops(plan, name, m.rows)
        if flops:
            row.update(model_flops=flops, measured_mfu=flops / measured / rates["flops"]["bf16"],
                       modeled_mfu=flops / modeled["modeled_s"] / rates["flops"]["bf16"])
        if name.endswith("/decode"):
            gen = plan.rollout if name.startswith("rollout/") else plan.evaluation
            must = sum(w["steps"] * w["must_read"] for w in windows)
            modeled_total = sum(w["steps"] * w["modeled_step_s"] for w in windows)
            row.update(tokens=m.rows * gen.max_new_tokens, tokens_per_s=m.rows * gen.max_new_tokens / measured,
                       windows=windows,
                       modeled_s=modeled_total, modeled_over_measured=modeled_total / measured,
                       bandwidth_fraction=must / rates["bandwidth"] / measured,
                       modeled_bandwidth_fraction=must / rates["bandwidth"] / modeled_total)
        out[name] = row
        print(f"  {name} at {m.rows} rows: measured {measured * 1e3:.1f} ms, modeled {row['modeled_s'] * 1e3:.1f} ms"
              + (f", MFU measured {row['measured_mfu']:.1%} / modeled {row['modeled_mfu']:.1%}" if flops else "")
              + (f", {row['tokens_per_s']:.0f} tokens/s, {row['bandwidth_fraction']:.1%} of the bandwidth roofline"
                 if "tokens_per_s" in row else "")
              + f"; peak {row['measured_peak_bytes']} bytes measured, {m.peak_bytes} planned", flush=True)
        del m
    return {"device": device.device_kind, "platform": device.platform, "peaks_of": peaks_of, "model": model_name,
            "phases": out}


def main(argv: list[str]) -> dict:
    from absl import flags

    from jaxmath.bench import memory
    from jaxmath.config import ConfigError

    extra = [a for a in argv if a.startswith(("--repeats", "--peaks"))]
    fv = memory._flags([a for a in argv if a not in extra])
    parsed = flags.FlagValues()
    flags.DEFINE_integer("repeats", 2, "timed runs per phase after one warm-up", flag_values=parsed)
    flags.DEFINE_enum("peaks", "", ["", "h100", "h200"], "the roofline's peaks (default: from the device)",
                      flag_values=parsed)
    parsed(["programs"] + extra)
    cfg = fv.config
    if cfg.get("mode") not in ("grpo", "sft", "eval"):
        raise SystemExit(f"programs: config.mode {cfg.get('mode')!r} runs no model program of jaxmath's")
    try:
        return report(cfg, fv, parsed.repeats, parsed.peaks)
    except ConfigError as e:
        raise SystemExit(f"programs: {e}") from None
