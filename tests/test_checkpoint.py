"""Tests for jaxmath.checkpoint: exact round trips, retention, resume, sharding and damaged checkpoints."""

import dataclasses
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxmath import checkpoint
from jaxmath.checkpoint import (
    CheckpointError,
    CheckpointManager,
    DamagedCheckpointError,
    TrainState,
    load_pytree,
    restore_or_none,
    save_pytree,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _bits(x) -> np.ndarray:
    """Raw bytes of an array, so bf16 and NaN payloads compare exactly."""
    return np.ascontiguousarray(np.asarray(x)).view(np.uint8)


def assert_trees_bit_equal(a, b):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        assert np.asarray(x).shape == np.asarray(y).shape
        np.testing.assert_array_equal(_bits(x), _bits(y))


def _params():
    key_w, key_b = jax.random.split(jax.random.key(0))
    return {
        "embed": jax.random.normal(key_w, (4, 8), jnp.bfloat16),
        "layers": {"w": jax.random.normal(key_b, (8, 8), jnp.float32), "b": jnp.zeros((8,), jnp.float32)},
    }


def _train_state(step: int = 7, params=None) -> TrainState:
    """A state after `step` adamw updates, so mu, nu and count are all non-trivial."""
    params = _params() if params is None else params
    optimizer = optax.adamw(1e-2)
    opt_state = optimizer.init(params)
    for i in range(2):
        grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1 * (i + 1)), params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return TrainState(
        params=params,
        opt_state=opt_state,
        step=step,
        data_cursor={"epoch": 1, "index": 37, "order_seed": 5},
        rng_key=jax.random.fold_in(jax.random.key(42), step),
        config={"lr": 0.01, "model": {"name": "tiny", "layers": 2}, "lora": None},
    )


def test_round_trip_is_bit_exact(tmp_path):
    state = _train_state()
    with CheckpointManager(tmp_path) as manager:
        assert manager.save(state.step, state)
        restored = manager.restore(target=state)
    assert_trees_bit_equal(restored.params, state.params)
    assert restored.params["embed"].dtype == jnp.bfloat16
    # Structure check covers the namedtuple types; the count must survive to keep bias correction.
    assert_trees_bit_equal(restored.opt_state, state.opt_state)
    assert type(restored.opt_state[0]) is type(state.opt_state[0])
    assert int(restored.opt_state[0].count) == 2
    assert jax.dtypes.issubdtype(restored.rng_key.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(restored.rng_key), jax.random.key_data(state.rng_key))
    assert restored.step == 7
    assert restored.data_cursor == {"epoch": 1, "index": 37, "order_seed": 5}
    assert restored.config == state.config
    # The config is also plain JSON on disk for people.
    assert '"layers": 2' in (tmp_path / "7" / "config" / "config.json").read_text()


def test_raw_uint32_key_and_no_target(tmp_path):
    state = _train_state()
    raw_key = jax.random.PRNGKey(9)
    state = dataclasses.replace(state, rng_key=raw_key)
    with CheckpointManager(tmp_path) as manager:
        manager.save(state.step, state)
        restored = manager.restore()
    assert restored.rng_key.dtype == jnp.uint32
    np.testing.assert_array_equal(restored.rng_key, raw_key)
    # Without a target: host numpy in plain containers, same bits.
    assert isinstance(restored.params["embed"], np.ndarray)
    assert_trees_bit_equal(restored.params, state.params)
    np.testing.assert_array_equal(restored.opt_state[0]["count"], 2)
    np.testing.assert_array_equal(_bits(restored.opt_state[0]["mu"]["embed"]), _bits(state.opt_state[0].mu["embed"]))


def test_nnx_state_params_round_trip(tmp_path):
    model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
    params = nnx.state(model, nnx.Param)
    state = _train_state(step=3, params=params)
    with CheckpointManager(tmp_path) as manager:
        manager.save(3, state)
        abstract_params = nnx.state(
            nnx.eval_shape(lambda: nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(5)), nnx.Linear(4, 2, rngs=nnx.Rngs(6)))),
            nnx.Param,
        )
        target = dataclasses.replace(state, params=abstract_params)
        restored = manager.restore(target=target)
    assert isinstance(restored.params, nnx.State)
    assert_trees_bit_equal(nnx.to_pure_dict(restored.params), nnx.to_pure_dict(state.params))
    assert_trees_bit_equal(restored.opt_state, state.opt_state)
    # The abstract target itself is left abstract.
    assert isinstance(jax.tree.leaves(abstract_params)[0], jax.ShapeDtypeStruct)
    # The restored State plugs back into a model.
    fresh = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(8)), nnx.Linear(4, 2, rngs=nnx.Rngs(9)))
    nnx.update(fresh, restored.params)
    x = jnp.ones((1, 3))
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    np.testing.assert_array_equal(fresh(x), nnx.merge(graphdef, state.params, rest)(x))


@pytest.mark.parametrize("opt_state", [(), optax.sgd(0.1).init({"w": jnp.ones(2)})])
def test_leafless_optimizer_state(tmp_path, opt_state):
    """Stateless optimizers give trees without arrays, which orbax alone refuses to save."""
    state = TrainState(_params(), opt_state, 2, {"index": 2}, jax.random.key(0), {})
    with CheckpointManager(tmp_path) as manager:
        assert manager.save(2, state)
        restored = manager.restore(target=state)
        assert manager.restore().opt_state is None
    assert restored.opt_state == opt_state
    assert_trees_bit_equal(restored.params, state.params)


def test_resume_continues_exactly(tmp_path):
    """N steps, save, restore, N more steps == 2N steps in one go (params, opt state and key)."""
    optimizer = optax.adamw(3e-2, weight_decay=0.1)
    x = jax.random.normal(jax.random.key(1), (16, 4))
    y = x @ jnp.arange(4.0)

    @jax.jit
    def train_step(params, opt_state, key):
        key, noise_key = jax.random.split(key)
        noisy_x = x + 0.01 * jax.random.normal(noise_key, x.shape)
        grads = jax.grad(lambda p: jnp.mean((noisy_x @ p["w"] - y) ** 2))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, key

    def run(state, steps):
        params, opt_state, key = state.params, state.opt_state, state.rng_key
        for _ in range(steps):
            params, opt_state, key = train_step(params, opt_state, key)
        return TrainState(params, opt_state, state.step + steps, {"index": state.step + steps}, key, {})

    params = {"w": jnp.zeros((4,))}
    start = TrainState(params, optimizer.init(params), 0, {"index": 0}, jax.random.key(0), {})
    straight = run(start, 6)
    with CheckpointManager(tmp_path) as manager:
        half = run(start, 3)
        manager.save(half.step, half)
    resumed = restore_or_none(tmp_path, target=start)
    assert resumed.step == 3 and resumed.data_cursor == {"index": 3}
    finished = run(resumed, 3)
    assert_trees_bit_equal(finished.params, straight.params)
    assert_trees_bit_equal(finished.opt_state, straight.opt_state)
    np.testing.assert_array_equal(jax.random.key_data(finished.rng_key), jax.random.key_data(straight.rng_key))


def test_keep_last_removes_old_steps(tmp_path):
    state = _train_state()
    with CheckpointManager(tmp_path, keep_last=2) as manager:
        for step in (10, 20, 30, 40):
            assert manager.save(step, dataclasses.replace(state, step=step))
        assert manager.all_steps() == [30, 40]
        assert manager.latest_step() == 40
        # A step that exists is not saved twice.
        assert not manager.save(40, dataclasses.replace(state, step=40))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["30", "40"]
    with pytest.raises(ValueError, match="same step"):
        CheckpointManager(tmp_path).save(50, state)
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)


@pytest.mark.parametrize("mode, expected_best", [("max", 20), ("min", 30)])
def test_keep_best_keeps_best_by_metric(tmp_path, mode, expected_best):
    state = _train_state()
    accuracies = {10: 0.5, 20: 0.9, 30: 0.1, 40: float("nan"), 50: 0.6, 60: 0.7}
    with CheckpointManager(tmp_path, keep_last=1, keep_best=1, best_metric="eval_accuracy", best_mode=mode) as manager:
        for step, accuracy in accuracies.items():
            manager.save(step, dataclasses.replace(state, step=step), metrics={"eval_accuracy": accuracy})
        assert manager.all_steps() == [expected_best, 60]
        assert manager.best_step() == expected_best
        assert manager.metrics(60) == {"eval_accuracy": 0.7}
    # A new manager on the same directory sees the same ranking (metrics are on disk).
    manager = CheckpointManager(tmp_path, keep_last=1, keep_best=1, best_metric="eval_accuracy", best_mode=mode)
    assert manager.best_step() == expected_best
    assert manager.restore(expected_best, target=state).step == expected_best
    manager.close()


def test_nan_metric_is_stored_as_null_and_never_best(tmp_path):
    state = _train_state()
    with CheckpointManager(tmp_path, keep_last=5, best_metric="reward") as manager:
        manager.save(1, dataclasses.replace(state, step=1), metrics={"reward": 0.2})
        manager.save(2, dataclasses.replace(state, step=2), metrics={"reward": float("inf")})
        assert manager.metrics(2) == {"reward": None}
        assert manager.best_step() == 1


def test_latest_and_restore_or_none(tmp_path):
    assert restore_or_none(tmp_path / "missing", target=None) is None
    assert restore_or_none(tmp_path, target=None) is None
    state = _train_state()
    with CheckpointManager(tmp_path, async_save=True) as manager:
        for step in (1, 2):
            manager.save(step, TrainState(**{**state.__dict__, "step": step, "data_cursor": {"index": step}}))
        # No explicit wait: restore itself waits for the in-flight async save of step 2.
        assert manager.latest_step() == 2
        assert manager.restore(target=state).step == 2
        assert manager.restore(1, target=state).data_cursor == {"index": 1}
        with pytest.raises(CheckpointError, match="no checkpoint at .*5"):
            manager.restore(5, target=state)
    resumed = restore_or_none(tmp_path, target=state)
    assert resumed.step == 2
    assert_trees_bit_equal(resumed.params, state.params)


def test_interrupted_save_never_becomes_latest(tmp_path):
    state = _train_state()
    with CheckpointManager(tmp_path) as manager:
        manager.save(7, state)
    # What a save killed mid-write leaves behind: orbax's tmp directory for a later step.
    bogus = tmp_path / "8.orbax-checkpoint-tmp-1700000000"
    (bogus / "params").mkdir(parents=True)
    (bogus / "params" / "garbage").write_bytes(b"\x00" * 10)
    manager = CheckpointManager(tmp_path)
    assert manager.all_steps() == [7]
    assert manager.latest_step() == 7
    assert restore_or_none(tmp_path, target=state).step == 7
    manager.close()


def test_partial_latest_checkpoint_falls_back_or_is_refused(tmp_path):
    state = _train_state()
    with CheckpointManager(tmp_path) as manager:
        manager.save(5, dataclasses.replace(state, step=5))
        manager.save(7, state)
    step_dir = tmp_path / "7"
    shutil.rmtree(step_dir / "opt_state")
    # Refusing names the directory, what is missing and the step to go back to; it changes nothing.
    with CheckpointManager(tmp_path, on_damaged="refuse") as manager, pytest.raises(DamagedCheckpointError) as info:
        manager.restore(target=state)
    message = str(info.value)
    assert str(step_dir) in message and "opt_state" in message and "[5]" in message
    assert "\n" not in message and step_dir.is_dir()
    # An explicit step is never replaced by another one.
    with CheckpointManager(tmp_path) as manager, pytest.raises(DamagedCheckpointError, match="opt_state"):
        manager.restore(7, target=state)
    # The default resumes from the newest good step and keeps the damaged one, renamed.
    with CheckpointManager(tmp_path) as manager:
        assert manager.restore(target=state).step == 5
        assert manager.all_steps() == [5]
        # The run can write step 7 again.
        assert manager.save(7, state)
        assert manager.restore(target=state).step == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["5", "7", "7.damaged"]


def test_truncated_only_checkpoint_is_an_error_that_names_it(tmp_path):
    state = _train_state()
    with CheckpointManager(tmp_path) as manager:
        manager.save(7, state)
    data_files = [p for p in (tmp_path / "7" / "params").rglob("*") if p.is_file() and p.stat().st_size > 64]
    assert data_files
    for path in data_files:
        path.write_bytes(path.read_bytes()[:16])
    with CheckpointManager(tmp_path) as manager, pytest.raises(CheckpointError) as info:
        manager.restore(target=state)
    assert str(tmp_path / "7") in str(info.value) and "damaged" in str(info.value)
    assert "\n" not in str(info.value)
    assert (tmp_path / "7").is_dir()  # nothing to fall back to: left as it was


def test_save_and_load_pytree(tmp_path):
    params = _params()
    save_pytree(tmp_path / "params", params)
    assert_trees_bit_equal(load_pytree(tmp_path / "params", target=params), params)
    plain = load_pytree(tmp_path / "params")
    assert isinstance(plain["embed"], np.ndarray)
    assert_trees_bit_equal(plain, params)
    abstract = jax.eval_shape(lambda: params)
    restored = load_pytree(tmp_path / "params", target=abstract)
    assert isinstance(restored["embed"], jax.Array) and restored["embed"].dtype == jnp.bfloat16
    with pytest.raises(CheckpointError, match="no pytree checkpoint"):
        load_pytree(tmp_path / "nope")


_SHARDED_SCRIPT = textwrap.dedent(
    """
    import sys, jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from jaxmath.checkpoint import CheckpointManager, TrainState
    assert jax.device_count() == 8, jax.devices()
    directory = sys.argv[1]
    save_mesh = Mesh(np.array(jax.devices()).reshape(8), ("fsdp",))
    w = jax.device_put(jnp.arange(64 * 16, dtype=jnp.float32).reshape(64, 16), NamedSharding(save_mesh, P("fsdp", None)))
    e = jax.device_put(jnp.arange(16 * 8, dtype=jnp.bfloat16).reshape(16, 8), NamedSharding(save_mesh, P(None, "fsdp")))
    params = {"w": w, "e": e}
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(params)
    keys = jax.random.split(jax.random.key(1), 8)
    state = TrainState(params, opt_state, 4, {"index": 4}, keys, {})
    with CheckpointManager(directory) as manager:
        manager.save(4, state)
    # Restore onto a different layout: a 2x4 mesh, sharded along other axes.
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "tp"))
    shardings = {"w": NamedSharding(mesh, P("tp", "data")), "e": NamedSharding(mesh, P("data", None))}
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k]) for k, v in params.items()}
    abstract_opt = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())),
        opt_state)
    key_shape = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), 8))
    key_sharding = NamedSharding(mesh, P(("data", "tp")))
    abstract_key = jax.ShapeDtypeStruct(key_shape.shape, key_shape.dtype, sharding=key_sharding)
    target = TrainState(abstract, abstract_opt, 0, {}, abstract_key, {})
    with CheckpointManager(directory) as manager:
        restored = manager.restore(target=target)
    for k in params:
        assert restored.params[k].sharding == shardings[k], (k, restored.params[k].sharding)
        np.testing.assert_array_equal(np.asarray(restored.params[k]), np.asarray(params[k]))
    mu = restored.opt_state[0].mu["w"]
    assert mu.sharding == NamedSharding(mesh, P()), mu.sharding
    assert restored.step == 4
    # A per-device batch of typed keys keeps its sharding too.
    assert restored.rng_key.sharding == key_sharding, restored.rng_key.sharding
    np.testing.assert_array_equal(jax.random.key_data(restored.rng_key), jax.random.key_data(keys))
    print("SHARDED_OK", len(restored.params["w"].addressable_shards))
    """
)


def test_restore_keeps_target_sharding_on_8_devices(tmp_path):
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(
        [sys.executable, "-c", _SHARDED_SCRIPT, str(tmp_path / "ckpt")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "SHARDED_OK 8" in result.stdout


def _rewrite_json(path: Path, edit) -> None:
    import json

    value = json.loads(path.read_text())
    edit(value)
    path.write_text(json.dumps(value))


def test_edited_meta_or_config_is_damage(tmp_path):
    """A changed digit in the data cursor or the config is caught by their digests, not restored."""
    state = _train_state()
    with CheckpointManager(tmp_path) as manager:
        manager.save(5, dataclasses.replace(state, step=5))
        manager.save(6, dataclasses.replace(state, step=6))
        manager.save(7, state)
    _rewrite_json(tmp_path / "7" / "meta" / "meta.json", lambda meta: meta["data_cursor"].update(index=38))
    _rewrite_json(tmp_path / "6" / "config" / "config.json", lambda config: config.update(lr=0.02))
    with CheckpointManager(tmp_path) as manager:
        with pytest.raises(DamagedCheckpointError, match="meta.json does not match its checksum"):
            manager.restore(7, target=state)
        with pytest.raises(DamagedCheckpointError, match="config.json does not match its checksum"):
            manager.restore(6, target=state)
        restored = manager.restore(target=state)
    assert restored.step == 5 and restored.data_cursor == state.data_cursor
    assert sorted(p.name for p in tmp_path.iterdir()) == ["5", "6.damaged", "7.damaged"]


def test_a_target_that_does_not_fit_is_not_damage(tmp_path):
    """A run whose model changed must not mistake every checkpoint for damage and set them aside."""
    state = _train_state()
    with CheckpointManager(tmp_path) as manager:
        manager.save(5, dataclasses.replace(state, step=5))
        manager.save(7, state)
    bigger = {**state.params, "embed": jnp.zeros((4, 16), jnp.bfloat16)}
    target = dataclasses.replace(state, params=bigger, opt_state=optax.adamw(1e-2).init(bigger))
    with CheckpointManager(tmp_path) as manager, pytest.raises(CheckpointError) as info:
        manager.restore(target=target)
    assert not isinstance(info.value, DamagedCheckpointError)
    assert "'embed' has shape (4, 8) there and (4, 16) here" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["5", "7"]


def test_format_1_checkpoint_is_refused_as_unverifiable_unless_accepted(tmp_path, monkeypatch):
    """A version-1 step carries no digests: refused in one line naming the flag; restored with it."""
    state = _train_state()
    with CheckpointManager(tmp_path) as manager:
        manager.save(7, state)

    def to_format_1(meta):
        for key in ("arrays", "config_sha256", "meta_sha256"):
            del meta[key]
        meta["format_version"] = 1

    _rewrite_json(tmp_path / "7" / "meta" / "meta.json", to_format_1)
    with CheckpointManager(tmp_path) as manager, pytest.raises(CheckpointError) as info:
        manager.restore(target=state)
    assert not isinstance(info.value, DamagedCheckpointError)  # not renamed aside: it may be fine, just old
    assert "format_version 1" in str(info.value) and "--allow_unverified" in str(info.value)
    assert "\n" not in str(info.value) and (tmp_path / "7").is_dir()
    monkeypatch.setattr(checkpoint.digests, "_accept_unverified", False)
    checkpoint.accept_unverified()
    with CheckpointManager(tmp_path) as manager:
        restored = manager.restore(target=state)
    assert_trees_bit_equal(restored.params, state.params)


def _big_params():
    """Parameters whose data is large enough to sit in its own data file (256 KiB), so a flipped byte in
    the largest file lands in array data."""
    return {"w": jax.random.normal(jax.random.key(1), (256, 256), jnp.float32), "b": jnp.ones((300,), jnp.float32)}


def _flip_a_byte_of_the_data(directory: Path) -> None:
    data = max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    flipped = bytearray(data.read_bytes())
    flipped[len(flipped) // 2] ^= 0x10
    data.write_bytes(bytes(flipped))


@pytest.mark.parametrize("target", ["same dtype", "cast to bfloat16", "none"])
def test_a_flipped_byte_in_a_saved_pytree_is_refused(tmp_path, target):
    """save_pytree records every array's digest; load_pytree compares the bits it read (in the saved
    dtype, before any cast the target asks for) and refuses a flipped byte in one line naming the array."""
    params = _big_params()
    save_pytree(tmp_path / "params", params)
    assert (tmp_path / "params" / checkpoint.PYTREE_DIGESTS_FILE).is_file()
    wanted = {"same dtype": params, "cast to bfloat16": jax.tree.map(lambda x: x.astype(jnp.bfloat16), params),
              "none": None}[target]
    intact = load_pytree(tmp_path / "params", target=wanted)
    if target == "cast to bfloat16":
        assert intact["w"].dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(intact["w"]), np.asarray(params["w"].astype(jnp.bfloat16)))
    else:
        assert_trees_bit_equal(intact, params)
    _flip_a_byte_of_the_data(tmp_path / "params")
    with pytest.raises(DamagedCheckpointError) as info:
        load_pytree(tmp_path / "params", target=wanted)
    assert "array pytree/w differs from its saved checksum" in str(info.value) and "\n" not in str(info.value)


def test_a_pytree_without_digests_is_refused_unless_accepted(tmp_path, monkeypatch):
    params = _params()
    save_pytree(tmp_path / "params", params)
    (tmp_path / "params" / checkpoint.PYTREE_DIGESTS_FILE).unlink()  # as an older jaxmath wrote it
    with pytest.raises(CheckpointError, match="cannot be verified.*--allow_unverified"):
        load_pytree(tmp_path / "params", target=params)
    monkeypatch.setattr(checkpoint.digests, "_accept_unverified", False)
    checkpoint.accept_unverified()
    assert_trees_bit_equal(load_pytree(tmp_path / "params", target=params), params)


def test_a_cast_restore_of_a_run_step_is_verified(tmp_path):
    """A target in another dtype than the step was saved in: the bits are compared before the cast, so a
    flipped byte is found (it was not, when cast arrays were left uncompared)."""
    params = _big_params()
    state = _train_state(params=params)
    with CheckpointManager(tmp_path) as manager:
        manager.save(7, state)
    cast = jax.tree.map(lambda x: x.astype(jnp.bfloat16), state.params)
    target = dataclasses.replace(state, params=cast)
    with CheckpointManager(tmp_path) as manager:
        restored = manager.restore(step=7, target=target)
    assert restored.params["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(restored.params["w"]), np.asarray(cast["w"]))
    _flip_a_byte_of_the_data(tmp_path / "7" / "params")
    with CheckpointManager(tmp_path) as manager, pytest.raises(DamagedCheckpointError, match="params/w differs"):
        manager.restore(step=7, target=target)


def test_failed_write_is_one_line_and_leaves_the_previous_step(tmp_path, monkeypatch):
    """What orbax raises on a full disk (a TensorStore ValueError carrying the OS error code)."""
    state = _train_state()
    manager = CheckpointManager(tmp_path)
    manager.save(5, dataclasses.replace(state, step=5))
    orbax_save = manager._manager.save

    def full_disk(step, *args, **kwargs):
        (tmp_path / f"{step}.orbax-checkpoint-tmp" / "params").mkdir(parents=True)
        raise ValueError('RESOURCE_EXHAUSTED: Error writing "w/0.0" in OCDBT database\n  spec: {...}\n'
                         "Failed to write 39494 bytes to file 33: No space left on device [os_error_code='28']")

    monkeypatch.setattr(manager._manager, "save", full_disk)
    with pytest.raises(CheckpointError) as info:
        manager.save(7, state)
    message = str(info.value)
    assert "\n" not in message
    assert f"could not write checkpoint step 7 to {tmp_path / '7'}: No space left on device" in message
    assert f"the previous checkpoint ({tmp_path / '5'}) is intact" in message
    assert "free space on that disk" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["5"]  # the partial write is gone
    monkeypatch.setattr(manager._manager, "save", orbax_save)
    assert manager.restore(target=state).step == 5
    assert manager.save(7, state)  # once there is space again
    manager.close()


def test_digests_ignore_layout_and_see_every_bit():
    """The same values give the same digest sharded 8 ways, on one device and in numpy (the path used
    on many hosts); one flipped bit or two swapped elements change it; an optax namedtuple and the
    plain dicts a target-less restore gives share paths."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from jaxmath import checksum

    x = jax.random.normal(jax.random.key(0), (64, 16), jnp.bfloat16)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b"))
    sharded = jax.device_put(x, NamedSharding(mesh, P("b", "a")))
    (dtype, shape, digest), = checksum.digests({"x": x}).values()
    assert (dtype, shape) == ("bfloat16", (64, 16))
    assert checksum.digests({"x": sharded})["x"][2] == digest == checksum.digests({"x": np.asarray(x)})["x"][2]
    assert "%08x%08x" % checksum._host_digest(np.asarray(x)) == digest
    flipped = np.asarray(x).copy()
    flipped.view(np.uint16)[3, 5] ^= 1
    swapped = np.asarray(x).copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert checksum.digests({"x": flipped})["x"][2] != digest != checksum.digests({"x": swapped})["x"][2]
    opt = optax.adam(1e-3).init({"w": jnp.ones(3)})
    assert set(checksum.digests(opt)) == {"0/count", "0/mu/w", "0/nu/w"}
    as_dicts = [{"count": np.asarray(opt[0].count), "mu": {"w": np.ones(3, np.float32) * 0},
                 "nu": {"w": np.zeros(3, np.float32)}}, {}]
    assert checksum.digests(as_dicts) == checksum.digests(opt)
