"""SFT -> RL (study Table 4): GRPO v1's recipe started from the SFT model instead of the base.
Run SFT first (configs/sft_config_a.py); it merges its LoRA into the base and exports an HF folder
to <sft workdir>/export, which becomes this run's model; GRPO then trains a fresh LoRA on it.
Study result: MATH-500 85.4% (direct RL: 85.2%), i.e. no benefit from the warm start.

    python -m jaxmath.main --config=configs/sft_config_a.py --config.model.path=/models/Qwen3-4B-Instruct-2507 \
        --config.data.dir=runs/distill --workdir=runs/sft_a
    python -m jaxmath.main --config=configs/sft_then_rl.py --config.model.path=runs/sft_a/export \
        --config.data.dir=data --workdir=runs/sft_then_rl
"""

from configs import grpo_common


def get_config():
    c = grpo_common.get_config(data="math_train", lr=4e-5, num_generations=16, max_tokens=2048, steps=937,
                               name="sft_then_rl")
    c.model.path = "runs/sft_a/export"
    c.lock()
    return c
