"""Teacher traces for SFT (the study's data step): ask an OpenAI-compatible server every MATH level 4-5
problem and the OlympiadBench numerical problems, keep the replies graded correct.

The study's teacher was Qwen3-235B-A22B-Instruct-2507 on vLLM:

    vllm serve Qwen/Qwen3-235B-A22B-Instruct-2507 --tensor-parallel-size 8 --port 8000
    python -m jaxmath.main --config=configs/distill.py --config.distill.endpoint=http://HOST:8000/v1 \
        --workdir=runs/distill

It kept 3,825 traces (3,435 MATH + 390 OlympiadBench, median ~2,300 characters). Outputs:
runs/distill/traces.jsonl (the SFT file: point `sft.train_files` of configs/sft_config_a.py at it),
traces.jsonl.attempts.jsonl (every graded reply) and traces.jsonl.summary.json. A rerun skips the
problems already graded, so a crash or a preempted job just runs the same command again. The API key,
if the server wants one, is read from $OPENAI_API_KEY (`distill.api_key_env`). `--config.distill.limit=20`
asks 20 problems per source (a smoke run). The `distill` keys are the fields of
`jaxmath.distill.DistillConfig` (`data_dir` comes from `data.dir`), at its defaults: the study's
teacher, MATH levels 4-5 and the OlympiadBench numerical set (`limit` applies to every source, so
run a second pass with limit=500 on olympiadbench alone to match the study's 500), temperature 0.7
(not stated in the study), 8,192 tokens. Outputs go to runs/distill unless --workdir says otherwise.
"""

import ml_collections

from jaxmath.config import defaults


def get_config() -> ml_collections.ConfigDict:
    config = defaults("distill")  # distill.endpoint has no default: pass --config.distill.endpoint=...
    config.distill.concurrency = 64
    config.lock()
    return config
