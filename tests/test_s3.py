"""Checkpoints on S3-compatible object storage, against a real S3 server (moto, loopback)."""

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from _s3_child import make_state as make_child_state
from _trees import assert_identical

from datarax_ckpt import CheckpointPathError, OrbaxCheckpointHandler

CHILD = Path(__file__).with_name("_s3_child.py")


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


def saved(progress: Path) -> int:
    return len(progress.read_text().split()) if progress.exists() else 0


def test_kill_at_random_moments_leaves_the_previous_step_restorable(s3_dir, tmp_path):
    """A writer saving every step (keep=2) is SIGKILLed at random moments, three times."""
    rng = random.Random(0)
    latest = None
    for trial in range(3):
        progress = tmp_path / f"progress-{trial}"
        first = 0 if latest is None else latest + 1
        child = subprocess.Popen(
            [sys.executable, str(CHILD), s3_dir, str(first), str(progress)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        # Three saves enqueued: the first is committed (at most two saves are pending).
        while saved(progress) < 3 and time.monotonic() < deadline:
            assert child.poll() is None, "the training child died before its first save"
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 2.0))  # capture, TensorStore writes, commit, retention
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
        with OrbaxCheckpointHandler() as handler:
            steps = handler.get_checkpoint_steps(s3_dir)
            assert steps, f"trial {trial}: no committed step after the kill"
            if latest is not None:  # the step restorable before the kill still is, or a newer one
                assert steps[-1] >= latest
            for step in steps:
                assert_identical(handler.restore(s3_dir, step=step), make_child_state(step))
            assert_identical(handler.restore(s3_dir), make_child_state(steps[-1]))
        latest = steps[-1]
    with OrbaxCheckpointHandler() as handler:  # the next writer cleans every unmarked step
        handler.save(s3_dir, make_child_state(latest + 1), step=latest + 1, keep=2)
    folders = {k.split("/")[0] for k in objects(s3_dir)}
    marked = {k.split("/")[0] for k in objects(s3_dir) if k.endswith("/commit_success.txt")}
    assert folders == marked == {f"ckpt-{latest}", f"ckpt-{latest + 1}"}


def cli(*args):
    script = Path(sys.executable).with_name("datarax-ckpt")
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    result = subprocess.run(
        [str(script), *args], capture_output=True, text=True, env=env, timeout=300
    )
    return result.returncode, result.stdout, result.stderr


def test_cli_ls_show_verify_rm_on_s3(s3_dir):
    with OrbaxCheckpointHandler() as handler:
        for step in (1, 2):
            handler.save(s3_dir, make_state(step), step=step, metadata={"epoch": step})
    code, out, err = cli("ls", s3_dir)
    assert code == 0, err
    assert out.count("intact") == 2 and "epoch=1" in out and "epoch=2" in out
    code, out, err = cli("show", s3_dir, "--step", "2")
    assert code == 0, err
    assert "['big']" in out and "epoch" in out
    code, out, err = cli("verify", s3_dir, "--step", "1")
    assert code == 0, out + err
    code, out, err = cli("rm", s3_dir, "--step", "1", "--yes")
    assert code == 0, err
    assert {k.split("/")[0] for k in objects(s3_dir)} == {"ckpt-2"}


def test_other_prefixes_under_the_directory_are_left_alone(s3_dir):
    bucket, _, run = s3_dir[len("s3://") :].partition("/")
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    client.put_object(Bucket=bucket, Key=f"{run}/logs/events.txt", Body=b"loss=1.0")
    with OrbaxCheckpointHandler() as handler:
        handler.save(s3_dir, make_state(1), step=1)
        handler.save(s3_dir, make_state(2), step=2, keep=1)
    assert {k.split("/")[0] for k in objects(s3_dir)} == {"ckpt-2", "logs"}


def test_specs_carry_the_endpoint_and_logs_never_a_secret(s3_dir, caplog, capfd):
    from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

    caplog.set_level(logging.DEBUG)
    with OrbaxCheckpointHandler() as handler:
        handler.save(s3_dir, make_state(1), step=1)
        handler.restore(s3_dir)
    spec = ts_utils.build_kvstore_tspec(f"{s3_dir}/ckpt-1/state", use_ocdbt=True)
    assert spec["base"]["driver"] == "s3"
    assert spec["base"]["endpoint"] == os.environ["AWS_ENDPOINT_URL"]
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    captured = capfd.readouterr()
    for text in (json.dumps(spec), caplog.text, captured.out, captured.err):
        assert secret not in text


@pytest.mark.parametrize("step", [None, 4])
def test_failed_overwrite_puts_the_old_checkpoint_back(s3_dir, monkeypatch, step):
    with OrbaxCheckpointHandler() as handler:
        handler.save(s3_dir, make_state(1), step=step, metadata={"m": 1})

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "save", fail)
    monkeypatch.setattr(ocp.Checkpointer, "save", fail)
    with OrbaxCheckpointHandler() as handler:
        handler.save(s3_dir, make_state(2), step=step, overwrite=True)
        with pytest.raises(OSError, match="No space left"):
            handler.wait_until_finished()
        assert_identical(handler.restore(s3_dir, step=step), make_state(1))
        assert handler.restore(s3_dir, step=step, metadata_only=True) == {"m": 1}
    name = "checkpoint" if step is None else f"ckpt-{step}"
    assert {k.split("/")[0] for k in objects(s3_dir)} == {name}


def test_follow_and_partial_restore_on_s3(s3_dir):
    with OrbaxCheckpointHandler() as writer:
        for step in (1, 2):
            writer.save(s3_dir, make_state(step), step=step)
    with OrbaxCheckpointHandler() as reader:  # an evaluation job: reads only
        assert list(reader.follow(s3_dir, timeout=0)) == [1, 2]
        assert list(reader.follow(s3_dir, after=1, timeout=0)) == [2]
        part = reader.restore(s3_dir, {"params": make_state(0)["params"]}, partial=True)
    assert list(part) == ["params"]
    assert_identical(part["params"], make_state(2)["params"])
