"""GRPO v1 (study Table 3): all of MATH train, lr 4e-5, K=16, 2,048 completion tokens, ~1 epoch,
LoRA rank 64. Study result: MATH-500 85.2%.

    python -m jaxmath.main --config=configs/grpo_v1.py --config.model.path=/models/Qwen3-4B-Instruct-2507 \
        --config.data.dir=data --workdir=runs/grpo_v1

937 steps of 8 prompts = one pass over the 7,498 answered MATH train problems.
"""

from jaxmath.config import config_module


def get_config():
    c = config_module(__file__, "grpo_common").study_row("grpo_v1", learning_rate=4e-5)
    c.steps = 937
    c.rl.num_generations = 16
    c.eval.max_new_tokens = 2048  # evaluate at the training budget
    c.lock()
    return c
