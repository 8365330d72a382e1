"""The study's SFT sweep (Table 12): every row is LoRA rank 64 on all seven projections, Adam
beta1 0.9 / beta2 0.95, max sequence 4,096, loss on assistant tokens only, linear decay to 0.

The study ran SFT on Tinker, so what it does not state is Tinker's (configs/grpo_common.py cites the
sources): Adam eps 1e-12 and no gradient clipping (`AdamParams` defaults; jaxmath's SFT default is
PyTorch's eps 1e-8 and clipping at 1.0), LoRA alpha 32 (scale 0.5; Tinker takes no alpha, see
grpo_common). The targets are the study's own words, "all attention + MLP projections": no adapter on
the LM head, although Tinker's train_unembed defaults to True (docs/STUDY.md).

    python -m jaxmath.main --config=configs/sft_sweep.py:v2 --config.model.path=/models/Qwen3-4B-Instruct-2507 \
        --config.data.dir=runs/distill --workdir=runs/sft_v2

Every row trains one trace per sequence (`sft.pack=False`, as the study did; True packs into fewer,
fuller rows) and exports the merged model to runs/sft_<row>/export for configs/eval.py or as
`model.path` of configs/sft_then_rl.py. The other keys are `jaxmath.sft.SFTConfig`'s fields (`sft.*`),
`jaxmath.model.lora.LoRAConfig`'s (`lora.*`) and `jaxmath.optim.OptimizerConfig`'s (`optimizer.*`),
at SFTConfig's defaults: Config A's.

| row | data                               | lr    | epochs | steps | batch (inferred)      |
|-----|------------------------------------|-------|--------|-------|-----------------------|
| v1  | 390 OlympiadBench traces           | 2e-5  | 3      | 9     | 128 (390 // 128 = 3)  |
| v2  | 390 OlympiadBench traces           | 5e-4  | 3      | 36    | 32 (390 // 32 = 12)   |
| v3  | 5.4k custom + OpenR1               | 5e-4  | 2      | 168   | 64 (5,400 // 64 = 84) |
| v4  | 861 short custom traces            | 5e-4  | 2      | 53    | 32, steps fixed at 53 |
| a   | 3,825 custom traces (Config A)     | 2e-4  | 2      | 238   | 32 (the study's)      |
| b   | 3,825 custom traces (Config B)     | 5e-4  | 1      | 119   | 32                    |

No row holds documents out for an eval loss (`sft.eval_fraction` 0, the default): a hold-out leaves
the training set before batches are planned, and the step counts above assume every trace trains
(2% held out gave Config A 234 steps). Pass `--config.sft.eval_fraction=0.02` to watch an eval loss
at the cost of those steps.

The study states the batch (32) only for Configs A and B; the v1-v3 batches are the ones that give
its step counts with a partial last batch dropped per epoch. 861 / 32 gives 26 steps per epoch, so
v4 runs a fixed 53 steps (two passes and one batch of a third), which is the study's count.

Data: `sft.train_files` are read from `data.dir`: `traces.jsonl` is the output of
configs/distill.py (rows carry their `source`; v1/v2 keep the OlympiadBench ones), `openr1.jsonl`
is OpenR1-Math-220k in the jaxmath schema (rows with `traces`; `python -m jaxmath.data.datasets --out DIR`
writes it into DIR with the other data files, not beside traces.jsonl: launch/sweep.py links both into
the v3 job's own data folder; run alone, v3 needs a data.dir holding both, e.g. links to each).
The study did not publish its v3 mix or the v4 length cut. v3 here is 5,400 documents
(`sft.max_documents`): every custom trace (3,825 in the study), then OpenR1 traces in file order up
to 5,400 (1,575 at the study's count), unfiltered: the study blames v3's regression on OpenR1's long
traces (median ~7,300 characters), and its <4,000-character filter, which kept 9.4% of OpenR1, was a
separate try (`--config.sft.max_trace_chars=4000`, which also cuts custom traces). v4 keeps custom
traces under 1,200 characters; the run log prints the document count, compare it with the table
and adjust `sft.max_trace_chars`.
"""

import ml_collections

from jaxmath.config import defaults

# Tinker's settings the study leaves unstated, shared by every row (sources in configs/grpo_common.py).
TINKER = {"optimizer.eps": 1e-12, "optimizer.max_grad_norm": 0.0, "lora.alpha": 32.0}

# What each row sets on top of the sweep's shared settings (keys as in --config.<key>=...).
ROWS = {
    "v1": {"optimizer.learning_rate": 2e-5, "sft.epochs": 3, "sft.batch_size": 128,
           "sft.train_sources": "olympiadbench"},
    "v2": {"optimizer.learning_rate": 5e-4, "sft.epochs": 3, "sft.train_sources": "olympiadbench"},
    "v3": {"optimizer.learning_rate": 5e-4, "sft.epochs": 2, "sft.batch_size": 64,
           "sft.train_files": "traces.jsonl,openr1.jsonl", "sft.max_documents": 5400},
    "v4": {"optimizer.learning_rate": 5e-4, "sft.epochs": 2, "steps": 53, "sft.max_trace_chars": 1200},
    "a": {"sft.epochs": 2},  # the SFT defaults are Config A's (jaxmath.sft.SFTConfig)
    "b": {"optimizer.learning_rate": 5e-4},
}


def get_config(arg: str = "a") -> ml_collections.ConfigDict:
    if arg not in ROWS:
        raise ValueError(f"unknown SFT sweep row {arg!r}; choose one of {sorted(ROWS)} (configs/sft_sweep.py:v1)")
    config = defaults("sft")
    config.workdir = f"runs/sft_{arg}"
    config.checkpoint_every = 20
    config.data.dir = "runs/distill"  # where configs/distill.py writes the traces
    config.sft.train_files = "traces.jsonl"
    config.sft.micro_batch_size = 4  # gradient accumulation: batch_size / micro_batch_size micro-batches
    config.update_from_flattened_dict(TINKER)
    config.update_from_flattened_dict(ROWS[arg])
    config.lock()
    return config
