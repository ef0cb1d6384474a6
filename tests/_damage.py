"""Real damage to checkpoint files, shared by test_integrity.py and test_cli.py."""

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

# "w" (4 KiB) is stored unpacked in its own data file region; the rest is packed.
PACK_THRESHOLD = 1024


def make_state(seed):
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.standard_normal(1024), jnp.float32),
        "b": jnp.asarray(rng.standard_normal(8), jnp.bfloat16),
        "rng": jax.random.key(seed),
        "name": f"run-{seed}",
        "step": seed,
    }


def data_file(folder):
    """The largest file of the step's array item: the one holding the bytes of "w"."""
    files = [p for p in pathlib.Path(folder, "state").rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def flip_byte(folder):
    path = data_file(folder)
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    return path


def truncate(folder):
    path = data_file(folder)
    os.truncate(path, path.stat().st_size // 2)
    return path


def delete(folder):
    path = data_file(folder)
    path.unlink()
    return path


def uncommit(folder):
    path = pathlib.Path(folder, "commit_success.txt")
    path.unlink()
    return path


DAMAGE = {"flip": flip_byte, "truncate": truncate, "delete": delete, "uncommit": uncommit}
# What verify reports for each damage.
KIND = {
    "flip": "checksum_mismatch",
    "truncate": "truncated_file",
    "delete": "missing_file",
    "uncommit": "not_committed",
}
