"""vLLM as a rollout engine: token ids in, completion ids, logprobs and finish reasons out.

The only package that imports vllm (lazily, so `VLLMConfig` can be built without it). It is split by
where the code runs:

    config.py     VLLMConfig (no vllm import)
    engine.py     what both engines share: requests, packing, the weight sync's shape
    colocated.py  ColocatedEngine: an in-process `vllm.LLM` (weights through DLPack), memory split
    client.py     ServerEngine: the trainer's side of a vLLM server, over HTTP on this host
    server.py     server processes: the command, start / stop, the CLI
                  (`python -m jaxmath.rollout.vllm MODEL_PATH --port=8000`, launch/vllm_server.sh)
    worker.py     WorkerExtension: runs inside vLLM's worker (here when colocated, in the server otherwise)

    engine = make_engine(VLLMConfig(model_path="/models/Qwen3-4B-Instruct-2507", dtype="bfloat16"))
    rollout = engine.generate(prompt_ids, SamplingParams(max_new_tokens=2048, num_samples=8))
    engine.update_weights(model)   # full weights, or only the adapters of a LoRA model
"""

from jaxmath.rollout.vllm.config import VLLMConfig
from jaxmath.rollout.vllm.engine import VLLMEngineBase


def make_engine(config: VLLMConfig) -> VLLMEngineBase:
    """The engine `config.mode` names: a `ColocatedEngine` or a `ServerEngine`."""
    if config.mode == "colocated":
        from jaxmath.rollout.vllm.colocated import ColocatedEngine

        return ColocatedEngine(config)
    from jaxmath.rollout.vllm.client import ServerEngine

    return ServerEngine(config)


__all__ = ["VLLMConfig", "VLLMEngineBase", "make_engine"]
