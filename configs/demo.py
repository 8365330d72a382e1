"""The embedded default: a tiny Qwen3 trained from scratch on seeded additions (12+5=) with a built-in
character tokenizer. An SFT warm-up on a flawed teacher (it boxes only 30% of its answers), then
GRPO with the `\\boxed{}` reward, then a table of held-out greedy accuracy after each phase. Runs on a
laptop CPU in minutes; nothing is downloaded.

    python -m jaxmath.main --config=configs/demo.py --workdir=runs/demo
    python -m jaxmath.main --config=configs/demo.py --config.steps=3 --workdir=/tmp/demo_smoke   # ~1 minute

`steps` counts GRPO steps; the SFT warm-up scales with it. Outputs: runs/demo/demo_results.json,
metrics.jsonl (one line per GRPO step), plots/*.png, checkpoints/, sft/.
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.mode = "demo"
    c.seed = 0
    c.steps = 60
    c.checkpoint_every = 20
    c.workdir = "runs/demo"

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = 1
    c.mesh.tp = 1

    c.demo = ml_collections.ConfigDict()
    c.demo.digits = 2
    c.demo.second_digits = 1
    c.demo.boxed_fraction = 0.3  # the flawed teacher boxes 30% of its answers
    c.demo.num_eval = 200
    c.demo.hidden_size = 128
    c.demo.intermediate_size = 384
    c.demo.num_layers = 3
    c.demo.num_heads = 4
    c.demo.num_kv_heads = 2
    c.demo.head_dim = 32
    c.demo.sft_steps = 200
    c.demo.min_sft_steps = 20
    c.demo.default_steps = 60
    c.demo.sft_batch_size = 64
    c.demo.sft_learning_rate = 3e-3
    c.demo.max_new_tokens = 12

    c.rl = ml_collections.ConfigDict()
    c.rl.prompts_per_step = 16
    c.rl.num_generations = 8
    c.rl.max_prompt_tokens = 16
    c.rl.max_completion_tokens = 12
    c.rl.temperature = 1.0
    c.rl.eval_every = 20
    c.rl.plot_every = 20
    c.rl.prompt_bucket = 8
    c.rl.warn_zero_std = 1.0

    c.loss = ml_collections.ConfigDict()
    c.loss.loss_agg = "seq_mean_token_mean"
    c.loss.logprob_chunk = 256

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 1e-4
    c.optimizer.schedule = "constant"
    c.optimizer.max_grad_norm = 1.0
    c.lock()
    return c
