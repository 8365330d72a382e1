"""How to run vLLM (`VLLMConfig`), importable without vllm: the trainer's config and the server CLI
build it, the engines and `server.server_command` read it."""

from __future__ import annotations

import dataclasses
import json
import os

MODES = ("colocated", "server")
SYNC_METHODS = ("auto", "load_weights", "file")
CPU_DEFAULT_MEMORY_UTILIZATION = 0.3
WORKER_EXTENSION = "jaxmath.rollout.vllm.worker.WorkerExtension"


@dataclasses.dataclass(frozen=True)
class VLLMConfig:
    """How to run vLLM. `model_path` is the HF directory vLLM loads (the trainer's base model).

    mode:        "colocated" (an in-process engine, `ColocatedEngine`) or "server" (a vLLM server at
                 `url`, driven over HTTP by `ServerEngine`)
    url:         the server's address with mode="server", e.g. http://127.0.0.1:8000
    served_model_name: the model name the server answers to (its --served-model-name); empty: the
                 model's path
    max_model_len: vLLM's context window (prompt + completion tokens); 0 (the default) sizes it to the
                 longest request the run makes (its prompt bucket plus max_new_tokens), set by `fit_context`
                 before the engine starts. Either way it must fit the model's max_position_embeddings.
    gpu_memory_utilization: vLLM's share of device memory (on a CPU, of host memory); 0: colocated on a
                 GPU, the run's device plan chooses it (`jaxmath.aot.colocate`: weights, the KV cache the
                 rollout needs, workspace), 0.3 on a CPU; a server started by `server_command` with 0 takes
                 0.9 of its own GPU, 0.3 on a CPU. A value set here is kept (the KV cache is what it leaves
                 after the weights and workspace) or refused before any work.
    kv_cache_memory_bytes, max_num_seqs: vLLM's KV cache and its most requests at once, set by the
                 device plan when colocated on a GPU (0: vLLM sizes them itself)
    enforce_eager: CUDA graphs off. Off by default: decode on a GPU runs several times slower without
                 them; on a CPU vLLM always runs eager (no CUDA graphs there, and compiling the model
                 with torch.compile on a CPU costs minutes).
    enable_sleep_mode: vLLM frees its weights and KV cache while JAX trains (sleep level 2 when every
                 sync rewrites all weights, 1 when only adapters are sent) and wakes for the next
                 rollout; the device plan then time-shares the GPU. Ignored where vLLM has no sleep mode
                 (CPUs). False: both engines hold their memory at once (a static split).
    enable_lora: sync LoRA adapters through vLLM's LoRA support (adapters only, PEFT format; max_lora_rank
                 >= rank). The trainer sets it for a vLLM server or a file sync; a colocated vLLM synced in
                 memory runs without it and takes the adapters merged into the weights.
    dtype:       the dtype vLLM computes in. The trainer passes its model.dtype when this is "auto":
                 vLLM's own "auto" would compute a float32 checkpoint in half precision, so its
                 logprobs would differ from a float32 trainer's by the rounding, not the weights.
    sync_method: "load_weights" (in-memory, bucketed; colocated only), "file" (safetensors in
                 shm_dir, read by the engine) or "auto" (load_weights when colocated, else file).
    cpu_kvcache_gib: KV cache size on a CPU build (VLLM_CPU_KVCACHE_SPACE) unless already set.
    enable_prefix_caching: reuse the KV cache of a shared prompt prefix (the K completions of a prompt)
    seed:        vLLM's sampling seed
    sync_bucket_mb: size of each bucket of weights sent to a colocated engine in one load_weights call
    shm_dir:     where a file sync writes the weights for the engine to read (shared memory by default)
    request_timeout_s: seconds one HTTP request to a vLLM server may take
    max_concurrent_requests: HTTP requests in flight to a vLLM server at once
    """

    model_path: str
    mode: str = "colocated"
    url: str = ""
    served_model_name: str = ""
    dtype: str = "auto"
    max_model_len: int = 0
    gpu_memory_utilization: float = 0.0
    enable_lora: bool = False
    max_lora_rank: int = 64
    kv_cache_memory_bytes: int = 0
    max_num_seqs: int = 0
    enforce_eager: bool = False
    enable_prefix_caching: bool = True
    enable_sleep_mode: bool = True
    seed: int = 0
    sync_method: str = "auto"
    sync_bucket_mb: int = 256
    shm_dir: str = "/dev/shm"
    cpu_kvcache_gib: int = 1
    request_timeout_s: float = 600.0
    max_concurrent_requests: int = 64

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"vllm.mode must be one of {MODES}, got {self.mode!r}")
        if self.sync_method not in SYNC_METHODS:
            raise ValueError(f"vllm.sync_method must be one of {SYNC_METHODS}, got {self.sync_method!r}")
        if self.mode == "server" and self.sync_method == "load_weights":
            raise ValueError("vllm.sync_method=load_weights needs the engine in this process; with mode=server "
                             "use sync_method=file (or auto)")
        if self.mode == "colocated" and not self.model_path:
            raise ValueError("vllm.model_path is empty: set model.path to the HF-format model vLLM should load "
                             "(export a jaxmath model with `python -m jaxmath.convert.jax_to_hf`)")
        if self.mode == "server" and not self.url:
            raise ValueError("vllm.mode=server needs vllm.url (e.g. http://127.0.0.1:8000); start the server with "
                             "`python -m jaxmath.rollout.vllm MODEL_PATH --port=8000` (launch/vllm_server.sh)")
        if not 0 <= self.gpu_memory_utilization < 1:
            raise ValueError(f"vllm.gpu_memory_utilization must be in [0, 1), got {self.gpu_memory_utilization}")
        if self.max_model_len < 0:
            raise ValueError(f"vllm.max_model_len must be >= 0 (0: fit the longest request), got {self.max_model_len}")
        if self.sync_bucket_mb < 1:
            raise ValueError(f"vllm.sync_bucket_mb must be >= 1, got {self.sync_bucket_mb}")


def model_positions(model_path: str) -> int | None:
    """The model's max_position_embeddings from `model_path`/config.json (None where the folder has no
    config.json, e.g. a hub id vLLM resolves itself)."""
    path = os.path.join(model_path, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        hf_config = json.load(f)
    positions = hf_config.get("max_position_embeddings", hf_config.get("text_config", {}).get("max_position_embeddings"))
    return int(positions) if positions else None


def fit_context(config: VLLMConfig, longest_request: int, what: str = "the longest request") -> VLLMConfig:
    """`config` with max_model_len set for requests of up to `longest_request` tokens (prompt bucket plus
    max_new_tokens; `what` says how it adds up, for the message) when it is 0, checked against the
    model's max_position_embeddings. Raises ConfigError, before vLLM starts, when the model cannot hold it.
    """
    from jaxmath.config import ConfigError

    positions = model_positions(config.model_path)
    window = config.max_model_len or longest_request
    if window < longest_request:
        raise ConfigError(f"vllm.max_model_len={window} is below {what} ({longest_request} tokens); set "
                          f"--config.vllm.max_model_len=0 to fit it, or shorten the prompts or max_new_tokens")
    if positions is not None and window > positions:
        source = "vllm.max_model_len" if config.max_model_len else what
        raise ConfigError(f"{source} needs {window} tokens but the model at {config.model_path} has "
                          f"max_position_embeddings={positions}; lower those settings or use a model with more "
                          f"positions")
    return dataclasses.replace(config, max_model_len=window)
