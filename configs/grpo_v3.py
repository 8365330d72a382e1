"""GRPO v3 (study Table 3): continues from the v2 checkpoint for 2 more epochs of MATH levels 4-5 at
lr 2e-5 (K=16, 4,096 tokens, LoRA rank 64; fresh optimizer state). Study result: MATH-500 90.6%.

    python -m jaxmath.main --config=configs/grpo_v3.py --config.model.path=/models/Qwen3-4B-Instruct-2507 \
        --config.init.checkpoint=runs/grpo_v2 --config.data.dir=data --workdir=runs/grpo_v3
"""

from jaxmath.config import config_module


def get_config():
    c = config_module(__file__, "grpo_common").study_row("grpo_v3", learning_rate=2e-5)
    c.steps = 998
    c.init.checkpoint = "runs/grpo_v2"
    c.data.train = "math_train_hard"
    c.rl.num_generations = 16
    c.rl.max_completion_tokens = 4096
    c.lock()
    return c
