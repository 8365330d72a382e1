"""The converters (jaxmath.convert, and the scripts in convert/ that forward to them): HF -> orbax -> HF
bit-exact, transformers loads the export, run checkpoints (LoRA merged and full-parameter) export to
the model they hold, and bad directories fail with a useful message."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from jaxmath.convert import common
from jaxmath.checkpoint import CheckpointManager, TrainState
from jaxmath.model import LoRAParam, from_pretrained
from jaxmath.model.lora import LoRAConfig, apply_lora, merge_lora
from tests.hf_models import hf_logits, make_hf_model

REPO = pathlib.Path(__file__).resolve().parents[1]
IDS = np.array([[3, 17, 250, 9, 41, 7, 100, 511], [5, 5, 60, 1, 2, 300, 4, 8]], np.int32)


def run_cli(module: str, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    if ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def tensors(path) -> dict[str, np.ndarray]:
    return load_file(os.path.join(path, "model.safetensors"))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """An untied (so lm_head is covered) float32 HF model with a tokenizer file beside it."""
    path = tmp_path_factory.mktemp("hf")
    model = make_hf_model(str(path), tie=False, seed=1)
    (path / "tokenizer_config.json").write_text('{"marker": "tokenizer travels"}')
    return path, model


@pytest.mark.slow  # 8-17 s: out of the fast subset's 10 minutes (the whole suite runs it)
def test_hf_orbax_hf_round_trip_is_bit_exact(hf_dir, tmp_path):
    src, hf_model = hf_dir
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    run_cli("jaxmath.convert.hf_to_jax", f"--hf_dir={src}", f"--out={ckpt}")
    assert (ckpt / "params").is_dir() and (ckpt / "tokenizer_config.json").is_file()
    assert json.loads((ckpt / "model_config.json").read_text())["num_hidden_layers"] == 2
    run_cli("jaxmath.convert.jax_to_hf", f"--ckpt={ckpt}", f"--out={out}")

    before, after = tensors(src), tensors(out)
    assert sorted(before) == sorted(after)
    for name in before:
        assert after[name].dtype == before[name].dtype, name
        assert np.array_equal(after[name], before[name]), name
    assert (out / "tokenizer_config.json").read_text() == '{"marker": "tokenizer travels"}'

    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    np.testing.assert_array_equal(hf_logits(reloaded, IDS), hf_logits(hf_model, IDS))


def test_bfloat16_conversion_rounds_once(hf_dir, tmp_path):
    src, _ = hf_dir
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    common.hf_to_orbax(str(src), str(ckpt), "bfloat16")
    assert json.loads((ckpt / "model_config.json").read_text())["torch_dtype"] == "bfloat16"
    common.export_hf(str(ckpt), str(out))
    before, after = tensors(src), tensors(out)
    name = "model.layers.1.self_attn.o_proj.weight"
    assert after[name].dtype == np.dtype(jnp.bfloat16)
    np.testing.assert_array_equal(after[name], before[name].astype(jnp.bfloat16))


def _save_run(run_dir, step: int, params, config: dict) -> None:
    state = TrainState(params=params, opt_state={}, step=step, data_cursor={"index": step},
                       rng_key=jax.random.key(0), config=config)
    with CheckpointManager(run_dir) as manager:
        manager.save(step, state)


@pytest.fixture(scope="module")
def lora_model(hf_dir):
    """The HF model in float32 with rank-4 adapters whose B is non-zero, so they change the model.
    Built once: attaching adapters runs many small eager ops."""
    model = from_pretrained(str(hf_dir[0]), dtype=jnp.float32)
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0))
    rng = np.random.default_rng(0)
    for _, var in nnx.to_flat_state(nnx.state(model, LoRAParam)):
        var.set_value(jnp.asarray(0.05 * rng.standard_normal(var.get_value().shape), jnp.float32))
    return model


def _scaled_lora(model, factor: float) -> nnx.State:
    return jax.tree.map(lambda x: x * factor, nnx.state(model, LoRAParam))


@pytest.mark.slow  # ~18 s: a LoRA run and its export
def test_lora_run_exports_merged_model(hf_dir, lora_model, tmp_path):
    src, _ = hf_dir
    run_dir = tmp_path / "run"
    config = {"model": {"path": str(src)}, "lora": {"rank": 4, "alpha": 8.0}}
    # Two steps: the run directory must resolve to the newest one.
    _save_run(run_dir, 1, _scaled_lora(lora_model, -0.5), config)
    _save_run(run_dir, 2, nnx.state(lora_model, LoRAParam), config)
    model = nnx.clone(lora_model)
    base_logits = np.asarray(from_pretrained(str(src), dtype=jnp.float32)(jnp.asarray(IDS)))
    merge_lora(model)
    merged_logits = np.asarray(model(jnp.asarray(IDS)))
    assert np.abs(merged_logits - base_logits).max() > 1e-2  # the adapters matter

    out = tmp_path / "merged"
    refused = run_cli("jaxmath.convert.jax_to_hf", f"--ckpt={run_dir}", f"--out={out}", ok=False)
    assert refused.returncode == 1
    assert "--merge_lora" in refused.stderr and "--adapter_only" in refused.stderr

    run_cli("jaxmath.convert.jax_to_hf", f"--ckpt={run_dir}", f"--out={out}", "--merge_lora")
    exported = from_pretrained(str(out), dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(exported(jnp.asarray(IDS))), merged_logits, atol=1e-5, rtol=1e-5)
    assert (out / "tokenizer_config.json").is_file()


def test_full_run_step_dir_with_base_model_flag(hf_dir, tmp_path):
    src, _ = hf_dir
    model = from_pretrained(str(src), dtype=jnp.float32)
    model.embed.set_value(model.embed.get_value() * 2.0)  # a "trained" weight that differs from the base
    run_dir = tmp_path / "run"
    # model.path points nowhere useful: --base_model must win.
    _save_run(run_dir, 5, nnx.state(model, nnx.Param), {"model": {"path": str(tmp_path / "moved")}})
    summary = common.export_hf(str(run_dir / "5"), str(tmp_path / "out"), base_model=str(src))
    assert summary["step"] == 5 and not summary["lora_merged"]
    after = tensors(tmp_path / "out")
    np.testing.assert_array_equal(after["model.embed_tokens.weight"], tensors(src)["model.embed_tokens.weight"] * 2.0)
    with pytest.raises(common.ConvertError, match="model.path .* has no config.json; pass --base_model"):
        common.export_hf(str(run_dir), str(tmp_path / "out2"))


def test_errors_name_the_problem(hf_dir, lora_model, tmp_path):
    src, _ = hf_dir
    with pytest.raises(common.ConvertError, match="does not exist"):
        common.hf_to_orbax(str(tmp_path / "nowhere"), str(tmp_path / "a"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(common.ConvertError, match="has no config.json"):
        common.hf_to_orbax(str(tmp_path / "empty"), str(tmp_path / "a"))
    (tmp_path / "config_only").mkdir()
    (tmp_path / "config_only" / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        common.hf_to_orbax(str(tmp_path / "config_only"), str(tmp_path / "a"))
    with pytest.raises(common.ConvertError, match="already exists"):
        common.hf_to_orbax(str(src), str(tmp_path / "empty"))

    with pytest.raises(common.ConvertError, match="neither a converted checkpoint"):
        common.export_hf(str(tmp_path / "empty"), str(tmp_path / "b"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model_config.json").write_text("{}")
    with pytest.raises(common.ConvertError, match="lacks params"):
        common.export_hf(str(tmp_path / "half"), str(tmp_path / "b"))

    run_dir = tmp_path / "run"
    _save_run(run_dir, 1, nnx.state(lora_model, LoRAParam), {"model": {"path": str(src)}})
    with pytest.raises(common.ConvertError, match="no lora.alpha; pass --lora_alpha"):
        common.export_hf(str(run_dir), str(tmp_path / "b"), merge_lora=True)
    (run_dir / "1" / "meta" / "meta.json").unlink()
    with pytest.raises(common.ConvertError, match="incomplete: it lacks meta/meta.json"):
        common.export_hf(str(run_dir), str(tmp_path / "b"), merge_lora=True)


def test_a_bit_flipped_run_checkpoint_is_refused_by_export(hf_dir, tmp_path):
    """One flipped bit in a run step's parameter data: the export stops with one error line naming
    the step and the array (before, it exported the wrong value), and writes no weights."""
    src, _ = hf_dir
    run_dir = tmp_path / "run"
    _save_run(run_dir, 3, nnx.state(from_pretrained(str(src), dtype=jnp.float32), nnx.Param), {})
    data = max((p for p in (run_dir / "3" / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    flipped = bytearray(data.read_bytes())
    flipped[len(flipped) // 2] ^= 0x10
    data.write_bytes(bytes(flipped))
    out = tmp_path / "out"
    proc = run_cli("jaxmath.convert.jax_to_hf", f"--ckpt={run_dir}", f"--out={out}", f"--base_model={src}", ok=False)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert f"checkpoint {run_dir / '3'} is damaged: array params/" in errors[0]
    assert "differs from its saved checksum" in errors[0] and "Nothing was exported" in errors[0]
    assert "Traceback" not in proc.stderr and "Encountered error" not in proc.stderr
    assert not (out / "model.safetensors").exists()


@pytest.mark.parametrize("script,flag", [("hf_to_jax", "--hf_dir"), ("jax_to_hf", "--ckpt")])
def test_convert_scripts_forward_to_jaxmath_convert(script, flag):
    """The old commands keep working: `python convert/<script>.py` runs jaxmath.convert.<script>."""
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(REPO / "convert" / f"{script}.py")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    # jaxmath.convert's own flags are parsed: the required one is asked for.
    assert proc.returncode == 1 and f"{flag} must have a value" in proc.stderr, proc.stderr[-2000:]
