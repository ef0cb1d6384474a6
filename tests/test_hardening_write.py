"""The write side of an untrusted checkpoint directory (issue 17).

Every failed background save is raised, once; the library's own folders (trash,
backups, Orbax's temporary folders) are never followed out of the directory; impossible
paths are refused by ``save()`` itself; Python floats round-trip bit-exactly; whatever
nesting ``save()`` accepts, ``restore()`` restores.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import struct
import subprocess
import sys
import threading

import jax.numpy as jnp
import numpy as np
import pytest
from _fault_child import make_read_only, make_writable, mount_tmpfs, unmount
from hypothesis import given, settings
from hypothesis import strategies as st
from orbax.checkpoint._src.path import async_path

import datarax_ckpt
from datarax_ckpt import (
    BackgroundSaveError,
    CheckpointError,
    CheckpointNotADirectoryError,
    CheckpointPathError,
    NestingTooDeepError,
    OrbaxCheckpointHandler,
    _layout,
    serialization,
)

READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES)  # remount (or injected) / chmod


def _state(step: int) -> dict:
    return {"w": jnp.arange(6.0) + step, "step": step}


def _same(a, b) -> None:
    assert a.keys() == b.keys()
    assert a["step"] == b["step"] and bool((a["w"] == b["w"]).all())


def _tree(root) -> dict[str, int]:
    """Every entry under ``root`` (links not followed) and its size: to see nothing moved."""
    found = {}
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(parent, name)
            found[os.path.relpath(path, root)] = os.lstat(path).st_size
    return found


# --------------------------------------------------------------------------- errors


@pytest.fixture
def read_only_disk(tmp_path, monkeypatch):
    """``(path, mounted)``: a tmpfs made read-only later if one can be mounted (root),
    else a folder whose writes fail by injection (see ``_fault_child``)."""
    monkeypatch.setattr(async_path, "mkdir", async_path.mkdir)  # undoes injected faults
    path = tmp_path / "disk"
    path.mkdir()
    mounted = mount_tmpfs(str(path), 16)
    yield path, mounted
    make_writable(str(path), mounted)
    if mounted:
        unmount(str(path))


def test_three_failed_background_saves_are_each_raised_exactly_once(read_only_disk, monkeypatch):
    directory, mounted = read_only_disk
    handler = OrbaxCheckpointHandler(max_pending_saves=3)
    handler.save(directory, _state(1), step=1)
    handler.wait_until_finished()
    make_read_only(str(directory), mounted)
    # Hold the first write at Orbax's folder creation until all three saves are queued,
    # so that no save() in between reports an earlier failure: all three fail unreported.
    gate, create = threading.Event(), async_path.mkdir

    async def gated_mkdir(*args, **kwargs):
        await asyncio.to_thread(gate.wait, 60)
        return await create(*args, **kwargs)

    monkeypatch.setattr(async_path, "mkdir", gated_mkdir)
    for step in (2, 3, 4):
        handler.save(directory, _state(step), step=step)
    gate.set()
    with pytest.raises(BackgroundSaveError, match="^3 background checkpoint saves failed") as e:
        handler.wait_until_finished()
    group = e.value
    assert isinstance(group, CheckpointError) and isinstance(group, ExceptionGroup)
    for error, step in zip(group.exceptions, (2, 3, 4), strict=True):
        assert isinstance(error, OSError) and error.errno in READ_ONLY_ERRNOS, error
        assert error.__notes__[-1] == (
            f"datarax_ckpt: raised by the background save of {directory / f'ckpt-{step}'}."
        )
    with pytest.raises(BackgroundSaveError):  # except* sees each error; the type is kept
        try:
            raise group
        except* OSError as matched:
            assert len(matched.exceptions) == 3
            raise
    assert handler.latest_step(directory) == 1  # each raised once: nothing is left to raise
    handler.close()


# The test above, in a child process whose whole stderr is seen (pytest would intercept
# thread exceptions and log records in this one).
_CHILD = """
import asyncio, os, sys, threading
sys.path.insert(0, sys.argv[2])
from _fault_child import make_read_only, mount_tmpfs, unmount, make_state
from orbax.checkpoint._src.path import async_path
from datarax_ckpt import BackgroundSaveError, OrbaxCheckpointHandler
directory = sys.argv[1]
mounted = mount_tmpfs(directory, 16)
handler = OrbaxCheckpointHandler(max_pending_saves=3)
handler.save(directory, make_state(1), step=1)
handler.wait_until_finished()
make_read_only(directory, mounted)
gate, create = threading.Event(), async_path.mkdir
async def gated_mkdir(*args, **kwargs):
    await asyncio.to_thread(gate.wait, 60)
    return await create(*args, **kwargs)
async_path.mkdir = gated_mkdir
for step in (2, 3, 4):
    handler.save(directory, make_state(step), step=step)
gate.set()
try:
    handler.wait_until_finished()
except BackgroundSaveError as group:
    print([e.errno for e in group.exceptions])
handler.close()
if mounted:
    unmount(directory)
"""


def test_raised_background_errors_print_nothing_on_stderr(tmp_path):
    tests = os.path.dirname(os.path.abspath(__file__))
    command = [sys.executable, "-c", _CHILD, str(tmp_path), tests]
    child = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    assert len(json.loads(child.stdout)) == 3
    assert set(json.loads(child.stdout)) <= set(READ_ONLY_ERRNOS)
    assert child.stderr == ""  # no thread traceback, no "Another background error" log


def test_one_failed_background_save_is_raised_as_itself(read_only_disk):
    directory, mounted = read_only_disk
    handler = OrbaxCheckpointHandler(async_save=False)
    handler.save(directory, _state(1), step=1)
    make_read_only(str(directory), mounted)
    with pytest.raises(OSError) as raised:
        handler.save(directory, _state(2), step=2)
    assert not isinstance(raised.value, BaseExceptionGroup)
    assert raised.value.errno in READ_ONLY_ERRNOS
    handler.close()


# --------------------------------------------------------------------------- own folders


@pytest.fixture
def saved(tmp_path):
    """``(directory, outside)``: steps 1 and 2 saved, and a folder beside the directory
    that must never be touched."""
    directory, outside = tmp_path / "d", tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("not yours")
    with OrbaxCheckpointHandler() as handler:
        for step in (1, 2):
            handler.save(directory, _state(step), step=step)
    return directory, outside


def test_a_symlinked_trash_receives_no_steps(saved, caplog):
    directory, outside = saved
    before = _tree(outside)
    os.symlink(outside, directory / ".datarax-trash")
    with caplog.at_level(logging.WARNING, "datarax_ckpt"):
        with OrbaxCheckpointHandler() as handler:
            handler.save(directory, _state(3), step=3, keep=1)  # retention removes 1 and 2
            assert handler.get_checkpoint_steps(directory) == [3]
            _same(handler.restore(directory), _state(3))
    assert _tree(outside) == before
    assert sorted(os.listdir(directory)) == ["ckpt-3"]
    assert "is a symlink, not a directory" in caplog.text


@pytest.mark.parametrize("kind", ["symlink", "file"])
def test_a_backup_that_is_not_a_folder_breaks_no_later_save_or_restore(saved, kind):
    directory, outside = saved
    before = _tree(outside)
    backup = directory / "ckpt-2.datarax-backup"
    if kind == "symlink":
        os.symlink(outside, backup)
    else:
        backup.write_text("junk")
    with OrbaxCheckpointHandler() as handler:
        _same(handler.restore(directory), _state(2))
        handler.save(directory, _state(9), step=2, overwrite=True)  # moves ckpt-2 aside
        handler.save(directory, _state(3), step=3)  # (only the latest step is overwritten)
        assert handler.get_checkpoint_steps(directory) == [1, 2, 3]
        _same(handler.restore(directory, step=2), _state(9))
    assert _tree(outside) == before
    assert sorted(os.listdir(directory)) == ["ckpt-1", "ckpt-2", "ckpt-3"]


def test_a_symlinked_temporary_folder_is_removed_not_followed(saved):
    directory, outside = saved
    before = _tree(outside)
    os.symlink(outside, directory / "ckpt-5.orbax-checkpoint-tmp-1700000000000000")
    (directory / "ckpt-6.orbax-checkpoint-tmp-1700000000000000").write_text("junk")
    with OrbaxCheckpointHandler() as handler:
        handler.save(directory, _state(5), step=5, keep=2)
        assert handler.get_checkpoint_steps(directory) == [2, 5]
    assert _tree(outside) == before
    assert sorted(os.listdir(directory)) == ["ckpt-2", "ckpt-5"]


def test_a_backup_replaced_by_a_link_is_not_put_back(saved):
    directory, outside = saved
    before = _tree(outside)
    step = directory / "ckpt-2"
    backup = _layout.move_aside(step)
    os.rename(backup, directory / "moved")
    os.symlink(outside, backup)
    with pytest.raises(CheckpointError, match="was replaced by a link or file"):
        _layout.put_back(step, backup)
    assert not os.path.lexists(backup) and not os.path.lexists(step)
    assert _tree(outside) == before


# --------------------------------------------------------------------------- paths


@pytest.mark.parametrize(
    ("where", "error", "message"),
    [
        ("", CheckpointPathError, "directory is the empty string"),
        ("d/a\0b", CheckpointPathError, "contains a NUL byte"),
        ("file/sub", CheckpointNotADirectoryError, "file is a file, not a folder"),
        ("file", CheckpointNotADirectoryError, "is a file. Pass a directory path"),
        (
            "d/" + "x" * 300,
            CheckpointPathError,
            "is 300 bytes long; this file system allows at most",
        ),
        ("d/" + "/".join(["y" * 200] * 20), CheckpointPathError, "Use a shorter path"),
        ("d/caf\udce9", CheckpointPathError, "is not valid UTF-8"),
    ],
    ids=["empty", "nul", "under-a-file", "a-file", "name-too-long", "path-too-long", "latin1"],
)
def test_impossible_paths_are_refused_by_save_itself(tmp_path, monkeypatch, where, error, message):
    monkeypatch.chdir(tmp_path)  # "" must not mean the current directory
    (tmp_path / "file").write_text("a file")
    before = _tree(tmp_path)
    with OrbaxCheckpointHandler() as handler:
        with pytest.raises(error, match=message):
            handler.save(where if not where or "\0" in where else tmp_path / where, _state(1))
    assert _tree(tmp_path) == before


def test_a_latin1_parent_that_exists_is_refused_too(tmp_path):
    parent = os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9")  # as os.listdir returns it
    os.mkdir(os.fsencode(parent))
    with OrbaxCheckpointHandler() as handler:
        with pytest.raises(CheckpointPathError, match="save under a UTF-8 name"):
            handler.save(os.path.join(parent, "run"), _state(1), step=1)
    assert os.listdir(os.fsencode(parent)) == []


# --------------------------------------------------------------------------- floats


def _bits(x: float) -> str:
    return struct.pack(">d", x).hex()


def _float(bits: int) -> float:
    return struct.unpack(">d", bits.to_bytes(8, "big"))[0]


def _through_json(state):
    arrays, manifest = serialization.serialize(state)
    return serialization.deserialize(arrays, json.loads(json.dumps(manifest)))


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))
def test_python_floats_round_trip_bit_exactly(a, b):
    x, z = _float(a), complex(_float(a), _float(b))
    back = _through_json({"x": x, "z": z})
    assert _bits(back["x"]) == _bits(x)
    assert (_bits(back["z"].real), _bits(back["z"].imag)) == (_bits(z.real), _bits(z.imag))


NANS = ["fff8000000000000", "7ff8000000000001", "fff0000000000001", "7ff4000000c0ffee"]


def test_nan_sign_and_payload_survive_a_real_save(tmp_path):
    floats = [struct.unpack(">d", bytes.fromhex(h))[0] for h in NANS]
    state = {"nans": floats, "inf": -float("inf"), "zero": -0.0, "z": complex(floats[0], 1.5)}
    with OrbaxCheckpointHandler() as handler:
        handler.save(tmp_path, state, step=1)
        back = handler.restore(tmp_path)
        assert handler.verify(tmp_path).ok
    assert [_bits(x) for x in back["nans"]] == NANS
    assert (_bits(back["inf"]), _bits(back["zero"])) == (_bits(-float("inf")), _bits(-0.0))
    assert _bits(back["z"].real) == NANS[0] and back["z"].imag == 1.5


def test_manifests_without_exact_bits_still_read(tmp_path):
    arrays, manifest = serialization.serialize({"f": float("nan"), "g": 0.1})
    node = manifest["tree"]["c"][0]
    assert node["x"] == "7ff8000000000000"
    del node["x"]  # as written before the exact bits were recorded
    back = serialization.deserialize(arrays, json.loads(json.dumps(manifest)))
    assert np.isnan(back["f"]) and back["g"] == 0.1


# --------------------------------------------------------------------------- depth


def _chain(levels: int, leaf=0, container=lambda child: {"a": child}):
    """``levels`` nested containers around ``leaf`` (levels + 1 manifest levels)."""
    tree = leaf
    for _ in range(levels):
        tree = container(tree)
    return tree


@pytest.mark.parametrize(
    "container",
    [lambda c: {"a": c}, lambda c: [c], lambda c: (1.5, c)],
    ids=["dict", "list", "tuple"],
)
def test_the_deepest_state_save_accepts_restores(tmp_path, container):
    deepest = _chain(serialization.MAX_DEPTH - 1, jnp.ones(2), container)
    with OrbaxCheckpointHandler() as handler:
        handler.save(tmp_path, deepest, step=1, metadata=_chain(serialization.MAX_DEPTH - 1))
        back = handler.restore(tmp_path)
        again = handler.restore(tmp_path, deepest)
        metadata = handler.restore(tmp_path, metadata_only=True)
        assert handler.verify(tmp_path).ok
    for tree in (back, again):
        for _ in range(serialization.MAX_DEPTH - 1):
            tree = tree["a"] if isinstance(tree, dict) else tree[-1]
        assert bool((tree == jnp.ones(2)).all())
    assert metadata == _chain(serialization.MAX_DEPTH - 1)


@pytest.mark.parametrize("levels", [serialization.MAX_DEPTH, 400])
def test_a_deeper_state_is_refused_at_save_naming_the_path(tmp_path, levels):
    with OrbaxCheckpointHandler() as handler:
        with pytest.raises(NestingTooDeepError, match=r"deeper than 100 levels .* at \['a'\]"):
            handler.save(tmp_path / "d", _chain(levels), step=1)
        with pytest.raises(NestingTooDeepError, match=r"The metadata nests .* at metadata\['a'\]"):
            handler.save(tmp_path / "d", {"w": 1}, step=1, metadata=_chain(levels))
    assert not (tmp_path / "d").exists()


def test_a_state_that_contains_itself_is_refused_not_a_recursion_error(tmp_path):
    state: dict = {"w": jnp.ones(2)}
    state["self"] = state
    with OrbaxCheckpointHandler() as handler:
        with pytest.raises(NestingTooDeepError, match=r"at \['self'\]\['self'\]"):
            handler.save(tmp_path, state, step=1)


# --------------------------------------------------------------------------- hierarchy


def test_every_public_error_is_a_checkpoint_error_and_a_builtin():
    errors = [getattr(datarax_ckpt, n) for n in datarax_ckpt.__all__ if n.endswith("Error")]
    assert len(errors) >= 11
    for cls in errors:
        assert issubclass(cls, CheckpointError), cls
        builtin = [b for b in cls.__mro__ if b.__module__ == "builtins"]
        assert builtin[0] not in (Exception, BaseException) or cls is CheckpointError, cls
    assert issubclass(datarax_ckpt.DeviceMemoryError, MemoryError)
    assert issubclass(CheckpointNotADirectoryError, NotADirectoryError)
    assert issubclass(BackgroundSaveError, ExceptionGroup)
