"""Local LoRA GRPO (study Tables 3 and 8): MATH levels 4-5, lr 4e-5, K=8, 2,048 tokens, LoRA rank 64,
run to step 100 as the study ran it, with checkpoints and MATH-500 evaluations at steps 50 and 100.
The study reports both: step 50 (~0.1 epoch; MATH-500 87.2%, its Table 4 row) and step 100 (86.0%,
its evidence of overfitting). By step 50 it saw reward ~0.95, gradient norms ~1e-7 and the importance
ratio ~0.1 (section 5.5), and it recommends early stopping on such signals; it did not stop its own run.

The learning rate follows TRL's linear schedule over a run planned as local_full's two epochs (998
steps), stopped at 100 (lr 4e-5 at step 0, 3.6e-5 at step 100): the study gives the run "LR = 4e-5"
throughout, which a decay to 0 over 100 steps would halve by step 50 (docs/STUDY.md).

Early stopping on the three signals is an option, off here as in the study's run:
`--config.rl.early_stop_reward=0.95 --config.rl.early_stop_grad_norm=1e-7 --config.rl.early_stop_ratio=0.1`
stops after 3 consecutive steps of any one (`rl.early_stop_patience`; the ratio is each completion's
smallest engine/trainer ratio, the median over the step's completions: `jaxmath.rl.loop.GRPOConfig`).

    python -m jaxmath.main --config=configs/local_lora.py --config.model.path=/models/Qwen3-4B-Instruct-2507 \
        --config.data.dir=data --workdir=runs/local_lora
"""

from jaxmath.config import config_module


def get_config():
    c = config_module(__file__, "grpo_common").study_row("local_lora", learning_rate=4e-5)
    c.data.train = "math_train_hard"
    # checkpoints every 50 steps and 100 steps in all (both the defaults): steps 50 and 100
    c.rl.eval_every = 50
    c.rl.keep_best = 2  # both evaluated checkpoints stay; the sweep exports the better (launch/sweep.py)
    c.optimizer.total_steps = 998  # TRL's linear decay over the planned two epochs, stopped at step 100
    c.eval.max_new_tokens = 2048  # evaluate at the training budget
    c.lock()
    return c
