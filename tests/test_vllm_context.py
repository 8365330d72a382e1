"""vLLM's context window from the request (no vllm import): `fit_context` sizes vllm.max_model_len to
the run's longest request and refuses, naming max_position_embeddings, what the model cannot hold;
`sections.longest_request` reads that request off each config that can use vLLM."""

import json
from pathlib import Path

import pytest

from jaxmath import sections
from jaxmath.config import ConfigError, build, load_config
from jaxmath.model.lora import LoRAConfig
from jaxmath.rollout.vllm.config import VLLMConfig, fit_context, model_positions

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _model(tmp_path, positions):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3", "max_position_embeddings": positions}))
    return str(tmp_path)


def test_zero_fits_the_longest_request(tmp_path):
    config = fit_context(VLLMConfig(model_path=_model(tmp_path, 262144)), 6144)
    assert config.max_model_len == 6144 and model_positions(config.model_path) == 262144


def test_a_model_too_short_is_one_line_naming_its_positions(tmp_path):
    what = "eval.max_prompt_tokens + eval.max_new_tokens = 2048 + 4096"
    with pytest.raises(ConfigError) as error:
        fit_context(VLLMConfig(model_path=_model(tmp_path, 1024)), 6144, what)
    message = str(error.value)
    assert "\n" not in message and "max_position_embeddings=1024" in message and what in message


def test_an_explicit_window_is_checked_both_ways(tmp_path):
    path = _model(tmp_path, 4096)
    assert fit_context(VLLMConfig(model_path=path, max_model_len=3000), 2000).max_model_len == 3000
    with pytest.raises(ConfigError, match="vllm.max_model_len=1000 is below"):
        fit_context(VLLMConfig(model_path=path, max_model_len=1000), 2000)
    with pytest.raises(ConfigError, match="vllm.max_model_len needs 8192 tokens .* max_position_embeddings=4096"):
        fit_context(VLLMConfig(model_path=path, max_model_len=8192), 2000)


def test_a_hub_id_is_left_to_vllm():
    config = fit_context(VLLMConfig(model_path="Qwen/Qwen3-4B-Instruct-2507"), 5000)
    assert config.max_model_len == 5000


RUNNABLE = sorted(p.stem for p in CONFIGS.glob("*.py") if "def get_config" in p.read_text())


@pytest.mark.parametrize("name", RUNNABLE)
def test_every_config_that_can_use_vllm_has_the_section(name, tmp_path):
    """... and its vllm settings fit its requests on Qwen3-4B-Instruct-2507's 262,144 positions."""
    config = load_config(str(CONFIGS / f"{name}.py"))
    can_use_vllm = config.mode in ("eval", "grpo")  # eval.backend=vllm / rollout.engine=vllm
    assert ("vllm" in config) == can_use_vllm, name
    if can_use_vllm:
        tokens, what = sections.longest_request(config)
        assert tokens > 0 and "max_prompt_tokens" in what
        config.model.path = _model(tmp_path, 262144)
        lora = build(LoRAConfig, config.lora, prefix="lora") if "lora" in config else None
        assert sections.vllm_config(config, lora).max_model_len >= tokens


def test_longest_request_of_the_eval_config():
    config = load_config(str(CONFIGS / "eval.py"))
    assert sections.longest_request(config)[0] == config.eval.max_prompt_tokens + config.eval.max_new_tokens == 6144
