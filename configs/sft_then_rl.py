"""SFT -> RL (study Table 4): GRPO v1's recipe started from the SFT model instead of the base.
Run SFT first (configs/sft_config_a.py); it merges its LoRA into the base and exports an HF folder
to <sft workdir>/export, which becomes this run's model; GRPO then trains a fresh LoRA on it.
Study result: MATH-500 85.4% (direct RL: 85.2%), i.e. no benefit from the warm start.

    python -m jaxmath.main --config=configs/sft_config_a.py --config.model.path=/models/Qwen3-4B-Instruct-2507 \
        --config.data.dir=runs/distill --workdir=runs/sft_a
    python -m jaxmath.main --config=configs/sft_then_rl.py --config.model.path=runs/sft_a/export \
        --config.data.dir=data --workdir=runs/sft_then_rl
"""

from jaxmath.config import config_module


def get_config():
    c = config_module(__file__, "grpo_v1").get_config()  # locked: existing keys change, none can be added
    c.workdir = "runs/sft_then_rl"
    c.model.path = "runs/sft_a/export"
    return c
