"""_arena: restores read into the memory of earlier restores only once nothing uses it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from datarax_ckpt import OrbaxCheckpointHandler


def _state(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.standard_normal((512, 1024)), jnp.float32),  # 2 MiB, stored alone
        "b": [jnp.asarray(rng.standard_normal(40_000), jnp.float32) for _ in range(8)],  # a pack
        "n": rng.standard_normal(300_000),  # numpy, 2.3 MiB
    }


def _same(restored: dict, state: dict) -> None:
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _pointers(restored: dict) -> set[int]:
    return {int(np.asarray(x).ctypes.data) for x in jax.tree.leaves(restored)}


@pytest.mark.parametrize("verify", [True, False])
def test_arrays_still_held_keep_their_values_across_restores(tmp_path, verify):
    one, two = _state(1), _state(2)
    with OrbaxCheckpointHandler() as handler:
        handler.save(tmp_path, one, step=1)
        handler.save(tmp_path, two, step=2)
        first = handler.restore(tmp_path, one, step=1, verify=verify)
        # Only parts of it kept: one packed leaf (a view of the pack), a numpy view.
        packed, view = first["b"][3], first["n"][:100]
        kept_w = first["w"]
        del first
        for _ in range(3):  # later restores of another step into whatever memory is free
            _same(handler.restore(tmp_path, two, step=2, verify=verify), two)
        np.testing.assert_array_equal(np.asarray(packed), np.asarray(one["b"][3]))
        np.testing.assert_array_equal(view, one["n"][:100])
        np.testing.assert_array_equal(np.asarray(kept_w), np.asarray(one["w"]))
        # A computation on a held array, then the array donated to it: still exact.
        doubled = jax.jit(lambda x: x * 2, donate_argnums=0)(kept_w)
        _same(handler.restore(tmp_path, two, step=2, verify=verify), two)
        np.testing.assert_array_equal(np.asarray(doubled), np.asarray(one["w"]) * 2)


def test_memory_of_dropped_restores_is_reused(tmp_path):
    state = _state(3)
    with OrbaxCheckpointHandler() as handler:
        handler.save(tmp_path, state, step=1)
        first = handler.restore(tmp_path, state, step=1)
        before = _pointers(first)
        held = handler.restore(tmp_path, state, step=1)
        assert not _pointers(held) & before  # all of first is in use: new memory
        del first
        again = handler.restore(tmp_path, state, step=1)
        assert _pointers(again) & before  # first was dropped: its buffers are read into
        _same(again, state)
        _same(held, state)
