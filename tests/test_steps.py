"""Step order and rollback: a save never loses a newer step, and going back is explicit.

Invariants pinned here, under asynchronous saves, across handlers and across processes:
(a) a save never deletes a step newer than itself; (b) once a save commits,
``latest_step()`` is its step; (c) a save below the latest committed (or pending) step is
refused before anything is written, ``overwrite=True`` included; (d) nothing is deleted
but by retention of committed steps or an explicit ``rollback``.
"""

import os
import subprocess
import sys
import textwrap
import threading

import jax.numpy as jnp
import numpy as np
import pytest

import datarax_ckpt._steps
from datarax_ckpt import (
    CheckpointError,
    CheckpointExistsError,
    OrbaxCheckpointHandler,
    StepOrderError,
)


def state(step):
    return {"w": jnp.full(16, step, jnp.float32), "s": step}


def folders(path):
    return sorted(os.listdir(path))


def test_resuming_from_an_earlier_step_is_refused_and_keeps_the_newer_steps(tmp_path):
    # The reproduction: a second run restarted at step 1 in the same folder.
    with OrbaxCheckpointHandler() as h:
        for s in (1, 2, 3):
            h.save(tmp_path, state(s), step=s, keep=2)
    with OrbaxCheckpointHandler() as h:
        with pytest.raises(StepOrderError, match=r"newer steps \[2, 3\].*handler\.rollback\(") as e:
            h.save(tmp_path, state(1), step=1, keep=2)
        assert e.value.newer == [2, 3]
        assert isinstance(e.value, CheckpointError) and isinstance(e.value, ValueError)
        with pytest.raises(StepOrderError, match=r"newer steps \[2, 3\]"):
            h.save(tmp_path, state(0), step=0, keep=2)
        assert h.get_checkpoint_steps(tmp_path) == [2, 3]
        assert h.restore(tmp_path)["s"] == 3
    assert folders(tmp_path) == ["ckpt-2", "ckpt-3"]  # nothing was written


def test_overwrite_replaces_the_latest_step_only(tmp_path):
    with OrbaxCheckpointHandler() as h:
        h.save(tmp_path, state(1), step=1)
        h.save(tmp_path, state(2), step=2)
        with pytest.raises(StepOrderError, match=r"step 1 .* newer steps \[2\].*overwrite=True"):
            h.save(tmp_path, state(10), step=1, overwrite=True)
        assert h.restore(tmp_path, step=1)["s"] == 1
        h.save(tmp_path, state(20), step=2, overwrite=True)
        assert h.restore(tmp_path)["s"] == 20
        assert h.get_checkpoint_steps(tmp_path) == [1, 2]


def test_a_save_below_a_pending_save_is_refused(tmp_path):
    big = {"w": jnp.asarray(np.random.default_rng(0).standard_normal(2_000_000), jnp.float32)}
    with OrbaxCheckpointHandler() as h:  # async: step 5 may still be being written
        h.save(tmp_path, big, step=5)
        with pytest.raises(StepOrderError, match=r"newer steps \[5\]"):
            h.save(tmp_path, big, step=3)
        h.save(tmp_path, big, step=6)
        assert h.get_checkpoint_steps(tmp_path) == [5, 6]


@pytest.mark.parametrize("async_save", [True, False])
def test_keep_retains_the_newest_steps_and_the_save_is_the_latest(tmp_path, async_save):
    with OrbaxCheckpointHandler(async_save=async_save) as h:
        for s in (0, 3, 4, 9, 10, 12):
            h.save(tmp_path, state(s), step=s, keep=3)
            assert h.latest_step(tmp_path) == s  # (b)
        assert h.get_checkpoint_steps(tmp_path) == [9, 10, 12]
        assert h.rollback(tmp_path, 9) == [10, 12]
        h.save(tmp_path, state(10), step=10, keep=2)  # resumed: retention counts by step
        assert h.get_checkpoint_steps(tmp_path) == [9, 10]
        assert h.restore(tmp_path)["s"] == 10


def test_a_changed_keep_applies_from_the_next_save(tmp_path):
    with OrbaxCheckpointHandler() as h:
        for s in range(1, 6):
            h.save(tmp_path, state(s), step=s)
        h.save(tmp_path, state(6), step=6, keep=2)
        assert h.get_checkpoint_steps(tmp_path) == [5, 6]
        h.save(tmp_path, state(7), step=7, keep=3)
        h.save(tmp_path, state(8), step=8)  # keep=None keeps all from now on
        assert h.get_checkpoint_steps(tmp_path) == [5, 6, 7, 8]


_WRITER = textwrap.dedent(
    """
    import sys
    import jax.numpy as jnp
    from datarax_ckpt import OrbaxCheckpointHandler

    with OrbaxCheckpointHandler() as h:
        for s in range(int(sys.argv[2]), int(sys.argv[3])):
            h.save(sys.argv[1], {"w": jnp.full(16, s, jnp.float32), "s": s}, step=s)
    """
)


def _write_in_another_process(directory, first, stop, check=True):
    return subprocess.run(
        [sys.executable, "-c", _WRITER, str(directory), str(first), str(stop)],
        check=check,
        timeout=300,
        capture_output=not check,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


def test_steps_written_by_another_process_are_never_lost(tmp_path):
    with OrbaxCheckpointHandler() as h:
        h.save(tmp_path, state(1), step=1, keep=2)
        h.wait_until_finished()
        # While h is the directory's writer, another process may not write there.
        refused = _write_in_another_process(tmp_path, 2, 5, check=False)
        assert refused.returncode != 0 and "WriterConflictError" in refused.stderr
        assert h.get_checkpoint_steps(tmp_path) == [1]
    _write_in_another_process(tmp_path, 2, 5)  # the next writer, after h closed
    with OrbaxCheckpointHandler() as h:
        with pytest.raises(StepOrderError, match=r"newer steps \[4\].*overwrite=True"):
            h.save(tmp_path, state(3), step=3, keep=2)
        h.save(tmp_path, state(5), step=5, keep=2)
        h.wait_until_finished()
        assert h.get_checkpoint_steps(tmp_path) == [4, 5]  # (a): 4 kept, retention by step
        assert h.restore(tmp_path, step=4)["s"] == 4
    with OrbaxCheckpointHandler() as h:
        assert h.rollback(tmp_path, 4) == [5]
    _write_in_another_process(tmp_path, 5, 7)  # the other process resumes after a rollback
    with OrbaxCheckpointHandler() as h:
        assert h.get_checkpoint_steps(tmp_path) == [4, 5, 6]
        assert h.restore(tmp_path)["s"] == 6


def test_rollback_waits_for_pending_saves_and_keeps_the_unversioned_checkpoint(tmp_path):
    with OrbaxCheckpointHandler() as h:
        h.save(tmp_path, {"note": "unversioned"})
        for s in range(1, 6):
            h.save(tmp_path, state(s), step=s)  # async: still being written below
        assert h.rollback(tmp_path, 2) == [3, 4, 5]
        assert h.get_checkpoint_steps(tmp_path) == [1, 2]
        assert h.restore(tmp_path)["s"] == 2
        h.save(tmp_path, state(3), step=3)
        assert h.restore(tmp_path)["s"] == 3
        assert h.rollback(tmp_path, 7) == []
        assert h.rollback(tmp_path, 0) == [1, 2, 3]
        assert h.get_checkpoint_steps(tmp_path) == []
        assert h.restore(tmp_path) == {"note": "unversioned"}
    assert folders(tmp_path) == ["checkpoint"]


def test_rollback_and_should_save_reject_bad_steps(tmp_path):
    with OrbaxCheckpointHandler() as h:
        with pytest.raises(TypeError, match="rollback needs an int step"):
            h.rollback(tmp_path, None)
        with pytest.raises(ValueError, match="step must be >= 0"):
            h.rollback(tmp_path, -1)
        with pytest.raises(TypeError, match="should_save needs an int step"):
            h.should_save(tmp_path, None)


def test_saving_the_latest_step_again_still_raises_exists(tmp_path):
    with OrbaxCheckpointHandler() as h:
        h.save(tmp_path, state(1), step=1)
        with pytest.raises(CheckpointExistsError):
            h.save(tmp_path, state(1), step=1)


def test_listing_without_wait_does_not_wait_for_a_write(tmp_path, monkeypatch):
    # Hold the background write of step 2 on the worker thread until the listing is done.
    release, held = threading.Event(), threading.Event()
    check_order = datarax_ckpt._steps.check_order

    def hold_on_worker(path, step, pending):
        if threading.current_thread() is not threading.main_thread() and step == 2:
            held.set()
            assert release.wait(120)
        check_order(path, step, pending)

    monkeypatch.setattr(datarax_ckpt._steps, "check_order", hold_on_worker)
    with OrbaxCheckpointHandler() as h:
        h.save(tmp_path, state(1), step=1)
        h.save(tmp_path, state(2), step=2)
        assert held.wait(120)
        try:
            assert h.pending_steps(tmp_path) == [2]
            assert h.get_checkpoint_steps(tmp_path, wait=False) == [1]
            assert h.latest_step(tmp_path, wait=False) == 1
            assert list(h.list_checkpoints(tmp_path, wait=False)) == [1]
            assert not h.should_save(tmp_path, 2)  # pending counts as saved
            assert h.should_save(tmp_path, 3)
        finally:
            release.set()
        assert h.latest_step(tmp_path) == 2  # wait=True (default) waits for it
        assert h.pending_steps(tmp_path) == []
