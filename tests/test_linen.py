"""Flax Linen's TrainState: arrays saved, apply_fn and tx taken from the target."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from _trees import assert_identical
from flax.training import train_state


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(nn.relu(nn.Dense(8)(x)))


X = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)


def create_state(seed):
    model = MLP()
    params = model.init(jax.random.key(seed), X)["params"]
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))
    return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)


@jax.jit
def train_step(state):
    def loss_fn(params):
        return (state.apply_fn({"params": params}, X) ** 2).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss


def test_train_state_restores_onto_a_train_state_and_keeps_training(handler, tmp_path):
    state = create_state(0)
    for _ in range(3):
        state, _ = train_step(state)
    handler.save(tmp_path, state, step=int(state.step))

    restored = handler.restore(tmp_path, create_state(1))
    assert isinstance(restored, train_state.TrainState)
    assert restored.apply_fn is not None and restored.tx is not None
    assert_identical(jax.tree.leaves(restored), jax.tree.leaves(state))
    for _ in range(2):
        state, loss = train_step(state)
        restored, restored_loss = train_step(restored)
        assert jnp.array_equal(loss, restored_loss)
    assert int(restored.step) == 5


def test_train_state_restores_onto_its_eval_shape(handler, tmp_path):
    # The Flax/Orbax pattern: an abstract TrainState, nothing allocated twice.
    state, _ = train_step(create_state(0))
    handler.save(tmp_path, state, step=1)
    abstract = jax.eval_shape(lambda: create_state(1))
    restored = handler.restore(tmp_path, abstract)
    assert isinstance(restored.params["Dense_0"]["kernel"], jax.Array)
    assert_identical(jax.tree.leaves(restored), jax.tree.leaves(state))
    assert jnp.array_equal(train_step(restored)[1], train_step(state)[1])


def test_train_state_without_target_gives_its_arrays(handler, tmp_path):
    state, _ = train_step(create_state(0))
    handler.save(tmp_path, state, step=1)
    restored = handler.restore(tmp_path)
    assert list(restored) == ["step", "params", "opt_state"]  # no functions: only data
    assert_identical(restored["params"], jax.tree.map(lambda x: x, state.params))
