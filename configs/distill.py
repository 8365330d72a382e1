"""Teacher traces for SFT (the study's data step): ask an OpenAI-compatible server every MATH level 4-5
problem and 500 OlympiadBench numerical problems, keep the replies graded correct.

The study's teacher was Qwen3-235B-A22B-Instruct-2507 on vLLM:

    vllm serve Qwen/Qwen3-235B-A22B-Instruct-2507 --tensor-parallel-size 8 --port 8000
    python -m jaxmath.main --config=configs/distill.py --config.distill.endpoint=http://HOST:8000/v1 \
        --workdir=runs/distill

It kept 3,825 traces (3,435 MATH + 390 OlympiadBench, median ~2,300 characters). One pass asks all of
it: `math_train_hard` (the 3,994 MATH L4-5 train problems, less the 2 whose gold answer is empty) and
`olympiadbench:500`, 500 of the 572 problems in the data folder's OlympiadBench numerical file, the
500 whose sha256(id) is smallest (`jaxmath.distill.select_problems`: deterministic, the same on every
machine). That file is the OlympiadBench *evaluation* set (Qwen2.5-Math's copy): the study also drew
its 500 from the benchmark, so an SFT model's OlympiadBench score is partly on problems whose teacher
traces it trained on. The study does not say which 500; `olympiadbench` without a count asks all 572.

Outputs: runs/distill/traces.jsonl (the SFT file: point `sft.train_files` of configs/sft_config_a.py at
it), traces.jsonl.attempts.jsonl (the journal: every reply as it arrived, its grade, every failed
request) and traces.jsonl.summary.json. Nothing is lost between runs: a rerun asks only the problems
without a reply (after a crash, a kill or Ctrl-C, run the same command again), and a later pass into
the same workdir (another source, more problems) adds its traces to traces.jsonl, never replacing
the earlier ones. The API key, if the server wants one, is read from $OPENAI_API_KEY
(`distill.api_key_env`). `--config.distill.limit=20` asks 20 problems per source (a smoke run).
`distill.timeout` bounds each try in wall-clock seconds, reading included. The `distill` keys are the
fields of `jaxmath.distill.DistillConfig` (`data_dir` comes from `data.dir`).
"""

import ml_collections

from jaxmath.config import defaults


def get_config() -> ml_collections.ConfigDict:
    config = defaults("distill")  # distill.endpoint has no default: pass --config.distill.endpoint=...
    config.distill.concurrency = 64
    config.lock()
    return config
