"""The memory plan's Table 10 sweep (`python -m jaxmath.bench memory --sweep`): its weight and optimizer
bytes against a hand calculation for Qwen3-4B, and the compiled breakdown's shape and JSON keys. The
per-phase report of a run is tested in tests/test_aot.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

from jaxmath.bench import memory
from jaxmath.model import preset

ROOT = Path(__file__).resolve().parents[1]
PARAMS_4B = 4_022_468_096  # DESIGN.md / paper_summary.md
LORA_R64 = 132_120_576  # rank 64 on all seven projections of the 36 layers
COUNTERS = 64  # Adam's and the schedule's int32 step counters: a few bytes, not a per-parameter cost


def _4b():
    return preset("qwen3-4b", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)


def test_lora_r64_state_bytes_match_hand_calculation():
    got = memory.state_bytes(_4b(), lora_rank=64, master_fp32=False)
    assert got["trainable_params"] == LORA_R64
    # bf16 base weights (8,044,936,192 bytes) plus float32 adapters (as PEFT keeps them).
    assert got["weights"] == 2 * PARAMS_4B + 4 * LORA_R64 == 8_044_936_192 + 528_482_304
    # Adam's two moments in the adapters' dtype (float32), no master: 8 bytes per parameter.
    assert 0 <= got["optimizer"] - 2 * 4 * LORA_R64 <= COUNTERS, got["optimizer"]
    assert got["gradients"] == 4 * LORA_R64  # the float32 accumulator


def test_full_parameter_state_bytes_match_hand_calculation():
    got = memory.state_bytes(_4b(), lora_rank=0, master_fp32=True)
    assert got["trainable_params"] == PARAMS_4B
    assert got["weights"] == 8_044_936_192
    # fp32 master (4) + bf16 first and second moments (2 + 2) = 8 bytes per parameter: 32.2 GB,
    # and the bf16 gradient accumulator: 8.0 GB (docs/PRECISION.md).
    assert 0 <= got["optimizer"] - 8 * PARAMS_4B <= COUNTERS, got["optimizer"]
    assert got["gradients"] == 2 * PARAMS_4B
    without_master = memory.state_bytes(_4b(), lora_rank=0, master_fp32=False)
    assert 0 <= without_master["optimizer"] - 2 * 2 * PARAMS_4B <= COUNTERS  # bf16 moments


@pytest.mark.slow  # compiles the train step
def test_memory_report_on_a_tiny_model_compiles_the_step(capsys):
    out = memory.main(["--config=configs/grpo_v2.py", "--sweep", "--preset=tiny", "--methods=lora_r64", "--ks=2",
                       "--tokens=16", "--no_sft"])
    assert list(out) == ["lora_r64/2x16"]
    row = out["lora_r64/2x16"]
    assert set(row) == set(memory.FIELDS)
    assert row["activations"] > 0 and row["kv_cache"] > 0
    assert row["peak"] >= row["weights"] + row["optimizer"] + row["gradients"]
    printed = capsys.readouterr().out
    assert "| peak |" in printed and "| fits cpu" in printed and "study full" in printed


@pytest.mark.slow
def test_memory_report_for_4b_cli_last_line_is_json():
    cmd = [sys.executable, "-m", "jaxmath.bench", "memory", "--config=configs/grpo_v2.py", "--sweep",
           "--preset=qwen3-4b", "--methods=lora_r64", "--ks=8", "--tokens=2048", "--no_sft"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    row = result["lora_r64/8x2048"]
    assert row["weights"] == 2 * PARAMS_4B + 4 * LORA_R64
    assert 0 <= row["optimizer"] - 8 * LORA_R64 <= COUNTERS
    # The rollout cache of 8 prompts + 64 rows x 3,072 slots: 36 layers x 8 kv heads x 128 x bf16 x (k, v).
    assert row["kv_cache"] == 2 * 36 * (8 + 64) * 3072 * 8 * 128 * 2
    assert row["weights"] < row["peak"] < 141e9
