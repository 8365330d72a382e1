"""The study's SFT sweep (Table 12): every row is LoRA rank 64 on all seven projections, Adam
beta1 0.9 / beta2 0.95, max sequence 4,096, loss on assistant tokens only, linear decay to 0.

    python -m jaxmath.main --config=configs/sft_sweep.py:v2 --config.model.path=/models/Qwen3-4B-Instruct-2507 \
        --config.data.dir=runs/distill --workdir=runs/sft_v2

| row | data                               | lr    | epochs | steps | batch (inferred)      |
|-----|------------------------------------|-------|--------|-------|-----------------------|
| v1  | 390 OlympiadBench traces           | 2e-5  | 3      | 9     | 128 (390 // 128 = 3)  |
| v2  | 390 OlympiadBench traces           | 5e-4  | 3      | 36    | 32 (390 // 32 = 12)   |
| v3  | 5.4k custom + OpenR1               | 5e-4  | 2      | 168   | 64 (5,400 // 64 = 84) |
| v4  | 861 short custom traces            | 5e-4  | 2      | 53    | 32, steps fixed at 53 |
| a   | 3,825 custom traces (Config A)     | 2e-4  | 2      | 238   | 32 (the study's)      |
| b   | 3,825 custom traces (Config B)     | 5e-4  | 1      | 119   | 32                    |

The study states the batch (32) only for Configs A and B; the v1-v3 batches are the ones that give
its step counts with a partial last batch dropped per epoch. 861 / 32 gives 26 steps per epoch, so
v4 runs a fixed 53 steps (two passes and one batch of a third), which is the study's count.

Data: `sft.train_files` are read from `data.dir`: `traces.jsonl` is the output of
configs/distill.py (rows carry their `source`; v1/v2 keep the OlympiadBench ones), `openr1.jsonl`
is OpenR1-Math-220k in the jaxmath schema (`python -m jaxmath.data.datasets`; rows with `traces`).
The study did not publish its v3 mix or the v4 length cut: v3 here is all custom traces plus OpenR1
traces under 4,000 characters (the filter the study mentions), v4 keeps custom traces under 1,200
characters; the run log prints the document count, compare it with the table and adjust
`sft.max_trace_chars`.
"""

import ml_collections

ROWS = {
    # name: (learning_rate, epochs, steps, batch_size, train_files, train_sources, max_trace_chars)
    "v1": (2e-5, 3, 0, 128, "traces.jsonl", "olympiadbench", 0),
    "v2": (5e-4, 3, 0, 32, "traces.jsonl", "olympiadbench", 0),
    "v3": (5e-4, 2, 0, 64, "traces.jsonl,openr1.jsonl", "", 4000),
    "v4": (5e-4, 2, 53, 32, "traces.jsonl", "", 1200),
    "a": (2e-4, 2, 0, 32, "traces.jsonl", "", 0),
    "b": (5e-4, 1, 0, 32, "traces.jsonl", "", 0),
}


def get_config(arg: str = "a") -> ml_collections.ConfigDict:
    if arg not in ROWS:
        raise ValueError(f"unknown SFT sweep row {arg!r}; choose one of {sorted(ROWS)} (configs/sft_sweep.py:v1)")
    lr, epochs, steps, batch, files, sources, max_chars = ROWS[arg]
    config = ml_collections.ConfigDict()
    config.mode = "sft"
    config.seed = 0
    config.workdir = f"runs/sft_{arg}"
    config.steps = steps  # 0: sft.epochs passes over the data
    config.checkpoint_every = 20

    config.model = ml_collections.ConfigDict()
    config.model.path = ""  # HF-format Qwen3-4B-Instruct-2507 (config.json, safetensors, tokenizer files)
    config.model.preset = ""
    config.model.dtype = "bfloat16"
    config.model.param_dtype = ""
    config.model.remat = "full"
    # "" = auto: cuDNN attention on a GPU (1.5x the SFT step of XLA's on an H200, docs/BENCHMARKS.md),
    # XLA on a CPU.
    config.model.attention_impl = ""

    config.data = ml_collections.ConfigDict()
    config.data.dir = "runs/distill"  # where the trace files are

    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = 1
    config.mesh.fsdp = -1
    config.mesh.tp = 1

    config.sft = ml_collections.ConfigDict()
    config.sft.train_files = files
    config.sft.train_sources = sources  # empty: every row; else only rows whose `source` is listed
    config.sft.max_trace_chars = max_chars
    config.sft.batch_size = batch
    config.sft.micro_batch_size = 4  # gradient accumulation: batch_size / micro_batch_size micro-batches
    config.sft.max_seq_len = 4096
    config.sft.pack = False  # the study trained on one trace per sequence; True packs (fewer, fuller rows)
    config.sft.epochs = epochs
    config.sft.eval_fraction = 0.02
    config.sft.eval_every = 20
    config.sft.keep_last = 2
    config.sft.log_every = 1
    config.sft.chunk_size = 1024
    config.sft.remat = True
    config.sft.export = True  # runs/sft_<row>/export: merged HF model for eval or configs/sft_then_rl.py

    config.lora = ml_collections.ConfigDict()
    config.lora.rank = 64
    config.lora.alpha = 128.0
    config.lora.targets = "(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.learning_rate = lr
    config.optimizer.schedule = "warmup_linear"  # linear decay to end_lr_ratio * lr = 0
    config.optimizer.warmup_steps = 0
    config.optimizer.end_lr_ratio = 0.0
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.95
    config.optimizer.weight_decay = 0.0
    config.optimizer.max_grad_norm = 1.0
    config.optimizer.master_fp32 = False

    config.lock()
    return config
