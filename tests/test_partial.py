"""Partial restore: only the target's part of a checkpoint, asked for explicitly."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from _trees import assert_identical
from flax import nnx

from datarax_ckpt import CheckpointCorruptedError, OrbaxCheckpointHandler, StructureMismatchError


def model_and_optimizer():
    params = {"w": jnp.arange(4096.0).reshape(64, 64), "b": jnp.ones(64)}
    tx = optax.adamw(1e-3)
    return {"model": params, "optimizer": tx.init(params), "step": 10}


def test_model_weights_alone_from_a_model_and_optimizer_checkpoint(handler, tmp_path):
    state = model_and_optimizer()
    handler.save(tmp_path, state, step=10)
    abstract = {"model": jax.tree.map(ocp.utils.to_shape_dtype_struct, state["model"])}
    restored = handler.restore(tmp_path, abstract, partial=True)
    assert list(restored) == ["model"]
    assert_identical(restored["model"], jax.tree.map(lambda x: x, state["model"]))


def test_leaves_not_asked_for_are_not_read(tmp_path):
    # Each stored array (2 MiB: not packed) in its own files (no OCDBT); the optimizer's
    # bytes are then damaged on disk. A verified partial restore of the model never reads
    # them.
    state = {"model": {"w": jnp.ones((1024, 512))}, "optimizer": {"mu": jnp.zeros((1024, 512))}}
    with OrbaxCheckpointHandler(use_ocdbt=False, verify_on_restore=True) as h:
        h.save(tmp_path, state, step=1)
        h.wait_until_finished()
        folder = tmp_path / "ckpt-1"
        manifest = json.loads((folder / "manifest" / "metadata").read_text())
        optimizer = manifest["tree"]["c"][manifest["tree"]["k"].index("optimizer")]
        stored = manifest["slots"][optimizer["c"][0]["s"]]["key"]
        chunk = next(p for p in (folder / "state" / stored).iterdir() if p.name[0] != ".")
        chunk.write_bytes(b"\xff" * len(chunk.read_bytes()))  # same length, other bytes
        target = {"model": {"w": jax.ShapeDtypeStruct((1024, 512), jnp.float32)}}
        restored = h.restore(tmp_path, target, partial=True)
        assert jnp.array_equal(restored["model"]["w"], state["model"]["w"])
        with pytest.raises(CheckpointCorruptedError, match=stored):
            h.restore(tmp_path, step=1)  # a full restore does read them


def test_mismatch_without_partial_names_paths_and_suggests_partial(handler, tmp_path):
    handler.save(tmp_path, model_and_optimizer(), step=1)
    target = {"model": model_and_optimizer()["model"]}
    with pytest.raises(
        StructureMismatchError, match=r"not in target: \['optimizer'\], \['step'\].*partial=True"
    ):
        handler.restore(tmp_path, target)


def test_a_target_leaf_not_in_the_checkpoint_is_an_error_even_partial(handler, tmp_path):
    handler.save(tmp_path, model_and_optimizer(), step=1)
    target = {"model": {"w": jnp.zeros((64, 64)), "extra": jnp.zeros(3)}}
    with pytest.raises(
        StructureMismatchError, match=r"missing from checkpoint: \['model'\]\['extra'\]"
    ):
        handler.restore(tmp_path, target, partial=True)


def test_single_leaves_may_be_left_out_at_any_depth(handler, tmp_path):
    state = model_and_optimizer()
    handler.save(tmp_path, state, step=1)
    restored = handler.restore(tmp_path, {"model": {"b": jnp.zeros(64)}, "step": 0}, partial=True)
    assert restored == {"model": {"b": restored["model"]["b"]}, "step": 10}
    assert jnp.array_equal(restored["model"]["b"], state["model"]["b"])


def test_partial_params_of_an_nnx_model_state(handler, tmp_path):
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(4, 4, rngs=rngs)
            self.bn = nnx.BatchNorm(4, rngs=rngs)

    model = Net(nnx.Rngs(0))
    handler.save(tmp_path, nnx.state(model), step=1)
    target = nnx.state(nnx.eval_shape(lambda: Net(nnx.Rngs(1))), nnx.Param)
    with pytest.raises(StructureMismatchError, match=r"not in target: \['bn'\]\['mean'\]"):
        handler.restore(tmp_path, target)
    params = handler.restore(tmp_path, target, partial=True)
    expected = nnx.state(model, nnx.Param)
    assert jax.tree.structure(params) == jax.tree.structure(expected)
    assert_identical(jax.tree.leaves(params), jax.tree.leaves(expected))


def test_partial_must_be_a_bool(handler, tmp_path):
    handler.save(tmp_path, {"a": 1}, step=1)
    with pytest.raises(TypeError, match="partial must be a bool"):
        handler.restore(tmp_path, {"a": 1}, partial="yes")


@pytest.mark.parametrize("step", [1, np.int64(1)], ids=["int", "numpy scalar"])
def test_a_step_passed_as_the_target_asks_for_step(handler, tmp_path, step):
    handler.save(tmp_path, {"a": 1}, step=1)
    with pytest.raises(TypeError, match=r"did you mean `step=1`\?"):
        handler.restore(tmp_path, step)
