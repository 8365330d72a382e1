"""PEFT adapter export: names and layouts from the HF table, and merging the written adapter into the
exported HF weights equals exporting the merged JAX model. With `peft` installed, PEFT itself loads
the adapter onto the transformers model and its logits equal jaxmath's adapted model."""

import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxmath.model as jm
from jaxmath.model import hf_io, lora, peft

VOCAB = 300


def _adapted(targets=lora.DEFAULT_TARGETS, tie=True):
    config = jm.preset("tiny", vocab_size=VOCAB, dtype=jnp.float32, param_dtype=jnp.float32, tie_word_embeddings=tie,
                       pad_token_id=0, eos_token_id=1)
    model = jm.init_model(config, seed=0)
    lora.apply_lora(model, lora.LoRAConfig(rank=4, alpha=8, targets=targets))
    for i, (_, dense) in enumerate(lora.projections(model)):
        if dense.lora_b is not None:
            dense.lora_b.set_value(0.1 * jax.random.normal(jax.random.key(i), dense.lora_b.get_value().shape))
    return model


def test_names_shapes_and_config(tmp_path):
    model = _adapted()
    record = peft.save_peft_adapter(model, str(tmp_path), "/models/base")
    config, tensors = peft.read_peft_adapter(str(tmp_path))
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["peft_type"] == "LORA"
    assert config["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"])
    assert config["base_model_name_or_path"] == "/models/base"
    c = model.config
    q = "base_model.model.model.layers.1.self_attn.q_proj"
    assert tensors[q + ".lora_A.weight"].shape == (4, c.hidden_size)
    assert tensors[q + ".lora_B.weight"].shape == (c.num_heads * c.head_dim, 4)
    o = "base_model.model.model.layers.0.self_attn.o_proj"
    assert tensors[o + ".lora_A.weight"].shape == (4, c.num_heads * c.head_dim)
    assert tensors[o + ".lora_B.weight"].shape == (c.hidden_size, 4)
    assert len(tensors) == record["tensors"] == 2 * 7 * c.num_layers


def test_merging_the_written_adapter_equals_merging_in_jax(tmp_path):
    model = _adapted(targets=r"(q_proj|o_proj|down_proj)$")
    peft.save_peft_adapter(model, str(tmp_path / "adapter"))
    base = dict(hf_io.hf_tensors(nnx.state(model), model.config))
    merged_from_file = peft.merge_into_hf(base, str(tmp_path / "adapter"))
    lora.merge_lora(model)
    merged_in_jax = dict(hf_io.hf_tensors(nnx.state(model), model.config))
    changed = 0
    for name, expected in merged_in_jax.items():
        np.testing.assert_allclose(merged_from_file[name], expected, atol=1e-6, err_msg=name)
        changed += not np.array_equal(base[name], expected)
    assert changed == 3 * model.config.num_layers  # the three targeted projections of every layer


def test_tree_export_matches_model_export(tmp_path):
    model = _adapted()
    peft.save_peft_adapter(model, str(tmp_path / "a"))
    tree = nnx.to_pure_dict(nnx.state(model, jm.LoRAParam))
    peft.save_peft_from_tree(tree, str(tmp_path / "b"), alpha=8.0)
    config_a, tensors_a = peft.read_peft_adapter(str(tmp_path / "a"))
    config_b, tensors_b = peft.read_peft_adapter(str(tmp_path / "b"))
    assert config_a == config_b and tensors_a.keys() == tensors_b.keys()
    for name in tensors_a:
        np.testing.assert_array_equal(tensors_a[name], tensors_b[name])


def test_no_adapters_is_an_error_that_says_what_to_do(tmp_path):
    model = jm.init_model(jm.preset("tiny", vocab_size=VOCAB), seed=0)
    with pytest.raises(ValueError, match="apply_lora"):
        peft.save_peft_adapter(model, str(tmp_path))


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed")
def test_peft_loads_the_adapter_and_matches_jaxmath(tmp_path):
    import torch
    from peft import PeftModel
    from transformers import Qwen3ForCausalLM

    model = _adapted()
    jm.save_pretrained(model, str(tmp_path / "base"))  # base weights only: adapters are not folded in
    peft.save_peft_adapter(model, str(tmp_path / "adapter"), str(tmp_path / "base"))
    hf = PeftModel.from_pretrained(Qwen3ForCausalLM.from_pretrained(str(tmp_path / "base")), str(tmp_path / "adapter"))
    ids = np.random.RandomState(0).randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        theirs = hf(torch.as_tensor(ids)).logits.numpy()
    ours = np.asarray(model(jnp.asarray(ids), positions=jnp.broadcast_to(jnp.arange(9), (2, 9))))
    np.testing.assert_allclose(theirs, ours, atol=2e-4)
    without = np.asarray(model(jnp.asarray(ids), lora=False))
    assert np.abs(ours - without).max() > 1e-2
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4


@pytest.mark.slow  # 8-17 s: out of the fast subset's 10 minutes (the whole suite runs it)
def test_adapter_only_cli_exports_a_runs_adapters(tmp_path):
    import os
    import pathlib
    import subprocess
    import sys

    from jaxmath.checkpoint import CheckpointManager, TrainState

    model = _adapted()
    run_dir = tmp_path / "run"
    state = TrainState(params=nnx.state(model, jm.LoRAParam), opt_state={}, step=3, data_cursor={"index": 3},
                       rng_key=jax.random.key(0), config={"model": {"path": "/models/base"},
                                                          "lora": {"rank": 4, "alpha": 8.0}})
    with CheckpointManager(run_dir) as manager:
        manager.save(3, state)
    repo = pathlib.Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "jaxmath.convert.jax_to_hf", f"--ckpt={run_dir}",
                           f"--out={tmp_path / 'cli'}", "--adapter_only"], cwd=repo, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(repo), JAX_PLATFORMS="cpu"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["step"] == 3
    peft.save_peft_adapter(model, str(tmp_path / "direct"), "/models/base")
    config_cli, tensors_cli = peft.read_peft_adapter(str(tmp_path / "cli"))
    config_direct, tensors_direct = peft.read_peft_adapter(str(tmp_path / "direct"))
    assert config_cli == config_direct and tensors_cli.keys() == tensors_direct.keys()
    for name in tensors_cli:
        np.testing.assert_array_equal(tensors_cli[name], tensors_direct[name])
    both = subprocess.run([sys.executable, "-m", "jaxmath.convert.jax_to_hf", f"--ckpt={run_dir}",
                           f"--out={tmp_path / 'x'}", "--adapter_only", "--merge_lora"], cwd=repo,
                          capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(repo), JAX_PLATFORMS="cpu"), timeout=300)
    assert both.returncode == 1 and "exclude each other" in both.stderr
