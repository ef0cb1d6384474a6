"""Equinox modules: arrays saved, static fields and activation functions from the target."""

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import pytest
from _trees import assert_identical

from datarax_ckpt import StructureMismatchError


class Model(eqx.Module):
    mlp: eqx.nn.MLP  # its activations (jax.nn.relu, identity) are pytree leaves
    norm: eqx.nn.LayerNorm
    scale: jax.Array
    act: callable = eqx.field(static=True)
    name: str = eqx.field(static=True)

    def __init__(self, key, act=jax.nn.gelu, name="model"):
        self.mlp = eqx.nn.MLP(4, 2, 16, 2, activation=jax.nn.relu, key=key)
        self.norm = eqx.nn.LayerNorm(4)
        self.scale = jnp.ones(())
        self.act, self.name = act, name

    def __call__(self, x):
        return self.act(self.mlp(self.norm(x)) * self.scale)


X = jnp.linspace(-1.0, 1.0, 4)


def test_module_restores_onto_a_like_module_and_trains_identically(handler, tmp_path):
    model = Model(jax.random.key(0))
    tx = optax.adam(1e-2)
    opt_state = tx.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def step(model, opt_state):
        grads = eqx.filter_grad(lambda m: m(X).sum())(model)
        updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state

    model, opt_state = step(model, opt_state)
    handler.save(tmp_path, {"model": model, "opt_state": opt_state}, step=1)

    fresh = Model(jax.random.key(1))
    like = {"model": fresh, "opt_state": tx.init(eqx.filter(fresh, eqx.is_array))}
    restored = handler.restore(tmp_path, like)
    assert type(restored["model"]) is Model and restored["model"].name == "model"
    assert restored["model"].mlp.activation is jax.nn.relu
    assert_identical(
        jax.tree.leaves(eqx.filter(restored, eqx.is_array)),
        jax.tree.leaves(eqx.filter({"model": model, "opt_state": opt_state}, eqx.is_array)),
    )
    a, b = step(model, opt_state), step(restored["model"], restored["opt_state"])
    assert jnp.array_equal(a[0](X), b[0](X))


def test_equinox_guide_pattern_filter_then_combine(handler, tmp_path):
    # Equinox's own idiom: save the arrays, rebuild with the static part of a like model.
    model = Model(jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)
    handler.save(tmp_path, params, step=1)
    like_params, _ = eqx.partition(Model(jax.random.key(1)), eqx.is_array)
    restored = eqx.combine(handler.restore(tmp_path, like_params), static)
    assert jnp.array_equal(restored(X), model(X))


def test_abstract_module_from_filter_eval_shape(handler, tmp_path):
    model = Model(jax.random.key(0))
    handler.save(tmp_path, model, step=1)
    abstract = eqx.filter_eval_shape(Model, jax.random.key(1))
    restored = handler.restore(tmp_path, abstract)
    assert jnp.array_equal(restored(X), model(X))


def test_functions_are_not_stored_without_a_target_and_must_be_callable_in_one(handler, tmp_path):
    handler.save(tmp_path, Model(jax.random.key(0)), step=1)
    plain = handler.restore(tmp_path)
    assert plain["mlp"]["activation"] is None  # only data is stored
    like = Model(jax.random.key(1))
    broken = eqx.tree_at(lambda m: m.mlp.activation, like, 3)
    with pytest.raises(StructureMismatchError, match=r"\.mlp\.activation.*a function"):
        handler.restore(tmp_path, broken)
