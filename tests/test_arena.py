"""_arena and the directory's long-lived reader: restores reuse memory and Orbax's state
handler from one restore to the next, yet read what is on disk now, held arrays intact."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from datarax_ckpt import CheckpointNotFoundError, OrbaxCheckpointHandler


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


_WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np, jax.numpy as jnp
    from datarax_ckpt import OrbaxCheckpointHandler

    directory, action = sys.argv[1], sys.argv[2]

    def state(seed):
        rng = np.random.default_rng(seed)
        return {"w": jnp.asarray(rng.standard_normal((512, 1024)), jnp.float32),
                "b": [jnp.asarray(rng.standard_normal(40_000), jnp.float32) for _ in range(8)],
                "n": rng.standard_normal(300_000)}

    with OrbaxCheckpointHandler() as handler:
        if action == "save":
            handler.save(directory, state(3), step=3)
            handler.save(directory, state(5), step=5)
        elif action == "overwrite":
            handler.save(directory, state(50), step=5, overwrite=True)
        elif action == "rollback":
            handler.rollback(directory, 3)
    """
)


def _writer(directory, action: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _WRITER, str(directory), action],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_long_lived_reader_sees_what_another_process_wrote_since(tmp_path):
    # An evaluation job's handler restores the same step again and again while a training
    # process overwrites it and then rolls it back: each restore reads the disk as it is.
    _writer(tmp_path, "save")
    with OrbaxCheckpointHandler() as reader:
        old = reader.restore(tmp_path, step=5)
        _same(old, _state(5))
        _writer(tmp_path, "overwrite")
        for _ in range(2):  # the second one reads into the memory the first dropped
            _same(reader.restore(tmp_path, _state(0), step=5), _state(50))
            _same(reader.restore(tmp_path, step=5), _state(50))
        _same(old, _state(5))  # still held: never read into
        _writer(tmp_path, "rollback")
        with pytest.raises(CheckpointNotFoundError, match="Available steps: \\[3\\]"):
            reader.restore(tmp_path, step=5)
        _same(reader.restore(tmp_path), _state(3))
        _same(old, _state(5))
