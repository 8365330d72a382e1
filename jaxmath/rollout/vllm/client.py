"""A vLLM server as a rollout engine (`vllm.mode=server`): the trainer's side of the HTTP connection.

The server (started by `jaxmath.rollout.vllm.server`) runs on this host at `config.url`. Rollouts go
through `/v1/completions` with token-id prompts; full weights through a safetensors file in
/dev/shm and the worker extension's `/collective_rpc` method; LoRA adapters through
`/v1/load_lora_adapter`.
"""

from __future__ import annotations

import concurrent.futures
import json
import urllib.error
import urllib.request
import uuid
from typing import Any

from jaxmath.rollout.types import SamplingParams
from jaxmath.rollout.vllm.config import VLLMConfig
from jaxmath.rollout.vllm.engine import Row, VLLMEngineBase, sampling_kwargs


class ServerEngine(VLLMEngineBase):
    """A RolloutEngine driving a vLLM server over HTTP.

        engine = ServerEngine(VLLMConfig(model_path=MODEL, mode="server", url="http://127.0.0.1:8000"))
    """

    def __init__(self, config: VLLMConfig):
        super().__init__(config)
        self.lora_name: str | None = None  # the adapter the server serves for this engine, after a LoRA sync
        self._model_name = config.served_model_name or config.model_path
        # Adapter names carry this engine's tag: a server outlives trainers and refuses a name it holds.
        self._server_tag = uuid.uuid4().hex[:8]
        try:
            self._http("GET", "/v1/models")
        except OSError as e:
            raise ConnectionError(f"no vLLM server answers at {config.url} ({e}); start one with "
                                  "`python -m jaxmath.rollout.vllm MODEL_PATH --port=PORT` (or the argv and "
                                  "environment from jaxmath.rollout.vllm.server.server_command(config))") from e

    @property
    def tokenizer(self):
        """The model directory's HF tokenizer (the server loaded the same one)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.config.model_path)
        return self._tokenizer

    def _generate_rows(self, prompts: list[list[int]], params: SamplingParams) -> list[Row]:
        def one(i):
            body = {"model": self.lora_name or self._model_name, "prompt": prompts[i], "return_token_ids": True,
                    "skip_special_tokens": False, **sampling_kwargs(params, i)}
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

    def _sync_memory(self, model):
        raise ValueError("vllm.sync_method=load_weights needs the engine in this process; with mode=server use "
                         "sync_method=file (or auto)")

    def _reload_file(self, path: str) -> None:
        self._http("POST", "/collective_rpc", {"method": "jaxmath_reload_weights_file", "args": [path]})

    def _swap_adapter(self, new_dir: str, lora_id: int) -> None:
        name = f"jaxmath-lora-{self._server_tag}-{lora_id}"
        self._http("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": new_dir})
        if self.lora_name is not None:
            self._http("POST", "/v1/unload_lora_adapter", {"lora_name": self.lora_name})
        self.lora_name = name

    def _reset_prefix_cache(self) -> None:
        if not self._http("POST", "/reset_prefix_cache")["success"]:
            raise RuntimeError(f"the vLLM server at {self.config.url} did not reset its prefix cache (it does not "
                               "while requests run); is another client using it?")
