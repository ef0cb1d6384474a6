"""Reads through _orbax: restores land in 64-byte-aligned memory jax adopts without a copy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _trees import assert_identical, cpu_mesh

from datarax_ckpt import CheckpointOptions, OrbaxCheckpointHandler


def _state(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "big": jnp.asarray(rng.standard_normal(600_000), jnp.float32),  # stored alone
        "small": [jnp.asarray(rng.standard_normal(n), jnp.float32) for n in (16, 32, 48)],
        "bf16": jnp.asarray(rng.standard_normal((64, 8)), jnp.bfloat16),
        "key": jax.random.key(seed),
        "np": rng.standard_normal((3, 5)),
        "scalar": jnp.float32(2.5),
        "empty": jnp.zeros((0, 4)),
    }


@pytest.mark.parametrize("verify", [True, False])
def test_restored_cpu_arrays_use_the_read_buffer_without_a_copy(tmp_path, verify):
    # On the CPU explicitly, also where an accelerator is the default backend: restores
    # without a target land on jax.default_device.
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu), OrbaxCheckpointHandler() as handler:
        state = _state()
        handler.save(tmp_path, state, step=1)
        restored = handler.restore(tmp_path, step=1, verify=verify)
    assert_identical(restored, state)
    assert restored["big"].sharding.device_set == {cpu}
    # The stored-alone leaf is the buffer TensorStore read into: 64-byte aligned, which
    # is what lets XLA adopt it instead of copying it.
    assert np.asarray(restored["big"]).ctypes.data % 64 == 0
    for x in restored["small"]:  # packed leaves: views of one read buffer
        assert np.asarray(x).ctypes.data % 64 == 0


def test_restored_arrays_can_be_donated(tmp_path):
    state = _state()
    with OrbaxCheckpointHandler() as handler:
        handler.save(tmp_path, state, step=1)
        restored = handler.restore(tmp_path, step=1)

        @functools.partial(jax.jit, donate_argnums=0)
        def train_step(s):
            return jax.tree.map(lambda x: x * 2, s)

        params = {"big": restored["big"], "small": restored["small"]}
        new = jax.block_until_ready(train_step(params))
        assert restored["big"].is_deleted()
        np.testing.assert_array_equal(np.asarray(new["big"]), np.asarray(state["big"]) * 2)
        # The checkpoint and a second restore are untouched by the donation.
        again = handler.restore(tmp_path, step=1)
    assert_identical(again, state)


def test_restore_onto_target_dtypes_and_shardings(tmp_path):
    state = {"w": jnp.asarray(np.random.default_rng(1).standard_normal((8, 64)), jnp.float32)}
    mesh = cpu_mesh((4,), ("x",))
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    one = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[2])
    as_bf16 = {"w": jax.ShapeDtypeStruct((8, 64), jnp.bfloat16, sharding=sharded)}
    on_one = {"w": jax.ShapeDtypeStruct((8, 64), jnp.float32, sharding=one)}
    with OrbaxCheckpointHandler(options=CheckpointOptions(pack_threshold_bytes=0)) as handler:
        handler.save(tmp_path, state, step=1)
        for verify in (True, False):
            restored = handler.restore(tmp_path, as_bf16, step=1, verify=verify)
            assert restored["w"].dtype == jnp.bfloat16
            assert restored["w"].sharding.is_equivalent_to(sharded, 2)
            np.testing.assert_array_equal(
                np.asarray(restored["w"]), np.asarray(state["w"].astype(jnp.bfloat16))
            )
            placed = handler.restore(tmp_path, on_one, step=1, verify=verify)
            assert placed["w"].sharding == one
            np.testing.assert_array_equal(np.asarray(placed["w"]), np.asarray(state["w"]))


def test_restore_onto_numpy_target(tmp_path):
    state = {"w": np.arange(12.0).reshape(3, 4), "i": np.arange(5, dtype=np.int16)}
    with OrbaxCheckpointHandler(options=CheckpointOptions(pack_threshold_bytes=0)) as handler:
        handler.save(tmp_path, state, step=1)
        restored = handler.restore(tmp_path, state, step=1)
    assert_identical(restored, state)


def test_restore_without_target_lands_on_jax_default_device(tmp_path):
    state = _state()
    with OrbaxCheckpointHandler() as handler:
        handler.save(tmp_path, state, step=1)
        third = jax.devices("cpu")[2]
        with jax.default_device(third):
            restored = handler.restore(tmp_path, step=1)
        with jax.default_device("cpu"):
            by_platform = handler.restore(tmp_path, step=1)
    assert_identical(restored, state)
    for leaf in (restored["big"], restored["small"][0], restored["bf16"], restored["key"]):
        assert leaf.sharding.device_set == {third}
    assert by_platform["big"].sharding.device_set == {jax.devices("cpu")[0]}


def test_many_packed_leaves_are_placed_as_jax_device_put_places_them(tmp_path):
    # A restore puts packed leaves on their devices through jax's batched put for one
    # array (_placing), not the public device_put: the result must be the same arrays.
    rng = np.random.default_rng(3)
    dtypes = [jnp.float32, jnp.bfloat16, jnp.float16, jnp.int8, jnp.uint32, jnp.int32, bool]
    devices = jax.devices("cpu")
    state = {
        f"{np.dtype(d).name}_{i}": jax.device_put(
            jnp.asarray(rng.standard_normal((i % 5 + 1, 7)) * 9).astype(d), devices[i % 2]
        )
        for i in range(40)
        for d in dtypes[i % len(dtypes) : i % len(dtypes) + 1]
    }
    target = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in state.items()
    }
    with OrbaxCheckpointHandler() as handler:
        handler.save(tmp_path, state, step=1)
        for verify in (True, False):
            restored = handler.restore(tmp_path, target, step=1, verify=verify)
            reference = jax.device_put(
                [np.asarray(v) for v in state.values()], [v.sharding for v in state.values()]
            )
            for (key, got), want in zip(restored.items(), reference, strict=True):
                assert got.dtype == want.dtype and got.shape == want.shape, key
                assert got.sharding == want.sharding and got.committed == want.committed, key
                assert got.weak_type == want.weak_type, key
                np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=key)
        untargeted = handler.restore(tmp_path, step=1)
    assert_identical(untargeted, state)
