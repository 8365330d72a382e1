"""Evaluation on the study's five benchmarks (Table 1): greedy accuracy +- 95% CI, or maj@k / pass@k.

Greedy-like, as in the study's Table 4 (temperature 0.01, few-shot prefix, boxed answers):

    python -m jaxmath.main --config=configs/eval.py --config.model.path=/models/Qwen3-4B-Instruct-2507 \
        --config.eval.benchmarks=math500,aime24,aime25,gsm8k,olympiadbench

Majority voting, as in Table 11 (temperature 0.7, 64 samples; maj@k and pass@k for k = 1, 2, ..., 64;
maj@k averages the 64 // k disjoint draws of k samples and pass@k is the unbiased estimator, where the
study reports one draw: docs/STUDY.md):

    python -m jaxmath.main --config=configs/eval.py --config.model.path=D \
        --config.eval.benchmarks=math500,aime24,aime25 --config.eval.temperature=0.7 \
        --config.eval.num_samples=64

Grading completions generated elsewhere (one benchmark; rows {"id": ..., "completions": [...]}):

    python -m jaxmath.main --config=configs/eval.py --config.eval.backend=file \
        --config.eval.benchmarks=math500 --config.eval.completions=F.jsonl

`--config.eval.limit=N` evaluates the first N problems (smoke runs). Generation runs on vLLM (as the
design card says; `vllm.*` sets it up); `--config.eval.backend=jax` runs it on the in-process JAX
sampler instead, with nothing more to install. `data.dir` must hold the JSONL files; build it with
`python -m jaxmath.data.datasets --out data` where the Hugging Face hub is reachable. The `eval` keys
are the fields of `jaxmath.eval.run.EvalConfig` (`data_dir` comes from `data.dir`). The study states
the five benchmarks, temperature 0.01, "a standardized few-shot prefix" and boxed answers; it
publishes neither the prefix nor a token limit, so the 4-shot prefix (jaxmath's 4 worked examples)
and the 4,096 new tokens (the longest training budget) are jaxmath's (docs/STUDY.md). Outputs go to
runs/eval unless --workdir says otherwise.
"""

import ml_collections

from jaxmath.config import defaults


def get_config() -> ml_collections.ConfigDict:
    config = defaults("eval")  # eval.*: jaxmath.eval.run.EvalConfig's fields at their defaults (the study's)
    config.eval.backend = "vllm"
    config.model.remat = "none"  # no backward pass
    config.lock()
    return config
