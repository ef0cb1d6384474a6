"""A training job writes a directory while evaluation jobs read it (docs/reliability.md).

Readers (restore, verify, listing, follow, the CLI) never break the writer and never fail
because of its ordinary work; a second writer is refused; a killed writer blocks nobody.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax.numpy as jnp
import pytest
from _readers_writers_child import KEEP, make_state, same

from datarax_ckpt import (
    CheckpointNotFoundError,
    OrbaxCheckpointHandler,
    WriterConflictError,
    _writer_lock,
)

CHILD = Path(__file__).with_name("_readers_writers_child.py")
N_STEPS = 40
READERS = ("restore", "follow", "verify")


def _start(role: str, directory: Path, n_steps: int = N_STEPS, **env) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(CHILD), role, str(directory), str(directory.parent / f"{role}.json")]
        + [str(n_steps)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )


def _tree(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*"))}


def test_a_training_job_and_three_evaluation_jobs_share_a_directory(tmp_path):
    directory = tmp_path / "run"
    processes = {role: _start(role, directory) for role in READERS}
    processes["writer"] = _start("writer", directory, RW_READERS=str(len(READERS)))
    results = {}
    for role, process in processes.items():
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, f"{role} exited with {process.returncode}:\n{err}"
        results[role] = json.loads((tmp_path / f"{role}.json").read_text())
    counts = {
        role: {k: v for k, v in r.items() if isinstance(v, int) and v and k != "pid"}
        | ({"yields": len(r["yields"])} if r["yields"] else {})
        | ({"statuses": r["statuses"]} if r["statuses"] else {})
        for role, r in results.items()
    }
    print("readers/writer counts:", json.dumps(counts))  # quoted in docs/reliability.md

    writer = results["writer"]
    assert writer["errors"] == [], writer["errors"]
    assert writer["saves"] == N_STEPS
    assert writer["final_steps"] == list(range(N_STEPS - KEEP, N_STEPS))
    for role in READERS:  # nothing but the documented CheckpointNotFoundError, no bad data
        reader = results[role]
        assert reader["errors"] == [], (role, reader["errors"])
        assert reader["wrong"] == [] and reader["went_back"] == [], (role, reader)
    restore, follow, verify = (results[r] for r in READERS)
    assert restore["restores"] > 0
    yields = follow["yields"]
    assert yields == sorted(set(yields)) and yields[-1] == N_STEPS - 1, yields
    assert follow["restores"] + follow["not_found"] == len(yields)
    assert verify["verifies"] > 0 and verify["listings"] > 0
    assert set(verify["statuses"]) <= {"intact", "pending"}, verify["statuses"]
    # The readers left nothing behind and the writer's close removed its lock.
    assert sorted(p.name for p in directory.iterdir()) == [
        f"ckpt-{s}" for s in sorted(range(N_STEPS - KEEP, N_STEPS), key=str)
    ]


def test_restoring_the_latest_step_while_retention_deletes_it_reads_the_new_latest(tmp_path):
    directory = tmp_path / "run"
    reader = _start("restore", directory)
    writer = _start("writer", directory, RW_READERS="1", RW_KEEP="1")  # keep=1: every
    results = {}  # commit deletes the step a reader of the latest may be reading
    for role, process in (("writer", writer), ("restore", reader)):
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, f"{role} exited with {process.returncode}:\n{err}"
        results[role] = json.loads((tmp_path / f"{role}.json").read_text())
    print("keep=1 counts:", {k: v for k, v in results["restore"].items() if isinstance(v, int)})
    assert results["writer"]["errors"] == [] and results["writer"]["final_steps"] == [N_STEPS - 1]
    restore = results["restore"]
    assert restore["errors"] == [] and restore["wrong"] == [] and restore["went_back"] == []
    assert restore["restores"] > 0


def test_a_second_writer_process_is_refused_and_a_killed_writer_blocks_nobody(tmp_path):
    directory = tmp_path / "run"
    holder = _start("hold", directory)
    worker = None
    try:
        ready, worker = holder.stdout.readline().split()
        assert ready == "ready"
        before = _tree(directory)
        with OrbaxCheckpointHandler() as handler:
            expected = f"another writer \\(host {socket.gethostname()}, pid {holder.pid}, since"
            with pytest.raises(WriterConflictError, match=expected):
                handler.save(directory, make_state(1), step=1)
            assert _tree(directory) == before, "the refused save changed the directory"
            assert same(handler.restore(directory), make_state(0))  # reading is fine

            # Killed, while the worker it forked lives on with a copy of the lock's fd.
            holder.send_signal(signal.SIGKILL)
            assert holder.wait(timeout=60) == -signal.SIGKILL
            os.kill(int(worker), 0)  # still running
            handler.save(directory, make_state(1), step=1)  # the same handler, now the writer
            handler.wait_until_finished()
            assert handler.get_checkpoint_steps(directory) == [0, 1]
            assert _writer_lock.holder(directory)["pid"] == os.getpid()
        assert sorted(p.name for p in directory.iterdir()) == ["ckpt-0", "ckpt-1"]
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        if worker is not None:
            os.kill(int(worker), signal.SIGKILL)


def test_a_second_handler_in_the_same_process_is_refused_until_the_first_closes(tmp_path):
    first, second = OrbaxCheckpointHandler(), OrbaxCheckpointHandler()
    first.save(tmp_path, make_state(0), step=0)
    with pytest.raises(WriterConflictError, match="another OrbaxCheckpointHandler in this process"):
        second.save(tmp_path, make_state(1), step=1)
    first.save(tmp_path, make_state(1), step=1, keep=1)  # the first writer is unaffected
    assert same(second.restore(tmp_path), make_state(1))  # and can be read beside
    first.close()
    second.save(tmp_path, make_state(2), step=2)
    second.close()
    assert OrbaxCheckpointHandler().get_checkpoint_steps(tmp_path) == [1, 2]


def test_readers_create_move_and_delete_nothing_and_the_writer_cleans_up(tmp_path):
    with OrbaxCheckpointHandler() as handler:
        for step in (1, 2):
            handler.save(tmp_path, make_state(step), step=step)
    # What a killed writer leaves: an overwrite of step 2 interrupted after moving the old
    # step aside, a half-written step, a step half-moved to the trash.
    (tmp_path / "ckpt-2").rename(tmp_path / "ckpt-2.datarax-backup")
    (tmp_path / "ckpt-3.orbax-checkpoint-tmp-1234").mkdir()
    (tmp_path / "ckpt-3.orbax-checkpoint-tmp-1234" / "part").write_bytes(b"x" * 100)
    (tmp_path / ".datarax-trash" / "ckpt-0").mkdir(parents=True)
    before = _tree(tmp_path)
    with OrbaxCheckpointHandler() as reader:
        assert same(reader.restore(tmp_path), make_state(2))
        assert same(reader.restore(tmp_path, step=1), make_state(1))
        assert reader.restore(tmp_path, metadata_only=True) == {}
        assert reader.verify(tmp_path).ok and reader.verify(tmp_path, step=1).ok
        assert reader.get_checkpoint_steps(tmp_path) == [1, 2]
        assert list(reader.follow(tmp_path, timeout=0)) == [1, 2]
    assert _tree(tmp_path) == before
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    shutil.copytree(tmp_path / "ckpt-1", outside)  # a committed step, outside the directory
    (tmp_path / "ckpt-7.datarax-backup").symlink_to(outside)  # not one of ours: not read
    with OrbaxCheckpointHandler() as reader:
        assert reader.get_checkpoint_steps(tmp_path) == [1, 2]
    with OrbaxCheckpointHandler() as writer:  # puts step 2 back, removes the rest
        writer.save(tmp_path, make_state(4), step=4)
        assert same(writer.restore(tmp_path, step=2), make_state(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-1", "ckpt-2", "ckpt-4"]
    assert (outside / "_CHECKPOINT_METADATA").exists()  # the link went, not its target


def test_follow_yields_each_new_step_in_order_and_ends_after_its_timeout(tmp_path):
    def train():
        with OrbaxCheckpointHandler() as writer:
            for step in range(5, 11):
                time.sleep(0.05)
                writer.save(tmp_path / "run", {"w": jnp.full(3, step)}, step=step, keep=2)

    seen = []
    with OrbaxCheckpointHandler() as reader:
        trainer = threading.Thread(target=train)
        trainer.start()  # the directory does not exist yet: follow waits for it
        for step in reader.follow(tmp_path / "run", timeout=60, poll_interval=0.01):
            seen.append(step)
            if step == 10:
                break
        trainer.join()
        # Retention may delete a step before follow sees it (skipped), never reorder them.
        assert seen == sorted(set(seen)) and seen[-1] == 10 and set(seen) <= set(range(5, 11))
        assert list(reader.follow(tmp_path / "run", timeout=0)) == [9, 10]
        assert list(reader.follow(tmp_path / "run", after=9, timeout=0)) == [10]

        before = set(threading.enumerate())
        threads, fds = len(before), len(os.listdir("/proc/self/fd"))
        started = time.monotonic()
        idle = reader.follow(tmp_path / "run", after=10, timeout=0.3, poll_interval=0.001)
        assert list(idle) == []  # many looks, no new step
        assert time.monotonic() - started >= 0.3  # it waited for a new step, then ended
        # It started no thread and kept no file open (others may have ended meanwhile).
        # Orbax's commit check runs each time on a new event loop whose closed executor
        # thread ends a moment later: wait for those, a leaked one would not end.
        # Only threads started by follow(): earlier tests may leave long-lived ones.
        for thread in set(threading.enumerate()) - before:
            if thread.name.startswith("asyncio_"):
                thread.join(timeout=20)
        names = [t.name for t in threading.enumerate()]
        assert threading.active_count() <= threads, names
        assert len(os.listdir("/proc/self/fd")) <= fds


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"after": 1.5}, TypeError, "after must be None or an int step, got 1.5."),
        ({"timeout": "1"}, TypeError, "timeout must be a number of seconds, got '1'."),
        ({"timeout": -1}, ValueError, "timeout must be a finite number of seconds >= 0, got -1."),
        ({"poll_interval": 0}, ValueError, "poll_interval must be > 0 seconds, got 0."),
    ],
)
def test_follow_refuses_bad_arguments_at_the_call(tmp_path, kwargs, error, message):
    with OrbaxCheckpointHandler() as handler:
        with pytest.raises(error) as raised:
            handler.follow(tmp_path, **kwargs)
        assert str(raised.value) == message


def test_restoring_an_explicit_step_that_retention_deleted_names_the_steps_left(tmp_path):
    with OrbaxCheckpointHandler() as writer, OrbaxCheckpointHandler() as reader:
        writer.save(tmp_path, make_state(1), step=1, keep=2)
        writer.wait_until_finished()
        followed = reader.follow(tmp_path)
        assert next(followed) == 1
        for step in (2, 3):  # the evaluator is slow: retention deletes step 1 first
            writer.save(tmp_path, make_state(step), step=step, keep=2)
        writer.wait_until_finished()
        with pytest.raises(CheckpointNotFoundError, match=r"step 1 .* Available steps: \[2, 3\]"):
            reader.restore(tmp_path, step=1)
        assert [next(followed), next(followed)] == [2, 3]
