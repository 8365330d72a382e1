"""vLLM in the trainer's process (`vllm.mode=colocated`): engine core and worker here, so weights cross
from JAX to torch through DLPack without a copy.

On a GPU it shares the device with JAX: start JAX with `xla_env_for_colocation()` in the environment
(no preallocation) and leave `gpu_memory_utilization=0` so vLLM's share is derived from JAX's
measured peak; `sleep()` / `wake_up()` free vLLM's memory during the train phase where the platform
supports it.
"""

from __future__ import annotations

import os
from typing import Any

from jaxmath.rollout.types import SamplingParams
from jaxmath.rollout.vllm.config import CPU_DEFAULT_MEMORY_UTILIZATION, WORKER_EXTENSION, VLLMConfig
from jaxmath.rollout.vllm.engine import Row, VLLMEngineBase, sampling_kwargs


def xla_env_for_colocation(jax_fraction: float | None = None) -> dict[str, str]:
    """Environment for JAX when vLLM shares its GPU; set it before jax is imported. Without a fraction
    XLA allocates on demand (no preallocation); with one, it preallocates that share only."""
    if jax_fraction is None:
        return {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    if not 0 < jax_fraction < 1:
        raise ValueError(f"jax_fraction must be in (0, 1), got {jax_fraction}")
    return {"XLA_PYTHON_CLIENT_MEM_FRACTION": f"{jax_fraction:.3f}"}


def derive_gpu_memory_utilization(jax_peak_bytes: int, total_bytes: int, margin: float = 0.05) -> float:
    """vLLM's share of a GPU that JAX also uses: what JAX's measured peak leaves, less a margin for
    fragmentation and CUDA contexts. Fails when less than 5% would remain."""
    share = 1.0 - jax_peak_bytes / total_bytes - margin
    if share < 0.05:
        raise ValueError(f"JAX's peak uses {jax_peak_bytes / 2**30:.1f} of {total_bytes / 2**30:.1f} GiB; too little "
                         "is left for vLLM. Lower the rollout/train batch, use LoRA, or run vLLM in server mode "
                         "on another GPU")
    return round(share, 3)


def _measured_utilization() -> float | None:
    """From JAX's first device: None on platforms without memory statistics (CPU)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        return None
    return derive_gpu_memory_utilization(stats.get("peak_bytes_in_use", stats.get("bytes_in_use", 0)),
                                         stats["bytes_limit"])


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

        utilization = c.gpu_memory_utilization or _measured_utilization() or CPU_DEFAULT_MEMORY_UTILIZATION
        kwargs: dict[str, Any] = dict(
            model=c.model_path, dtype=c.dtype, max_model_len=c.max_model_len or None, seed=c.seed,
            gpu_memory_utilization=utilization, enforce_eager=c.enforce_eager,
            enable_prefix_caching=c.enable_prefix_caching, logprobs_mode="processed_logprobs",
            worker_extension_cls=WORKER_EXTENSION, enable_sleep_mode=c.enable_sleep_mode)
        if c.enable_lora:
            kwargs.update(enable_lora=True, max_lora_rank=c.max_lora_rank, max_loras=1)
        self.gpu_memory_utilization = utilization
        self._llm = LLM(**kwargs)

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

    def sleep(self, level: int = 1) -> bool:
        """Free vLLM's device memory for the train phase. Returns False (and does nothing) where vLLM
        has no sleep mode: on CPUs or without vllm.enable_sleep_mode. Level 1 keeps the weights in host
        memory; level 2 drops them (the next update_weights must be a full sync)."""
        if not self._can_sleep():
            return False
        self._llm.sleep(level=level)
        return True

    def wake_up(self) -> bool:
        if not self._can_sleep():
            return False
        self._llm.wake_up()
        return True

    def _can_sleep(self) -> bool:
        if self._llm is None or not self.config.enable_sleep_mode:
            return False
        from vllm.platforms import current_platform

        return not current_platform.is_cpu()

    def close(self) -> None:
        """Release the engine and the shared-memory sync files."""
        super().close()
        if self._llm is not None:
            engine = getattr(self._llm, "llm_engine", None)
            if engine is not None and hasattr(engine, "engine_core"):
                engine.engine_core.shutdown()
            self._llm = None
