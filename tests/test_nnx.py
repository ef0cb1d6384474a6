"""Flax NNX states, the way Flax's checkpointing guide saves and restores them."""

import json
import logging
import warnings

import jax
import jax.numpy as jnp
import optax
import pytest
from _trees import assert_identical
from flax import nnx

from datarax_ckpt import StructureMismatchError, serialization


class TwoLayerMLP(nnx.Module):
    """The model of Flax's checkpointing guide."""

    def __init__(self, dim, rngs: nnx.Rngs):
        self.linear1 = nnx.Linear(dim, dim, rngs=rngs, use_bias=False)
        self.linear2 = nnx.Linear(dim, dim, rngs=rngs, use_bias=False)

    def __call__(self, x):
        return self.linear2(self.linear1(x))


class Net(nnx.Module):
    """Every kind of NNX state: Params, BatchNorm statistics, Dropout's RNG stream, Embed."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(10, 4, rngs=rngs)
        self.linear = nnx.Linear(4, 4, rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.out = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens).mean(axis=1)
        return self.out(self.drop(self.bn(nnx.relu(self.linear(x)))))


class Quantized(nnx.Variable):
    """A user-defined Variable type."""


def make_net(seed=0):
    return Net(nnx.Rngs(seed, dropout=seed + 1))


def assert_same_state(a, b):
    """Same State/Variable types, keys, Variable metadata, and leaves bit for bit."""
    assert type(a) is type(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert_identical(jax.tree.leaves(a), jax.tree.leaves(b))


def _zeros_like(x):
    if not isinstance(x, jax.Array):
        return x
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.key(123)  # another key (PRNG keys have no zeros)
    return jnp.zeros_like(x)


def _optimizer_state():
    model = make_net()
    return nnx.state(nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param))


STATES = {
    "nnx.state(model)": lambda: nnx.state(make_net()),
    "nnx.state(model, nnx.Param)": lambda: nnx.state(make_net(), nnx.Param),
    "nnx.split(model)[1]": lambda: nnx.split(make_net())[1],
    "nnx.split(model, nnx.Param, ...)": lambda: nnx.split(make_net(), nnx.Param, ...)[1:],
    "nnx.state(optimizer)": _optimizer_state,
    "nnx.state(nnx.Rngs(0))": lambda: nnx.state(nnx.Rngs(0, dropout=1)),
    "dict of Variables": lambda: {
        "w": nnx.Param(jnp.arange(6.0).reshape(2, 3)),
        "count": nnx.Variable(jnp.int32(3)),
        "stats": nnx.BatchStat(jnp.ones(3)),
        "key": nnx.RngKey(jax.random.key(4), tag="default"),
        "n": nnx.RngCount(jnp.uint32(7), tag="default"),
    },
    "nested in a training state": lambda: {
        "model": nnx.state(make_net()),
        "step": 3,
        "run": "baseline",
    },
}


@pytest.mark.parametrize("make", STATES.values(), ids=STATES.keys())
def test_nnx_states_round_trip_with_their_types(handler, tmp_path, make):
    state = make()
    handler.save(tmp_path, state, step=1)
    restored = handler.restore(tmp_path)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert_identical(jax.tree.leaves(restored), jax.tree.leaves(state))
    # ... and onto a target of the same kind (different values), which is left unchanged.
    target = jax.tree.map(_zeros_like, state)
    before = jax.tree.leaves(target)
    restored = handler.restore(tmp_path, target)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert_identical(jax.tree.leaves(restored), jax.tree.leaves(state))
    assert all(x is y for x, y in zip(jax.tree.leaves(target), before, strict=True))


def test_flax_guide_restore_onto_abstract_state_then_merge(handler, tmp_path):
    # https://flax.readthedocs.io/en/latest/guides/checkpointing.html, step by step.
    model = TwoLayerMLP(4, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(42), (3, 4))
    _, state = nnx.split(model)
    handler.save(tmp_path / "state", state, step=1)

    abstract_model = nnx.eval_shape(lambda: TwoLayerMLP(4, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract_model)
    state_restored = handler.restore(tmp_path / "state", abstract_state)
    assert_same_state(state_restored, state)
    model = nnx.merge(graphdef, state_restored)
    assert jnp.array_equal(model(x), nnx.merge(*nnx.split(TwoLayerMLP(4, nnx.Rngs(0))))(x))


def test_flax_guide_pure_dict_pattern(handler, tmp_path):
    # The guide's alternative: save the pure dict, restore it into an abstract state.
    model = TwoLayerMLP(4, rngs=nnx.Rngs(0))
    state = nnx.state(model)
    handler.save(tmp_path, nnx.to_pure_dict(state), step=1)
    graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: TwoLayerMLP(4, nnx.Rngs(1))))
    restored_pure = handler.restore(tmp_path)
    nnx.replace_by_pure_dict(abstract_state, restored_pure)
    assert_same_state(nnx.state(nnx.merge(graphdef, abstract_state)), state)
    # The pure dict also restores straight onto an abstract State, Variables rebuilt.
    _, abstract_state = nnx.split(nnx.eval_shape(lambda: TwoLayerMLP(4, nnx.Rngs(1))))
    assert_same_state(handler.restore(tmp_path, abstract_state), state)
    # ... and a saved State restores onto a pure-dict target as a pure dict.
    handler.save(tmp_path, state, step=2)
    pure = handler.restore(tmp_path, nnx.to_pure_dict(nnx.state(TwoLayerMLP(4, nnx.Rngs(3)))))
    assert_identical(pure, nnx.to_pure_dict(state))


def test_training_resumes_identically_from_model_and_optimizer_states(handler, tmp_path):
    model = make_net(0)
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
    tokens = jnp.arange(12).reshape(3, 4) % 10

    @nnx.jit
    def train_step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: (m(tokens) ** 2).mean())(model)
        optimizer.update(model, grads)
        return loss

    train_step(model, optimizer)
    handler.save(tmp_path, {"model": nnx.state(model), "opt": nnx.state(optimizer)}, step=1)

    fresh = make_net(7)
    fresh_opt = nnx.Optimizer(fresh, optax.adamw(1e-2), wrt=nnx.Param)
    target = {"model": nnx.state(fresh), "opt": nnx.state(fresh_opt)}
    restored = handler.restore(tmp_path, target)
    nnx.update(fresh, restored["model"])
    nnx.update(fresh_opt, restored["opt"])
    for _ in range(2):  # dropout draws, BatchNorm statistics and adamw moments all agree
        assert jnp.array_equal(train_step(model, optimizer), train_step(fresh, fresh_opt))
    assert_same_state(nnx.state(fresh), nnx.state(model))


def test_saved_state_updates_a_module_in_place_and_a_saved_module_restores_as_state(
    handler, tmp_path
):
    model = make_net(0)
    handler.save(tmp_path / "state", nnx.state(model), step=1)
    fresh = make_net(5)
    assert handler.restore(tmp_path / "state", fresh) is fresh
    assert_same_state(nnx.state(fresh), nnx.state(model))

    handler.save(tmp_path / "module", model, step=1)
    assert_same_state(handler.restore(tmp_path / "module"), nnx.state(model))
    assert_same_state(
        handler.restore(tmp_path / "module", nnx.state(make_net(3))), nnx.state(model)
    )


def test_rngs_resume_the_same_random_stream(handler, tmp_path):
    rngs = nnx.Rngs(0, dropout=1)
    rngs.dropout()  # advance the stream
    handler.save(tmp_path, rngs, step=1)
    fresh = nnx.Rngs(9, dropout=9)
    handler.restore(tmp_path, fresh)
    assert jnp.array_equal(
        jax.random.key_data(fresh.dropout()), jax.random.key_data(rngs.dropout())
    )


def test_custom_variable_type_and_its_metadata_round_trip(handler, tmp_path):
    value = jnp.arange(4.0)
    variable = Quantized(value, scale=0.5, axes=("batch", None), info={"bits": [4, 8]})
    handler.save(tmp_path, {"q": variable}, step=1)
    restored = handler.restore(tmp_path)["q"]
    assert type(restored) is Quantized
    assert restored.get_metadata() == variable.get_metadata()
    assert type(restored.get_metadata("axes")) is tuple
    assert jnp.array_equal(restored[...], value)


def test_metadata_that_is_not_plain_data_is_left_to_the_target(handler, tmp_path):
    def hint(x):
        return x

    variable = Quantized(jnp.ones(2), hint=hint, scale=2)
    handler.save(tmp_path, {"q": variable}, step=1)
    assert "hint" not in handler.restore(tmp_path)["q"].get_metadata()
    target = {"q": Quantized(jnp.zeros(2), hint=hint, scale=2)}
    restored = handler.restore(tmp_path, target)["q"]
    assert restored.get_metadata("hint") is hint and jnp.array_equal(restored[...], jnp.ones(2))


def test_variable_type_not_imported_comes_back_as_variable_with_a_warning(caplog):
    arrays, manifest = serialization.serialize({"q": Quantized(jnp.ones(2))})
    # What a reader sees when the module defining the class was never imported.
    manifest = json.loads(json.dumps(manifest).replace(__name__, "not_imported_anywhere"))
    with caplog.at_level(logging.WARNING, logger="datarax_ckpt"):
        restored = serialization.deserialize(arrays, manifest)["q"]
    assert type(restored) is nnx.Variable and jnp.array_equal(restored[...], jnp.ones(2))
    assert "not_imported_anywhere.Quantized is not imported" in caplog.text


def test_variable_type_mismatch_names_both(handler, tmp_path):
    handler.save(tmp_path, {"w": nnx.Param(jnp.ones(2))}, step=1)
    with pytest.raises(StructureMismatchError, match=r"\['w'\].*nnx.BatchStat.*nnx.Param"):
        handler.restore(tmp_path, {"w": nnx.BatchStat(jnp.ones(2))})


def test_shape_mismatch_names_the_variable_path(handler, tmp_path):
    handler.save(tmp_path, nnx.state(TwoLayerMLP(4, nnx.Rngs(0))), step=1)
    _, wrong = nnx.split(nnx.eval_shape(lambda: TwoLayerMLP(5, nnx.Rngs(0))))
    with pytest.raises(StructureMismatchError, match=r"\['linear1'\]\['kernel'\]\.value.*shape"):
        handler.restore(tmp_path, wrong)


@pytest.mark.filterwarnings("error::DeprecationWarning")
def test_encoding_and_rebuilding_nnx_states_warns_nothing():
    # Flax deprecates State methods (to_pure_dict, ...): none of them may be called.
    model = make_net()
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
    tree = {"model": model, "opt": nnx.state(optimizer), "rngs": nnx.state(nnx.Rngs(0))}
    arrays, manifest = serialization.serialize(tree)
    serialization.deserialize(arrays, manifest)
    target = {"model": make_net(1), "opt": nnx.state(optimizer), "rngs": nnx.state(nnx.Rngs(2))}
    serialization.deserialize(arrays, manifest, target)


def test_handler_calls_warn_nothing_from_the_library(handler, tmp_path):
    model = make_net()
    with warnings.catch_warnings():
        # Warnings attributed to the library's own modules (what it calls) are errors.
        warnings.filterwarnings("error", category=DeprecationWarning, module="datarax_ckpt")
        handler.save(tmp_path, {"model": model, "state": nnx.state(model)}, step=1)
        handler.restore(tmp_path)
        handler.restore(tmp_path, {"model": make_net(1), "state": nnx.state(make_net(2))})
