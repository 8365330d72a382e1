"""`python -m jaxmath.bench roofline --config=configs/grpo_v2.py --target=h100`: how fast the run's own
programs would go on the target, modeled from the compiled programs (no GPU needed, nothing run).

Every program jaxmath executes for the run (the JAX sampler's prefill and decode loop, the logprob
pass, the GRPO train step; the SFT step; evaluation's generation) is compiled for the target as
`python -m jaxmath.bench memory` compiles it (same flags: `--micro_batch_rows`, `--sampler_rows`,
`--sft_micro`, `--preset`, `--phases`), and its optimized HLO is costed kernel by kernel by
`jaxmath.aot.cost`: FLOPs of every matmul and attention call, bytes read and written, and a modeled
time of max(FLOPs / peak, bytes / bandwidth) plus a launch cost per kernel. A config whose rollouts
run on vLLM (the study configs) is costed with the JAX sampler's programs in their place: vLLM's
kernels are not jaxmath's programs.

Reported per program: FLOPs, bytes, modeled seconds, kernel launches and the five costliest kernels.
The train step's remat policy and rows are those the run's plan chooses on the target
(`jaxmath.aot.fit.with_micro_batch_rows`: the fastest modeled step that fits). Its modeled MFU: model
FLOPs counted as docs/BENCHMARKS.md counts them
(`jaxmath.bench.grpo_step.train_flops`, every row at full length) over the modeled time and the
target's bf16 peak. The decode loop is one program per attention window (the largest is the
program's entry in `programs`); per window, one step: the bytes it must read (every weight once, the
live keys and values, `jaxmath.bench.memory.decode_step`) against the bytes it reads (`read_ratio`) and
writes (`write_ratio`), and its modeled fraction of the bandwidth roofline (must-read bytes over
bandwidth, over the modeled step). The last line is one JSON object.

What the model leaves out: overlap between kernels, L2 hits (bytes are an upper bound on DRAM
traffic), elementwise arithmetic, and any efficiency below peak inside a kernel; its times are lower
bounds for the compiled programs, to compare programs by, not a prediction of wall time.
"""

from __future__ import annotations

import dataclasses


def _model_flops(plan, phase: str, rows: int) -> float:
    """Model FLOPs of one execution of a training program at full-length rows (0 where none apply)."""
    import numpy as np

    from jaxmath.bench.grpo_step import train_flops

    import jax

    from jaxmath.aot import plan as plan_lib

    c = plan.model
    lora = 0
    if plan.trains_lora:  # the adapters' parameter count, from the abstract state the run trains
        state = plan_lib._abstract_state(plan, c, None)
        lora = sum(int(x.size) for x in jax.tree.leaves(state.trainable))
    if phase == "train/step" and plan.grpo is not None:
        g = plan.grpo
        valid = np.full(g.rows, g.prompt_tokens + g.completion_tokens - 1)
        return train_flops(c, valid, np.full(g.rows, g.completion_tokens), lora)
    if phase == "train/sft_step" and plan.sft is not None:
        s = plan.sft
        return train_flops(c, np.full(s.batch, s.seq - 1), np.full(s.batch, s.seq - 1), lora)
    return 0.0


def jax_programs(cfg, fv, target, compile=None):
    """(model name, RunPlan, phase names) of the programs jaxmath runs for `cfg` on `target`, with the flags
    of `python -m jaxmath.bench memory`. A config that generates on vLLM is planned with the JAX sampler's
    programs in vLLM's place: vLLM's kernels are not jaxmath's. compile: the plan's search compiles with it
    (`jaxmath.aot.fit.phase_compiler`), so a caller that keeps it reuses the chosen programs."""
    from jaxmath.aot import plan as plan_lib
    from jaxmath.bench import memory

    if cfg.get("mode") == "grpo" and cfg.rollout.engine != "jax":
        cfg.rollout.engine = "jax"
    if cfg.get("mode") == "eval" and cfg.eval.backend != "jax":
        cfg.eval.backend = "jax"
    model_name, model_cfg = memory.model_config(cfg, fv.preset)
    plan = memory.run_plan(cfg, model_cfg, micro_batch_rows=fv.micro_batch_rows, sampler_rows=fv.sampler_rows,
                           sft_micro=fv.sft_micro)
    if not fv.sampler_rows:  # the sampler's rows by the target's memory, as it chooses them
        plan = plan_lib.on_target(plan, target)
    if plan.grpo is not None:
        from jaxmath.aot import fit

        # as the run plans it before its weights load (`jaxmath.aot.device.fit_micro_batch_rows`): rows
        # configured (or --micro_batch_rows) are checked, 0 (auto) become the largest that fit, and the
        # remat policy is the one whose step models fastest at the rows it fits
        if fv.micro_batch_rows:
            plan = dataclasses.replace(plan, loss=dataclasses.replace(plan.loss, micro_batch_rows=fv.micro_batch_rows))
        plan = fit.with_micro_batch_rows(plan, target, compile=compile)
    return model_name, plan, [p for p in plan.phases if plan.phases[p] and (not fv.phases or p in fv.phases)]


def report(cfg, fv) -> dict:
    from jaxmath.aot import cost, fit
    from jaxmath.aot import plan as plan_lib
    from jaxmath.aot.targets import load_target, peaks
    from jaxmath.bench import memory

    target = load_target(fv.target)
    rates = peaks(fv.target)
    compile = fit.phase_compiler(target, keep=True)  # the train programs the plan's search chose, compiled once
    model_name, plan, names = jax_programs(cfg, fv, target, compile)
    print(f"roofline: the {cfg.mode} run of {fv['config'].config_filename} with {model_name}, for {target.name} "
          f"({rates['bandwidth'] / 1e12:.2f} TB/s, {rates['flops']['bf16'] / 1e12:.1f} TFLOP/s bf16); "
          f"programs {', '.join(names)}", flush=True)
    programs, decode, mfu = {}, {}, {}
    for name in names:
        m = compile(plan, name, plan.phases[name])
        text = m.compiled.as_text()
        summary = cost.program_cost(text, rates)
        loops = summary.pop("loops")
        programs[name] = {**summary, "rows": m.rows, "peak_bytes": m.peak_bytes}
        line = (f"  {name} at {m.rows} rows: {summary['flops'] / 1e12:.2f} TFLOP, {summary['bytes'] / 1e9:.1f} GB, "
                f"modeled {summary['modeled_s'] * 1e3:.1f} ms over {summary['kernels']} kernels, "
                f"peak {m.peak_bytes / 1e9:.1f} GB")
        flops = _model_flops(plan, name, m.rows)
        if flops:
            mfu[name] = flops / summary["modeled_s"] / rates["flops"]["bf16"]
            programs[name].update(model_flops=flops, remat=plan.model.remat)
            line += f"; modeled MFU {mfu[name]:.1%} (model.remat={plan.model.remat})"
        print(line, flush=True)
        if name.endswith("/decode"):  # one program per attention window
            decode[name] = []
            largest = memory.decode_windows_of(plan, name)[-1][1]  # compiled above
            for steps_to, window in memory.decode_windows_of(plan, name):
                if window != largest:
                    text = plan_lib.compile_phase(plan, name, m.rows, target, keep=True, window=window).compiled.as_text()
                (loop,) = loops if window == largest else cost.program_cost(text, rates)["loops"]
                must = memory.decode_must_read(plan, name, window)
                entry = {"window": window, "steps_to": steps_to, "must_read": must,
                         "read": loop["read"], "written": loop["written"], "read_ratio": loop["read"] / must,
                         "write_ratio": loop["written"] / must, "modeled_step_s": loop["modeled_s"],
                         "bandwidth_fraction": must / rates["bandwidth"] / loop["modeled_s"],
                         "kernels_per_step": loop["kernels"]}
                decode[name].append(entry)
                print(f"    window {entry['window']}: reads {entry['read_ratio']:.2f}x and writes "
                      f"{entry['write_ratio']:.2f}x what it must; modeled step {entry['modeled_step_s'] * 1e3:.2f} ms, "
                      f"{entry['bandwidth_fraction']:.1%} of the bandwidth roofline "
                      f"({entry['kernels_per_step']} kernels)", flush=True)
        for k in summary["top_kernels"]:
            print(f"      {k['modeled_s'] * 1e3:8.2f} ms  {k['kind']:<9} x{k['count']:<5} {k['name']} ({k['op']}, "
                  f"{k['bound']}-bound)", flush=True)
    out = {"target": target.name, "model": model_name, "peaks": rates, "launch_seconds": cost.LAUNCH_SECONDS,
           "programs": programs, "decode": decode, "modeled_mfu": mfu}
    train = "train/step" if "train/step" in mfu else "train/sft_step" if "train/sft_step" in mfu else ""
    if train:
        out["train_modeled_mfu"] = mfu[train]
    return out


def main(argv: list[str]) -> dict:
    from jaxmath.aot import targets
    from jaxmath.bench import memory
    from jaxmath.config import ConfigError

    fv = memory._flags(argv)
    targets.prepare_process()
    if fv.target not in targets.GPU_TARGETS:
        raise SystemExit(f"roofline: --target must be a GPU ({', '.join(targets.GPU_TARGETS)}); the model needs its "
                         "peak rates")
    try:
        targets.require_plugin(fv.target)
        cfg = fv.config
        if cfg.get("mode") not in ("grpo", "sft", "eval"):
            raise SystemExit(f"roofline: config.mode {cfg.get('mode')!r} runs no model program of jaxmath's")
        return report(cfg, fv)
    except (targets.TargetUnavailable, ConfigError) as e:
        raise SystemExit(f"roofline: {e}") from None

