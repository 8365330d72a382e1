"""Evaluation on the study's five benchmarks (Table 1): greedy accuracy +- 95% CI, or maj@k / pass@k.

Greedy-like, as in the study's Table 4 (temperature 0.01, few-shot prefix, boxed answers):

    python -m jaxmath.main --config=configs/eval.py --config.model.path=/models/Qwen3-4B-Instruct-2507 \
        --config.eval.benchmarks=math500,aime24,aime25,gsm8k,olympiadbench

Majority voting, as in Table 11 (temperature 0.7, 64 samples; maj@k and pass@k for k = 1, 2, ..., 64):

    python -m jaxmath.main --config=configs/eval.py --config.model.path=D \
        --config.eval.benchmarks=math500,aime24,aime25 --config.eval.temperature=0.7 \
        --config.eval.num_samples=64

Grading completions generated elsewhere (one benchmark; rows {"id": ..., "completions": [...]}):

    python -m jaxmath.main --config=configs/eval.py --config.eval.backend=file \
        --config.eval.benchmarks=math500 --config.eval.completions=F.jsonl

`--config.eval.limit=N` evaluates the first N problems (smoke runs); `--config.eval.backend=vllm`
switches engines. `data.dir` must hold the JSONL files; build it with
`python -m jaxmath.data.datasets --out data` where the Hugging Face hub is reachable. The `eval` keys
are the fields of `jaxmath.eval.run.EvalConfig` (`data_dir` comes from `data.dir`).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.mode = "eval"
    config.seed = 0
    config.workdir = "runs/eval"

    config.model = ml_collections.ConfigDict()
    config.model.path = ""  # HF-format model folder (config.json, safetensors, tokenizer files)
    config.model.preset = ""
    config.model.dtype = "bfloat16"  # float32 for exact comparisons on a CPU
    config.model.param_dtype = ""
    config.model.remat = "none"
    config.model.attention_impl = ""

    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = 1
    config.mesh.fsdp = -1
    config.mesh.tp = 1

    config.sampler = ml_collections.ConfigDict()
    config.sampler.max_batch_rows = 256
    config.sampler.cache_dtype = ""

    config.data = ml_collections.ConfigDict()
    config.data.dir = "data"

    config.eval = ml_collections.ConfigDict()
    config.eval.benchmarks = "math500,aime24,aime25,gsm8k,olympiadbench"
    config.eval.backend = "jax"  # jax | vllm | file
    config.eval.completions = ""  # file backend: JSONL of {"id", "completions"} rows
    config.eval.limit = 0  # > 0: first N problems of each benchmark
    config.eval.temperature = 0.01  # the study's near-greedy decoding; 0.7 for majority voting
    config.eval.num_samples = 1  # > 1 adds maj@k and pass@k
    config.eval.top_p = 1.0
    config.eval.max_new_tokens = 4096
    config.eval.max_prompt_tokens = 2048
    config.eval.seed = 0
    config.eval.few_shot = 4  # worked examples in the prompt prefix, 0 turns it off
    config.eval.system_prompt = ""
    config.eval.enable_thinking = False  # only hybrid Qwen3 templates read it; 2507 Instruct has none
    config.eval.maj_k = ""  # e.g. "1,16,64"; empty: 1, 2, 4, ..., num_samples
    config.eval.answer_fallback = ""  # e.g. "gsm8k=gsm8k"; empty: \boxed{} answers only, as in the study
    config.eval.timeout = 1.0  # seconds per answer comparison
    config.eval.workers = 0  # grading processes; 0 grades in process
    config.eval.batch_size = 64  # prompts per engine call
    config.eval.progress = True

    config.lock()
    return config
