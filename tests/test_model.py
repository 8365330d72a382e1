"""The Qwen3 port against HF transformers (torch, float32), and its own invariants."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxmath.model as jm
from jaxmath.model import hf_io
from jaxmath.model.qwen3 import rope_inv_freq
from tests.hf_models import hf_logits, make_hf_model

ARCHS = {
    # name: kwargs of make_hf_model
    "tied_gqa2": dict(num_heads=4, num_kv_heads=2, head_dim=32, tie=True),
    "untied_gqa4_hd_ne": dict(num_heads=8, num_kv_heads=2, head_dim=24, hidden_size=64, tie=False),
    "mha": dict(num_heads=4, num_kv_heads=4, head_dim=16, tie=True),
    "yarn": dict(num_heads=4, num_kv_heads=1, head_dim=32, tie=False,
                 rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
}


@pytest.fixture(scope="module", params=sorted(ARCHS))
def hf_pair(request, tmp_path_factory):
    d = str(tmp_path_factory.mktemp(request.param))
    hf = make_hf_model(d, **ARCHS[request.param])
    return d, hf


def test_logits_match_hf_float32(hf_pair):
    d, hf = hf_pair
    model = jm.from_pretrained(d, dtype=jnp.float32)
    ids = np.random.RandomState(1).randint(0, 512, (3, 40))
    diff = np.abs(np.asarray(model(jnp.asarray(ids))) - hf_logits(hf, ids)).max()
    assert diff <= 1e-4, diff


def test_logits_bf16_close_to_hf_float32(hf_pair):
    d, hf = hf_pair
    model = jm.from_pretrained(d, dtype=jnp.bfloat16)
    ids = np.random.RandomState(2).randint(0, 512, (2, 32))
    ref = hf_logits(hf, ids)
    out = np.asarray(model(jnp.asarray(ids)))
    # bf16 keeps 8 bits of mantissa; through a few layers the logits stay within 5% of their range,
    # and the argmax agrees almost everywhere.
    assert np.abs(out - ref).max() <= 0.05 * np.abs(ref).max()
    assert (out.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_padded_batch_matches_unpadded(hf_pair):
    d, _ = hf_pair
    model = jm.from_pretrained(d, dtype=jnp.float32)
    rng = np.random.RandomState(3)
    seqs = [rng.randint(2, 512, n) for n in (7, 12, 4)]
    width = 14
    for side in ("left", "right"):
        ids = np.zeros((3, width), np.int32)
        mask = np.zeros((3, width), np.int32)
        for i, s in enumerate(seqs):
            sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
            ids[i, sl], mask[i, sl] = s, 1
        out = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
        for i, s in enumerate(seqs):
            single = np.asarray(model(jnp.asarray(s[None])))[0]
            got = out[i][mask[i].astype(bool)]
            assert np.abs(got - single).max() <= 1e-4, side


def test_packed_segments_match_separate_sequences(hf_pair):
    d, _ = hf_pair
    model = jm.from_pretrained(d, dtype=jnp.float32)
    rng = np.random.RandomState(4)
    a, b = rng.randint(2, 512, 9), rng.randint(2, 512, 6)
    packed = np.concatenate([a, b, [0, 0]])[None]
    seg = np.array([[1] * 9 + [2] * 6 + [0, 0]])
    out = np.asarray(model(jnp.asarray(packed), segment_ids=jnp.asarray(seg)))[0]
    for s, sl in ((a, slice(0, 9)), (b, slice(9, 15))):
        single = np.asarray(model(jnp.asarray(s[None])))[0]
        assert np.abs(out[sl] - single).max() <= 1e-4


def test_kv_cache_decode_matches_forward(hf_pair):
    d, _ = hf_pair
    model = jm.from_pretrained(d, dtype=jnp.float32)
    rng = np.random.RandomState(5)
    # two left-padded prompts of different lengths, then 6 decode steps
    prompts = [rng.randint(2, 512, 5), rng.randint(2, 512, 9)]
    gen = rng.randint(2, 512, (2, 6))
    width = 9
    ids = np.zeros((2, width), np.int32)
    valid = np.zeros((2, width), bool)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], valid[i, width - len(p):] = p, True
    cache = model.init_cache(2, 20)
    step = nnx.jit(lambda m, t, v, c: m.forward_with_cache(t, v, c))
    h, cache = step(model, jnp.asarray(ids), jnp.asarray(valid), cache)
    got = [model.logits(h[:, -1])]
    for t in range(gen.shape[1]):
        h, cache = step(model, jnp.asarray(gen[:, t:t + 1]), jnp.ones((2, 1), bool), cache)
        got.append(model.logits(h[:, -1]))
    got = np.stack([np.asarray(g) for g in got], 1)  # [2, 7, vocab]
    for i, p in enumerate(prompts):
        full = np.concatenate([p, gen[i]])[None]
        ref = np.asarray(model(jnp.asarray(full)))[0, len(p) - 1:]
        assert np.abs(got[i] - ref).max() <= 1e-4
    assert int(cache.index) == width + gen.shape[1]
    np.testing.assert_array_equal(np.asarray(cache.lengths), [5 + 6, 9 + 6])
    # Decode steps that attend over only the first 15 of the 20 slots (all that are written) agree.
    windowed = nnx.jit(lambda m, t, v, c: m.forward_with_cache(t, v, c, window=15))
    _, cache = step(model, jnp.asarray(ids), jnp.asarray(valid), model.init_cache(2, 20))
    for t in range(gen.shape[1]):
        h, cache = windowed(model, jnp.asarray(gen[:, t:t + 1]), jnp.ones((2, 1), bool), cache)
        np.testing.assert_allclose(np.asarray(model.logits(h[:, -1])), got[:, t + 1], atol=1e-5)
    with pytest.raises(ValueError, match="window must be in"):
        model.forward_with_cache(jnp.asarray(gen[:, :1]), jnp.ones((2, 1), bool), cache, window=21)


def test_per_layer_model_decodes_bit_for_bit_like_the_stacked_one():
    """`unstack_layers` (the sampler's layout: one array per layer and weight) is a copy of the layers
    whose cached prefill and decode give exactly the stacked model's hidden states, in bf16 too (the
    unrolled layers hand on each layer's output in the compute dtype, as the scanned ones do)."""
    from jaxmath.model.qwen3 import unstack_layers

    for dtype in (jnp.float32, jnp.bfloat16):
        model = jm.init_model(jm.preset("tiny", dtype=dtype, param_dtype=dtype), seed=1)
        per_layer = unstack_layers(model)
        assert len(per_layer.layers) == model.config.num_layers
        q_kernel = per_layer.layers[1].attn.q_proj.kernel.get_value()
        np.testing.assert_array_equal(q_kernel, model.layers.attn.q_proj.kernel.get_value()[1])
        ids = jnp.asarray(np.random.RandomState(0).randint(1, 200, (3, 10)), jnp.int32)
        step = nnx.jit(lambda m, t, c: m.forward_with_cache(t, jnp.ones(t.shape, bool), c, window=16))
        outs = []
        for m in (model, per_layer):
            h, cache = step(m, ids[:, :6], m.init_cache(3, 20))
            hs = [h]
            for t in range(6, 10):
                h, cache = step(m, ids[:, t:t + 1], cache)
                hs.append(h)
            outs.append(np.concatenate([np.asarray(x.astype(jnp.float32)) for x in hs], 1))
        np.testing.assert_array_equal(outs[0], outs[1])


def test_attention_kernel_choice():
    """Auto is decided from the platform the model is placed on, never from jax.default_backend():
    cuDNN for training attention on a GPU in bf16 with a head size it takes, XLA otherwise; an explicit
    choice is kept; the KV-cache path always uses XLA."""
    bf16 = jm.preset("tiny", dtype=jnp.bfloat16)  # head_dim 32
    assert bf16.attention_impl is None
    assert bf16.for_platform("gpu").attention_impl == "cudnn"
    assert bf16.for_platform("cpu").attention_impl == "xla"
    assert bf16.replace(dtype=jnp.float32).for_platform("gpu").attention_impl == "xla"
    assert bf16.replace(head_dim=256).for_platform("gpu").attention_impl == "xla"
    assert bf16.replace(attention_impl="xla").for_platform("gpu").attention_impl == "xla"
    assert bf16.replace(attention_impl="cudnn").for_platform("cpu").attention_impl == "cudnn"
    model = jm.init_model(bf16)  # placed on this CPU
    assert model.config.attention_impl == "xla"
    attn = jm.Qwen3(bf16.for_platform("gpu"), rngs=nnx.Rngs(0)).layers.attn
    assert attn.implementation_for(cached=False) == "cudnn"
    assert attn.implementation_for(cached=True) == "xla"
    assert jm.Qwen3(bf16, rngs=nnx.Rngs(0)).layers.attn.implementation_for(cached=False) == "xla"
    with pytest.raises(ValueError, match="attention_impl"):
        jm.preset("tiny", attention_impl="flash")


def test_seq_lengths_match_right_padded_segments():
    """Right-padded rows described by their lengths (the layout cuDNN takes without a mask) compute
    what the same rows described by segment ids compute, on XLA's attention."""
    model = jm.init_model(jm.preset("tiny", vocab_size=128, dtype=jnp.float32, param_dtype=jnp.float32), seed=2)
    lengths = np.array([7, 3, 9], np.int32)
    ids = np.random.RandomState(8).randint(2, 128, (3, 9))
    segments = (np.arange(9)[None] < lengths[:, None]).astype(np.int32)
    by_length = np.asarray(model.hidden_states(jnp.asarray(ids), seq_lengths=jnp.asarray(lengths)))
    by_segment = np.asarray(model.hidden_states(jnp.asarray(ids), segment_ids=jnp.asarray(segments)))
    real = segments.astype(bool)
    np.testing.assert_allclose(by_length[real], by_segment[real], atol=1e-6)
    with pytest.raises(ValueError, match="not both"):
        model.hidden_states(jnp.asarray(ids), segment_ids=jnp.asarray(segments), seq_lengths=jnp.asarray(lengths))


def test_hf_round_trip_bit_exact_and_loads_in_transformers(tmp_path):
    import torch
    from transformers import Qwen3ForCausalLM

    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    hf = make_hf_model(src, tie=False, num_heads=8, num_kv_heads=2, head_dim=24)
    model = jm.from_pretrained(src, dtype=jnp.float32)
    jm.save_pretrained(model, dst, max_shard_bytes=200_000)  # forces several shards and an index
    assert os.path.isfile(os.path.join(dst, "model.safetensors.index.json"))
    a, b = hf_io.CheckpointReader(src), hf_io.CheckpointReader(dst)
    assert set(a.where) == set(b.where)
    for name in a.where:
        x, y = a.read(name), b.read(name)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), name
    reloaded = Qwen3ForCausalLM.from_pretrained(dst, dtype=torch.float32)
    ids = np.random.RandomState(6).randint(0, 512, (2, 16))
    np.testing.assert_allclose(hf_logits(reloaded, ids), hf_logits(hf, ids), atol=1e-6)


def test_bf16_round_trip_bit_exact(tmp_path):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    make_hf_model(src, dtype="bfloat16")
    model = jm.from_pretrained(src, dtype=jnp.bfloat16)
    jm.save_pretrained(model, dst)
    a, b = hf_io.CheckpointReader(src), hf_io.CheckpointReader(dst)
    for name in a.where:
        assert a.read(name).tobytes() == b.read(name).tobytes(), name
    assert json.load(open(os.path.join(dst, "config.json")))["torch_dtype"] == "bfloat16"


def test_qwen3_4b_shapes_without_allocating():
    cfg = jm.preset("qwen3-4b")
    abstract = nnx.eval_shape(lambda: jm.Qwen3(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(abstract)
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
    assert total == 4_022_468_096 == cfg.num_params()
    assert state["embed"].get_value().shape == (151936, 2560)
    assert state["layers"]["attn"]["q_proj"]["kernel"].get_value().shape == (36, 2560, 32, 128)
    assert state["layers"]["attn"]["k_proj"]["kernel"].get_value().shape == (36, 2560, 8, 128)
    assert state["layers"]["attn"]["o_proj"]["kernel"].get_value().shape == (36, 32, 128, 2560)
    assert state["layers"]["mlp"]["down_proj"]["kernel"].get_value().shape == (36, 9728, 2560)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state))
    assert jm.preset("qwen3-8b").num_params() == 8_190_735_360


def test_config_reads_both_hf_writers():
    base = dict(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, head_dim=8, model_type="qwen3")
    v4 = jm.Qwen3Config.from_hf_dict({**base, "rope_theta": 5e6, "rope_scaling": None})
    v5 = jm.Qwen3Config.from_hf_dict({**base, "rope_parameters": {"rope_theta": 5e6, "rope_type": "default"}})
    assert v4.rope_theta == v5.rope_theta == 5e6 and v4.rope_scaling == v5.rope_scaling == ()
    yarn4 = jm.Qwen3Config.from_hf_dict({**base, "rope_theta": 1e6, "rope_scaling": {
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}})
    yarn5 = jm.Qwen3Config.from_hf_dict({**base, "rope_parameters": {
        "rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}})
    assert yarn4.rope_scaling == yarn5.rope_scaling
    np.testing.assert_array_equal(rope_inv_freq(yarn4)[0], rope_inv_freq(yarn5)[0])
    with pytest.raises(ValueError, match="model_type"):
        jm.Qwen3Config.from_hf_dict({**base, "model_type": "llama"})


def test_clear_errors_for_bad_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        jm.from_pretrained(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        jm.from_pretrained(str(tmp_path / "empty"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        jm.from_pretrained(str(tmp_path / "bad"))
    src = str(tmp_path / "trunc")
    make_hf_model(src)
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        os.rename(os.path.join(src, "model.safetensors"), os.path.join(src, "weights.bin"))
        jm.from_pretrained(src)
    data = open(os.path.join(src, "weights.bin"), "rb").read()
    open(os.path.join(src, "model.safetensors"), "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        jm.from_pretrained(src)


@pytest.mark.slow  # ~18 s of compiles
def test_token_logprobs_match_full_log_softmax():
    cfg = jm.preset("tiny", vocab_size=300, dtype=jnp.float32, param_dtype=jnp.float32)
    model = jm.init_model(cfg, seed=1)
    rng = np.random.RandomState(7)
    ids = jnp.asarray(rng.randint(0, 300, (3, 11)))
    targets = jnp.asarray(rng.randint(0, 300, (3, 11)))

    def chunked(m, temperature):
        h = m.hidden_states(ids)
        return jm.token_logprobs(h, m.head_weight, targets, temperature=temperature, chunk_size=8, with_entropy=True)

    def full(m, temperature):
        logp = jax.nn.log_softmax(m(ids) / temperature, -1)
        return jnp.take_along_axis(logp, targets[..., None], -1)[..., 0], -(jnp.exp(logp) * logp).sum(-1)

    for temperature in (1.0, 0.7):
        (lp, ent), (lp_ref, ent_ref) = chunked(model, temperature), full(model, temperature)
        np.testing.assert_allclose(lp, lp_ref, atol=1e-5)
        np.testing.assert_allclose(ent, ent_ref, atol=1e-5)
    g = nnx.grad(lambda m: chunked(m, 1.0)[0].sum())(model)
    g_ref = nnx.grad(lambda m: full(m, 1.0)[0].sum())(model)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.slow  # two backward compiles
def test_remat_does_not_change_gradients():
    """Every model.remat policy gives the gradients of none; "attention" and "attention_mlp" keep the
    q, k, v projections and the residual after attention (and the MLP's gate and up) for the backward
    pass, so their compiled gradient programs recompute fewer matmuls than "full"'s."""
    import re

    cfg = jm.preset("tiny", vocab_size=300, dtype=jnp.float32, param_dtype=jnp.float32)
    ids = jnp.asarray(np.random.RandomState(8).randint(0, 300, (2, 9)))
    grads, dots = {}, {}
    model = jm.init_model(cfg, seed=1)
    for remat in ("none", "full", "dots", "attention", "attention_mlp"):
        model.config = model.config.replace(remat=remat)
        graphdef, state = nnx.split(model)
        compiled = jax.jit(jax.grad(lambda s: nnx.merge(graphdef, s).hidden_states(ids, remat=True).sum())
                           ).lower(state).compile()
        grads[remat] = compiled(state)
        dots[remat] = len(re.findall(r"\bdot\(", compiled.as_text()))
    for remat in ("full", "dots", "attention", "attention_mlp"):
        for a, b in zip(jax.tree.leaves(grads["none"]), jax.tree.leaves(grads[remat])):
            # recomputation may fuse differently, so float32 rounding differs slightly
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
    assert dots["full"] > dots["attention"] > dots["attention_mlp"], dots


@pytest.mark.slow  # 8-17 s: out of the fast subset's 10 minutes (the whole suite runs it)
def test_sharded_forward_matches_one_device(tmp_path):
    # A fresh process, so the 8 fake devices exist whatever this process's jax was started with.
    d = str(tmp_path / "m")
    make_hf_model(d, num_heads=4, num_kv_heads=2, head_dim=32, tie=False)
    script = textwrap.dedent(f"""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        import jax, jax.numpy as jnp, numpy as np
        from flax import nnx
        import jaxmath.model as jm
        from jaxmath.model import sharding
        assert jax.device_count() == 8
        ids = jnp.asarray(np.random.RandomState(0).randint(0, 512, (8, 16)))
        ref = np.asarray(jm.from_pretrained({d!r}, dtype=jnp.float32)(ids))
        for fsdp, tp in ((4, 2), (8, 1), (2, 4)):
            mesh = sharding.make_mesh(fsdp=fsdp, tp=tp)
            model = jm.from_pretrained({d!r}, dtype=jnp.float32, mesh=mesh)
            kernel = model.layers.mlp.gate_proj.kernel.get_value()
            assert len(kernel.sharding.device_set) == 8, kernel.sharding
            with sharding.use_mesh(mesh):
                out = nnx.jit(lambda m, x: m(x))(model, ids)
            err = float(np.abs(np.asarray(out) - ref).max())
            assert err <= 1e-4, (fsdp, tp, err)
        print("OK")
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def test_init_model_is_sharded_at_creation():
    from jaxmath.model import sharding

    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices")
    mesh = sharding.make_mesh(fsdp=4, tp=2)
    model = jm.init_model(jm.preset("tiny", vocab_size=256, dtype=jnp.float32, param_dtype=jnp.float32), mesh=mesh)
    spec = model.layers.attn.q_proj.kernel.get_value().sharding.spec
    assert tuple(spec) == (None, "fsdp", "tp", None)
    assert tuple(model.embed.get_value().sharding.spec) == ("tp", "fsdp")


@pytest.mark.slow  # compiles two initializations
def test_init_rng_impl_cuts_the_init_temporary():
    """rbg (used by the benchmarks' random-weight presets) needs a fraction of threefry's init memory."""
    from jaxmath.model.qwen3 import Qwen3

    config = jm.preset("qwen3-0.6b")

    def temp_bytes(impl):
        init = jax.jit(lambda: nnx.split(Qwen3(config, rngs=nnx.Rngs(jax.random.key(0, impl=impl))))[1])
        return init.lower().compile().memory_analysis().temp_size_in_bytes

    weights = config.num_params() * 2
    assert temp_bytes("threefry2x32") > 3 * weights > 2 * temp_bytes("rbg")
    small = jm.preset("tiny", vocab_size=256)
    a, b = (jm.init_model(small, rng_impl=impl) for impl in ("threefry2x32", "rbg"))
    assert a.embed.get_value().shape == b.embed.get_value().shape
    assert not np.array_equal(np.asarray(a.embed.get_value()), np.asarray(b.embed.get_value()))
    np.testing.assert_array_equal(np.asarray(jm.init_model(small, rng_impl="rbg").embed.get_value()),
                                  np.asarray(b.embed.get_value()))  # seeded: the same weights again
