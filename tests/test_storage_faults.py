"""Full disk and failing storage: errors surface loudly, earlier checkpoints survive, no hang.

The faults are real where the test may mount a small tmpfs (root, as in CI containers):
the disk really fills up, and ``mount -o remount,ro`` really makes it read-only mid-run.
Elsewhere they are injected at the storage layer (Orbax's creation of the checkpoint
folder raises ``OSError(ENOSPC)`` or ``OSError(EROFS)``; a non-root user gets a real
``chmod`` instead). Either way the fault is injected: no test here is skipped.
``DATARAX_CKPT_NO_MOUNT=1`` forces the injected variant.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _fault_child import (
    clear_storage_errors,
    inject_storage_error,
    make_read_only,
    make_state,
    make_writable,
    mount_tmpfs,
    unmount,
)
from _trees import assert_identical as assert_same
from orbax.checkpoint._src.path import async_path

from datarax_ckpt import OrbaxCheckpointHandler, _writer_lock

CHILD = Path(__file__).with_name("_fault_child.py")
# make_state() stores ~3.1 MiB: an 11 MiB disk takes three checkpoints, not four.
DISK_MIB = 11
READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES)  # remount (or injected) / chmod


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """``(path, mounted)``: a 12 MiB tmpfs if one can be mounted, else a plain folder."""
    monkeypatch.setattr(async_path, "mkdir", async_path.mkdir)  # undoes injected faults
    path = tmp_path / "disk"
    path.mkdir()
    mounted = mount_tmpfs(str(path), DISK_MIB)
    yield path, mounted
    if mounted:
        unmount(str(path))
    else:
        os.chmod(path, 0o755)


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not re.fullmatch(r"ckpt-\d+", p.name))


def _check_intact(directory: Path, steps: list[int]) -> None:
    """A fresh handler lists exactly ``steps`` and restores each bit-exactly."""
    with OrbaxCheckpointHandler() as handler:
        assert handler.get_checkpoint_steps(directory) == steps
        for step in steps:
            assert_same(handler.restore(directory, step=step), make_state(step))


# TensorStore's failed writes call back into an asyncio loop Orbax has already closed.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_full_disk_raises_enospc_and_keeps_earlier_checkpoints(small_disk):
    directory, mounted = small_disk
    if not mounted:
        inject_storage_error(errno.ENOSPC, from_step=3)
    handler = OrbaxCheckpointHandler()
    errors = []
    for step in range(30):
        try:
            handler.save(directory, make_state(step), step=step)
        except* OSError as e:  # the failure(s) of earlier background writes
            errors.extend(e.exceptions)
        if errors:
            break
    while True:  # each failed save is reported exactly once, then the handler is clean
        try:
            handler.wait_until_finished()
        except* OSError as e:  # several at once come as one BackgroundSaveError
            errors.extend(e.exceptions)
        else:
            break
    handler.close()

    assert errors, "the disk filled up but no save reported it"
    for error in errors:
        assert error.errno == errno.ENOSPC, error
        assert "No space left on device" in str(error)
        assert any(re.search(r"background save of .*ckpt-\d+", n) for n in error.__notes__)
    committed = sorted(int(p.name[5:]) for p in directory.iterdir() if p.name[:5] == "ckpt-")
    # Step 3 did not fit. A later save may fit again once step 3's partial files are gone.
    assert committed[:3] == [0, 1, 2] and 3 not in committed
    assert _leftovers(directory) == []  # the failed saves' temporary folders are gone
    _check_intact(directory, committed)

    # Freeing space is all it takes to save again.
    for step in committed[:-1]:
        shutil.rmtree(directory / f"ckpt-{step}")
    clear_storage_errors()
    with OrbaxCheckpointHandler() as handler:
        handler.save(directory, make_state(40), step=40)
    _check_intact(directory, [committed[-1], 40])


def test_read_only_mid_run_fails_the_next_call_wait_and_close(small_disk):
    directory, mounted = small_disk
    handler = OrbaxCheckpointHandler()
    for step in (0, 1):
        handler.save(directory, make_state(step), step=step)
    handler.wait_until_finished()
    make_read_only(str(directory), mounted)

    handler.save(directory, make_state(2), step=2)  # fails in the background
    with pytest.raises(OSError) as on_next_call:
        handler.latest_step(directory)
    assert handler.latest_step(directory) == 1  # reported once; the failed step is not listed
    handler.save(directory, make_state(3), step=3)
    with pytest.raises(OSError) as on_wait:
        handler.wait_until_finished()
    handler.save(directory, make_state(4), step=4)
    with pytest.raises(OSError) as on_close:
        handler.close()
    for raised, step in ((on_next_call, 2), (on_wait, 3), (on_close, 4)):
        assert raised.value.errno in READ_ONLY_ERRNOS, raised.value
        assert f"background save of {directory / f'ckpt-{step}'}" in raised.value.__notes__[-1]

    _check_intact(directory, [0, 1])  # restoring works on the read-only disk
    make_writable(str(directory), mounted)
    # No temporary folder; only the writer lock file, which close() could not remove
    # from the read-only disk. It is no longer locked: the next writer takes it.
    assert _leftovers(directory) == [_writer_lock.LOCK_NAME]
    with OrbaxCheckpointHandler() as handler:
        handler.save(directory, make_state(2), step=2)
    _check_intact(directory, [0, 1, 2])
    assert _leftovers(directory) == []


def test_read_only_unversioned_checkpoint_is_refused_and_the_old_one_kept(small_disk):
    directory, mounted = small_disk
    with OrbaxCheckpointHandler() as handler:
        handler.save(directory, make_state(0))
    make_read_only(str(directory), mounted)
    handler = OrbaxCheckpointHandler(async_save=False)
    with pytest.raises(OSError) as raised:
        handler.save(directory, make_state(1), overwrite=True)
    assert raised.value.errno in READ_ONLY_ERRNOS
    handler.close()
    with OrbaxCheckpointHandler() as handler:
        assert_same(handler.restore(directory), make_state(0))


def test_process_exits_promptly_after_storage_faults(tmp_path):
    """A child fills one disk and makes another read-only, then exits with a save failing.

    Before the fix, a failed folder creation left Orbax threads waiting 300 s for it and
    the process could not exit; the 150 s limit here only catches such a hang.
    """
    full, read_only = tmp_path / "full", tmp_path / "ro"
    full.mkdir()
    read_only.mkdir()
    mounted = [mount_tmpfs(str(full), DISK_MIB), mount_tmpfs(str(read_only), DISK_MIB)]
    try:
        command = [sys.executable, str(CHILD), "storage", str(full), str(int(mounted[0]))]
        command += [str(read_only), str(int(mounted[1]))]
        child = subprocess.run(command, capture_output=True, text=True, timeout=150)
    finally:
        for path, was_mounted in zip((full, read_only), mounted, strict=True):
            if was_mounted:
                unmount(str(path))
            else:
                os.chmod(path, 0o755)
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert report["full"] and set(report["full"]) == {errno.ENOSPC}
    assert report["ro"] and set(report["ro"]) <= set(READ_ONLY_ERRNOS)
    assert "A pending checkpoint failed while the process was exiting" in child.stderr
