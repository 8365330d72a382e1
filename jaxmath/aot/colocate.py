"""One GPU, two engines: the memory plan of a run whose rollouts or evaluation run on a vLLM colocated
in the trainer's process (`rollout.engine=vllm`, `eval.backend=vllm`, `vllm.mode=colocated`).

    plan = device_plan(target, vllm_side=VLLMSide.of(model_cfg, ...), jax_resident_bytes=...)
    os.environ.update(plan.jax_env)        # before jax creates its GPU client
    LLM(..., gpu_memory_utilization=plan.gpu_memory_utilization, kv_cache_memory_bytes=plan.kv_cache_bytes,
        max_num_seqs=plan.max_num_seqs, enable_sleep_mode=plan.sleep)
    fit.micro_batch_rows(run_plan, jax_target, 0, budget=plan.jax_budget_bytes)   # JAX's programs fit its share

The shape every later plan builds on (the H100 speed model, long completions, many processes):

- The device is split before either engine starts. `budget_bytes` is the target's capacity less
  `MARGIN` (as `jaxmath.aot.fit`): every phase of the run, JAX's and vLLM's holdings added, must
  peak within it.
- A phase lists what each side holds on the device while it runs (`holds`: name -> bytes). JAX always
  holds its resident train state (weights, adapters, optimizer state); vLLM always holds the CUDA
  context both share and its CUDA graph pool.
- Time-shared (`sleep`, the default on a GPU: vLLM's sleep mode): vLLM generates with its weights,
  KV cache and activation workspace; during JAX's programs (the logprob pass, the train step) it
  sleeps at level 2 and holds only the context, its graphs and the workspace its allocator caches;
  it wakes its weights, takes the new weights, then wakes its KV cache (`vllm/sync`). JAX runs with
  `XLA_PYTHON_CLIENT_ALLOCATOR=platform`: the train step's temporaries (one slab per program call in
  XLA's buffer assignment) go back to the device when the step ends, so vLLM can wake into them.
  JAX's programs may peak at `jax_budget_bytes` = budget less vLLM's sleeping holdings.
- Static (`vllm.enable_sleep_mode=False`): both hold everything at once. JAX preallocates its share
  (`XLA_PYTHON_CLIENT_MEM_FRACTION`, taken before vLLM starts, so vLLM cannot eat it); vLLM's KV cache
  gets the rollout's rows or `STATIC_KV_SHARE` of what is left, whichever is smaller.
- vLLM's KV cache is planned in vLLM's own units: blocks of `KV_BLOCK_TOKENS` tokens, one page per
  layer per block (`kv_page_bytes`), so `kv_cache_rows` is vLLM's own "maximum concurrency" for
  requests of `max_model_len` tokens. It is passed to vLLM as `kv_cache_memory_bytes` (vLLM then
  skips its own sizing) and `gpu_memory_utilization` is the whole of vLLM's footprint, which vLLM
  checks against the free memory when it starts.
- Refusals name the setting to change (`PlanError`, a ConfigError).

Why the weights are held twice, not shared: vLLM computes from its own layout (q/k/v and gate/up
fused, [out, in], post-processed at load) in memory from its sleep-mode allocator pool, and its CUDA
graphs capture those addresses; the trainer keeps [layers, in, out] stacks in XLA's buffers, which
a full-parameter update replaces every step. Sharing would need one layout serving both kernels
and one allocator. In the time-shared plan the second copy costs nothing during JAX's programs
(vLLM's weights are discarded at sleep level 2 and rewritten by the sync, which it needs anyway):
only the rollout and sync phases pay it, `vllm_weights_bytes` (8.0 GB for Qwen3-4B in bf16).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jaxmath.aot.targets import Target
from jaxmath.config import ConfigError

GIB = 1 << 30
MARGIN = 0.1  # of capacity, outside every phase (as jaxmath.aot.fit.MARGIN)
CONTEXT_BYTES = int(0.75 * GIB)  # the CUDA context JAX and torch share, cuBLAS/cuDNN handles
CUDA_GRAPH_BYTES = 1 * GIB  # vLLM's captured decode graphs (its own estimate is ~0.5-1 GiB for 4-8B models)
TORCH_WORKSPACE_BYTES = int(0.5 * GIB)  # cuBLAS workspaces, sampler scratch outside vLLM's profile run
KV_BLOCK_TOKENS = 16  # vLLM's block size on CUDA
MAX_BATCHED_TOKENS = 16384  # vLLM's default token budget per forward for the LLM class on an H100/H200
MAX_NUM_SEQS = 1024  # vLLM's default on an H100/H200; the plan lowers it to the rows a call makes
STATIC_KV_SHARE = 0.5  # static plan: vLLM's KV cache takes at most this share of what both leave free
SLEEP_LEVEL = 2  # discard weights and KV cache; the sync after waking rewrites every weight


class PlanError(ConfigError):
    """A device split that cannot fit; the message names the setting to change."""


@dataclasses.dataclass(frozen=True)
class VLLMSide:
    """What the run asks of vLLM, from its config and model.

    weights_bytes:   the model's weights in vLLM's dtype
    kv_token_bytes:  one token's keys and values over all layers
    kv_page_bytes:   one block's keys and values in one layer (vLLM's page)
    num_layers:      attention layers (pages per block)
    max_model_len:   the longest request (prompt bucket + completion budget)
    requests:        requests one generate call makes (prompts x samples): the most vLLM can use at once
    prompt_tokens:   the longest prompt; samples of one prompt share its full blocks (prefix caching)
    samples:         samples per prompt
    activation_bytes: vLLM's profile run: MAX_BATCHED_TOKENS tokens through a layer, and the sampler's
                     float32 logits, probabilities and logprobs of max_num_seqs rows
    """

    weights_bytes: int
    kv_token_bytes: int
    kv_page_bytes: int
    num_layers: int
    max_model_len: int
    requests: int
    prompt_tokens: int
    samples: int
    activation_bytes: int
    itemsize: int = 2  # bytes per weight and cache element in vLLM's dtype

    @classmethod
    def of(cls, model_cfg, *, dtype, max_model_len: int, requests: int, prompt_tokens: int,
           samples: int) -> "VLLMSide":
        c = model_cfg
        itemsize = np.dtype(dtype).itemsize
        page = 2 * KV_BLOCK_TOKENS * c.num_kv_heads * c.head_dim * itemsize
        seqs = max_num_seqs(requests)
        per_token = (3 * c.intermediate_size + 3 * c.hidden_size
                     + (c.num_heads + 2 * c.num_kv_heads) * c.head_dim) * itemsize
        activations = MAX_BATCHED_TOKENS * per_token + 3 * seqs * c.vocab_size * 4
        return cls(weights_bytes=c.num_params() * itemsize, kv_token_bytes=page * c.num_layers // KV_BLOCK_TOKENS,
                   kv_page_bytes=page, num_layers=c.num_layers, max_model_len=max_model_len, requests=requests,
                   prompt_tokens=prompt_tokens, samples=samples, activation_bytes=int(activations),
                   itemsize=itemsize)

    @property
    def block_bytes(self) -> int:
        """One block over all layers: the unit vLLM's KV cache is counted in."""
        return self.kv_page_bytes * self.num_layers

    def blocks_per_request(self) -> int:
        return math.ceil(self.max_model_len / KV_BLOCK_TOKENS)

    def blocks_for_all_requests(self) -> int:
        """Blocks that hold every request of a call at full length, the samples of a prompt sharing its
        full prompt blocks (vLLM's prefix caching)."""
        prompts = math.ceil(self.requests / self.samples)
        shared = self.prompt_tokens // KV_BLOCK_TOKENS
        own = math.ceil((self.max_model_len - shared * KV_BLOCK_TOKENS) / KV_BLOCK_TOKENS)
        return prompts * (shared + self.samples * own)


def sync_working_bytes(model_cfg, itemsize: int, *, merges_lora: bool, bucket_bytes: int) -> int:
    """JAX's working set while it sends weights (`jaxmath.rollout.weight_sync`): the largest stacked
    parameter converted whole to vLLM's dtype and layout, plus, when adapters are merged in, its float32
    delta and sum; and one bucket of per-layer slices handed over."""
    c = model_cfg
    largest = c.num_layers * c.hidden_size * max(c.intermediate_size, c.num_heads * c.head_dim)
    return int(largest * (itemsize + (8 if merges_lora else 0)) + bucket_bytes)


def max_num_seqs(requests: int) -> int:
    """vLLM's max_num_seqs for calls of `requests` rows: no more than a call makes, nor vLLM's default."""
    return max(1, min(MAX_NUM_SEQS, requests))


@dataclasses.dataclass(frozen=True)
class DevicePlan:
    """The split of one device between JAX and a colocated vLLM (see the module docstring).

    holds: phase -> {holder: bytes}; a phase's peak is the sum. JAX programs' phases hold
        "jax/program" (the compiled program's peak beyond the resident state) only once a compiled
        peak is added (`with_jax_programs`); before that they hold JAX's budget for them.
    """

    target: str
    device_bytes: int
    capacity_bytes: int
    budget_bytes: int
    sleep: bool
    sleep_level: int
    jax_resident_bytes: int
    jax_budget_bytes: int
    jax_fraction: float  # XLA_PYTHON_CLIENT_MEM_FRACTION in the static plan; 0 in the time-shared one
    vllm_weights_bytes: int
    kv_cache_bytes: int
    kv_cache_blocks: int
    kv_cache_rows: int
    kv_cache_rows_needed: int  # the requests one generate call makes
    workspace_bytes: int  # vLLM's activations (its profile run) and cuBLAS/sampler scratch
    graph_bytes: int
    context_bytes: int
    max_num_seqs: int
    max_model_len: int
    gpu_memory_utilization: float
    holds: dict[str, dict[str, int]]

    @property
    def jax_env(self) -> dict[str, str]:
        """JAX's allocator settings, set before jax creates its GPU client."""
        if self.sleep:
            return {"XLA_PYTHON_CLIENT_ALLOCATOR": "platform", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
        return {"XLA_PYTHON_CLIENT_MEM_FRACTION": f"{self.jax_fraction:.3f}", "XLA_PYTHON_CLIENT_PREALLOCATE": "true"}

    def peak(self, phase: str) -> int:
        return sum(self.holds[phase].values())

    @property
    def peak_bytes(self) -> int:
        return max(self.peak(p) for p in self.holds)

    def with_jax_programs(self, peaks: dict[str, int]) -> "DevicePlan":
        """The plan with JAX's compiled phases (name -> peak bytes, resident state included) beside
        what vLLM holds meanwhile."""
        holds = dict(self.holds)
        beside = self.holds["jax/programs"]
        for name, peak in peaks.items():
            holds[name] = {**{k: v for k, v in beside.items() if not k.startswith("jax/")}, "jax/program": int(peak)}
        holds.pop("jax/programs")
        return dataclasses.replace(self, holds=holds)

    def summary(self) -> str:
        """One log line: the split and what it buys."""
        gb = 1e9
        how = (f"time-shared (vLLM sleeps at level {self.sleep_level} through JAX's programs; JAX allocator platform)"
               if self.sleep else f"static (JAX preallocates {self.jax_fraction:.3f} of the device)")
        return (f"device plan for {self.target} ({self.capacity_bytes / gb:.1f} GB, budget {self.budget_bytes / gb:.1f}): "
                f"{how}; vLLM gpu_memory_utilization={self.gpu_memory_utilization:.3f} (weights "
                f"{self.vllm_weights_bytes / gb:.1f} GB, KV cache {self.kv_cache_bytes / gb:.1f} GB = "
                f"{self.kv_cache_rows} requests of {self.max_model_len} tokens at once; a call makes "
                f"{self.kv_cache_rows_needed}), JAX resident "
                f"{self.jax_resident_bytes / gb:.1f} GB, JAX programs up to {self.jax_budget_bytes / gb:.1f} GB")

    def as_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["jax_env"] = self.jax_env
        out["peak_bytes"] = self.peak_bytes
        return out


def _fraction(nbytes: int, device_bytes: int) -> float:
    """nbytes as a fraction of the device, rounded up to 3 decimals (vLLM and XLA take a fraction)."""
    return math.ceil(nbytes / device_bytes * 1000) / 1000


def device_plan(target: Target, *, vllm_side: VLLMSide, jax_resident_bytes: int, sleep: bool,
                jax_programs: bool = True, gpu_memory_utilization: float = 0.0,
                sync_bytes: int = 256 << 20) -> DevicePlan:
    """Split `target` between JAX (its resident train state; its programs when `jax_programs`) and a
    colocated vLLM serving `vllm_side`. gpu_memory_utilization: 0 plans vLLM's share; a value the
    user set is kept (its KV cache is what it leaves) or refused. sync_bytes: the weight sync's working
    set on JAX's side (`sync_working_bytes`). Raises PlanError naming the setting
    to change when not even one longest request fits beside JAX's state, or nothing is left for JAX's
    programs."""
    gb = 1e9
    device = target.device_bytes or target.capacity_bytes
    budget = int(target.capacity_bytes * (1 - MARGIN))
    v = vllm_side
    workspace = v.activation_bytes + TORCH_WORKSPACE_BYTES
    graphs = CUDA_GRAPH_BYTES
    fixed = CONTEXT_BYTES + jax_resident_bytes + v.weights_bytes + workspace + graphs
    room = budget - fixed  # for the KV cache while vLLM generates
    if gpu_memory_utilization:
        room = min(room, int(gpu_memory_utilization * device) - v.weights_bytes - workspace - graphs)
    elif not sleep and jax_programs:
        room = int(room * STATIC_KV_SHARE)
    per_request = v.blocks_per_request()
    blocks = min(max(room, 0) // v.block_bytes, max(v.blocks_for_all_requests(), per_request))
    rows = blocks // per_request
    what = "vllm.gpu_memory_utilization" if gpu_memory_utilization else (
        "the completion length (rl.max_completion_tokens / eval.max_new_tokens) or model.dtype")
    if rows < 1:
        raise PlanError(
            f"vLLM's KV cache cannot hold one request of {v.max_model_len} tokens on {target.description}: "
            f"{max(room, 0) / gb:.2f} GB is left for it beside JAX's {jax_resident_bytes / gb:.1f} GB train state and "
            f"vLLM's {v.weights_bytes / gb:.1f} GB of weights, and one request needs "
            f"{per_request * v.block_bytes / gb:.2f} GB; lower {what}, train LoRA (lora.rank), or use "
            "--config.rollout.engine=jax")
    kv = blocks * v.block_bytes
    awake = v.weights_bytes + kv + workspace + graphs
    utilization = gpu_memory_utilization or _fraction(awake, device)
    holds: dict[str, dict[str, int]] = {
        "vllm/generate": {"context": CONTEXT_BYTES, "jax/resident": jax_resident_bytes,
                          "vllm/weights": v.weights_bytes, "vllm/kv_cache": kv, "vllm/workspace": workspace,
                          "vllm/cuda_graphs": graphs},
    }
    fraction = 0.0
    jax_budget = 0
    if jax_programs:
        # the weight sync after each update: vLLM's weights awake, its KV cache not yet
        holds["vllm/sync"] = {"context": CONTEXT_BYTES, "jax/resident": jax_resident_bytes,
                              "vllm/weights": v.weights_bytes, "vllm/cuda_graphs": graphs, "vllm/workspace": workspace,
                              "sync/convert": sync_bytes, **({} if sleep else {"vllm/kv_cache": kv})}
        beside = {"context": CONTEXT_BYTES, "vllm/cuda_graphs": graphs, "vllm/workspace": workspace}
        if not sleep:
            beside.update({"vllm/weights": v.weights_bytes, "vllm/kv_cache": kv})
        jax_budget = budget - sum(beside.values())
        if jax_budget <= jax_resident_bytes:
            raise PlanError(f"JAX's programs have no room on {target.description}: its train state takes "
                            f"{jax_resident_bytes / gb:.1f} GB of the {jax_budget / gb:.1f} GB vLLM leaves; "
                            + ("set vllm.enable_sleep_mode=True, " if not sleep else "") +
                            "lower vllm.gpu_memory_utilization, train LoRA (lora.rank), or use --config.rollout.engine=jax")
        if not sleep:
            fraction = math.floor(jax_budget / device * 1000) / 1000
        holds["jax/programs"] = {**beside, "jax/budget": jax_budget}
    return DevicePlan(
        target=target.name, device_bytes=device, capacity_bytes=target.capacity_bytes, budget_bytes=budget,
        sleep=sleep, sleep_level=SLEEP_LEVEL if sleep else 0, jax_resident_bytes=jax_resident_bytes,
        jax_budget_bytes=jax_budget, jax_fraction=fraction, vllm_weights_bytes=v.weights_bytes, kv_cache_bytes=kv,
        kv_cache_blocks=blocks, kv_cache_rows=rows, kv_cache_rows_needed=v.requests,
        workspace_bytes=workspace, graph_bytes=graphs, context_bytes=CONTEXT_BYTES,
        max_num_seqs=max_num_seqs(v.requests), max_model_len=v.max_model_len, gpu_memory_utilization=utilization, holds=holds)
