"""Reinforcement learning: the pure GRPO math (`grpo`) and the host loop (`loop`).

`grpo` holds jittable functions only; `loop` (sample, reward, advantage, step, log, save) calls them.
"""

from jaxmath.rl.grpo import (
    Accumulated,
    Normalizer,
    combine,
    finalize,
    group_advantages,
    group_stats,
    loss_normalizer,
    policy_loss,
    select_groups,
)

__all__ = [
    "Accumulated",
    "Normalizer",
    "combine",
    "finalize",
    "group_advantages",
    "group_stats",
    "loss_normalizer",
    "policy_loss",
    "select_groups",
]
