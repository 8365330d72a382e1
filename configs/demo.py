"""The embedded default: does reinforcement learning beat imitation on correctness, on the same budget?

A tiny Qwen3 (2 layers, hidden 64) learns two-digit addition from scratch, written as a worked
solution that ends in `\\boxed{}` (47+85= -> `7+5=12 4+8+1=13 \\boxed{132}`), from a teacher whose
traces are always boxed but forget a carry 10% of the time, and 70% of the time when it must ripple
on. Two arms from the same initialization, the same number of optimizer steps: SFT on the teacher's
traces for 400 steps, and the same SFT for 300 steps followed by 100 steps of GRPO with the study's
boxed reward. Held-out greedy accuracy of both, graded by the boxed reward and format-blind (the last
number), with 95% intervals and unboxed rates, is printed as a table. CPU, a few minutes, nothing
downloaded. jaxmath.demo and jaxmath.data.demo_task say more; docs/DEMO.md has three seeds.

    python -m jaxmath.main --config=configs/demo.py --workdir=runs/demo
    python -m jaxmath.main --config=configs/demo.py --config.steps=3 --workdir=/tmp/demo_smoke   # smoke run

`steps` counts the GRPO arm's GRPO steps; the shared SFT prefix is demo.sft_steps at steps=100 and
scales with steps (at least demo.min_sft_steps), and the SFT arm trains prefix + steps. Outputs:
runs/demo/demo_results.json, held_out.jsonl, plots/demo_accuracy.png, plots/demo_unboxed.png,
sft/ (the SFT run, continued as the SFT arm), branch/ (the weights where the arms split) and grpo/
(the GRPO run's metrics.jsonl, plots and checkpoints). Rerunning the command reuses finished work.
"""

from jaxmath.config import defaults


def get_config():
    c = defaults("demo")  # the task, model and SFT budget are jaxmath.demo.DemoConfig's defaults
    c.checkpoint_every = 20
    c.workdir = "runs/demo"
    c.mesh.fsdp = 1  # one device: the demo model is too small to shard
    c.rl.max_prompt_tokens = 16
    c.rl.max_completion_tokens = 28  # also the held-out evaluation's budget; solutions take 21 tokens
    c.rl.filter_groups = True  # train on groups whose rewards differ, drawn from twice as many prompts
    c.rl.oversample = 2.0
    c.rl.eval_every = 10
    c.rl.plot_every = 0  # grpo/plots/ is written once, at the end
    c.rl.prompt_bucket = 8
    c.rl.warn_zero_std = 1.0
    c.loss.logprob_chunk = 256
    c.optimizer.learning_rate = 2e-4
    c.optimizer.schedule = "linear"  # to 0 at the last step, as the SFT arm's schedule does
    c.lock()
    return c
