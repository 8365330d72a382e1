"""`python -m jaxmath.bench memory --config=configs/grpo_v2.py --target=h100`: does the run fit the
device? Every program the run executes, compiled for the target at the shapes the config builds.

The run is read from its config file with overrides exactly as `python -m jaxmath.main` reads it
(`--config.rl.max_prompt_tokens=1500`), and `jaxmath.aot.plan` lists its phases: for GRPO the sampler's
prefill and decode loop (one sub-batch at the rows the sampler chooses on the target by memory,
`jaxmath.aot.plan.generation_rows`, at most `sampler.max_batch_rows`; the rollout's cache length,
every decode window), the old-policy / reference logprob pass where the run needs one, the
train step (micro-batches of `loss.micro_batch_rows`; its 0, "auto" as the study configs ship, is
fitted to the target as the run fits it before weights load, `jaxmath.aot.fit`, within JAX's share
where vLLM shares the device), the weight sync's LoRA merge (an estimate: it
runs eagerly) and periodic evaluation's generation; for SFT the train step (`sft.micro_batch_size`)
and the held-out loss; for the eval config its generation. Each is compiled for the target
(`--target=h100|h200` with the CUDA plugin of the `aot` extra, no GPU needed; `cpu` for this
machine) and reported with its arguments, temporaries and outputs from XLA's memory analysis, what
the run keeps resident beside it, its peak, and the attention kernel the compiled program contains.
Nothing is allocated.

--micro_batch_rows, --sampler_rows and --sft_micro override the rows a phase is compiled at (the knobs
its memory follows); `jaxmath.aot.plan.compiled_peak_bytes` is the same measurement for a planner.
A run fits when its largest phase plus --headroom_bytes (default 4 GB) is within the target's
capacity (for an H100 80GB, 80e9 of the 84.9e9 bytes CUDA reports: a run fits when its peak is at
most 76e9). On a real GPU, JAX's allocator takes 75% of the device unless told otherwise;
`python -m jaxmath.main` sets XLA_CLIENT_MEM_FRACTION=0.95 (80.7e9 bytes of an H100) unless the user
set a fraction.

--sweep prints the study's Table 10 layout instead (LoRA r64 / full-parameter x K x completion
length, the train step and SFT step of this config, compiled for the target). The last line is JSON.
"""

from __future__ import annotations

from typing import Any

import numpy as np

GB = 1e9
# The study's Table 10 (one H100 80GB, K=8, 2,048 tokens), in bytes.
STUDY = {"full": dict(weights=8e9, optimizer=32e9, gradients=8e9, activations=10e9, kv_cache=8e9, peak=66e9),
         "lora_r64": dict(weights=8e9, optimizer=0.5e9, gradients=0.3e9, activations=10e9, kv_cache=8e9,
                          peak=27e9)}
SWEEP_MICRO_ROWS = 16  # --sweep's rows per micro-batch when neither the flag nor the config sets them
FIELDS = ("weights", "optimizer", "gradients", "activations", "kv_cache", "peak")


def _flags(argv: list[str]):
    """Parse argv with the flags of this command; --config takes overrides as main does."""
    from absl import flags
    from ml_collections import config_flags

    from jaxmath.aot import run as run_lib
    from jaxmath.aot.targets import TARGETS

    fv = flags.FlagValues()
    # sys_argv: the config flag registers the --config.* overrides it finds there, as main's does.
    config_flags.DEFINE_config_file("config", None, "a config file, e.g. configs/grpo_v2.py", flag_values=fv,
                                    sys_argv=["memory"] + list(argv))
    flags.DEFINE_enum("target", "cpu", TARGETS, "the device to compile for", flag_values=fv)
    flags.DEFINE_string("preset", "", f"model preset (default: model.preset, model.path's config.json, "
                                      f"else {run_lib.DEFAULT_PRESET})", flag_values=fv)
    flags.DEFINE_integer("micro_batch_rows", 0, "GRPO rows per train micro-batch (0: loss.micro_batch_rows, "
                         "whose 0 is fitted to the target; --sweep: 16)", flag_values=fv)
    flags.DEFINE_integer("sampler_rows", 0, "rows per sampler sub-batch (0: as sampler.max_batch_rows gives)",
                         flag_values=fv)
    flags.DEFINE_integer("sft_micro", 0, "SFT rows per micro-batch (0: sft.micro_batch_size)", flag_values=fv)
    flags.DEFINE_list("phases", [], "compile only these phases (default: all)", flag_values=fv)
    flags.DEFINE_float("headroom_bytes", 4e9, "memory kept free beside the run's peak", flag_values=fv)
    flags.DEFINE_boolean("fit", False, "for a phase that does not fit, compile it again at half its rows until "
                         "it does, and report the rows that fit", flag_values=fv)
    flags.DEFINE_boolean("sweep", False, "the study's Table 10 sweep instead of the run's phases", flag_values=fv)
    flags.DEFINE_list("methods", ["lora_r64", "full"], "--sweep: lora_r64, full", flag_values=fv)
    flags.DEFINE_list("ks", ["8", "16"], "--sweep: completions per prompt", flag_values=fv)
    flags.DEFINE_list("tokens", ["2048", "4096"], "--sweep: completion tokens", flag_values=fv)
    flags.DEFINE_boolean("no_sft", False, "--sweep: skip the SFT step", flag_values=fv)
    try:
        fv(["memory"] + list(argv))
    except (flags.Error, AttributeError, KeyError) as e:  # an unknown flag, or an unknown config key
        raise SystemExit(f"memory: {e!r} is not a flag of this command or a key of the config") from e
    if fv.config is None:
        raise SystemExit("memory: --config is required, e.g. --config=configs/grpo_v2.py")
    return fv


# --- the run, from its config (jaxmath.aot.run; named here for the tests and older callers) ---------

from jaxmath.aot.run import model_config, run_plan  # noqa: E402


# --- the report ----------------------------------------------------------------------------------------


def _gb(x: float) -> str:
    return f"{x / GB:.1f}"


def phase_table(memories) -> str:
    head = "| phase | rows | arguments | temporaries | outputs | resident | peak GB | attention | compile s |"
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for m in memories:
        lines.append(f"| {m.phase} | {m.rows or '-'} | {_gb(m.arguments)} | {_gb(m.temporaries)} | "
                     f"{_gb(m.outputs - m.aliased)} | {_gb(m.resident)} | **{_gb(m.peak_bytes)}** | {m.attention} | "
                     f"{m.compile_seconds if m.rows else 'estimate'} |")
    return "\n".join(lines) + "\n"


def device_table(device) -> str:
    """The colocated device plan: what JAX and vLLM hold in each phase, in GB."""
    holders = list(dict.fromkeys(h for holds in device.holds.values() for h in holds))
    lines = ["| phase | " + " | ".join(holders) + " | peak GB |", "|---|" + "---|" * (len(holders) + 1)]
    for name, holds in device.holds.items():
        cells = [_gb(holds[h]) if h in holds else "-" for h in holders]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | **{_gb(device.peak(name))}** |")
    return "\n".join(lines) + "\n"


def decode_windows_of(plan, phase: str) -> tuple[tuple[int, int], ...]:
    """(steps to, attention window) of each of `phase`'s decode programs (`decode_windows`)."""
    from jaxmath.aot.plan import sampler_bucket
    from jaxmath.rollout.jax_sampler import decode_windows

    gen = plan.rollout if phase.startswith("rollout/") else plan.evaluation
    return decode_windows(sampler_bucket(plan.sampler, gen.prompt_tokens), gen.max_new_tokens,
                          plan.sampler.decode_window)


def decode_must_read(plan, phase: str, window: int) -> int:
    """The bytes one decode step at `window` must read: every weight once, the keys and values of the
    window, and the slot it writes."""
    from jaxmath.model.config import dtype_from_name
    from jaxmath.model.qwen3 import KVCache

    c, rows = plan.model, plan.phases[phase]
    cache_dtype = dtype_from_name(plan.sampler.cache_dtype) if plan.sampler.cache_dtype else c.dtype
    weights = c.num_params() * np.dtype(c.param_dtype).itemsize
    return int(weights + KVCache.nbytes_for(c, rows, window, cache_dtype) + KVCache.nbytes_for(c, rows, 1, cache_dtype))


def decode_step(plan, phase: str, steps_to: int, window: int, loop: dict) -> dict:
    """One decode step at `window`: what it must read (`decode_must_read`) against the bytes of the
    buffers the compiled step (`loop`, the traffic of its loop body) reads and writes, and the copies
    it makes."""
    return {"window": window, "steps_to": steps_to, "must_read": decode_must_read(plan, phase, window),
            "buffers_read": loop["read"], "buffers_written": loop["written"], "copies": loop["copies"],
            "copy_bytes": loop["copy_bytes"], "largest_copy": loop["largest_copy"]}


def rows_that_fit(plan, phase: str, rows: int, target, budget: float) -> tuple[int, int]:
    """(rows, peak) of the largest halving of `rows` at which `phase` fits `budget` bytes, (0, 0) when
    none does. Sampler rows are those `JaxSampler.plan` can run (whole groups of K, or fewer rows than
    K with a group spread over admissions: `plan.sub_batch_rows`), train rows divide the batch."""
    from jaxmath.aot import plan as plan_lib

    kind = phase.split("/", 1)[1]
    if kind in ("prefill", "decode"):
        gen = plan.rollout if phase.startswith("rollout/") else plan.evaluation
        candidates = sorted({plan_lib.sub_batch_rows(plan.sampler, gen, r) for r in _halvings(rows)} - {0},
                            reverse=True)
    else:
        batch = plan.grpo.rows if plan.grpo is not None else plan.sft.batch
        candidates = [r for r in _halvings(rows) if batch % r == 0]
    for r in candidates:
        peak = plan_lib.compiled_peak_bytes(plan, phase, r, target)
        print(f"    {phase} at {r} rows: peak {_gb(peak)} GB", flush=True)
        if peak <= budget:
            return r, peak
    return 0, 0


def _halvings(rows: int) -> list[int]:
    out = []
    while rows > 1:
        rows //= 2
        out.append(rows)
    return out


def report(cfg, fv) -> dict[str, Any]:
    from jaxmath.aot import fit
    from jaxmath.aot import plan as plan_lib
    from jaxmath.aot.targets import load_target

    from jaxmath.aot import run as run_lib

    target = load_target(fv.target)
    model_name, model_cfg = model_config(cfg, fv.preset)
    plan = run_plan(cfg, model_cfg, micro_batch_rows=fv.micro_batch_rows, sampler_rows=fv.sampler_rows,
                    sft_micro=fv.sft_micro)
    if not fv.sampler_rows:  # the sub-batch rows the sampler chooses on the target, by its memory
        if plan.sampler is not None:  # refused as the run refuses it when not even one row fits
            fit.check_generation(plan, target)
        plan = plan_lib.on_target(plan, target)
    device = run_lib.device_plan(cfg, target, model_cfg) if target.is_gpu else None
    compile_at = fit.phase_compiler(target)  # the plan's search and the report below share their compiles
    if plan.grpo is not None and not fv.micro_batch_rows and not plan.loss.micro_batch_rows:
        # loss.micro_batch_rows=0 (auto): the rows the run would pick before its weights load
        # (`jaxmath.aot.device.fit_micro_batch_rows`), within JAX's share where vLLM shares the device.
        budget = device.jax_budget_bytes if device is not None else None
        plan = fit.with_micro_batch_rows(plan, target, budget=budget, compile=compile_at)
        print(f"loss.micro_batch_rows=0 (auto): {plan.loss.micro_batch_rows} rows per train micro-batch fit "
              f"{target.name}" + (f" within JAX's {_gb(budget)} GB" if budget else "")
              + (", each layer's saved input in host memory (model.remat=offload)"
                 if plan.model.remat == "offload" and cfg.model.remat != "offload" else ""), flush=True)
    names = [p for p in plan.phases if not fv.phases or p in fv.phases]
    unknown = sorted(set(fv.phases) - set(plan.phases))
    if unknown:
        raise SystemExit(f"memory: --phases {unknown} are not phases of this run; it has {list(plan.phases)}")
    print(f"memory plan: the {cfg.mode} run of {fv['config'].config_filename} with {model_name}, for "
          f"{target.name} ({target.description}, {_gb(target.capacity_bytes)} GB); phases {', '.join(names)}",
          flush=True)
    memories, fitting = [], {}
    budget = target.capacity_bytes - fv.headroom_bytes
    for name in names:
        m = compile_at(plan, name, plan.phases[name])
        memories.append(m)
        print(f"  {name}" + (f" at {m.rows} rows: peak {_gb(m.peak_bytes)} GB, attention {m.attention} "
                             f"(compiled in {m.compile_seconds} s)" if m.rows else
                             f" (estimate, not a compiled program): peak {_gb(m.peak_bytes)} GB"), flush=True)
        if fv.fit and m.rows and m.peak_bytes > budget:
            fitting[name] = rows_that_fit(plan, name, m.rows, target, budget)
    if device is not None:  # vLLM colocated: its holdings beside each JAX phase, and its own phases
        if device.jax_budget_bytes:  # a run with JAX programs (an evaluation has none)
            device = device.with_jax_programs({m.phase: m.peak_bytes for m in memories})
        for m in memories:
            m.resident += device.peak(m.phase) - m.peak_bytes
    peak = max([m.peak_bytes for m in memories] + ([device.peak_bytes] if device else []))
    fits = peak + fv.headroom_bytes <= target.capacity_bytes
    if device is not None:  # and every phase within the split's budget (JAX's programs within JAX's share)
        fits = fits and all(device.peak(p) <= device.budget_bytes for p in device.holds)
    print()
    print(phase_table(memories))
    if device is not None:
        print(device_table(device))
        print(device.summary())
    print(f"peak {_gb(peak)} GB of {_gb(target.capacity_bytes)} GB ({target.name}), headroom "
          f"{_gb(fv.headroom_bytes)} GB: {'fits' if fits else 'does NOT fit'}")
    print()
    print("| phase | copies outside loops | their GB | largest GB |")
    print("|---|---|---|---|")
    for m in memories:
        if m.traffic is not None:
            t = m.traffic
            print(f"| {m.phase} | {t['copies']} | {_gb(t['copy_bytes'])} | {_gb(t['largest_copy'])} |")
    for name, (rows, peak_at) in fitting.items():
        print(f"{name} does not fit at {plan.phases[name]} rows; "
              + (f"it fits at {rows} rows (peak {_gb(peak_at)} GB)" if rows else "no smaller row count fits"))
    # The decode phases are compiled at their largest window (the memory bound); `roofline` reads each.
    steps = {m.phase: [decode_step(plan, m.phase, *decode_windows_of(plan, m.phase)[-1], m.traffic["loops"][0])]
             for m in memories if m.phase.endswith("/decode")}
    for phase, rows in steps.items():
        print(f"\n{phase}, one step at its largest window (GB): must read | buffers read | buffers written | "
              f"copies (GB, largest)")
        for r in rows:
            print(f"  window {r['window']}: {_gb(r['must_read'])} | {_gb(r['buffers_read'])} | "
                  f"{_gb(r['buffers_written'])} | {r['copies']} ({_gb(r['copy_bytes'])}, {_gb(r['largest_copy'])})")
    vllm_phases = {} if device is None else {
        name: {"peak_bytes": device.peak(name), "holds": holds} for name, holds in device.holds.items()
        if name.startswith("vllm/")}
    colocated = {} if device is None else {
        "gpu_memory_utilization": device.gpu_memory_utilization, "kv_cache_rows": device.kv_cache_rows,
        "kv_cache_rows_needed": device.kv_cache_rows_needed, "kv_cache_bytes": device.kv_cache_bytes,
        "jax_env": device.jax_env, "jax_budget_bytes": device.jax_budget_bytes, "sleep": device.sleep,
        # the static split preallocates this share; the time-shared one sets no fraction (allocator platform)
        "jax_memory_fraction": device.jax_fraction or None,
        "jax_allocator": device.jax_env.get("XLA_PYTHON_CLIENT_ALLOCATOR", "bfc"),
        "device_plan": device.as_json()}
    return {"target": target.name, "capacity_bytes": target.capacity_bytes, "peak_bytes": int(peak), "fits": fits,
            "headroom_bytes": int(fv.headroom_bytes), "model": model_name, **colocated,
            "phases": {**vllm_phases, **{m.phase: {"peak_bytes": int(m.peak_bytes), "attention": m.attention, "rows": m.rows,
                                 "arguments": m.arguments, "temporaries": m.temporaries, "outputs": m.outputs,
                                 "aliased": m.aliased, "resident": m.resident,
                                 "host_temporaries": m.host_temporaries, "remat": plan.model.remat,
                                 "compile_seconds": m.compile_seconds,
                                 "copies": m.traffic and {k: v for k, v in m.traffic.items() if k != "loops"},
                                 **({"decode_steps": steps[m.phase]} if m.phase in steps else {}),
                                 **({"fits_at_rows": fitting[m.phase][0], "peak_bytes_at_those_rows":
                                     int(fitting[m.phase][1])} if m.phase in fitting else {}),
                                 **({"holds": device.holds[m.phase]} if device is not None else {})}
                       for m in memories}}}


# --- the study's Table 10 sweep ---------------------------------------------------------------------------


def state_bytes(model_cfg, lora_rank: int, master_fp32: bool) -> dict[str, int]:
    """weights, optimizer and gradient bytes of training `model_cfg` with `lora_rank` adapters (0:
    full-parameter), from abstract shapes only (seconds, no compile).

    weights: every parameter in model.param_dtype, plus the float32 LoRA adapters; optimizer: Adam's two
    moments per trainable parameter in its dtype (optimizer.moment_dtype "auto": float32 adapters 8
    bytes, bf16 weights 4 bytes) plus the float32 master copy when master_fp32; gradients: the step's
    accumulator in each parameter's dtype (docs/PRECISION.md)."""
    import jax
    from flax import nnx

    from jaxmath import optim
    from jaxmath.aot.plan import nbytes
    from jaxmath.model import lora as lora_lib
    from jaxmath.model.qwen3 import Qwen3

    def build():
        model = Qwen3(model_cfg, rngs=nnx.Rngs(0))
        if lora_rank:
            lora_lib.apply_lora(model, lora_lib.LoRAConfig(rank=lora_rank, alpha=2.0 * lora_rank))
        return model

    _, trainable, frozen = lora_lib.split_trainable(nnx.eval_shape(build))
    optimizer = optim.make_optimizer(optim.OptimizerConfig(learning_rate=1e-5, master_fp32=master_fp32))
    opt_state = jax.eval_shape(optimizer.init, trainable)
    params = sum(int(x.size) for x in jax.tree.leaves(trainable))
    # The step's gradient accumulator, in each parameter's dtype (float32 adapters, bf16 weights).
    accumulator = jax.eval_shape(optim.grad_accumulator, trainable)
    return {"weights": nbytes(trainable) + nbytes(frozen), "optimizer": nbytes(opt_state),
            "gradients": nbytes(accumulator), "trainable_params": params}


def sweep(cfg, fv) -> dict[str, dict]:
    """Table 10: per method x K x tokens, the train step's temporaries and the rollout's KV cache."""
    from jaxmath.aot import plan as plan_lib
    from jaxmath.aot.targets import load_target
    from jaxmath.model.lora import LoRAConfig
    from jaxmath.model.qwen3 import KVCache
    from jaxmath.optim import OptimizerConfig
    from jaxmath.rl.step import LossConfig

    target = load_target(fv.target)
    model_name, model_cfg = model_config(cfg, fv.preset)
    prompts, prompt_tokens = cfg.rl.prompts_per_step, cfg.rl.max_prompt_tokens
    # One micro-batch size for every cell, so the cells compare: --micro_batch_rows, the config's, else
    # SWEEP_MICRO_ROWS (the configs pick theirs per device and length: loss.micro_batch_rows=0).
    micro = fv.micro_batch_rows or cfg.loss.micro_batch_rows or SWEEP_MICRO_ROWS
    chunk, rank = cfg.loss.logprob_chunk, cfg.lora.rank or 64
    print(f"memory sweep: {model_name} for {target.name}, {prompts} prompts x K, prompt {prompt_tokens} tokens, "
          f"micro-batch {micro} rows", flush=True)
    results: dict[str, dict] = {}
    for method in fv.methods:
        lora_rank = {"lora_r64": rank, "full": 0}[method]
        state = state_bytes(model_cfg, lora_rank, lora_rank == 0)
        resident = state["weights"] + state["optimizer"]
        for k in map(int, fv.ks):
            for tokens in map(int, fv.tokens):
                plan = plan_lib.grpo_plan(
                    model_cfg, lora=LoRAConfig(rank=lora_rank, alpha=2.0 * max(lora_rank, 1)),
                    optimizer=OptimizerConfig(learning_rate=1e-5, master_fp32=lora_rank == 0),
                    loss=LossConfig(micro_batch_rows=micro, logprob_chunk=chunk), prompts=prompts,
                    num_generations=k, max_prompt_tokens=prompt_tokens, max_completion_tokens=tokens,
                    prompt_bucket=cfg.rl.prompt_bucket, temperature=1.0, on_policy=True, sampler=None)
                m = plan_lib.compile_phase(plan, "train/step", micro or k * prompts, target)
                kv = KVCache.nbytes_for(model_cfg, prompts + k * prompts, prompt_tokens + tokens)
                merged = _projection_bytes(model_cfg) if lora_rank else 0
                key = f"{method}/{k}x{tokens}"
                results[key] = {"weights": state["weights"], "optimizer": state["optimizer"],
                                "gradients": state["gradients"],
                                "activations": max(m.temporaries - state["gradients"], 0), "kv_cache": kv,
                                "peak": max(resident + m.temporaries, resident + kv + merged),
                                "attention": m.attention}
                print(f"  {key}: peak {_gb(results[key]['peak'])} GB ({m.compile_seconds} s)", flush=True)
    sft: dict[str, dict] = {}
    if not fv.no_sft:
        seq = max(map(int, fv.tokens))
        for method in fv.methods:
            lora_rank = {"lora_r64": rank, "full": 0}[method]
            state = state_bytes(model_cfg, lora_rank, lora_rank == 0)
            plan = plan_lib.sft_plan(model_cfg, lora=LoRAConfig(rank=lora_rank, alpha=2.0 * max(lora_rank, 1)),
                                     optimizer=OptimizerConfig(learning_rate=1e-5, master_fp32=lora_rank == 0),
                                     batch=32, micro=fv.sft_micro or 4, seq=seq, chunk=chunk, remat=True)
            m = plan_lib.compile_phase(plan, "train/sft_step", fv.sft_micro or 4, target)
            resident = state["weights"] + state["optimizer"]
            sft[f"sft {method} 32x{seq}"] = {"weights": state["weights"], "optimizer": state["optimizer"],
                                             "gradients": state["gradients"],
                                             "activations": max(m.temporaries - state["gradients"], 0),
                                             "kv_cache": 0, "peak": resident + m.temporaries, "attention": m.attention}
    print()
    print(table(results, sft, target))
    return {k: {f: int(v[f]) for f in FIELDS} for k, v in results.items()}


def _projection_bytes(model_cfg) -> int:
    """Bytes of the seven projection kernels: the copy the sampler merges LoRA adapters into."""
    import numpy as np

    c = model_cfg
    per_layer = (2 * c.hidden_size * c.num_heads * c.head_dim + 2 * c.hidden_size * c.num_kv_heads * c.head_dim
                 + 3 * c.hidden_size * c.intermediate_size)
    return int(c.num_layers * per_layer * np.dtype(c.param_dtype).itemsize)


def table(results: dict[str, dict], sft: dict[str, dict], target) -> str:
    """Markdown in the layout of the study's Table 10, one column per plan, the study's beside."""
    names = list(results) + list(sft)
    cols = {**results, **sft}
    lines = ["| GB | " + " | ".join(names) + " | study full | study LoRA r64 |", "|---|" + "---|" * (len(names) + 2)]
    for field in FIELDS:
        cells = [_gb(cols[n][field]) for n in names]
        lines.append(f"| {field} | " + " | ".join(cells) + f" | {_gb(STUDY['full'][field])} | "
                     f"{_gb(STUDY['lora_r64'][field])} |")
    lines.append("| attention | " + " | ".join(cols[n]["attention"] for n in names) + " | | |")
    fits = ["yes" if cols[n]["peak"] <= target.capacity_bytes else "no" for n in names]
    lines.append(f"| fits {target.name} ({_gb(target.capacity_bytes)} GB) | " + " | ".join(fits) + " | yes | yes |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> dict:
    from jaxmath.aot import targets

    fv = _flags(argv)
    # Before jax starts its backends: the CPU as jax's platform (also for --target=cpu, where an
    # installed CUDA plugin would otherwise try the absent GPU and print its failure).
    targets.prepare_process()
    if fv.target in targets.GPU_TARGETS:
        try:
            targets.require_plugin(fv.target)
        except targets.TargetUnavailable as e:
            raise SystemExit(str(e)) from None
    cfg = fv.config
    if cfg.get("mode") not in ("grpo", "sft", "eval"):  # e.g. distill: its teacher is a vLLM server
        raise SystemExit(f"memory: config.mode {cfg.get('mode')!r} runs no model program of jaxmath's; "
                         "use a grpo, sft or eval config")
    from jaxmath.config import ConfigError

    try:
        return sweep(cfg, fv) if fv.sweep else report(cfg, fv)
    except (targets.TargetUnavailable, ConfigError) as e:  # ConfigError: a device split that cannot fit
        raise SystemExit(f"memory: {e}") from None
