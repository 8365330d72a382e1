"""A run's device programs at the shapes its configuration builds, compiled for a target phase by phase.

    plan = grpo_plan(model_cfg, lora=..., optimizer=..., loss=..., grpo=..., sampler=..., evaluation=...)
    for name in plan.phases:
        memory = compile_phase(plan, name, plan.rows(name), target)   # PhaseMemory, from the compiled program
    compiled_peak_bytes(plan, "train/step", 8, target)                  # what a row planner asks

A phase is one jitted program of the run (the sampler's prefill, its decode loop, the GRPO train step,
the old-policy logprob pass, the SFT step, ...) together with what else the run keeps on the device
while that program runs (the trainer's weights and optimizer state during a rollout, the sampler's
merged copy of the LoRA kernels during training). Its peak is

    resident bytes not among the program's arguments + arguments + temporaries + outputs - aliased outputs

with arguments, temporaries, outputs and aliases from XLA's `memory_analysis()` of the program compiled
for the target, so the numbers are the target's buffer assignment (cuDNN attention and GPU fusions for a
GPU target). `rows` is the one knob a phase's memory follows: rows per train micro-batch for training
phases, rows per sampler sub-batch (prompts x samples) for generation phases; everything else is the
configuration's. Nothing is allocated: states are `nnx.eval_shape` / `jax.eval_shape` shapes.

The shapes are the worst the run builds: the longest prompt its budget admits (`rl.max_prompt_tokens`
in the GRPO prompt bucket, the sampler's bucket for generation) and full-length completions.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmath.aot import hlo
from jaxmath.aot.targets import Target
from jaxmath.model.config import Qwen3Config, dtype_from_name
from jaxmath.model.lora import LoRAConfig
from jaxmath.optim import OptimizerConfig
from jaxmath.rl.step import LossConfig, bucket
from jaxmath.rollout.jax_sampler import MEMORY_MARGIN, SamplerConfig, decode_windows, rows_that_fit, sub_batch_cost


@dataclasses.dataclass(frozen=True)
class Generation:
    """One engine call: `prompts` prompts (split into sub-batches by the sampler) of at most
    `prompt_tokens` tokens, `num_samples` completions of `max_new_tokens` each."""

    prompts: int
    num_samples: int
    prompt_tokens: int
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def truncate(self) -> bool:
        return self.temperature > 0 and (self.top_k > 0 or self.top_p < 1.0)


@dataclasses.dataclass(frozen=True)
class GRPOShapes:
    """One GRPO step: `rows` = prompts x K sequences of `prompt_tokens` (bucketed) + `completion_tokens`."""

    rows: int
    prompt_tokens: int
    completion_tokens: int
    on_policy: bool
    tis_cap: float = 0.0
    logprob_pass: bool = False  # old-policy or reference logprobs are computed before the step
    # rl.max_staleness=1: the next rollout runs during the train phase, so the JAX sampler keeps its copy
    # of the layers there; a synchronous run's sampler frees it for the train phase (`JaxSampler.sleep`)
    overlap: bool = False


@dataclasses.dataclass(frozen=True)
class SFTShapes:
    """One SFT step: `batch` rows of `seq` positions; held-out loss in batches of the micro-batch rows."""

    batch: int
    seq: int
    chunk: int
    remat: bool
    packed: bool = False  # several documents per row (segment ids), else one per row (lengths)


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What a run executes on the device, at its shapes.

    model:      the model's shapes and numerics (an auto attention kernel is decided per target)
    lora:       adapters trained (rank > 0), or None / rank 0 for full-parameter training
    optimizer:  None for a run that does not train (evaluation)
    sampler:    the JAX sampler's settings (None: no JAX generation, e.g. the vLLM engine)
    rollout:    GRPO's training rollouts; evaluation: periodic or standalone evaluation generation
    phases:     phase name -> the rows the configuration gives it (micro-batch or sub-batch rows)
    """

    model: Qwen3Config
    lora: LoRAConfig | None = None
    optimizer: OptimizerConfig | None = None
    loss: LossConfig | None = None
    grpo: GRPOShapes | None = None
    sft: SFTShapes | None = None
    sampler: SamplerConfig | None = None
    rollout: Generation | None = None
    evaluation: Generation | None = None
    phases: dict[str, int] = dataclasses.field(default_factory=dict)

    def rows(self, phase: str) -> int:
        if phase not in self.phases:
            raise KeyError(f"this run has no phase {phase!r}; it has {sorted(self.phases)}")
        return self.phases[phase]

    @property
    def trains_lora(self) -> bool:
        return self.lora is not None and self.lora.rank > 0

    @property
    def merges_lora(self) -> bool:
        """The sampler generates from a merged copy of the adapted kernels."""
        return self.trains_lora and self.sampler is not None and self.sampler.lora_mode in ("merge", "auto")


# --- building plans ---------------------------------------------------------------------------------


def sampler_bucket(cfg: SamplerConfig, length: int) -> int:
    """The sampler's padded prompt length for a longest prompt of `length` tokens (as
    `JaxSampler.bucket_for`; tests/test_aot.py holds the two equal)."""
    if cfg.prompt_buckets:
        for b in cfg.prompt_buckets:
            if b >= length:
                return b
        raise ValueError(f"a prompt of {length} tokens is longer than sampler.prompt_buckets' largest "
                         f"{cfg.prompt_buckets[-1]}")
    return max(cfg.min_bucket, 1 << max(0, (length - 1).bit_length()))


def sub_batch_rows(cfg: SamplerConfig, gen: Generation, fit_rows: int | None = None) -> int:
    """The sampler's decode slots for `gen` (as `JaxSampler.plan` sizes them: min(max_batch_rows,
    fit_rows) rows, whole groups of K when one fits, and no more than the next power of two of the
    request's rows; fewer than K rows when not one group fits, a group then spread over them).
    fit_rows: the rows its memory budget admits (`rows_that_fit`); None: no memory limit."""
    rows = cfg.max_batch_rows if fit_rows is None else min(cfg.max_batch_rows, fit_rows)
    if rows < gen.num_samples:
        return rows
    rows -= rows % gen.num_samples
    total = gen.prompts * gen.num_samples
    return min(rows, 1 << (total - 1).bit_length())


def sampler_budget(plan: "RunPlan", target: Target) -> int:
    """The bytes a sampler sub-batch may take on `target` (as `JaxSampler.memory_budget`: the
    configured sampler.memory_budget_bytes, else the device's memory less what the run holds there
    while it generates — the trainer's weights and optimizer state, the merged LoRA kernels — less
    MEMORY_MARGIN)."""
    if plan.sampler.memory_budget_bytes:
        return plan.sampler.memory_budget_bytes
    state = _abstract_state(plan, plan.model, None)
    in_use = _trainer_bytes(state) + state.sampler_copy_bytes
    return int((target.capacity_bytes - in_use) * (1 - MEMORY_MARGIN))


def generation_rows(plan: "RunPlan", phase: str, target: Target) -> int:
    """Rows of the largest sub-batch the sampler runs for `phase` ("rollout/..." or "eval/...") on
    `target`: what its memory budget admits (`sub_batch_cost`, `rows_that_fit`), at most max_batch_rows.
    0 when not even one row fits."""
    gen = plan.rollout if phase.startswith("rollout/") else plan.evaluation
    cfg = plan.sampler
    cache_dtype = dtype_from_name(cfg.cache_dtype) if cfg.cache_dtype else plan.model.dtype
    cost = sub_batch_cost(plan.model, prompt_len=sampler_bucket(cfg, gen.prompt_tokens),
                          max_new_tokens=gen.max_new_tokens, cache_dtype=cache_dtype, vocab_chunk=cfg.vocab_chunk,
                          full_vocab=gen.truncate or cfg.vocab_chunk == 0)
    fit = rows_that_fit(cost, sampler_budget(plan, target), gen.num_samples)
    return sub_batch_rows(cfg, gen, fit) if fit else 0


def on_target(plan: "RunPlan", target: Target) -> "RunPlan":
    """`plan` with its generation phases at the rows the sampler chooses on `target` by memory."""
    phases = {name: generation_rows(plan, name, target) if name.endswith(("/prefill", "/decode")) else rows
              for name, rows in plan.phases.items()}
    return dataclasses.replace(plan, phases=phases)


def grpo_plan(model: Qwen3Config, *, lora: LoRAConfig, optimizer: OptimizerConfig, loss: LossConfig,
              prompts: int, num_generations: int, max_prompt_tokens: int, max_completion_tokens: int,
              prompt_bucket: int, temperature: float, on_policy: bool,
              sampler: SamplerConfig | None, evaluation: Generation | None = None,
              rollout_prompts: int = 0, overlap: bool = False) -> RunPlan:
    """The GRPO run's phases: rollout prefill and decode (JAX sampler), the old-policy / reference
    logprob pass when the run needs one, the train step, and periodic evaluation's generation.
    prompts: groups per train step; rollout_prompts: prompts sampled per step (more with DAPO-style
    group filtering; 0: the same). overlap: rl.max_staleness=1 (the next rollout generates during the
    train phase, which then trains off policy)."""
    rows = prompts * num_generations
    on_policy = on_policy and not overlap
    logprob_pass = not on_policy or loss.beta > 0
    grpo = GRPOShapes(rows=rows, prompt_tokens=bucket(max_prompt_tokens, prompt_bucket),
                      completion_tokens=max_completion_tokens, on_policy=on_policy, tis_cap=loss.tis_cap,
                      logprob_pass=logprob_pass, overlap=overlap)
    rollout = Generation(rollout_prompts or prompts, num_generations, max_prompt_tokens, max_completion_tokens,
                         temperature)
    micro = loss.micro_batch_rows or rows
    phases: dict[str, int] = {}
    if sampler is not None:
        phases["rollout/prefill"] = phases["rollout/decode"] = sub_batch_rows(sampler, rollout)
    if logprob_pass:
        phases["train/logprobs"] = micro
    phases["train/step"] = micro
    if sampler is not None and lora.rank > 0 and sampler.lora_mode in ("merge", "auto"):
        phases["sync/merge"] = 0
    if sampler is not None and evaluation is not None:
        phases["eval/prefill"] = phases["eval/decode"] = sub_batch_rows(sampler, evaluation)
    return RunPlan(model=model, lora=lora, optimizer=optimizer, loss=loss, grpo=grpo, sampler=sampler,
                   rollout=rollout, evaluation=evaluation, phases=phases)


def sft_plan(model: Qwen3Config, *, lora: LoRAConfig, optimizer: OptimizerConfig, batch: int, micro: int,
             seq: int, chunk: int, remat: bool, packed: bool = False) -> RunPlan:
    """The SFT run's phases: the train step ([batch / micro, micro, seq]) and the held-out loss."""
    return RunPlan(model=model, lora=lora, optimizer=optimizer, sft=SFTShapes(batch, seq, chunk, remat, packed),
                   phases={"train/sft_step": micro, "eval/sft_loss": micro})


def eval_plan(model: Qwen3Config, *, sampler: SamplerConfig, evaluation: Generation) -> RunPlan:
    """An evaluation run: the model's weights and the sampler's prefill and decode."""
    rows = sub_batch_rows(sampler, evaluation)
    return RunPlan(model=model, sampler=sampler, evaluation=evaluation,
                   phases={"eval/prefill": rows, "eval/decode": rows})


# --- abstract state -----------------------------------------------------------------------------------


@dataclasses.dataclass
class _State:
    """Abstract device state of the run, placed on the target."""

    graphdef: Any             # the trainer's model (with adapters when training LoRA)
    trainable: Any
    frozen: Any
    opt_state: Any
    optimizer: Any
    sampler_graphdef: Any     # the model the sampler runs (adapters merged away, or not)
    sampler_state: Any
    sampler_copy_bytes: int   # the sampler's own copy of the layers (merged), beyond the trainer's arrays


def nbytes(tree: Any) -> int:
    return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)))  # (PRNG keys: 8 bytes)


def _place(tree: Any, sharding) -> Any:
    if sharding is None:
        return tree
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _abstract_state(plan: RunPlan, model_cfg: Qwen3Config, sharding) -> _State:
    from flax import nnx

    from jaxmath import optim
    from jaxmath.model import lora as lora_lib
    from jaxmath.model.qwen3 import Qwen3, unstack_layers

    def build(with_lora: bool):
        model = Qwen3(model_cfg, rngs=nnx.Rngs(0))
        if with_lora:
            lora_lib.apply_lora(model, plan.lora)
        return model

    base = nnx.eval_shape(lambda: build(False))
    model = nnx.eval_shape(lambda: build(True)) if plan.trains_lora else base
    graphdef, trainable, frozen = lora_lib.split_trainable(model)
    opt_state, optimizer = None, None
    if plan.optimizer is not None:
        optimizer = optim.make_optimizer(plan.optimizer)
        opt_state = jax.eval_shape(optimizer.init, trainable)
    # The sampler holds its own copy of the layers, one array per layer (`JaxSampler.update_weights`),
    # with the adapters merged into it when it merges them.
    sampler = nnx.eval_shape(lambda: unstack_layers(build(False) if plan.merges_lora else build(plan.trains_lora)))
    copy_bytes = nbytes(nnx.state(sampler.layers)) if plan.sampler is not None else 0
    sampler_graphdef, sampler_state = nnx.split(sampler)
    return _State(graphdef, _place(trainable, sharding), _place(frozen, sharding),
                  None if opt_state is None else _place(opt_state, sharding), optimizer, sampler_graphdef,
                  _place(sampler_state, sharding), copy_bytes)


# --- one phase ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PhaseMemory:
    """One compiled phase, in bytes. peak = resident + arguments + temporaries + outputs - aliased.

    resident: device memory the run holds during the phase that is not an argument of its program
    attention: the attention kernels the compiled program contains ("cudnn", "cudnn+bias", "xla",
        "none"; `jaxmath.aot.hlo.attention_kernel`)
    """

    phase: str
    rows: int
    arguments: int
    temporaries: int
    outputs: int
    aliased: int
    resident: int
    attention: str
    compile_seconds: float
    traffic: dict | None = None  # `jaxmath.aot.hlo.program_traffic` of the compiled program
    host_temporaries: int = 0  # temporaries in host memory (remat "offload": each layer's saved input)
    compiled: Any = dataclasses.field(default=None, repr=False)
    modeled_seconds: float = 0.0  # the roofline model's time of the program (`jaxmath.aot.cost`); 0 off a GPU target

    @property
    def peak_bytes(self) -> int:
        return self.resident + self.arguments + self.temporaries + self.outputs - self.aliased


def compiled_peak_bytes(plan: RunPlan, phase: str, rows: int, target: Target) -> int:
    """The peak bytes of `phase` at `rows` (micro-batch or sub-batch rows) compiled for `target`."""
    return compile_phase(plan, phase, rows, target).peak_bytes


def compile_phase(plan: RunPlan, phase: str, rows: int, target: Target, *, keep: bool = False,
                  window: int | None = None) -> PhaseMemory:
    """Compile `phase` of `plan` for `target` at `rows` and read its memory and attention kernel.
    keep: also return the compiled program (for its HLO). window: a decode phase's attention window
    (default its largest, `decode_windows`' last)."""
    if phase not in plan.phases:
        raise KeyError(f"this run has no phase {phase!r}; it has {sorted(plan.phases)}")
    sharding = target.sharding()
    model_cfg = plan.model.for_platform(target.platform)
    state = _abstract_state(plan, model_cfg, sharding)
    kind = phase.split("/", 1)[1]
    if kind == "merge":
        return _merge_estimate(plan, state, phase)
    if kind in ("prefill", "decode"):
        gen = plan.rollout if phase.startswith("rollout/") else plan.evaluation
        lowered, resident = _generation(plan, state, gen, kind, rows, sharding, window)
    elif kind == "step":
        lowered, resident = _grpo_step(plan, state, rows, sharding)
    elif kind == "logprobs":
        lowered, resident = _logprobs(plan, state, rows, sharding)
    elif kind == "sft_step":
        lowered, resident = _sft_step(plan, state, rows, sharding)
    elif kind == "sft_loss":
        lowered, resident = _sft_loss(plan, state, rows, sharding)
    else:
        raise KeyError(f"no program for phase {phase!r}")
    began = time.perf_counter()
    compiled = lowered.compile()
    seconds = time.perf_counter() - began
    stats = compiled.memory_analysis()
    text = compiled.as_text()
    return PhaseMemory(phase=phase, rows=rows, arguments=int(stats.argument_size_in_bytes),
                       temporaries=int(stats.temp_size_in_bytes), outputs=int(stats.output_size_in_bytes),
                       host_temporaries=int(getattr(stats, "host_temp_size_in_bytes", 0) or 0),
                       aliased=int(stats.alias_size_in_bytes), resident=resident,
                       attention=hlo.attention_kernel(text), compile_seconds=round(seconds, 1),
                       traffic=hlo.program_traffic(text), compiled=compiled if keep else None,
                       modeled_seconds=_modeled_seconds(text, target))


def _modeled_seconds(hlo_text: str, target: Target) -> float:
    """The roofline model's seconds of a program compiled for a GPU target (0 for a CPU: no peaks)."""
    from jaxmath.aot import cost

    rates = roofline_peaks(target)
    return cost.program_cost(hlo_text, rates, top=0)["modeled_s"] if rates else 0.0


def roofline_peaks(target: Target) -> dict | None:
    """The peak rates (`jaxmath.aot.targets.peaks`) to model `target`'s programs with: a named GPU's own;
    for this process's GPU ("local") those of the named GPU its description names, else the H100's
    (the plan only compares variants of one program by them); None for a CPU."""
    from jaxmath.aot.targets import GPU_TARGETS, peaks

    if not target.is_gpu:
        return None
    if target.name in GPU_TARGETS:
        return peaks(target.name)
    named = [name for name in GPU_TARGETS if name in target.description.lower()]
    return peaks(named[0] if named else "h100")


def _merge_estimate(plan: RunPlan, state: _State, phase: str) -> PhaseMemory:
    """The weight sync of a LoRA run (`JaxSampler.update_weights`): a new per-layer copy of the layers,
    into which `merge_lora` folds the adapters eagerly, one projection at a time, while the sampler still
    holds the previous copy where the rollout overlaps the training (a synchronous run's sampler freed
    it for the train phase). Not a compiled program, so an estimate: the new copy plus three float32
    arrays of the largest projection (its kernel, its delta and their sum; of all layers, an upper bound
    of one layer's) as temporaries."""
    from flax import nnx

    from jaxmath.model import lora as lora_lib
    from jaxmath.model.qwen3 import Qwen3

    pattern = re.compile(plan.lora.targets)
    base = nnx.eval_shape(lambda: Qwen3(plan.model, rngs=nnx.Rngs(0)))
    largest = max(int(np.prod(dense.kernel.get_value().shape)) for path, dense in lora_lib.projections(base)
                  if pattern.search(path))
    return PhaseMemory(phase=phase, rows=0, arguments=0, temporaries=state.sampler_copy_bytes + 3 * 4 * largest,
                       outputs=0, aliased=0, resident=_trainer_bytes(state) + _train_phase_sampler_bytes(plan, state),
                       attention="none", compile_seconds=0.0)


def _trainer_bytes(state: _State) -> int:
    return nbytes(state.trainable) + nbytes(state.frozen) + nbytes(state.opt_state)


def _spec(shape, dtype, sharding):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _generation(plan: RunPlan, state: _State, gen: Generation, kind: str, rows: int, sharding,
                window: int | None = None):
    """The sampler's `_prefill` (of the prompts whose samples fill `rows` slots) or `_decode` (the
    `rows` slots at one attention window; default the largest, which bounds its memory). A refill's
    prefill runs beside the live slots, so they are held while it runs; `_admit` (the slots donated,
    plus the prompts' cache) holds less than the prefill did."""
    from jaxmath.rollout import jax_sampler

    cfg = plan.sampler
    k = gen.num_samples
    bucket_len = sampler_bucket(cfg, gen.prompt_tokens)
    cache_len = bucket_len + gen.max_new_tokens
    cache_dtype = dtype_from_name(cfg.cache_dtype) if cfg.cache_dtype else plan.model.dtype
    # The trainer's weights and optimizer state stay on the device; the sampler's arguments are its own
    # weights (its own per-layer copy of the layers, merged when it merges, and the trainer's embedding,
    # final norm and head).
    resident = _trainer_bytes(state) + state.sampler_copy_bytes - nbytes(state.sampler_state)
    state_args = state.sampler_state
    slots = jax.eval_shape(functools.partial(jax_sampler._empty_slots, config=plan.model, rows=rows,
                                             cache_len=cache_len, max_new_tokens=gen.max_new_tokens,
                                             cache_dtype=cache_dtype))
    if kind == "prefill":
        prompts = max(1, rows // k)
        tokens = _spec((prompts, bucket_len), jnp.int32, sharding)
        valid = _spec((prompts, bucket_len), jnp.bool_, sharding)
        lowered = jax_sampler._prefill.lower(state.sampler_graphdef, state_args, tokens, valid,
                                             cache_len=cache_len, cache_dtype=cache_dtype)
        return lowered, resident + nbytes(slots)
    slots = jax.tree.map(lambda x: _spec(x.shape, x.dtype, sharding), slots)
    scalar = functools.partial(_spec, (), sharding=sharding)
    lowered = jax_sampler._decode.lower(
        state.sampler_graphdef, state_args, slots, _spec((plan.model.vocab_size,), jnp.bool_, sharding),
        scalar(jnp.float32), scalar(jnp.float32), scalar(jnp.int32), greedy=gen.greedy,
        top_k=gen.top_k if gen.truncate else 0, truncate=gen.truncate, vocab_chunk=cfg.vocab_chunk,
        window=window or cache_len)
    return lowered, resident


def _batch(plan: RunPlan, sharding):
    from jaxmath.rl.step import Batch

    g = plan.grpo
    width, rows, t = g.prompt_tokens + g.completion_tokens, g.rows, g.completion_tokens
    def f32(shape):
        return _spec(shape, jnp.float32, sharding)

    return Batch(tokens=_spec((rows, width), jnp.int32, sharding), valid=_spec((rows, width), jnp.bool_, sharding),
                 completion_mask=_spec((rows, t), jnp.bool_, sharding), advantages=f32((rows,)),
                 old_logprobs=f32((rows, t)), engine_logprobs=f32((rows, t)),
                 ref_logprobs=f32((rows, t)) if plan.loss.beta > 0 else None)


def _loss_at(plan: RunPlan, rows: int) -> LossConfig:
    if plan.grpo.rows % rows:
        raise ValueError(f"train micro-batch rows {rows} must divide the step's {plan.grpo.rows} rows")
    return dataclasses.replace(plan.loss, micro_batch_rows=rows)


def _grpo_step(plan: RunPlan, state: _State, rows: int, sharding):
    from jaxmath.rl.step import make_train_step

    step = make_train_step(state.graphdef, state.optimizer, _loss_at(plan, rows), on_policy=plan.grpo.on_policy,
                           temperature=plan.rollout.temperature, max_completion_tokens=plan.grpo.completion_tokens)
    lowered = step.lower(state.trainable, state.frozen, state.opt_state, _batch(plan, sharding))
    return lowered, _train_phase_sampler_bytes(plan, state)


def _train_phase_sampler_bytes(plan: RunPlan, state: _State) -> int:
    """What the JAX sampler holds through the train phase: its copy of the layers where the next
    rollout overlaps the training, nothing in a synchronous run (it sleeps, `JaxSampler.sleep`)."""
    return state.sampler_copy_bytes if plan.grpo.overlap else 0


def _logprobs(plan: RunPlan, state: _State, rows: int, sharding):
    from jaxmath.rl.step import make_logprob_fn

    batch = _batch(plan, sharding)
    fn = make_logprob_fn(state.graphdef, _loss_at(plan, rows), temperature=plan.rollout.temperature)
    lowered = fn.lower(state.trainable, state.frozen, batch.tokens, batch.valid, plan.grpo.completion_tokens)
    rest = nbytes(batch) - nbytes((batch.tokens, batch.valid))
    return lowered, nbytes(state.opt_state) + _train_phase_sampler_bytes(plan, state) + rest


def _sft_batch(shape, sharding) -> dict:
    from jaxmath import sft

    return {k: _spec(shape, jnp.bool_ if k == "loss_mask" else jnp.int32, sharding) for k in sft.BATCH_KEYS}


def _sft_step(plan: RunPlan, state: _State, rows: int, sharding):
    from jaxmath import sft

    s = plan.sft
    if s.batch % rows:
        raise ValueError(f"sft micro-batch rows {rows} must divide the batch of {s.batch}")
    step = sft.make_sft_step(state.graphdef, state.optimizer, chunk_size=s.chunk, remat=s.remat,
                             one_document_per_row=not s.packed)
    batch = _sft_batch((s.batch // rows, rows, s.seq), sharding)
    return step.lower(state.trainable, state.frozen, state.opt_state, batch), 0


def _sft_loss(plan: RunPlan, state: _State, rows: int, sharding):
    from jaxmath import sft

    fn = sft.make_eval_step(state.graphdef, chunk_size=plan.sft.chunk, one_document_per_row=not plan.sft.packed)
    lowered = fn.lower(state.trainable, state.frozen, _sft_batch((rows, plan.sft.seq), sharding))
    return lowered, nbytes(state.opt_state)
