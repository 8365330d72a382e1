"""The device plan of a run whose rollouts and evaluation share the GPU with the JAX trainer
(`jaxmath.aot.colocate`): its arithmetic for Qwen3-4B by hand and against vLLM's own KV-cache block
arithmetic, its refusals, and `python -m jaxmath.main` setting JAX's allocator and vLLM's memory from
it before jax starts (a subprocess with a recording stand-in for vllm.LLM, planned for an H100)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

from jaxmath.aot import colocate
from jaxmath.aot import run as run_lib
from jaxmath.aot.targets import load_target
from jaxmath.config import ConfigError, load_config
from jaxmath.model import preset
from tests.conftest import FIXTURE_DATA_DIR

ROOT = Path(__file__).resolve().parents[1]
PARAMS_4B = 4_022_468_096
KV_TOKEN_4B = 2 * 36 * 8 * 128 * 2  # keys and values, 36 layers, 8 KV heads of 128, bf16: 147,456 bytes


def _side(**changes):
    args = dict(dtype=jnp.bfloat16, max_model_len=5120, requests=128, prompt_tokens=1024, samples=16)
    args.update(changes)
    return colocate.VLLMSide.of(preset("qwen3-4b"), **args)


def test_vllm_side_of_qwen3_4b_by_hand():
    side = _side()
    assert side.weights_bytes == 2 * PARAMS_4B
    assert side.kv_token_bytes == KV_TOKEN_4B
    assert side.kv_page_bytes == 16 * KV_TOKEN_4B // 36 == 65_536
    assert side.blocks_per_request() == 320
    # 8 prompts: each shares its 64 full prompt blocks among its 16 samples, which own the rest.
    assert side.blocks_for_all_requests() == 8 * (64 + 16 * 256)


def test_time_shared_plan_on_an_h100():
    h100 = load_target("h100")
    resident = 9_600_000_000
    plan = colocate.device_plan(h100, vllm_side=_side(), jax_resident_bytes=resident, sleep=True)
    assert plan.budget_bytes == int(80e9 * 0.9)
    # Every phase fits the budget; the rollout phase is where the KV cache takes what is left.
    assert all(plan.peak(p) <= plan.budget_bytes for p in plan.holds)
    generate = plan.holds["vllm/generate"]
    assert generate["jax/resident"] == resident and generate["vllm/weights"] == 2 * PARAMS_4B
    assert plan.peak("vllm/generate") > plan.budget_bytes - _side().block_bytes  # no whole block left over
    assert plan.kv_cache_bytes == plan.kv_cache_blocks * _side().block_bytes
    assert plan.kv_cache_rows == plan.kv_cache_blocks // 320 >= 1
    # While JAX's programs run, vLLM sleeps: no weights, no KV cache beside them.
    beside = plan.holds["jax/programs"]
    assert "vllm/weights" not in beside and "vllm/kv_cache" not in beside
    assert plan.jax_budget_bytes == plan.budget_bytes - (beside["context"] + beside["vllm/cuda_graphs"]
                                                          + beside["vllm/workspace"])
    assert plan.jax_env == {"XLA_PYTHON_CLIENT_ALLOCATOR": "platform", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    awake = plan.vllm_weights_bytes + plan.kv_cache_bytes + plan.workspace_bytes + plan.graph_bytes
    assert plan.gpu_memory_utilization == math.ceil(awake / h100.device_bytes * 1000) / 1000
    assert 0 < plan.gpu_memory_utilization < 1
    assert plan.max_num_seqs == 128


def test_static_plan_holds_both_at_once_and_preallocates_jax():
    plan = colocate.device_plan(load_target("h100"), vllm_side=_side(), jax_resident_bytes=9_600_000_000, sleep=False)
    beside = plan.holds["jax/programs"]
    assert beside["vllm/weights"] == 2 * PARAMS_4B and beside["vllm/kv_cache"] == plan.kv_cache_bytes
    assert plan.jax_env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "true"
    fraction = float(plan.jax_env["XLA_PYTHON_CLIENT_MEM_FRACTION"])
    assert fraction * plan.device_bytes <= plan.jax_budget_bytes
    # JAX's preallocation and vLLM's share fit the device together.
    assert fraction + plan.gpu_memory_utilization < 1
    shared = colocate.device_plan(load_target("h100"), vllm_side=_side(), jax_resident_bytes=9_600_000_000, sleep=True)
    assert plan.kv_cache_bytes < shared.kv_cache_bytes  # the static split leaves JAX room for its programs


def test_a_plan_that_cannot_fit_names_the_setting():
    h100 = load_target("h100")
    with pytest.raises(colocate.PlanError, match="rl.max_completion_tokens"):  # 32B weights and a 1M context
        colocate.device_plan(h100, vllm_side=colocate.VLLMSide.of(
            preset("qwen3-32b"), dtype=jnp.bfloat16, max_model_len=1 << 20, requests=8, prompt_tokens=1024, samples=8),
            jax_resident_bytes=0, sleep=True)
    with pytest.raises(colocate.PlanError, match="vllm.gpu_memory_utilization"):
        colocate.device_plan(h100, vllm_side=_side(), jax_resident_bytes=9_600_000_000, sleep=True,
                             gpu_memory_utilization=0.12)
    assert issubclass(colocate.PlanError, ConfigError)  # main reports it in one line, exit 2


def _study(name: str, *overrides: str):
    cfg = load_config(str(ROOT / "configs" / f"{name}.py"))
    for item in overrides:
        key, value = item.split("=", 1)
        section, field = key.split(".")
        cfg[section][field] = type(cfg[section][field])(value) if not isinstance(cfg[section][field], bool) \
            else value == "true"
    return cfg


@pytest.mark.parametrize("name", ["grpo_v2", "local_full", "eval"])
def test_study_configs_plan_their_colocated_vllm(name):
    cfg = _study(name)
    plan = run_lib.device_plan(cfg, load_target("h100"))
    assert plan is not None and plan.kv_cache_rows >= 1 and 0 < plan.gpu_memory_utilization < 1
    if name == "eval":  # no JAX program: vLLM alone, and all of its calls' requests fit at once
        assert plan.jax_resident_bytes == 0 and "jax/programs" not in plan.holds
    else:
        assert plan.jax_budget_bytes > plan.jax_resident_bytes
    assert run_lib.device_plan(_study(name, "vllm.mode=server", "vllm.url=http://127.0.0.1:8000"),
                               load_target("h100")) is None


# --- main applies the plan before jax starts -------------------------------------------------------

# Runs jaxmath.main with a stand-in for vllm (a GPU platform whose LLM records its arguments and ends
# the process) and records the XLA allocator settings at the moment jax creates its first backend.
_RECORDER = r'''
import importlib.machinery, json, os, sys, types
out, stop_at_jax = sys.argv[1], sys.argv[2] == "1"
record = {}
from jax._src import xla_bridge
_backends = xla_bridge.backends
KEYS = ("XLA_PYTHON_CLIENT_ALLOCATOR", "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION",
        "XLA_CLIENT_MEM_FRACTION")
def backends():
    if "env_when_jax_started" not in record:
        record["env_when_jax_started"] = {k: os.environ.get(k) for k in KEYS}
        if stop_at_jax:
            json.dump(record, open(out, "w")); os._exit(0)
    return _backends()
xla_bridge.backends = backends
class LLM:
    def __init__(self, **kwargs):
        record["llm"] = {k: v for k, v in kwargs.items() if isinstance(v, (bool, int, float, str, type(None)))}
        json.dump(record, open(out, "w")); os._exit(0)
class _Platform:
    def is_cpu(self):
        return False
vllm = types.ModuleType("vllm"); vllm.__spec__ = importlib.machinery.ModuleSpec("vllm", None); vllm.LLM = LLM
platforms = types.ModuleType("vllm.platforms"); platforms.current_platform = _Platform(); vllm.platforms = platforms
sys.modules.update({"vllm": vllm, "vllm.platforms": platforms})
from jaxmath import main
sys.argv = ["jaxmath.main"] + sys.argv[3:]
main.run()
'''


def _main_records(tmp_path, model: Path, *overrides: str, stop_at_jax: bool = False) -> dict:
    script, out = tmp_path / "recorder.py", tmp_path / "record.json"
    script.write_text(_RECORDER)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_PYTHON_CLIENT", "XLA_CLIENT"))}
    env.update(JAXMATH_PLAN_TARGET="h100", PYTHONPATH=str(ROOT))
    argv = [sys.executable, str(script), str(out), "1" if stop_at_jax else "0", "--config=configs/grpo_v2.py",
            f"--config.model.path={model}", f"--config.data.dir={FIXTURE_DATA_DIR}", f"--workdir={tmp_path / 'run'}",
            *overrides]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.is_file(), done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tests.tiny_qwen import write_tiny_qwen3

    return write_tiny_qwen3(tmp_path_factory.mktemp("tiny"))


def _expected(model: Path, *overrides: str):
    return run_lib.device_plan(_study("grpo_v2", f"model.path={model}", f"data.dir={FIXTURE_DATA_DIR}", *overrides),
                               load_target("h100"))


@pytest.mark.slow  # ~25 s: a tiny model loads in a subprocess
@pytest.mark.parametrize("sleep", [True, False], ids=["time-shared", "static"])
def test_main_sets_the_plans_allocator_and_vllm_memory_before_jax_starts(tmp_path, tiny_model, sleep):
    overrides = () if sleep else ("vllm.enable_sleep_mode=false",)
    record = _main_records(tmp_path, tiny_model, *(f"--config.{o}" for o in overrides))
    plan = _expected(tiny_model, *overrides)
    env = {k: v for k, v in record["env_when_jax_started"].items() if v is not None}
    assert env == plan.jax_env  # and no other fraction (main's 0.95 is for runs without vLLM)
    llm = record["llm"]
    assert llm["gpu_memory_utilization"] == plan.gpu_memory_utilization
    assert llm["kv_cache_memory_bytes"] == plan.kv_cache_bytes and llm["max_num_seqs"] == plan.max_num_seqs
    assert llm["enable_sleep_mode"] is sleep and llm["enforce_eager"] is False  # CUDA graphs on a GPU


@pytest.mark.slow  # ~15 s
def test_main_gives_jax_the_device_when_the_rollouts_run_on_jax(tmp_path, tiny_model):
    record = _main_records(tmp_path, tiny_model, "--config.rollout.engine=jax", stop_at_jax=True)
    env = {k: v for k, v in record["env_when_jax_started"].items() if v is not None}
    assert env == {"XLA_CLIENT_MEM_FRACTION": "0.95"}


# --- against vLLM's own block arithmetic ----------------------------------------------------------


def _vllm_kv_config(tmp_path, max_model_len: int, available: int):
    """vLLM's own KV-cache config for Qwen3-4B (36 full-attention layers, 8 KV heads of 128, bf16,
    blocks of 16 tokens) in `available` bytes, and its maximum concurrency."""
    import torch
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.attention.backends.utils import resolve_kv_cache_layout
    from vllm.v1.core import kv_cache_utils
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from tests.tiny_qwen import QWEN3_4B_INSTRUCT_2507

    (tmp_path / "config.json").write_text(json.dumps({**QWEN3_4B_INSTRUCT_2507, "torch_dtype": "bfloat16"}))
    config = EngineArgs(model=str(tmp_path), max_model_len=max_model_len, dtype="bfloat16", skip_tokenizer_init=True,
                        block_size=colocate.KV_BLOCK_TOKENS).create_engine_config()
    spec = {f"model.layers.{i}.self_attn.attn": FullAttentionSpec(
        block_size=colocate.KV_BLOCK_TOKENS, num_kv_heads=8, head_size=128, dtype=torch.bfloat16) for i in range(36)}
    resolve_kv_cache_layout(config, [["LBNHC"]], spec.values())
    kv = kv_cache_utils.get_kv_cache_config_from_groups(config, kv_cache_utils.get_kv_cache_groups(config, spec),
                                                        available)
    page = spec["model.layers.0.self_attn.attn"].page_size_bytes
    return kv, kv_cache_utils.get_max_concurrency_for_kv_cache_config(config, kv), page


@pytest.mark.vllm
@pytest.mark.parametrize("name", [pytest.param("grpo_v2", marks=pytest.mark.slow), "local_full"])
def test_kv_cache_plan_matches_vllms_block_arithmetic(tmp_path, name):
    pytest.importorskip("vllm")
    plan = run_lib.device_plan(_study(name), load_target("h100"))
    kv, concurrency, page = _vllm_kv_config(tmp_path, plan.max_model_len, plan.kv_cache_bytes)
    assert page == colocate.VLLMSide.of(preset("qwen3-4b"), dtype=jnp.bfloat16, max_model_len=plan.max_model_len,
                                        requests=1, prompt_tokens=1, samples=1).kv_page_bytes
    assert kv.num_blocks == plan.kv_cache_blocks
    assert int(concurrency) == plan.kv_cache_rows >= 1


# --- the engines a run uses, said up front ------------------------------------------------------------


def test_first_log_lines_name_the_engine_of_each_phase():
    from jaxmath import runs

    line = runs.engines_line(_study("local_lora"))
    assert line.startswith("engines: rollouts on vLLM (colocated, sleeping through the train phase); "
                           "evaluation on vLLM (colocated")
    assert "train step on JAX" in line and "--config.rollout.engine=jax" in line
    assert "rollouts on the JAX sampler" in runs.engines_line(_study("grpo_v2", "rollout.engine=jax"))
    assert runs.engines_line(_study("eval")).startswith("engines: evaluation on vLLM (colocated")
    assert "evaluation on the JAX sampler" in runs.engines_line(_study("eval", "eval.backend=jax"))


def test_a_run_on_vllm_without_vllm_stops_before_any_work(monkeypatch):
    """validate() refuses it, in one line naming the extra to install and the override to JAX."""
    import importlib.util

    from jaxmath import validate

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    for name, key in (("grpo_v2", "rollout.engine"), ("eval", "eval.backend")):
        with pytest.raises(ConfigError) as refused:
            validate.validate(_study(name, f"data.dir={FIXTURE_DATA_DIR}", f"model.path={FIXTURE_DATA_DIR}"))
        message = str(refused.value)
        assert message.startswith(f"{key}=vllm needs vLLM, which is not installed")
        assert "pip install -e '.[vllm]'" in message and f"--config.{key}=jax" in message
    validate.validate(_study("grpo_v2", "rollout.engine=jax", f"data.dir={FIXTURE_DATA_DIR}", "model.preset=tiny"))


# --- the colocated engine's phases, on a GPU platform (a stand-in for vllm.LLM) ----------------------


class _RecordingLLM:
    """What ColocatedEngine calls on vllm.LLM, recorded in order; weights arrive as (name, tensor)."""

    def __init__(self, **kwargs):
        self.kwargs, self.calls, self.weights = kwargs, [], {}
        cache = type("Cache", (), {"gpu_memory_utilization": kwargs["gpu_memory_utilization"]})
        self.llm_engine = type("Engine", (), {"vllm_config": type("V", (), {"cache_config": cache}),
                                              "model_config": type("M", (), {"dtype": "torch.float32"})})

    def sleep(self, level):
        self.calls.append(f"sleep level {level}")

    def wake_up(self, tags=None):
        self.calls.append(f"wake_up {','.join(tags)}")

    def collective_rpc(self, name, args):
        self.weights.update((n, t.numpy().copy()) for n, t in args[0])
        self.calls.append(name)

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")


@pytest.mark.slow  # 8-17 s: out of the fast subset's 10 minutes (the whole suite runs it)
def test_colocated_engine_wakes_weights_then_kv_cache_around_a_merged_lora_sync(monkeypatch):
    import importlib.machinery
    import types

    import numpy as np

    from jaxmath.model import init_model
    from jaxmath.model import lora as lora_lib
    from jaxmath.rollout.vllm import VLLMConfig, make_engine

    vllm = types.ModuleType("vllm")
    vllm.__spec__, vllm.LLM = importlib.machinery.ModuleSpec("vllm", None), _RecordingLLM
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = type("GPU", (), {"is_cpu": lambda self: False})()
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
    engine = make_engine(VLLMConfig(model_path="/m", dtype="float32", gpu_memory_utilization=0.6,
                                    kv_cache_memory_bytes=1 << 30, max_num_seqs=128))
    llm = engine._llm
    assert llm.kwargs["kv_cache_memory_bytes"] == 1 << 30 and llm.kwargs["max_num_seqs"] == 128
    assert llm.kwargs["enable_sleep_mode"] and not llm.kwargs["enforce_eager"] and "enable_lora" not in llm.kwargs

    model = init_model(preset("tiny", dtype=jnp.float32, param_dtype=jnp.float32), seed=0)
    lora_lib.apply_lora(model, lora_lib.LoRAConfig(rank=4, alpha=8))
    _, q = next((p, d) for p, d in lora_lib.projections(model) if p.endswith("q_proj"))
    q.lora_b.set_value(0.1 * jnp.ones_like(q.lora_b.get_value()))
    assert engine.sleep() and engine.wake_up()
    engine.update_weights(model)
    assert llm.calls == ["sleep level 2", "wake_up weights", "jaxmath_reload_weights", "wake_up kv_cache",
                         "reset_prefix_cache"]
    # The adapters arrive folded into the projection, in HF layout [out, in]; the model keeps them apart.
    kernel = np.asarray(q.kernel.get_value()[0], np.float32).reshape(model.config.hidden_size, -1)
    delta = np.asarray(lora_lib.lora_delta(q)[0]).reshape(model.config.hidden_size, -1)
    np.testing.assert_allclose(llm.weights["model.layers.0.self_attn.q_proj.weight"], (kernel + delta).T, rtol=1e-6)
    assert np.abs(delta).max() > 0.01 and lora_lib.has_lora(model)


# --- the done-when, for every study config (compiled for an H100) ------------------------------


@pytest.mark.aot
@pytest.mark.slow  # ~1-2 min: the 4B train steps compile for an H100
@pytest.mark.long
@pytest.mark.skipif(not __import__("jaxmath.aot.targets", fromlist=["x"]).plugin_installed(),
                    reason="JAX's CUDA plugin is not installed (pip install -e '.[aot]')")
def test_every_study_config_plans_vllm_beside_jax_on_an_h100():
    """`python -m jaxmath.bench memory --config=configs/<name>.py --target=h100` as shipped: it fits within
    76e9 bytes, plans vLLM's phases, and says the split it would run with."""
    names = ["grpo_v1", "grpo_v2", "grpo_v3", "sft_then_rl", "local_full", "local_lora", "eval"]
    script = ("import json, sys; from jaxmath.bench import memory\n"
              "print(json.dumps({n: memory.main([f'--config=configs/{n}.py', '--target=h100']) for n in sys.argv[1:]}))")
    done = subprocess.run([sys.executable, "-c", script, *names], cwd=ROOT, capture_output=True, text=True,
                          timeout=1200, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for name, r in results.items():
        assert r["fits"] and r["peak_bytes"] <= 76e9, (name, r["peak_bytes"])
        assert any(p.startswith("vllm") for p in r["phases"]), name
        assert 0 < r["gpu_memory_utilization"] < 1 and r["kv_cache_rows"] >= 1, name
        assert r["jax_allocator"] == "platform" and r["jax_memory_fraction"] is None  # time-shared as shipped
    assert "train/logprobs" in results["local_full"]["phases"]  # TRL's importance correction
    assert not any(p.startswith(("train/", "rollout/")) for p in results["eval"]["phases"])


def test_prepare_device_refuses_a_fraction_the_user_set_beside_vllm(monkeypatch):
    from jaxmath.aot import device

    for key in ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_ALLOCATOR",
                "XLA_PYTHON_CLIENT_PREALLOCATE"):
        monkeypatch.setenv(key, "")  # restored after the test, whatever prepare_device sets
    monkeypatch.setenv(device.PLAN_TARGET_ENV, "h100")
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
    with pytest.raises(ConfigError, match="XLA_PYTHON_CLIENT_MEM_FRACTION is set, but this run shares the GPU"):
        device.prepare_device(_study("grpo_v2"))
    # without vLLM beside it, a fraction the user set is kept; none set: JAX takes 95%
    assert device.prepare_device(_study("grpo_v2", "rollout.engine=jax")) is None
    assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.5" and os.environ["XLA_CLIENT_MEM_FRACTION"] == ""
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "")
    device.prepare_device(_study("grpo_v2", "rollout.engine=jax"))
    assert os.environ["XLA_CLIENT_MEM_FRACTION"] == "0.95"
    monkeypatch.setenv("XLA_CLIENT_MEM_FRACTION", "")
    plan = device.prepare_device(_study("grpo_v2"))
    assert plan is not None and os.environ["XLA_PYTHON_CLIENT_ALLOCATOR"] == "platform"
    device._device_plan = None
