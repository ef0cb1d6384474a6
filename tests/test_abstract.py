"""Abstract restore targets: trees of jax.ShapeDtypeStruct and nnx.eval_shape states."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from _trees import assert_identical, cpu_mesh
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from datarax_ckpt import StructureMismatchError


def make_state():
    return {
        "params": {"w": jnp.arange(24.0).reshape(8, 3), "b": jnp.ones(3, jnp.bfloat16)},
        "rng": jax.random.key(3),
        "step": jnp.int32(5),
    }


def test_orbax_style_abstract_tree_restores_real_arrays(handler, tmp_path):
    state = make_state()
    handler.save(tmp_path, state, step=1)
    # Orbax's own idiom for "restore this, here".
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    assert isinstance(abstract["rng"], jax.ShapeDtypeStruct)
    restored = handler.restore(tmp_path, abstract)
    # jax.tree.map sorts dict keys: the result has the target's order.
    assert_identical(restored, jax.tree.map(lambda x: x, state))


def test_abstract_dtype_converts_and_sharding_places(handler, tmp_path):
    state = make_state()
    handler.save(tmp_path, state, step=1)
    mesh = cpu_mesh((4,), ("data",))
    rows = NamedSharding(mesh, P("data", None))
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    abstract["params"]["w"] = jax.ShapeDtypeStruct((8, 3), jnp.bfloat16, sharding=rows)
    abstract["rng"] = jax.ShapeDtypeStruct(
        (), state["rng"].dtype, sharding=NamedSharding(mesh, P())
    )
    restored = handler.restore(tmp_path, abstract)
    w = restored["params"]["w"]
    assert isinstance(w, jax.Array) and w.dtype == jnp.bfloat16 and w.sharding == rows
    assert jnp.array_equal(w, state["params"]["w"].astype(jnp.bfloat16))
    assert restored["rng"].sharding.mesh == mesh
    assert_identical(jax.random.key_data(restored["rng"]), jax.random.key_data(state["rng"]))


def test_abstract_shape_mismatch_names_path(handler, tmp_path):
    handler.save(tmp_path, make_state(), step=1)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, make_state())
    abstract["params"]["w"] = jax.ShapeDtypeStruct((3, 8), jnp.float32)
    with pytest.raises(StructureMismatchError, match=r"\['params'\]\['w'\].*shape \(3, 8\)"):
        handler.restore(tmp_path, abstract)


def test_abstract_key_with_another_impl_is_refused(handler, tmp_path):
    handler.save(tmp_path, {"rng": jax.random.key(0)}, step=1)
    other = jax.ShapeDtypeStruct((), jax.random.key(0, impl="rbg").dtype)
    with pytest.raises(StructureMismatchError, match=r"rbg key.*threefry2x32 key"):
        handler.restore(tmp_path, {"rng": other})


class Sharded(nnx.Module):
    def __init__(self, rngs):
        init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("data", None))
        self.linear = nnx.Linear(8, 4, kernel_init=init, rngs=rngs)


def test_sharded_model_restores_onto_eval_shape_state_under_the_mesh(handler, tmp_path):
    # Flax's sharded-restore pattern: the abstract state (from nnx.eval_shape inside the
    # mesh) carries shardings over an AbstractMesh; the restore runs under the real mesh.
    mesh = cpu_mesh((4,), ("data",))
    with jax.set_mesh(mesh):
        model = Sharded(nnx.Rngs(0))
        handler.save(tmp_path, nnx.state(model), step=1)
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Sharded(nnx.Rngs(1))))
        restored = handler.restore(tmp_path, abstract)
    kernel = restored["linear"]["kernel"]
    assert type(kernel) is nnx.Param and kernel.get_metadata("out_sharding") == ("data", None)
    assert kernel[...].sharding == NamedSharding(mesh, P("data", None))
    assert jnp.array_equal(kernel[...], model.linear.kernel[...])
    merged = nnx.merge(graphdef, restored)
    x = np.ones((2, 8), np.float32)
    assert jnp.array_equal(merged.linear(x), model.linear(x))

    with pytest.raises(StructureMismatchError, match=r"abstract mesh.*jax.set_mesh"):
        handler.restore(tmp_path, abstract)  # no mesh set: nowhere to put the shards


def test_python_scalars_and_zero_d_arrays_restore_onto_each_other(handler, tmp_path):
    # A fresh TrainState has step=0 (an int); a trained one a 0-d array: either way round.
    handler.save(tmp_path, {"step": 3, "lr": 0.5, "count": jnp.int32(9)}, step=1)
    target = {
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "lr": jax.ShapeDtypeStruct((), jnp.bfloat16),
        "count": 0,
    }
    restored = handler.restore(tmp_path, target)
    assert_identical(
        restored, {"step": jnp.int32(3), "lr": jnp.bfloat16(0.5), "count": jnp.int32(9)}
    )
