"""LoRA adapters: zero at init, the reference policy is adapters-off, merging is exact, 4B count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxmath.model as jm
from jaxmath.model import lora


def _model():
    return jm.init_model(jm.preset("tiny", vocab_size=300, dtype=jnp.float32, param_dtype=jnp.float32), seed=0)


def test_fresh_adapters_leave_the_model_unchanged_and_merge_exactly():
    model = _model()
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 300, (2, 7)))
    base = np.asarray(model(ids))
    n = lora.apply_lora(model, lora.LoRAConfig(rank=4, alpha=8))
    assert n == sum(x.size for x in jax.tree.leaves(nnx.state(model, jm.LoRAParam)))
    np.testing.assert_array_equal(np.asarray(model(ids)), base)
    for i, (_, dense) in enumerate(lora.projections(model)):
        dense.lora_b.set_value(0.1 * jax.random.normal(jax.random.key(i), dense.lora_b.get_value().shape))
    adapted = np.asarray(model(ids))
    assert np.abs(adapted - base).max() > 1e-2
    np.testing.assert_array_equal(np.asarray(model(ids, lora=False)), base)  # reference policy, no copy
    assert lora.merge_lora(model) == 7 and not lora.has_lora(model)
    np.testing.assert_allclose(np.asarray(model(ids)), adapted, atol=1e-5)


def test_targets_select_projections_and_bad_targets_fail():
    model = _model()
    lora.apply_lora(model, lora.LoRAConfig(rank=2, alpha=2, targets=r"(q_proj|v_proj)$"))
    with_adapters = sorted(p for p, d in lora.projections(model) if d.lora_a is not None)
    assert with_adapters == ["layers.attn.q_proj", "layers.attn.v_proj"]
    with pytest.raises(ValueError, match="matches no projection"):  # refused with the settings, before any model
        lora.LoRAConfig(rank=2, targets="nonexistent")
    with pytest.raises(ValueError, match="is not a regular expression"):
        lora.LoRAConfig(rank=2, targets="(q_proj")


@pytest.mark.slow  # 8-17 s: out of the fast subset's 10 minutes (the whole suite runs it)
def test_split_by_type_gives_only_adapters_and_gradients_flow_to_them():
    model = _model()
    lora.apply_lora(model, lora.LoRAConfig(rank=4, alpha=8))
    graphdef, adapters, base = nnx.split(model, jm.LoRAParam, ...)
    assert all(isinstance(v, jm.LoRAParam) for v in jax.tree.leaves(adapters, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    ids = jnp.asarray(np.random.RandomState(1).randint(0, 300, (2, 5)))

    def loss(adapters):
        return nnx.merge(graphdef, adapters, base)(ids).mean()

    grads = jax.grad(loss)(adapters)
    b_grads = [g for p, g in jax.tree_util.tree_leaves_with_path(grads) if "lora_b" in jax.tree_util.keystr(p)]
    assert b_grads and all(float(jnp.abs(g).max()) > 0 for g in b_grads)


def test_qwen3_4b_rank64_adapter_count():
    def build():
        model = jm.Qwen3(jm.preset("qwen3-4b"), rngs=nnx.Rngs(0))
        lora.apply_lora(model, lora.LoRAConfig(rank=64))
        return model

    adapters = nnx.state(nnx.eval_shape(build), jm.LoRAParam)
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(adapters)) == 132_120_576


@pytest.mark.slow  # 8-17 s: out of the fast subset's 10 minutes (the whole suite runs it)
def test_float32_adapters_on_a_bf16_base_merge_export_sync_and_restore(tmp_path):
    """Adapters stay float32 on a bf16 model; everything that leaves the trainer still works: merging
    (export and the sampler's copy) keeps the kernels bf16, PEFT writes float32 (vLLM casts to its
    LoRA dtype on load), and a checkpoint restores float32 adapters and float32 Adam moments."""
    from jaxmath import checkpoint, optim
    from jaxmath.model import peft
    from jaxmath.rollout.jax_sampler import JaxSampler, SamplerConfig

    model = jm.init_model(jm.preset("tiny", vocab_size=300, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16), seed=0)
    ids = jnp.asarray(np.random.RandomState(2).randint(0, 300, (2, 7)))
    base = np.asarray(model(ids))
    lora.apply_lora(model, lora.LoRAConfig(rank=4, alpha=8))
    for i, (_, dense) in enumerate(lora.projections(model)):
        dense.lora_b.set_value(0.1 * jax.random.normal(jax.random.key(i), dense.lora_b.get_value().shape))
    adapters = nnx.state(model, jm.LoRAParam)
    assert {x.dtype for x in jax.tree.leaves(adapters)} == {jnp.dtype(jnp.float32)}
    adapted = np.asarray(model(ids))
    assert np.abs(adapted - base).max() > 0.1

    sampler = JaxSampler(model, SamplerConfig(lora_mode="merge"))  # merges into a copy
    assert lora.has_lora(model)
    assert {x.dtype for x in jax.tree.leaves(sampler._state)} == {jnp.dtype(jnp.bfloat16)}  # adapters folded in
    tensors, _, rank, _ = peft.peft_tensors(model)
    assert rank == 4 and {t.dtype for t in tensors.values()} == {np.dtype(np.float32)}

    optimizer = optim.make_optimizer(optim.OptimizerConfig(1e-4))
    target = checkpoint.TrainState(adapters, optimizer.init(adapters), 3, {}, jax.random.key(0), {})
    with checkpoint.CheckpointManager(tmp_path) as manager:
        manager.save(3, target)
        restored = manager.restore(target=target)
    assert {x.dtype for x in jax.tree.leaves((restored.params, restored.opt_state)) if x.ndim} == {
        jnp.dtype(jnp.float32)}
    for got, want in zip(jax.tree.leaves(restored.params), jax.tree.leaves(adapters)):
        np.testing.assert_array_equal(got, want)

    assert lora.merge_lora(model) == 7
    assert {d.kernel.get_value().dtype for _, d in lora.projections(model)} == {jnp.dtype(jnp.bfloat16)}
    merged = np.asarray(model(ids))
    # bf16 rounding of the merged kernels, small against what the adapters changed.
    assert np.abs(merged - adapted).max() < 0.1 * np.abs(adapted - base).max()


def test_a_wide_projection_joins_its_low_rank_term_to_the_matmul():
    """`jaxmath.model.projection`: at enough rows a projection wider out than in (q, gate, up) computes
    x W + s (x A) B as one matmul [x, s x A] [W; B]: its output and the gradients of x, A and B equal the
    two products' (float32), no gradient of the frozen W is computed (the compiled gradient program has
    no [in + rank, out] matmul), and narrower projections and a decode step's few rows keep two products."""
    import re

    from jaxmath.model.projection import joined_matmul, joins

    rng = np.random.RandomState(0)
    rows, d_in, d_out, rank = 64, 16, 48, 4
    x = jnp.asarray(rng.randn(2, rows, d_in), jnp.float32)
    w, a, b = (jnp.asarray(rng.randn(*s) / 4, jnp.float32) for s in ((d_in, d_out), (d_in, rank), (rank, d_out)))
    dy = jnp.asarray(rng.randn(2, rows, d_out), jnp.float32)

    def two(x, a, b):
        return jnp.sum(dy * (jnp.einsum("btd,df->btf", x, w) + 0.5 * jnp.einsum("btr,rf->btf", x @ a, b)))

    def joined(x, a, b):
        return jnp.sum(dy * joined_matmul("btd,df->btf", x, 0.5 * (x @ a), w, b))

    want, want_grads = jax.value_and_grad(two, argnums=(0, 1, 2))(x, a, b)
    got, got_grads = jax.value_and_grad(joined, argnums=(0, 1, 2))(x, a, b)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, e in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)
    text = jax.jit(jax.grad(joined, argnums=(1, 2))).lower(x, a, b).compile().as_text()
    shapes = [line.split("=")[1].split()[0] for line in text.splitlines() if re.search(r"\bdot\(", line)]
    assert not any(s.startswith(f"f32[{d_in + rank},{d_out}]") for s in shapes), shapes
    # Qwen3-4B's shapes: q, gate and up join over a train micro-batch; k, v, down and o never; a
    # decode step's 64 rows never
    for equation, shape, at_train in (("btd,dnh->btnh", (2560, 32, 128), True), ("btd,df->btf", (2560, 9728), True),
                                      ("btd,dkh->btkh", (2560, 8, 128), False), ("btf,fd->btd", (9728, 2560), False),
                                      ("btnh,nhd->btd", (32, 128, 2560), False)):
        assert joins(equation, shape, 64, 16 * 5120) == at_train, equation
        assert not joins(equation, shape, 64, 64), equation
    # a tiny model's LoRA layer at train shapes runs the joined matmul, with the two products' output
    config = jm.preset("tiny", dtype=jnp.float32, param_dtype=jnp.float32)
    model = jm.init_model(config, seed=0)
    lora.apply_lora(model, lora.LoRAConfig(rank=4, alpha=8))
    up = model.layers.mlp.up_proj
    graphdef, state = nnx.split(up)
    single = nnx.merge(graphdef, jax.tree.map(lambda v: v[0], state))
    single.lora_b.set_value(jnp.asarray(rng.randn(*single.lora_b.get_value().shape), jnp.float32))
    h = jnp.asarray(rng.randn(4, 1024, config.hidden_size), jnp.float32)
    assert joins(single.equation, single.kernel.get_value().shape, 4, 4 * 1024)
    expected = (jnp.einsum(single.equation, h, single.kernel.get_value())
                + single.lora_scale * (h @ single.lora_a.get_value()) @ single.lora_b.get_value())
    np.testing.assert_allclose(single(h), expected, rtol=1e-5, atol=1e-5)
