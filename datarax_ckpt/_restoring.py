"""The read side of OrbaxCheckpointHandler: restore and verify, run on a directory's worker."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from typing import Any

import jax
from etils import epath

from datarax_ckpt import (
    _arena,
    _directory,
    _integrity,
    _layout,
    _manifest,
    _orbax,
    _report,
    _s3,
    _snapshot,
    _structure,
    serialization,
)
from datarax_ckpt._errors import CheckpointCorruptedError, CheckpointNotFoundError

logger = logging.getLogger("datarax_ckpt")


def on_device(device: Any, fn: Any, *args: Any) -> Any:
    """Runs ``fn(*args)`` under ``jax.default_device(device)`` (a per-thread setting)."""
    with jax.default_device(device):
        return fn(*args)


def caller_context() -> tuple[Any, Any]:
    """The calling thread's ``jax.default_device`` and ``jax.set_mesh`` mesh (both per thread)."""
    return _snapshot.default_device(), jax.sharding.get_mesh()


def in_context(context: tuple[Any, Any], fn: Any, *args: Any) -> Any:
    """Runs ``fn(*args)`` under a :func:`caller_context`: a target from ``nnx.eval_shape``
    is sharded over an abstract mesh, made concrete with the caller's mesh."""
    device, mesh = context
    with contextlib.ExitStack() as stack:
        if not mesh.empty:
            stack.enter_context(jax.set_mesh(mesh))
        return on_device(device, fn, *args)


def no_checkpoint(path: epath.Path) -> CheckpointNotFoundError:
    """The error for a directory with neither steps nor an unversioned checkpoint."""
    return CheckpointNotFoundError(
        f"No checkpoint in {path}: no committed ckpt-<step>/ folder and no "
        f"{_layout.UNVERSIONED}/ folder."
    )


def missing_step(path: epath.Path, step: int, steps: list[int]) -> CheckpointNotFoundError:
    """The error for a step that is not committed, listing those that are."""
    return CheckpointNotFoundError(
        f"No committed checkpoint for step {step} in {path}. Available steps: {steps or 'none'}."
    )


# A writer's retention (or overwrite) may delete a step between a reader's listing and
# its read. restore(step=None) then lists again and reads the newest step, at most this
# many times: retention deletes the oldest steps, so the newest one vanishes only when
# ``keep`` newer saves commit during one read.
ATTEMPTS = 8


class _Vanished(Exception):
    """The folder being read was removed or replaced meanwhile (by a writer's own work)."""


def _identity(folder: epath.Path) -> Any:
    """What tells a committed folder from a later one of the same name; None if absent."""
    if _s3.is_s3(folder):  # no inode: a new commit writes a new marker object
        return _s3.marker_identity(folder)
    if not _layout.is_committed(folder):
        return None
    try:
        stat = os.stat(folder)  # a rename keeps the inode; a new commit has another
    except FileNotFoundError:
        return None
    except (OSError, TypeError):  # a remote path: only presence can be checked
        return str(folder)
    return (stat.st_dev, stat.st_ino)


def _stable(folder: epath.Path, fn, *args, failed=lambda result: False) -> Any:
    """``fn(*args)``; raises :class:`_Vanished` if it failed (an exception, or
    ``failed(result)``) and ``folder`` was removed or replaced while it ran.

    A read that succeeded is valid even then: the writer moves a step away with one
    rename before deleting its files, and committed files are never rewritten.
    """
    before = _identity(folder)
    if before is None:
        raise _Vanished(folder)
    try:
        result = fn(*args)
    except Exception as e:
        if _identity(folder) != before:
            raise _Vanished(folder) from e
        raise
    if failed(result) and _identity(folder) != before:
        raise _Vanished(folder)
    return result


def _deleted(path: epath.Path, step: int) -> CheckpointNotFoundError:
    error = missing_step(path, step, _layout.committed_steps(path))
    error.add_note(f"ckpt-{step} was deleted (or replaced) while it was being read.")
    return error


def _too_fast(path: epath.Path, steps: list[int]) -> CheckpointNotFoundError:
    return CheckpointNotFoundError(
        f"The newest step of {path} was deleted while being read, {ATTEMPTS} times "
        f"(last listing: {steps}): its writer's retention removes steps faster than this "
        "restore reads them. Save with a larger keep, or restore less often."
    )


def read(
    handle: _directory.Directory, target, step, metadata_only, verify, fallback, partial=False
) -> Any:
    """The body of ``OrbaxCheckpointHandler.restore``, run on the directory's worker.

    Only reads: it creates, moves and deletes nothing, so it is safe beside a writer in
    another process (leftovers of killed saves are the writer's to clean up).
    """
    path = handle.path
    if not path.is_dir():
        raise CheckpointNotFoundError(f"Checkpoint directory {path} does not exist.")
    for _ in range(ATTEMPTS):
        folders = _layout.step_folders(path)
        try:
            args = (target, step, metadata_only, verify, fallback, partial)
            return _read_listed(handle, folders, *args)
        except _Vanished as e:
            if step is not None:
                raise _deleted(path, step) from e.__cause__
            logger.debug("%s was deleted while being read; listing %s again.", e, path)
    raise _too_fast(path, list(folders))


def _read_listed(handle, folders, target, step, metadata_only, verify, fallback, partial) -> Any:
    path, steps = handle.path, list(folders)
    if step is None and not steps:
        unversioned = path / _layout.UNVERSIONED
        if not _layout.is_committed(unversioned):
            # An overwrite of it in progress (or interrupted): its backup is the last
            # committed one, as the writer's recovery would put it back.
            unversioned = _layout.backup_path(unversioned)
            if not _layout.is_committed(unversioned):
                raise no_checkpoint(path)
        args = (handle, unversioned, target, metadata_only, verify, partial)
        return _stable(unversioned, _read_items, *args)
    if step is not None and step not in steps:
        raise missing_step(path, step, steps)
    failures: list[tuple[int, CheckpointCorruptedError]] = []
    for candidate in [step] if step is not None else steps[::-1]:
        folder = folders[candidate]
        try:
            args = (handle, folder, target, metadata_only, verify, partial)
            restored = _stable(folder, _read_items, *args)
        except CheckpointCorruptedError as e:
            if step is not None or not fallback:
                e.add_note("Restore an older step with step=N, or step=None to fall back.")
                raise
            logger.warning("Skipping step %d of %s:\n%s", candidate, path, e)
            failures.append((candidate, e))
            continue
        if failures:
            skipped = [s for s, _ in failures]
            logger.warning("Restored step %d of %s instead of %s.", candidate, path, skipped)
        return restored
    raise CheckpointCorruptedError(
        f"Every step in {path} is corrupt or incomplete ({steps}); nothing was restored.\n"
        + "\n".join(str(e) for _, e in failures),
        report=failures[0][1].report,
    ) from failures[0][1]


def _read_items(handle, path, target, metadata_only, verify=False, partial=False) -> Any:
    ours = (_layout.ITEM_MANIFEST, _layout.ITEM_METADATA, _layout.ITEM_CHECKSUMS)
    if not any((path / item).exists() for item in ours):
        # None of our items: another tool's checkpoint, not a damaged one of ours.
        _manifest.check_format(None, str(path))
    # The one validation of this restore: the manifest against the files (and every
    # entry of the folder, every JSON item read with a size limit), before allocating.
    structure = _structure.inspect(path, arrays=not metadata_only)
    if structure.problems:
        raise _report.corrupted(path, structure.problems)
    if structure.checked is None:  # not ours, or a newer format version
        _manifest.check_format(structure.manifest, str(path))
    if not verify:
        structure.checksums = None
    with _integrity.reading(structure):
        return _read_checked(handle, path, target, metadata_only, structure, partial)


def _read_checked(handle, path, target, metadata_only, structure, partial) -> Any:
    # The JSON items were read by the structural check (bounded, regular files only):
    # Orbax reads only the arrays.
    _integrity.check_json_item(structure, _layout.ITEM_MANIFEST, structure.manifest)
    if metadata_only:
        _integrity.check_json_item(structure, _layout.ITEM_METADATA, structure.metadata)
        return structure.metadata
    # Through the directory's own state handler, never its CheckpointManager
    # (_orbax.state_reader).
    with _orbax.state_reader(path, handle.state_reader()) as read:
        return _read_through(handle, read, target, structure, partial)


def _read_through(handle, read, target, structure, partial) -> Any:
    plan = serialization.plan_restore(structure.checked, target, partial=partial)
    # Without checksums to check (none recorded, or verify off) this is a plain read.
    raw = structure.checked.raw
    with _arena.reusing(handle.restore_arena):
        loaded = _integrity.load_verified(read, plan.storage, raw, structure, handle.hash_pool())
    return plan.build(loaded)


# ------------------------------------------------------------------ verifying


def verify(handle: _directory.Directory, step: int | None) -> _report.VerifyReport:
    """The body of ``OrbaxCheckpointHandler.verify``, run on the directory's worker.

    A step deleted by a writer while it is checked is not reported as damaged: with
    ``step=None`` the newest step is checked again, an explicit step is not found.
    """
    path = handle.path
    if not path.is_dir():
        raise CheckpointNotFoundError(f"Checkpoint directory {path} does not exist.")
    for _ in range(ATTEMPTS):
        folders = _layout.step_folders(path)
        steps = list(folders)
        if step is None and not steps:
            folder = path / _layout.UNVERSIONED  # verify reports it even if uncommitted
            if not folder.exists():
                raise no_checkpoint(path)
            return _integrity.verify(folder, item_handlers=handle.item_handlers())
        if step is not None and step not in steps:
            raise missing_step(path, step, steps)
        folder = folders[steps[-1] if step is None else step]
        try:
            handlers = handle.item_handlers()
            check = functools.partial(_integrity.verify, folder, item_handlers=handlers)
            return _stable(folder, check, failed=lambda report: not report.ok)
        except _Vanished as e:
            if step is not None:
                raise _deleted(path, step) from e.__cause__
            logger.debug("%s was deleted while being verified; listing %s again.", e, path)
    raise _too_fast(path, steps)
