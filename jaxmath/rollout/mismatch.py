"""How far the rollout engine's logprobs are from the trainer's.

The engine (vLLM, or the JAX sampler under a different kernel or dtype) samples with its own
numerics; the trainer recomputes logprobs of the same tokens. GRPO's ratio assumes both are the same
policy. Their gap is logged every step (PEERS.md: trl#4159, verl#6280); the truncated IS
correction itself is `jaxmath.rl.grpo.tis_weights`.

Plain numpy on host arrays: the loop logs host scalars.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def logprob_mismatch(engine_logprobs: Any, trainer_logprobs: Any, mask: Any) -> dict[str, float]:
    """Statistics of trainer - engine logprobs over the tokens in `mask`.

    engine_logprobs, trainer_logprobs: [rows, completion_len] float (logprobs of the sampled tokens)
    mask:                              [rows, completion_len] bool (completion_mask)

    Returns (floats, named for the metrics log):
      mismatch/abs_mean, mismatch/abs_max: |trainer - engine| per token
      mismatch/ratio_mean, _min, _max, _std:         importance ratio exp(trainer - engine) per token
      mismatch/kl_k3:                                 k3 estimate of KL(engine || trainer), >= 0
      mismatch/seq_ratio_mean:                        exp(sum over the sequence of trainer - engine)
      mismatch/seq_min_ratio_median:                  the median over completions of each completion's
                                                      smallest per-token ratio (the early-stop signal:
                                                      an outlier token moves one completion's minimum,
                                                      never the median of them)
      mismatch/tokens:                                number of tokens compared
    A zero-learning-rate run with a faithful engine has ratios ~1 and differences ~0.
    """
    engine = np.asarray(engine_logprobs, np.float64)
    trainer = np.asarray(trainer_logprobs, np.float64)
    mask = np.asarray(mask, bool)
    if not engine.shape == trainer.shape == mask.shape:
        raise ValueError(f"engine logprobs {engine.shape}, trainer logprobs {trainer.shape} and mask {mask.shape} "
                         "must have the same [rows, completion_len] shape; pass rollout.logprobs, the trainer's "
                         "logprobs of rollout.completion_ids and rollout.completion_mask")
    n = int(mask.sum())
    if n == 0:
        return {"mismatch/tokens": 0.0}
    diff = (trainer - engine)[mask]
    # Clipped before exp so one wild token cannot overflow the statistics; e^30 is already absurd.
    log_ratio = np.clip(diff, -30.0, 30.0)
    ratio = np.exp(log_ratio)
    seq_log_ratio = np.clip(np.where(mask, trainer - engine, 0.0).sum(axis=1), -30.0, 30.0)
    rows = mask.any(axis=1)
    seq_min = np.exp(np.where(mask, np.clip(trainer - engine, -30.0, 30.0), np.inf).min(axis=1))[rows]
    return {
        "mismatch/abs_mean": float(np.abs(diff).mean()),
        "mismatch/abs_max": float(np.abs(diff).max()),
        "mismatch/ratio_mean": float(ratio.mean()),
        "mismatch/ratio_min": float(ratio.min()),
        "mismatch/ratio_max": float(ratio.max()),
        "mismatch/ratio_std": float(ratio.std()),
        # k3 = r - 1 - log r with r = p_trainer / p_engine: unbiased for KL(engine || trainer) under
        # engine samples, and never negative per token (Schulman's estimator).
        "mismatch/kl_k3": float((ratio - 1.0 - log_ratio).mean()),
        "mismatch/seq_ratio_mean": float(np.exp(seq_log_ratio[rows]).mean()),
        "mismatch/seq_min_ratio_median": float(np.median(seq_min)),
        "mismatch/tokens": float(n),
    }

