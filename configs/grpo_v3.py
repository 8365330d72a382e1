"""GRPO v3 (study Table 3): continues from the v2 checkpoint for 2 more epochs of MATH levels 4-5 at
lr 2e-5 (K=16, 4,096 tokens, LoRA rank 64; fresh optimizer state). Study result: MATH-500 90.6%.

    python -m jaxmath.main --config=configs/grpo_v3.py --config.model.path=/models/Qwen3-4B-Instruct-2507 \
        --config.init.checkpoint=runs/grpo_v2 --config.data.dir=data --workdir=runs/grpo_v3
"""

from configs import grpo_common


def get_config():
    c = grpo_common.get_config(data="math_train_hard", lr=2e-5, num_generations=16, max_tokens=4096, steps=998,
                               name="grpo_v3")
    c.init.checkpoint = "runs/grpo_v2"
    c.lock()
    return c
