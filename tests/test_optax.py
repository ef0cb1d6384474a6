"""optax states of the common optimizers: saved mid-training, resumed bit for bit."""

import jax
import jax.numpy as jnp
import optax
import pytest
from _trees import assert_identical


def schedule():
    return optax.warmup_cosine_decay_schedule(0.0, 1e-2, warmup_steps=2, decay_steps=20)


OPTIMIZERS = {
    "adamw": lambda: optax.adamw(1e-3, weight_decay=1e-4),
    "chain(clip, adamw(schedule))": lambda: optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(schedule())
    ),
    "inject_hyperparams(sgd)": lambda: optax.inject_hyperparams(optax.sgd)(
        learning_rate=0.1, momentum=0.9
    ),
    "MultiSteps(adam, 3)": lambda: optax.MultiSteps(optax.adam(1e-2), every_k_schedule=3),
    "multi_transform": lambda: optax.multi_transform(
        {"w": optax.adam(1e-2), "b": optax.set_to_zero()}, {"w": "w", "b": "b"}
    ),
}


def loss(params, x):
    return ((x @ params["w"] + params["b"][None, :]) ** 2).mean()


@pytest.mark.parametrize("make", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_optimizer_state_resumes_identically(handler, tmp_path, make):
    tx = make()
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3), "b": jnp.zeros(3)}
    x = jnp.ones((2, 4))

    @jax.jit
    def step(params, opt_state):
        grads = jax.grad(loss)(params, x)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    for _ in range(4):  # mid-way through MultiSteps' accumulation and the warmup
        params, opt_state = step(params, opt_state)
    handler.save(tmp_path, {"params": params, "opt_state": opt_state}, step=4)

    fresh = tx.init(params)
    restored = handler.restore(tmp_path, {"params": params, "opt_state": fresh})
    assert jax.tree.structure(restored["opt_state"]) == jax.tree.structure(opt_state)
    assert_identical(jax.tree.leaves(restored["opt_state"]), jax.tree.leaves(opt_state))
    a = (params, opt_state)
    b = (restored["params"], restored["opt_state"])
    for _ in range(3):
        a, b = step(*a), step(*b)
        assert_identical(jax.tree.leaves(b), jax.tree.leaves(a))
