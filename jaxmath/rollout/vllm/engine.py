"""What the two vLLM engines share: request validation and packing, per-prompt seeds, and the weight
sync's shape (LoRA adapters as a PEFT folder, full weights in memory or through a safetensors file,
then a prefix-cache reset). `ColocatedEngine` and `ServerEngine` supply how each step reaches vLLM.

Logprobs: vLLM is asked for `logprobs_mode="processed_logprobs"`, the log-softmax of the logits it
actually samples from (after temperature; greedy requests get the untempered softmax), which is what
`Rollout.logprobs` promises and what the trainer's temperature-scaled logprobs are compared to. The
raw default would be the untempered distribution for every request, biasing the GRPO ratio at T != 1.

Stops: requests set `ignore_eos` and pass `SamplingParams.stop_token_ids` explicitly, so vLLM stops
on exactly the tokens the JAX sampler stops on; the stop token stays in the completion and its mask.

After every weight update the prefix cache is reset: cached prompt KV computed with the old weights
would otherwise be reused by the next rollout.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any, Sequence

import numpy as np

from jaxmath.rollout.types import FINISH_LENGTH, FINISH_STOP, Rollout, RolloutEngine, SamplingParams
from jaxmath.rollout.vllm.config import VLLMConfig

# (completion token ids, their logprobs, vLLM's finish reason) of one row
Row = tuple[list[int], list[float], str]


def request_seed(seed: int, prompt_index: int) -> int:
    """Per-prompt vLLM seed; vLLM gives the prompt's j-th sample seed + j, so rows never share a stream."""
    return int(np.random.SeedSequence([seed, prompt_index]).generate_state(1)[0] >> 1)


def sampling_kwargs(params: SamplingParams, prompt_index: int) -> dict[str, Any]:
    """vLLM sampling fields of one prompt's request (the same for `vllm.SamplingParams` and HTTP)."""
    return dict(n=params.num_samples, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                max_tokens=params.max_new_tokens, seed=request_seed(params.seed, prompt_index),
                stop_token_ids=list(params.stop_token_ids), ignore_eos=True, logprobs=0)


def pack(prompts: list[list[int]], rows: list[Row], params: SamplingParams) -> Rollout:
    n, width = len(rows), params.max_new_tokens
    ids = np.zeros((n, width), np.int32)
    logprobs = np.zeros((n, width), np.float32)
    mask = np.zeros((n, width), bool)
    finish = np.zeros((n,), np.int8)
    for r, (tokens, lps, reason) in enumerate(rows):
        k = len(tokens)
        ids[r, :k] = tokens
        logprobs[r, :k] = lps
        mask[r, :k] = True
        finish[r] = FINISH_STOP if reason == "stop" else FINISH_LENGTH
    return Rollout(prompt_ids=prompts, completion_ids=ids, logprobs=logprobs, completion_mask=mask,
                   finish_reason=finish, prompt_index=np.repeat(np.arange(len(prompts), dtype=np.int32),
                                                                params.num_samples))


class VLLMEngineBase(RolloutEngine):
    """A RolloutEngine on vLLM with weight sync from the JAX trainer; see `make_engine`.

    Subclasses implement `_generate_rows`, `_reload_file`, `_swap_adapter`, `_reset_prefix_cache` and
    `tokenizer`; the colocated one also the in-memory `_sync_memory`.
    """

    def __init__(self, config: VLLMConfig):
        self.config = config
        self.last_sync = None
        self._lora_id = 0
        self._lora_dir: str | None = None
        self._tokenizer = None
        self.sync_dir = os.path.join(config.shm_dir, f"jaxmath-sync-{os.getpid()}-{id(self):x}")

    # --- generation ---

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> Rollout:
        """`params.num_samples` completions per prompt, rows grouped by prompt (see Rollout)."""
        prompts = [list(map(int, p)) for p in prompts]
        if not prompts:
            raise ValueError("generate needs at least one prompt")
        if any(not p for p in prompts):
            raise ValueError("every prompt needs at least one token")
        longest = max(len(p) for p in prompts) + params.max_new_tokens
        if self.config.max_model_len and longest > self.config.max_model_len:
            raise ValueError(f"prompt + max_new_tokens reaches {longest} tokens, above vllm.max_model_len="
                             f"{self.config.max_model_len}; set vllm.max_model_len=0 (fit the request) or shorten it")
        return pack(prompts, self._generate_rows(prompts, params), params)

    def _generate_rows(self, prompts: list[list[int]], params: SamplingParams) -> list[Row]:
        raise NotImplementedError

    # --- weight sync ---

    def _engine_dtype(self):
        """The dtype the engine computes in, for the sent weights (None: leave them as they are)."""
        return None

    def update_weights(self, model) -> dict[str, float]:
        """Make the engine generate with `model`'s current weights; returns the sync metrics.

        A model with LoRA adapters syncs only the adapters where the engine runs with LoRA support
        (vllm.enable_lora; the engine's base must be the model's base: both load model.path); without
        it, and for any other model, all weights are sent (adapters merged in), in memory when colocated.
        """
        from jaxmath.rollout import weight_sync

        start = time.perf_counter()
        if weight_sync.uses_lora(model) and self.config.enable_lora:
            record = self._sync_lora(model)
        else:
            if self.config.enable_lora:
                raise ValueError("full-weight sync into a vLLM started with enable_lora is not possible (vLLM 0.32's "
                                 "LoRA layers wrap the base weights and reject load_weights); set "
                                 "vllm.enable_lora=False for full-parameter training")
            method = self.config.sync_method
            if method == "auto":
                method = "load_weights" if self.config.mode == "colocated" else "file"
            record = self._sync_memory(model) if method == "load_weights" else self._sync_file(model)
        self._weights_loaded()
        self._reset_prefix_cache()
        record.seconds = time.perf_counter() - start
        self.last_sync = record
        return record.as_metrics()

    def _sync_memory(self, model):
        raise NotImplementedError

    def _weights_loaded(self) -> None:
        """Called after the new weights are in, before the prefix cache is reset (a colocated engine
        woken in stages takes its KV cache back here)."""

    def _sync_file(self, model):
        from jaxmath.rollout import weight_sync

        record = weight_sync.SyncRecord("file")
        path = os.path.join(self.sync_dir, "weights.safetensors")
        weight_sync.write_weights_file(model, path, self._engine_dtype(), record)
        try:
            self._reload_file(path)
        finally:
            os.remove(path)
        return record

    def _reload_file(self, path: str) -> None:
        raise NotImplementedError

    def _sync_lora(self, model):
        from jaxmath.model.peft import save_peft_adapter
        from jaxmath.rollout import weight_sync

        if getattr(model, "head_lora", None) is not None:
            raise ValueError("vLLM's LoRA support takes no adapter on the LM head (lora.train_unembed); set "
                             "vllm.enable_lora=False so the adapters reach vLLM merged into its weights")
        record = weight_sync.SyncRecord("lora")
        self._lora_id += 1
        new_dir = os.path.join(self.sync_dir, f"lora-{self._lora_id}")
        written = save_peft_adapter(model, new_dir, self.config.model_path)
        if written["rank"] > self.config.max_lora_rank:
            raise ValueError(f"LoRA rank {written['rank']} exceeds vllm.max_lora_rank={self.config.max_lora_rank}; "
                             "raise vllm.max_lora_rank")
        record.gather_seconds, record.bytes, record.tensors, record.buckets = (
            written["seconds"], written["bytes"], written["tensors"], 1)
        self._swap_adapter(new_dir, self._lora_id)
        old_dir, self._lora_dir = self._lora_dir, new_dir
        if old_dir:
            shutil.rmtree(old_dir, ignore_errors=True)
        return record

    def _swap_adapter(self, new_dir: str, lora_id: int) -> None:
        """Serve the adapter in `new_dir` (sync number `lora_id`) from now on and drop the previous one.
        A new id or name per sync makes vLLM load the new files instead of reusing its cached adapter."""
        raise NotImplementedError

    def _reset_prefix_cache(self) -> None:
        raise NotImplementedError

    @property
    def tokenizer(self):
        """The model's HF tokenizer."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the shared-memory sync files."""
        shutil.rmtree(self.sync_dir, ignore_errors=True)
