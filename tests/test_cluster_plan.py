"""`python -m jaxmath.bench cluster`: a GRPO train step compiled for 8 and 16 H100s at once (deviceless),
its memory per GPU. On a tiny model: the mesh spans the GPUs, each holds its share of the parameters and
optimizer state (half as much on 16 as on 8), the program keeps cuDNN attention, and a GPU count that
does not fill whole hosts is refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jaxmath.aot import targets

ROOT = Path(__file__).resolve().parents[1]
needs_plugin = pytest.mark.skipif(not targets.plugin_installed(),
                                  reason="JAX's CUDA plugin is not installed (pip install -e '.[aot]')")


def _cluster(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "jaxmath.bench", "cluster", "--config=configs/local_full.py", "--target=h100",
           "--preset=tiny", "--config.rl.max_completion_tokens=64", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.mark.aot
@pytest.mark.slow
@needs_plugin
def test_train_step_compiled_for_8_and_16_h100s():
    results = {}
    for devices in (8, 16):
        # The step's 64 rows as one micro-batch: on 16 GPUs a step that accumulates micro-batches does
        # not compile with cuDNN attention (docs/SCALING.md, "Cluster plans").
        out = _cluster(f"--devices={devices}", "--micro_batch_rows=64")
        assert out.returncode == 0, out.stderr[-3000:]
        results[devices] = json.loads(out.stdout.strip().splitlines()[-1])
    for devices, r in results.items():
        assert r["mesh"] == {"data": 1, "fsdp": devices, "tp": 1} and r["attention"] == "cudnn"
        assert r["lora_rank"] == 0 and r["micro_batch_rows"] == r["step_rows"] == 64
        assert r["peak_bytes_per_device"] > r["arguments_bytes"] > 0
    # Parameters and optimizer state split over twice the GPUs: half per GPU (less what stays whole).
    assert 0.45 < results[16]["arguments_bytes"] / results[8]["arguments_bytes"] < 0.6


@needs_plugin
def test_a_gpu_count_that_does_not_fill_hosts_is_refused():
    out = _cluster("--devices=12")
    assert out.returncode != 0 and "--devices=12 must be a multiple of 8" in out.stderr
