"""LoRA on the LM head (Tinker's train_unembed, `lora.train_unembed`): exact logits, gradients to the
adapter, a tied model's embedding untouched, merging that unties, HF and PEFT export, the 4B count."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxmath.model as jm
from jaxmath.model import hf_io, lora, peft
from jaxmath.model.head import token_logprobs

VOCAB = 300


def _adapted(tie=True, dtype=jnp.float32):
    config = jm.preset("tiny", vocab_size=VOCAB, dtype=dtype, param_dtype=dtype, tie_word_embeddings=tie,
                       pad_token_id=0, eos_token_id=1)
    model = jm.init_model(config, seed=0)
    lora.apply_lora(model, lora.LoRAConfig(rank=4, alpha=8, train_unembed=True))
    for i, (_, dense) in enumerate(lora.projections(model)):
        dense.lora_b.set_value(0.1 * jax.random.normal(jax.random.key(i), dense.lora_b.get_value().shape))
    b = model.head_lora.lora_b.get_value()
    model.head_lora.lora_b.set_value(0.3 * jax.random.normal(jax.random.key(99), b.shape))
    return model


IDS = jnp.asarray(np.random.RandomState(0).randint(0, VOCAB, (2, 7)))


@pytest.mark.parametrize("tie", [True, False])
def test_head_adapter_logits_are_exact_and_leave_the_embedding_alone(tie):
    model = _adapted(tie)
    embed = np.asarray(model.embed.get_value())
    hidden = model.hidden_states(IDS)
    h = np.asarray(hidden, np.float64)
    a = np.asarray(model.head_lora.lora_a.get_value(), np.float64)
    b = np.asarray(model.head_lora.lora_b.get_value(), np.float64)
    w = np.asarray(model.base_head_weight(), np.float64)
    expected = h @ w.T + 2.0 * (h @ a) @ b  # alpha 8 / rank 4
    np.testing.assert_allclose(np.asarray(model(IDS)), expected, atol=2e-4)
    # lora=False is the base model's head (the reference policy); the input embedding never changes
    base_hidden = np.asarray(model.hidden_states(IDS, lora=False), np.float64)
    np.testing.assert_allclose(np.asarray(model(IDS, lora=False)), base_hidden @ w.T, atol=2e-4)
    assert np.abs(np.asarray(model(IDS)) - np.asarray(model.logits(hidden, lora=False))).max() > 1e-2
    np.testing.assert_array_equal(np.asarray(model.embed.get_value()), embed)
    # the trainer's fused logprobs take the same operands
    hh, ww = model.head_operands(hidden)
    lp, _ = token_logprobs(hh, ww, IDS)
    ref = jax.nn.log_softmax(jnp.asarray(expected, jnp.float32), axis=-1)
    np.testing.assert_allclose(np.asarray(lp), np.take_along_axis(np.asarray(ref), np.asarray(IDS)[..., None], -1)[..., 0],
                               atol=2e-4)


@pytest.mark.slow  # 8-17 s: out of the fast subset's 10 minutes (the whole suite runs it)
def test_gradients_reach_the_head_adapter_through_the_fused_logprobs():
    model = _adapted()
    graphdef, adapters, frozen = lora.split_trainable(model)

    def loss(adapters):
        m = nnx.merge(graphdef, adapters, frozen)
        hh, ww = m.head_operands(m.hidden_states(IDS))
        return -token_logprobs(hh, ww, IDS)[0].sum()

    grads = nnx.to_pure_dict(jax.grad(loss)(adapters))
    assert float(jnp.abs(grads["head_lora"]["lora_a"]).max()) > 0
    assert float(jnp.abs(grads["head_lora"]["lora_b"]).max()) > 0


@pytest.mark.slow  # an HF export and reload
def test_merging_unties_a_tied_model_and_the_hf_export_reloads_it(tmp_path):
    model = _adapted(tie=True)
    adapted = np.asarray(model(IDS))
    assert lora.merge_lora(model) == 8 and not lora.has_lora(model)  # 7 projections + the head
    assert model.config.tie_word_embeddings is False and model.lm_head is not None
    np.testing.assert_allclose(np.asarray(model(IDS)), adapted, atol=1e-5)
    jm.save_pretrained(model, str(tmp_path / "hf"))
    reloaded = jm.from_pretrained(str(tmp_path / "hf"), dtype=jnp.float32)
    assert reloaded.config.tie_word_embeddings is False
    np.testing.assert_allclose(np.asarray(reloaded(IDS)), adapted, atol=1e-5)


def test_peft_export_carries_the_head_and_merges_as_jax_does(tmp_path):
    model = _adapted(tie=True)
    record = peft.save_peft_adapter(model, str(tmp_path / "adapter"))
    config, tensors = peft.read_peft_adapter(str(tmp_path / "adapter"))
    assert "lm_head" in config["target_modules"] and record["tensors"] == 2 * 7 * model.config.num_layers + 2
    assert tensors["base_model.model.lm_head.lora_A.weight"].shape == (4, model.config.hidden_size)
    assert tensors["base_model.model.lm_head.lora_B.weight"].shape == (VOCAB, 4)
    base = dict(hf_io.hf_tensors(nnx.state(model), model.config))
    assert "lm_head.weight" not in base  # tied
    from_file = peft.merge_into_hf(base, str(tmp_path / "adapter"))
    lora.merge_lora(model)
    in_jax = dict(hf_io.hf_tensors(nnx.state(model), model.config))
    assert from_file.keys() == in_jax.keys()
    for name, expected in in_jax.items():
        np.testing.assert_allclose(from_file[name], expected, atol=1e-6, err_msg=name)
    # the checkpoint-tree export (jax_to_hf --adapter_only) writes the same adapter
    tree_model = _adapted(tie=True)
    peft.save_peft_from_tree(nnx.to_pure_dict(nnx.state(tree_model, jm.LoRAParam)), str(tmp_path / "tree"), alpha=8.0)
    _, tree_tensors = peft.read_peft_adapter(str(tmp_path / "tree"))
    assert tree_tensors.keys() == tensors.keys()


@pytest.mark.slow  # torch and PEFT
@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed")
def test_peft_applies_the_head_adapter_to_a_tied_model_as_jaxmath_does(tmp_path):
    import torch
    from peft import PeftModel
    from transformers import Qwen3ForCausalLM

    model = _adapted(tie=True)
    jm.save_pretrained(model, str(tmp_path / "base"))
    peft.save_peft_adapter(model, str(tmp_path / "adapter"), str(tmp_path / "base"))
    hf = PeftModel.from_pretrained(Qwen3ForCausalLM.from_pretrained(str(tmp_path / "base")), str(tmp_path / "adapter"))
    ids = np.asarray(IDS)
    with torch.no_grad():
        theirs = hf(torch.as_tensor(ids)).logits.numpy()
    ours = np.asarray(model(IDS, positions=jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)))
    np.testing.assert_allclose(theirs, ours, atol=2e-4)


def test_the_merged_weight_sync_sends_the_adapted_head_of_a_tied_model():
    from jaxmath.rollout import weight_sync

    model = _adapted(tie=True)
    sent = dict(weight_sync.hf_device_arrays(model))
    head = np.asarray(model.base_head_weight()) + np.asarray(model.head_lora.delta())
    np.testing.assert_allclose(np.asarray(sent["lm_head.weight"]), head, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(sent["model.embed_tokens.weight"]), np.asarray(model.embed.get_value()))


def test_vllm_lora_sync_refuses_a_head_adapter_in_one_line(tmp_path):
    from jaxmath.rollout.vllm.config import VLLMConfig
    from jaxmath.rollout.vllm.engine import VLLMEngineBase  # noqa: F401  (the sync path under test)

    engine = VLLMEngineBase.__new__(VLLMEngineBase)
    engine.config = VLLMConfig(model_path=str(tmp_path), enable_lora=True)
    with pytest.raises(ValueError, match="vllm.enable_lora=False"):
        engine._sync_lora(_adapted())


def test_qwen3_4b_rank64_with_the_head_adapter_count():
    def build():
        model = jm.Qwen3(jm.preset("qwen3-4b"), rngs=nnx.Rngs(0))
        lora.apply_lora(model, lora.LoRAConfig(rank=64, train_unembed=True))
        return model

    adapters = nnx.state(nnx.eval_shape(build), jm.LoRAParam)
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(adapters))
    assert total == 132_120_576 + 64 * (2560 + 151_936) == 142_008_320


@pytest.mark.slow  # 8-17 s: out of the fast subset's 10 minutes (the whole suite runs it)
def test_the_one_pass_head_takes_no_gradient_matmul_for_the_frozen_base_head():
    """`weighted_token_logprobs` (on-policy GRPO, SFT) on an adapted head's blocks, (h, scale h A) and
    (W, B.T) as `head_operands` gives them: A's and B's gradients equal those through `token_logprobs`,
    and the frozen W's block takes no gradient: the compiled gradient program holds no [vocab, embed +
    rank] head gradient, only the adapter block's [vocab, rank] (docs/BENCHMARKS.md, the GRPO v2 step)."""
    import re

    from jaxmath.model.head import weighted_token_logprobs

    model = _adapted()
    graphdef, adapters, frozen = lora.split_trainable(model)
    weights = jnp.asarray(np.random.RandomState(1).randn(*IDS.shape), jnp.float32)

    def objective(adapters, fused):
        m = nnx.merge(graphdef, adapters, frozen)
        hh, ww = m.head_operands(m.hidden_states(IDS))
        if fused:
            return weighted_token_logprobs(hh, ww, IDS, weights, temperature=0.7)[0]
        return jnp.sum(weights * token_logprobs(hh, ww, IDS, temperature=0.7)[0])

    want = nnx.to_pure_dict(jax.grad(objective)(adapters, False))["head_lora"]
    got = nnx.to_pure_dict(jax.grad(objective)(adapters, True))["head_lora"]
    for name in ("lora_a", "lora_b"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-6)
    text = jax.jit(jax.grad(objective), static_argnums=1).lower(adapters, True).compile().as_text()
    dots = [line.split("=")[1].split()[0] for line in text.splitlines() if re.search(r"\bdot\(", line)]
    d, r = model.config.hidden_size, model.head_lora.lora_a.get_value().shape[1]
    assert any(s.startswith(f"f32[{VOCAB},{r}]") for s in dots), dots
    assert not any(s.startswith(f"f32[{VOCAB},{d + r}]") for s in dots), dots
