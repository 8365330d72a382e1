"""SFT Config A (the study's Table 2): LoRA rank 64 on all attention and MLP projections, lr 2e-4 with
linear decay to 0, batch 32, 2 epochs (238 steps over 3,825 traces), max sequence 4,096, Adam
beta1 0.9 / beta2 0.95, loss on assistant tokens only; what the study leaves unstated is Tinker's,
where it ran (eps 1e-12, no clipping, LoRA alpha 32: configs/sft_sweep.py). MATH-500 77.2% in the
study (baseline 79.4%).

    python -m jaxmath.main --config=configs/distill.py --config.distill.endpoint=http://HOST:8000/v1
    python -m jaxmath.main --config=configs/sft_config_a.py --config.model.path=/models/Qwen3-4B-Instruct-2507 \
        --config.data.dir=runs/distill --workdir=runs/sft_a

The merged model is written to runs/sft_a/export (HF format), ready for configs/eval.py or as
`model.path` of configs/sft_then_rl.py. The sweep's shared settings are in configs/sft_sweep.py.
"""

from jaxmath.config import config_module


def get_config():
    return config_module(__file__, "sft_sweep").get_config("a")
