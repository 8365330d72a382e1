"""GRPO v1 (study Table 3): all of MATH train, lr 4e-5, K=16, 2,048 completion tokens, ~1 epoch,
LoRA rank 64. Study result: MATH-500 85.2%.

    python -m jaxmath.main --config=configs/grpo_v1.py --config.model.path=/models/Qwen3-4B-Instruct-2507 \
        --config.data.dir=data --workdir=runs/grpo_v1

937 steps of 8 prompts = one pass over the 7,498 answered MATH train problems.
"""

from configs import grpo_common


def get_config():
    c = grpo_common.get_config(data="math_train", lr=4e-5, num_generations=16, max_tokens=2048, steps=937,
                               name="grpo_v1")
    c.lock()
    return c
