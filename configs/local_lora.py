"""Local LoRA GRPO (study Tables 3 and 8): MATH levels 4-5, lr 4e-5, K=8, 2,048 tokens, LoRA rank 64.
The study's best checkpoint was step 50 (~0.1 epoch; MATH-500 87.2%); by step 100 it overfit
(86.0%), with reward ~0.95, gradient norms ~1e-7 and the importance ratio ~0.1. This config runs
100 steps (the default), evaluates on MATH-500 every 10 and keeps the best two checkpoints, and
stops early on those three saturation signals (rl.early_stop_*: reward >= 0.95, grad norm <= 1e-7, engine/trainer
ratio min <= 0.1, each for 3 steps).

    python -m jaxmath.main --config=configs/local_lora.py --config.model.path=/models/Qwen3-4B-Instruct-2507 \
        --config.data.dir=data --workdir=runs/local_lora
"""

from jaxmath.config import config_module


def get_config():
    c = config_module(__file__, "grpo_common").study_row("local_lora", learning_rate=4e-5)
    c.checkpoint_every = 10
    c.data.train = "math_train_hard"
    c.rl.eval_every = 10
    c.rl.keep_best = 2
    c.rl.early_stop_reward = 0.95  # the study's three signals (section 5.5), see jaxmath.rl.loop.GRPOConfig
    c.rl.early_stop_grad_norm = 1e-7
    c.rl.early_stop_ratio = 0.1
    c.eval.max_new_tokens = 2048  # evaluate at the training budget
    c.lock()
    return c
