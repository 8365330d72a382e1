"""vLLM in the trainer's process (`vllm.mode=colocated`): engine core and worker here, so weights cross
from JAX to torch through DLPack without a copy.

On a GPU it shares the device with JAX by the run's device plan (`jaxmath.aot.colocate`, applied by
`jaxmath.aot.device` before jax starts): the plan's gpu_memory_utilization, KV cache bytes and max_num_seqs
arrive in the VLLMConfig. `sleep()` frees vLLM's memory for JAX's programs and `wake_up()` takes it
back in two stages (weights, then after the sync the KV cache), where the platform has sleep mode.
"""

from __future__ import annotations

import os
from typing import Any

from jaxmath.rollout.types import SamplingParams
from jaxmath.rollout.vllm.config import CPU_DEFAULT_MEMORY_UTILIZATION, WORKER_EXTENSION, VLLMConfig
from jaxmath.rollout.vllm.engine import Row, VLLMEngineBase, sampling_kwargs


def engine_kwargs(c: VLLMConfig, *, on_cpu: bool) -> dict[str, Any]:
    """`vllm.LLM`'s arguments for `c`. On a GPU: the device plan's memory settings, CUDA graphs unless
    enforce_eager, sleep mode as configured. On a CPU: eager (no CUDA graphs, and torch.compile of the
    model costs minutes there), no sleep mode (vLLM has none on CPUs), 0.3 of host memory unless set."""
    kwargs: dict[str, Any] = dict(
        model=c.model_path, dtype=c.dtype, max_model_len=c.max_model_len or None, seed=c.seed,
        gpu_memory_utilization=c.gpu_memory_utilization or CPU_DEFAULT_MEMORY_UTILIZATION,
        enforce_eager=c.enforce_eager or on_cpu, enable_prefix_caching=c.enable_prefix_caching,
        logprobs_mode="processed_logprobs", worker_extension_cls=WORKER_EXTENSION,
        enable_sleep_mode=c.enable_sleep_mode and not on_cpu)
    if not on_cpu:
        if c.kv_cache_memory_bytes:
            kwargs["kv_cache_memory_bytes"] = c.kv_cache_memory_bytes
        if c.max_num_seqs:
            kwargs["max_num_seqs"] = c.max_num_seqs
    if c.enable_lora:
        kwargs.update(enable_lora=True, max_lora_rank=c.max_lora_rank, max_loras=1)
    return kwargs


class ColocatedEngine(VLLMEngineBase):
    """An in-process `vllm.LLM` as a RolloutEngine.

        engine = ColocatedEngine(VLLMConfig(model_path="/models/Qwen3-4B-Instruct-2507", dtype="bfloat16"))
        rollout = engine.generate(prompt_ids, SamplingParams(max_new_tokens=2048, num_samples=8))
        ... optimizer step ...
        engine.update_weights(model)   # full weights in memory, or only the adapters of a LoRA model
    """

    def __init__(self, config: VLLMConfig):
        super().__init__(config)
        self._lora_request = None
        c = config
        # Engine core and worker in this process: DLPack handover and no engine processes to spawn.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(c.cpu_kvcache_gib))
        from vllm import LLM

        self._llm = None
        self._staged_kv = False  # weights woken, KV cache still asleep (between wake_up and the sync)
        from vllm.platforms import current_platform

        self._on_cpu = current_platform.is_cpu()
        self._llm = LLM(**engine_kwargs(c, on_cpu=self._on_cpu))
        self.gpu_memory_utilization = self._llm.llm_engine.vllm_config.cache_config.gpu_memory_utilization

    @property
    def tokenizer(self):
        """The HF tokenizer vLLM loaded with the model."""
        if self._tokenizer is None:
            self._tokenizer = self._llm.get_tokenizer()
        return self._tokenizer

    def _generate_rows(self, prompts: list[list[int]], params: SamplingParams) -> list[Row]:
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        requests = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        sampling = [VSamplingParams(**sampling_kwargs(params, i), detokenize=False) for i in range(len(prompts))]
        outputs = self._llm.generate(requests, sampling, use_tqdm=False, lora_request=self._lora_request)
        rows = []
        for out in outputs:
            for o in sorted(out.outputs, key=lambda o: o.index):
                tokens = list(o.token_ids)
                lps = [step[t].logprob for step, t in zip(o.logprobs, tokens)]
                rows.append((tokens, lps, o.finish_reason))
        return rows

    # --- weight sync ---

    def _engine_dtype(self):
        import jax.numpy as jnp

        return jnp.dtype(str(self._llm.llm_engine.model_config.dtype).removeprefix("torch."))

    def _sync_memory(self, model):
        from jaxmath.rollout import weight_sync

        record = weight_sync.SyncRecord("load_weights")
        bucket_bytes = self.config.sync_bucket_mb << 20
        buckets = weight_sync.torch_buckets(model, self._engine_dtype(), bucket_bytes, record)
        # One engine call per sync: the worker is in this process, so the generator itself crosses and
        # each bucket is converted on the JAX side only when the reload reaches it.
        self._llm.collective_rpc("jaxmath_reload_weights", args=((pair for bucket in buckets for pair in bucket),))
        return record

    def _reload_file(self, path: str) -> None:
        self._llm.collective_rpc("jaxmath_reload_weights_file", args=(path,))

    def _swap_adapter(self, new_dir: str, lora_id: int) -> None:
        from vllm.lora.request import LoRARequest

        self._lora_request = LoRARequest(f"jaxmath-lora-{lora_id}", lora_id, new_dir)
        self._llm.llm_engine.add_lora(self._lora_request)
        if lora_id > 1:
            self._llm.llm_engine.remove_lora(lora_id - 1)

    def _reset_prefix_cache(self) -> None:
        self._llm.reset_prefix_cache()

    # --- memory phases ---

    def sleep(self) -> bool:
        """Free vLLM's device memory for JAX's programs. Returns False (and does nothing) where vLLM has
        no sleep mode: on CPUs or without vllm.enable_sleep_mode. Level 2 (weights and KV cache
        discarded) when the next sync rewrites every weight; level 1 (weights kept in host memory) when
        only LoRA adapters are sent, so the base survives."""
        if not self._can_sleep():
            return False
        self._llm.sleep(level=1 if self.config.enable_lora else 2)
        return True

    def wake_up(self) -> bool:
        """Take the weights' memory back; the KV cache follows after the sync (`update_weights`), so the
        sync's buckets never sit beside a full KV cache."""
        if not self._can_sleep():
            return False
        self._llm.wake_up(tags=["weights"])
        self._staged_kv = True
        return True

    def _weights_loaded(self) -> None:
        if self._staged_kv:
            self._llm.wake_up(tags=["kv_cache"])
            self._staged_kv = False

    def _can_sleep(self) -> bool:
        return self._llm is not None and self.config.enable_sleep_mode and not self._on_cpu

    def close(self) -> None:
        """Release the engine and the shared-memory sync files."""
        super().close()
        if self._llm is not None:
            engine = getattr(self._llm, "llm_engine", None)
            if engine is not None and hasattr(engine, "engine_core"):
                engine.engine_core.shutdown()
            self._llm = None
