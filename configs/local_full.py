"""Local full-parameter GRPO (study Tables 3 and 8): MATH levels 4-5, lr 5e-6, K=8, 2,048 tokens,
2 epochs = 998 steps, all 4.0B parameters (bf16 weights with an fp32 master copy in the optimizer).
The study ran it with TRL + vLLM colocate on one H100 in 13 h. Study result: MATH-500 87.8%.

    python -m jaxmath.main --config=configs/local_full.py --config.model.path=/models/Qwen3-4B-Instruct-2507 \
        --config.data.dir=data --workdir=runs/local_full
"""

from jaxmath.config import config_module


def get_config():
    c = config_module(__file__, "grpo_common").study_row("local_full", learning_rate=5e-6)
    c.steps = 998
    c.data.train = "math_train_hard"
    c.lora.rank = 0  # full-parameter training
    c.optimizer.master_fp32 = True
    c.eval.max_new_tokens = 2048  # evaluate at the training budget
    c.lock()
    return c
