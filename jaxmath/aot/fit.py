"""Sizes that fit by construction: the rows per train micro-batch a run uses, chosen from the device's
memory and the train step's compiled memory, or a user's value refused before any weight loads.

    rows = micro_batch_rows(plan, target, requested=0)      # 0: the largest rows that fit ("auto")
    rows = micro_batch_rows(plan, target, requested=16)     # 16, or ConfigError naming the knob

The budget is the target's capacity less a margin (`budget_bytes`); a phase's memory is its compiled
peak (`jaxmath.aot.plan.compiled_peak_bytes`: XLA's buffer assignment for that device, plus what the
run holds beside the program), so the rows chosen are those of the program the run will execute.
Candidates are the divisors of the step's rows (a micro-batch must divide the batch), searched by
bisection since memory grows with rows: a handful of compiles.

The sampler's sub-batch rows are chosen by the sampler itself at every request (`JaxSampler.plan`,
`rows_that_fit`; fewer rows than a group's K when not one group fits, the group then spread over
admissions); `jaxmath.aot.plan.generation_rows` is the same choice for a target, and `check_generation`
refuses, before any weight loads, a run of which not even one row fits.

`local_target()` is the device this process runs on, as a Target: on a GPU its capacity is what the
device reports (`memory_stats()["bytes_limit"]`, which follows XLA_PYTHON_CLIENT_MEM_FRACTION); on a
CPU there is none, and nothing is refused (XLA's CPU programs are not what a GPU run executes, and
host RAM is shared with everything else on the machine).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from jaxmath.aot.targets import Target
from jaxmath.config import ConfigError

# Remat policies a GPU plan weighs against "full" (`jaxmath.model.qwen3`): each keeps more of a layer's
# forward pass for its backward, so fewer rows fit and less is recomputed; the plan takes the fastest.
SAVING_REMATS = ("attention", "attention_mlp")
# The share of the device left outside the plan: allocator fragmentation, cuDNN workspaces, the
# runtime's own buffers (as the sampler's MEMORY_MARGIN).
MARGIN = 0.1
KNOB = "loss.micro_batch_rows"


def budget_bytes(target: Target) -> int:
    """Bytes one phase of a run may peak at on `target`."""
    return int(target.capacity_bytes * (1 - MARGIN))


def divisors(total: int) -> list[int]:
    """The divisors of `total`, ascending: the micro-batch rows a batch of `total` rows admits."""
    return [d for d in range(1, total + 1) if total % d == 0]


def largest_fitting(candidates: Sequence[int], peak_of: Callable[[int], int], budget: int) -> tuple[int, int]:
    """(rows, peak) for the largest of ascending `candidates` whose `peak_of(rows)` is within `budget`,
    (0, 0) when none is. peak_of must grow with rows (bisection: log2(len) calls)."""
    low, high, best = 0, len(candidates) - 1, (0, 0)
    while low <= high:
        mid = (low + high) // 2
        peak = peak_of(candidates[mid])
        if peak <= budget:
            best, low = (candidates[mid], peak), mid + 1
        else:
            high = mid - 1
    return best


def choose_rows(knob: str, requested: int, candidates: Sequence[int], peak_of: Callable[[int], int],
                budget: int, *, what: Callable[[int], str] | None = None) -> int:
    """`requested` rows when they fit `budget`, the largest candidate that fits when requested is 0
    (auto); ConfigError naming the knob, its value and the largest value that fits otherwise.
    what: the term that does not fit at `rows` (`phase_term`), named when not even the smallest
    candidate fits."""
    gb = 1e9
    if requested:
        peak = peak_of(requested)
        if peak <= budget:
            return requested
        fit, _ = largest_fitting([c for c in candidates if c < requested], peak_of, budget)
        raise ConfigError(
            f"{knob}={requested} does not fit: its peak is {peak / gb:.1f} GB of a {budget / gb:.1f} GB budget; "
            + (f"the largest value that fits is {fit} (or 0 to choose it)" if fit else
               "no value fits; " + (f"{what(candidates[0])}; " if what else "")
               + "shorten the sequences or train fewer parameters"))
    fit, _ = largest_fitting(candidates, peak_of, budget)
    if not fit:
        term = what(candidates[0]) if what else f"its peak at {candidates[0]} row is {peak_of(candidates[0]) / gb:.1f} GB"
        raise ConfigError(f"{knob}=0 (auto): not even {candidates[0]} row fits a {budget / gb:.1f} GB budget: "
                          f"{term}; shorten the sequences (rl.max_completion_tokens, rl.max_prompt_tokens) or "
                          "train fewer parameters (lora.rank)")
    return fit


def phase_term(plan, memory) -> str:
    """The term of a compiled phase (`jaxmath.aot.plan.PhaseMemory`) that grows with the sequence, for
    a refusal: the program's temporaries (activations, gradients, a chunk of logits) beside the state
    it holds."""
    gb = 1e9
    g = plan.grpo
    positions = g.prompt_tokens + g.completion_tokens - 1
    return (f"{memory.phase} at {memory.rows} row of {positions:,} positions peaks at {memory.peak_bytes / gb:.1f} GB, "
            f"of which its temporaries (activations, gradients, a chunk of logits) are "
            f"{memory.temporaries / gb:.1f} GB beside {(memory.peak_bytes - memory.temporaries) / gb:.1f} GB of "
            "weights, optimizer state and batch")


def micro_batch_rows(plan, target: Target, requested: int, budget: int | None = None,
                     compile: Callable | None = None, most: int = 0) -> int:
    """Rows per GRPO train micro-batch for `plan` (`jaxmath.aot.plan.RunPlan`) on `target`: requested
    if it fits (else ConfigError), or the largest divisor of the step's rows that fits when requested
    is 0 (at most `most` rows when given). The train step and, where the run has one, the logprob pass
    must both fit. budget: the
    bytes JAX's programs may peak at (default `budget_bytes(target)`; a device shared with vLLM
    passes JAX's share from `jaxmath.aot.colocate`). compile: (plan, phase, rows) -> PhaseMemory
    (default `jaxmath.aot.plan.compile_phase` on `target`; a caller that keeps its compiles passes its own)."""
    from jaxmath.aot import plan as plan_lib

    phases = [p for p in ("train/logprobs", "train/step") if p in plan.phases]
    compile = compile or phase_compiler(target)
    budget = budget_bytes(target) if budget is None else budget

    def peak_of(rows: int) -> int:
        return max(compile(plan, p, rows).peak_bytes for p in phases)

    def what(rows: int) -> str:
        return phase_term(plan, max((compile(plan, p, rows) for p in phases), key=lambda m: m.peak_bytes))

    candidates = [d for d in divisors(plan.grpo.rows) if not most or d <= most]
    return choose_rows(KNOB, requested, candidates, peak_of, budget, what=what)


# The phases with a backward pass: the only programs a remat policy changes (a forward pass computes
# the same with any policy, so the plan's search compiles the logprob pass once, not once per policy).
BACKWARD_PHASES = ("train/step", "train/sft_step")


def phase_compiler(target: Target, *, keep: bool = False) -> Callable:
    """compile(plan, phase, rows) -> PhaseMemory for `target`, each (remat policy, phase, rows) compiled
    once (`jaxmath.aot.plan.compile_phase`; keep: with the compiled program, for its HLO). The plans
    passed must differ only in model.remat: the plan's search and the reports that print it."""
    from jaxmath.aot import plan as plan_lib

    cache = {}

    def compile(plan, phase, rows):
        key = (plan.model.remat if phase in BACKWARD_PHASES else None, phase, rows)
        if key not in cache:
            cache[key] = plan_lib.compile_phase(plan, phase, rows, target, keep=keep)
        return cache[key]

    return compile


def with_micro_batch_rows(plan, target: Target, budget: int | None = None, compile: Callable | None = None):
    """`plan` with its train phases at the rows `micro_batch_rows` chooses (the configured
    loss.micro_batch_rows, checked, or the largest that fits when it is 0). With model.remat "full" on
    a GPU target the plan also fits each of SAVING_REMATS (which keep the attention's projections and
    output for the backward pass instead of recomputing them) and takes the policy and rows whose train
    step the roofline model (`jaxmath.aot.cost`) times fastest (`faster_remat`). Where not even one row
    fits with "full", the plan moves each layer's saved input to host memory (remat "offload": the same
    update, the device keeps one layer's working set) and takes the rows that fit so. The returned
    plan's model carries the choice, which the run then trains with; every policy computes the same
    update."""
    compile = compile or phase_compiler(target)
    try:
        rows = micro_batch_rows(plan, target, plan.loss.micro_batch_rows, budget=budget, compile=compile)
        if plan.model.remat == "full" and target.is_gpu:
            plan, rows = faster_remat(plan, rows, target, budget, compile)
    except ConfigError as refused:
        if not (plan.model.remat == "full" and target.is_gpu):
            raise
        offloaded = dataclasses.replace(plan, model=plan.model.replace(remat="offload"))
        try:
            rows = micro_batch_rows(offloaded, target, plan.loss.micro_batch_rows, budget=budget, compile=compile)
        except ConfigError:
            raise ConfigError(f"{refused} (nor with each layer's saved input offloaded to host memory, "
                              "model.remat=offload)") from None
        plan = offloaded
    phases = {name: rows if name in ("train/logprobs", "train/step") else r for name, r in plan.phases.items()}
    return dataclasses.replace(plan, phases=phases, loss=dataclasses.replace(plan.loss, micro_batch_rows=rows))


def faster_remat(plan, rows: int, target: Target, budget: int | None, compile: Callable):
    """(plan, rows): of `plan` and each of SAVING_REMATS, the policy and rows whose train step (the whole
    batch, in micro-batches of those rows) has the least modeled time (`PhaseMemory.modeled_seconds`);
    `plan` at `rows` itself where the target has no roofline (no peaks). The rows are the configured
    ones, or in auto mode the largest that fit each policy or the divisor below them, whichever models
    faster: past its own memory limit (below the plan's budget on an H100) XLA rematerializes inside
    the program, and the larger micro-batch then costs more than the extra launches of the smaller.
    Each policy keeps more than the one before it, so fits no more rows: its bisection looks no
    higher than the rows the one before it fit, and the search stops at the first policy of which not
    one row fits."""
    if not getattr(compile(plan, "train/step", rows), "modeled_seconds", 0.0):
        return plan, rows

    def fastest(policy, fitted: int) -> tuple[float, int]:
        # in auto mode the divisor below too; the bisection compiled most of these already (`phase_compiler`)
        below = [] if plan.loss.micro_batch_rows else [d for d in divisors(plan.grpo.rows) if d < fitted][-1:]
        return min((compile(policy, "train/step", r).modeled_seconds, r) for r in [fitted, *below])

    seconds, best_rows = fastest(plan, rows)
    best, most = (seconds, plan, best_rows), rows
    for remat in SAVING_REMATS:
        candidate = dataclasses.replace(plan, model=plan.model.replace(remat=remat))
        try:
            fitted = micro_batch_rows(candidate, target, plan.loss.micro_batch_rows, budget=budget,
                                      compile=compile, most=most)
        except ConfigError:  # not one row (or not the configured rows) fits, nor will with the next
            break
        seconds, fastest_rows = fastest(candidate, fitted)
        if seconds < best[0]:
            best = (seconds, candidate, fastest_rows)
        most = fitted
    return best[1], best[2]


def check_generation(plan, target: Target) -> None:
    """ConfigError, in one line naming the term that does not fit, when not even one row of a
    generation phase of `plan` (the JAX sampler's rollout or evaluation) fits `target`: one sample's
    KV cache and its prompt's prefill beside what the run holds (`jaxmath.aot.plan.generation_rows`,
    the choice `JaxSampler.plan` makes on the device). Fewer rows than K are fine: the sampler spreads
    a group over admissions."""
    from jaxmath.aot import plan as plan_lib
    from jaxmath.model.config import dtype_from_name
    from jaxmath.model.qwen3 import KVCache

    gb = 1e9
    for phase in [p for p in plan.phases if p.endswith("/decode")]:
        if plan_lib.generation_rows(plan, phase, target):
            continue
        gen = plan.rollout if phase.startswith("rollout/") else plan.evaluation
        cfg = plan.sampler
        cache_dtype = dtype_from_name(cfg.cache_dtype) if cfg.cache_dtype else plan.model.dtype
        cache_len = plan_lib.sampler_bucket(cfg, gen.prompt_tokens) + gen.max_new_tokens
        row = KVCache.nbytes_for(plan.model, 1, cache_len, cache_dtype)
        knob = "rl.max_completion_tokens" if phase.startswith("rollout/") else "eval.max_new_tokens"
        raise ConfigError(
            f"{phase}: not even one row fits {target.description}: one sample's KV cache of {cache_len:,} "
            f"positions ({row / gb:.1f} GB in {np.dtype(cache_dtype).name}), held twice while its prompt is "
            f"prefilled, does not fit the sampler's {plan_lib.sampler_budget(plan, target) / gb:.1f} GB beside "
            f"the trainer's state; lower {knob}" + (", set sampler.cache_dtype=bfloat16" if np.dtype(cache_dtype).itemsize > 2
                                                     else "") + " or train fewer parameters (lora.rank)")


def local_target(capacity_bytes: int = 0) -> Target | None:
    """This process's first device as a Target when it is a GPU reporting its memory limit (or, with
    capacity_bytes, any GPU: a device plan's capacity, where JAX's allocator reports none); None on a
    CPU (no refusal there) or a device that does not report one."""
    import jax

    device = jax.devices()[0]
    if device.platform == "gpu" and capacity_bytes:
        return Target("local", "gpu", int(capacity_bytes), f"{device.device_kind} (this process's device)",
                      int(capacity_bytes))
    stats = device.memory_stats() if device.platform == "gpu" else None
    if not stats or "bytes_limit" not in stats:
        return None
    limit = int(stats["bytes_limit"])
    return Target("local", "gpu", limit, f"{device.device_kind} (this process's device)", limit)


def with_capacity(target: Target, capacity_bytes: int) -> Target:
    return dataclasses.replace(target, capacity_bytes=int(capacity_bytes))
