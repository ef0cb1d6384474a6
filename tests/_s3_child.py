"""A training loop that saves every step to S3 until it is killed (for tests/test_s3.py)."""

import sys

import jax.numpy as jnp
import numpy as np


def make_state(step: int) -> dict:
    """The state of ``step``: the same bits in every process."""
    rng = np.random.default_rng(step)
    return {
        "params": {
            f"w{i}": jnp.asarray(rng.standard_normal((64, 64)), jnp.float32) for i in range(8)
        },
        "big": jnp.asarray(rng.standard_normal(300_000), jnp.float32),
        "step": step,
    }


def train(directory: str, first_step: int, progress: str) -> None:
    from datarax_ckpt import OrbaxCheckpointHandler

    with OrbaxCheckpointHandler() as handler:
        for step in range(first_step, first_step + 10_000):
            handler.save(directory, make_state(step), step=step, keep=2)
            with open(progress, "a") as f:
                f.write(f"{step}\n")


if __name__ == "__main__":
    train(sys.argv[1], int(sys.argv[2]), sys.argv[3])
