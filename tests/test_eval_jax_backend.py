"""The `jax` eval backend end to end: a tiny random Qwen3 with the real Qwen tokenizer and vocabulary,
through `evaluate(JaxSampler(...), ...)` in process and through `python -m jaxmath.main` in a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

from jaxmath.eval.run import EvalConfig, evaluate
from jaxmath.model import from_pretrained
from jaxmath.rollout.jax_sampler import JaxSampler, SamplerConfig
from jaxmath.rollout.types import FINISH_LENGTH, FINISH_STOP

from tests.conftest import DATA_DIR
from tests.tiny_qwen import write_tiny_qwen3

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """tests/tiny_qwen.py: Qwen3-4B-Instruct-2507's config at 2 layers, 64 wide, 151,936-token vocabulary."""
    return write_tiny_qwen3(tmp_path_factory.mktemp("tiny_qwen"))


def _check_results(results, workdir, benchmark, n, max_new_tokens):
    entry = results[benchmark]
    assert entry["n"] == n and 0.0 <= entry["accuracy"] <= 1.0
    assert entry["truncated"] <= n and entry["parse_failures"] <= n
    on_disk = json.loads((Path(workdir) / "eval" / "results.json").read_text())
    assert on_disk[benchmark]["n"] == n and on_disk["meta"]["engine"] == "jax"
    records = [json.loads(line) for line in (Path(workdir) / "eval" / f"completions_{benchmark}.jsonl").open()]
    assert len(records) == n
    for record in records:
        assert len(record["completions"]) == 1 and record["finish_reasons"][0] in (FINISH_STOP, FINISH_LENGTH)
        assert isinstance(record["completions"][0], str)
    return records


def test_evaluate_with_jax_sampler(tiny_dir, tmp_path):
    from transformers import AutoTokenizer

    model = from_pretrained(str(tiny_dir), dtype=jnp.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_dir))
    engine = JaxSampler(model, SamplerConfig())
    cfg = EvalConfig(benchmarks="gsm8k", data_dir=str(DATA_DIR), limit=3, max_new_tokens=16, few_shot=0,
                     temperature=0.0, progress=False)
    results = evaluate(engine, tokenizer, cfg, tmp_path, {"model": str(tiny_dir)})
    records = _check_results(results, tmp_path, "gsm8k", 3, 16)
    # The first completion is HF transformers' greedy continuation of the same prompt, decoded.
    import torch
    from transformers import AutoModelForCausalLM

    from jaxmath.data import datasets, prompts

    example = datasets.load("gsm8k", cfg.data_dir)[0]
    prompt = prompts.encode_prompts([example], tokenizer, cfg.max_prompt_tokens, few_shot=0)[0]
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)
    with torch.no_grad():
        hf_ids = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                             eos_token_id=list(prompts.stop_token_ids(tokenizer)))[0, len(prompt):].tolist()
    assert records[0]["id"] == example.id
    assert records[0]["completions"][0] == tokenizer.decode(hf_ids, skip_special_tokens=True)
    assert engine.last_stats["decode_steps"] and engine.last_stats["decode_steps"][0] <= 16


@pytest.mark.slow  # a subprocess eval, ~17 s
def test_main_eval_mode_subprocess(tiny_dir, tmp_path):
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "jaxmath.main", "--config=configs/eval.py", "--config.eval.backend=jax",
           f"--config.model.path={tiny_dir}",
           f"--config.data.dir={DATA_DIR}", "--config.eval.limit=2", "--config.eval.max_new_tokens=8",
           "--config.eval.benchmarks=gsm8k", "--config.eval.progress=False",
           f"--workdir={workdir}"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one device is enough here
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((workdir / "eval" / "results.json").read_text())
    _check_results(results, workdir, "gsm8k", 2, 8)
    assert results["meta"]["model"] == str(tiny_dir)
