"""Local full-parameter GRPO (study Tables 3 and 8): MATH levels 4-5, lr 5e-6, K=8, 2,048 tokens,
2 epochs = 998 steps, all 4.0B parameters (bf16 weights with an fp32 master copy in the optimizer).
The study ran it with TRL + vLLM colocate on one H100 in 13 h. Study result: MATH-500 87.8%.

    python -m jaxmath.main --config=configs/local_full.py --config.model.path=/models/Qwen3-4B-Instruct-2507 \
        --config.data.dir=data --workdir=runs/local_full
"""

from configs import grpo_common


def get_config():
    c = grpo_common.get_config(data="math_train_hard", lr=5e-6, num_generations=8, max_tokens=2048, steps=998,
                               lora_rank=0, name="local_full")
    c.lock()
    return c
