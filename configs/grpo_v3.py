"""GRPO v3 (study Table 3): continues from the v2 checkpoint for 2 more epochs of MATH levels 4-5 at
lr 2e-5 (K=16, 4,096 tokens, LoRA rank 64). Study result: MATH-500 90.6%.

It starts from v2's adapters with a fresh optimizer state (the study does not say whether Tinker's
Adam moments carried over; docs/STUDY.md) and with seed 1, so its two epochs (the study's third and
fourth) visit the problems in orders of their own instead of replaying v2's (seed 0).

    python -m jaxmath.main --config=configs/grpo_v3.py --config.model.path=/models/Qwen3-4B-Instruct-2507 \
        --config.init.checkpoint=runs/grpo_v2 --config.data.dir=data --workdir=runs/grpo_v3
"""

from jaxmath.config import config_module


def get_config():
    c = config_module(__file__, "grpo_common").study_row("grpo_v3", learning_rate=2e-5)
    c.steps = 998
    c.seed = 1  # epochs 3 and 4: orders of their own, not v2's replayed
    c.init.checkpoint = "runs/grpo_v2"
    c.data.train = "math_train_hard"
    c.rl.num_generations = 16
    c.rl.max_completion_tokens = 4096
    c.lock()
    return c
