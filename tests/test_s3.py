"""Checkpoints on S3-compatible object storage, against a real S3 server (moto, loopback)."""

import os

import boto3
import jax.numpy as jnp
import numpy as np
import pytest
from _trees import assert_identical

from datarax_ckpt import CheckpointPathError, OrbaxCheckpointHandler


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


def objects(s3_dir, prefix=""):
    """Keys under ``s3_dir`` (relative to it), read with boto3, not through the library."""
    bucket, _, run = s3_dir[len("s3://") :].partition("/")
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    pages = client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=f"{run}/{prefix}"
    )
    return sorted(o["Key"][len(run) + 1 :] for page in pages for o in page.get("Contents", []))


def remove_object(s3_dir, key):
    bucket, _, run = s3_dir[len("s3://") :].partition("/")
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).delete_object(
        Bucket=bucket, Key=f"{run}/{key}"
    )


def test_restore_onto_target_and_listing(s3_dir):
    state = make_state(2)
    target = {**make_state(0), "big": jnp.zeros(400_000, jnp.bfloat16)}
    with OrbaxCheckpointHandler() as handler:
        handler.save(s3_dir, state, step=2)
        restored = handler.restore(s3_dir, target, step=2)
        assert handler.list_checkpoints(s3_dir) == {2: f"{s3_dir}/ckpt-2"}
        assert handler.latest_step(s3_dir) == 2
    assert restored["big"].dtype == jnp.bfloat16  # the target's dtype
    assert_identical(restored["params"], state["params"])
    # Everything is under the step's prefix, and Orbax's commit marker is there.
    keys = objects(s3_dir)
    assert keys and all(k.startswith("ckpt-2/") for k in keys)
    assert "ckpt-2/commit_success.txt" in keys


def test_keep_deletes_old_steps_objects(s3_dir):
    with OrbaxCheckpointHandler() as handler:
        for step in range(1, 5):
            handler.save(s3_dir, make_state(step), step=step, keep=2)
        assert handler.get_checkpoint_steps(s3_dir) == [3, 4]
        assert_identical(handler.restore(s3_dir, step=3), make_state(3))
    assert {k.split("/")[0] for k in objects(s3_dir)} == {"ckpt-3", "ckpt-4"}


def test_step_without_marker_is_never_listed_or_restored_and_the_writer_cleans_it(s3_dir):
    with OrbaxCheckpointHandler() as handler:
        handler.save(s3_dir, make_state(1), step=1)
        handler.save(s3_dir, make_state(2), step=2)
    # A save killed before its marker (or a deletion killed after it) leaves this:
    remove_object(s3_dir, "ckpt-2/commit_success.txt")
    assert objects(s3_dir, "ckpt-2/")
    with OrbaxCheckpointHandler() as handler:
        assert handler.get_checkpoint_steps(s3_dir) == [1]
        assert_identical(handler.restore(s3_dir), make_state(1))
        with pytest.raises(FileNotFoundError, match="No committed checkpoint for step 2"):
            handler.restore(s3_dir, step=2)
        handler.save(s3_dir, make_state(3), step=3)  # the writer removes the leftover
        assert handler.get_checkpoint_steps(s3_dir) == [1, 3]
    assert objects(s3_dir, "ckpt-2/") == []


def test_overwrite_replaces_the_step_and_leaves_no_backup(s3_dir):
    with OrbaxCheckpointHandler() as handler:
        handler.save(s3_dir, make_state(1), step=1)
        with pytest.raises(FileExistsError, match="overwrite=True"):
            handler.save(s3_dir, make_state(5), step=1)
        handler.save(s3_dir, make_state(5), step=1, overwrite=True)
        assert_identical(handler.restore(s3_dir, step=1), make_state(5))
        assert handler.get_checkpoint_steps(s3_dir) == [1]
    assert {k.split("/")[0] for k in objects(s3_dir)} == {"ckpt-1"}


def test_unversioned_checkpoint_round_trip(s3_dir):
    with OrbaxCheckpointHandler() as handler:
        handler.save(s3_dir, make_state(7), metadata={"epoch": 1})
        assert handler.get_checkpoint_steps(s3_dir) == []
        assert_identical(handler.restore(s3_dir), make_state(7))
        assert handler.restore(s3_dir, metadata_only=True) == {"epoch": 1}
    assert "checkpoint/commit_success.txt" in objects(s3_dir)


def test_verify_reads_back_and_finds_a_damaged_object(s3_dir):
    with OrbaxCheckpointHandler() as handler:
        handler.save(s3_dir, make_state(1), step=1)
        report = handler.verify(s3_dir, step=1)
        assert report.ok and report.checksums_recorded
        data = [k for k in objects(s3_dir, "ckpt-1/state/") if "/d/" in k]
        assert data
        bucket, _, run = s3_dir[len("s3://") :].partition("/")
        client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
        body = client.get_object(Bucket=bucket, Key=f"{run}/{data[0]}")["Body"].read()
        damaged = body[:-8] + bytes(b ^ 0xFF for b in body[-8:])
        client.put_object(Bucket=bucket, Key=f"{run}/{data[0]}", Body=damaged)
        report = handler.verify(s3_dir, step=1)
        assert not report.ok and report.problems


def test_path_without_bucket_is_refused(s3_server):
    with OrbaxCheckpointHandler() as handler:
        with pytest.raises(CheckpointPathError, match="names no bucket"):
            handler.save("s3://", make_state(1), step=1)
