"""Checkpoints on S3-compatible object storage, against a real S3 server (moto, loopback)."""

import jax.numpy as jnp
import numpy as np
from _trees import assert_identical

from datarax_ckpt import OrbaxCheckpointHandler


def make_state(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "params": {"w": jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)},
        "big": jnp.asarray(rng.standard_normal(400_000), jnp.float32),  # stored unpacked
        "step": seed,
        "name": f"run-{seed}",
    }


def test_save_restore_round_trip(s3_dir):
    state = make_state(1)
    with OrbaxCheckpointHandler() as handler:
        path = handler.save(s3_dir, state, step=1, metadata={"loss": 0.5})
        assert path == f"{s3_dir}/ckpt-1"
        handler.wait_until_finished()
        assert handler.get_checkpoint_steps(s3_dir) == [1]
        assert_identical(handler.restore(s3_dir), state)
        assert handler.restore(s3_dir, metadata_only=True) == {"loss": 0.5}
