"""The sharding tables are strict (an unknown logical axis or two axes on one mesh axis raise), and no
constraint is dropped silently: eager constraints outside a mesh raise for arrays on several devices,
and steps built with `jit_on_mesh` run under the mesh of their arguments. About 10 s on 8 fake devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import jaxmath.model as jm
from jaxmath.model import lora, sharding

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices (tests/conftest.py)")


def test_unknown_logical_axis_raises():
    with pytest.raises(ValueError, match="'embd' is not in the sharding table"):
        sharding.logical_to_spec(("vocab", "embd"))
    with pytest.raises(ValueError, match="'layers' is not in the sharding table"):
        sharding.constrain(jnp.zeros((2, 3)), ("layers", "embed"))  # a parameter axis on an activation


def test_two_axes_on_one_mesh_axis_raise():
    rules = {**sharding.PARAM_RULES, "batch": ("data", "fsdp")}
    with pytest.raises(ValueError, match="a mesh axis may shard one dimension"):
        sharding.logical_to_spec(("batch", "embed"), rules=rules)  # both want fsdp
    # Activations keep their embed dimension whole, so batch can take fsdp without a collision.
    assert sharding.logical_to_spec(("batch", "seq", "embed"), rules=sharding.ACTIVATION_RULES) == \
        PartitionSpec(("data", "fsdp"), None, None)


def test_every_parameter_of_the_model_maps_without_collision():
    model = jm.init_model(jm.preset("tiny", vocab_size=256))
    lora.apply_lora(model, lora.LoRAConfig(rank=4, alpha=8.0), seed=0)
    variables = jax.tree.leaves(nnx.state(model), is_leaf=lambda x: isinstance(x, nnx.Variable))
    for var in variables:
        sharding.logical_to_spec(var.get_metadata()["axes"])  # raises on an unknown axis or a collision
    assert len(variables) > 10


@needs_8
def test_constraint_outside_a_mesh_on_a_sharded_array_raises():
    mesh = sharding.make_mesh(fsdp=8)
    x = jax.device_put(np.zeros((8, 16), np.float32), NamedSharding(mesh, PartitionSpec("fsdp")))
    with pytest.raises(ValueError, match="outside a mesh on an array placed on 8 devices"):
        sharding.constrain(x, ("batch", "embed"))
    with sharding.use_mesh(mesh):
        assert sharding.constrain(x, ("batch", "embed")).shape == (8, 16)
    single = jnp.zeros((8, 16))
    assert sharding.constrain(single, ("batch", "embed")) is single  # one device: nothing to constrain


@needs_8
def test_jit_on_mesh_applies_constraints_on_the_arguments_mesh():
    mesh = sharding.make_mesh(fsdp=8)
    values = np.arange(8 * 16, dtype=np.float32).reshape(8, 16)
    replicated = jax.device_put(values, NamedSharding(mesh, PartitionSpec()))

    def double():  # a fresh function each time: jax caches traces per function
        return lambda x: sharding.constrain(2 * x, ("batch", "embed"))

    out = sharding.jit_on_mesh(double())(replicated)  # no use_mesh around the call
    assert out.sharding.spec == PartitionSpec("fsdp"), out.sharding  # split over the batch axes (data has size 1)
    np.testing.assert_array_equal(np.asarray(out), 2 * np.asarray(replicated))
    # A plain jit traces without a mesh, so the constraint does not apply: what jit_on_mesh prevents.
    assert jax.jit(double())(replicated).sharding.is_fully_replicated
    abstract = jax.ShapeDtypeStruct((8, 16), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
    assert "sharding_constraint" in sharding.jit_on_mesh(double()).lower(abstract).as_text()
    assert "sharding_constraint" not in jax.jit(double()).lower(abstract).as_text()
