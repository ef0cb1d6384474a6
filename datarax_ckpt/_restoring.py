"""The read side of OrbaxCheckpointHandler: restore and verify, run on a directory's worker."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from datarax_ckpt import (
    _directory,
    _integrity,
    _layout,
    _manifest,
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


def read(
    handle: _directory.Directory, target, step, metadata_only, verify, fallback, partial=False
) -> Any:
    """The body of ``OrbaxCheckpointHandler.restore``, run on the directory's worker."""
    path = handle.path
    if not path.is_dir():
        raise CheckpointNotFoundError(f"Checkpoint directory {path} does not exist.")
    handle.manager()  # first use: finish interrupted overwrites before listing
    steps = _layout.committed_steps(path)
    unversioned = path / _layout.UNVERSIONED
    if step is None and not steps:
        if not _layout.is_committed(unversioned):
            raise no_checkpoint(path)
        return _read_items(handle, unversioned, None, target, metadata_only, verify, partial)
    if step is not None and step not in steps:
        raise missing_step(path, step, steps)
    failures: list[tuple[int, CheckpointCorruptedError]] = []
    for candidate in [step] if step is not None else steps[::-1]:
        try:
            folder = path / _layout.step_name(candidate)
            restored = _read_items(
                handle, folder, candidate, target, metadata_only, verify, partial
            )
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


def _read_items(handle, path, step, target, metadata_only, verify=False, partial=False) -> Any:
    ours = (_layout.ITEM_MANIFEST, _layout.ITEM_METADATA, _layout.ITEM_CHECKSUMS)
    if not any((path / item).exists() for item in ours):
        # None of our items: another tool's checkpoint, not a damaged one of ours.
        _manifest.check_format(None, str(path))
    # The one validation of this restore: the manifest against the files (and every
    # entry of the folder, every JSON item read with a size limit), before allocating.
    structure = _structure.inspect(path, arrays=not metadata_only)
    if structure.problems:
        raise _structure.corrupted(path, structure.problems)
    if structure.checked is None:  # not ours, or a newer format version
        _manifest.check_format(structure.manifest, str(path))
    if not verify:
        structure.checksums = None
    with _integrity.reading(structure):
        return _read_checked(handle, path, step, target, metadata_only, structure, partial)


def _read_checked(handle, path, step, target, metadata_only, structure, partial=False) -> Any:
    # The JSON items were read by the structural check (bounded, regular files only):
    # Orbax reads only the arrays.
    _integrity.check_json_item(structure, _layout.ITEM_MANIFEST, structure.manifest)
    if metadata_only:
        _integrity.check_json_item(structure, _layout.ITEM_METADATA, structure.metadata)
        return structure.metadata
    if step is None:
        checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler(**handle.item_handlers()))

        def read(**items):
            return checkpointer.restore(path, args=ocp.args.Composite(**items))
    else:
        manager = handle.manager()
        manager.reload()

        def read(**items):
            return manager.restore(step, args=ocp.args.Composite(**items))

    plan = serialization.plan_restore(structure.checked, target, partial=partial)
    # Without checksums to check (none recorded, or verify off) this is a plain read.
    loaded = _integrity.load_verified(read, plan.storage, structure.checked.raw, structure)
    return plan.build(loaded)


# ------------------------------------------------------------------ verifying


def verify(handle: _directory.Directory, step: int | None) -> _structure.VerifyReport:
    """The body of ``OrbaxCheckpointHandler.verify``, run on the directory's worker."""
    path = handle.path
    if not path.is_dir():
        raise CheckpointNotFoundError(f"Checkpoint directory {path} does not exist.")
    steps = _layout.committed_steps(path)
    if step is None and not steps:
        folder = path / _layout.UNVERSIONED  # verify reports it even if uncommitted
        if not folder.exists():
            raise no_checkpoint(path)
    elif step is None or step in steps:
        folder = path / _layout.step_name(steps[-1] if step is None else step)
    else:
        raise missing_step(path, step, steps)
    return _integrity.verify(folder, item_handlers=handle.item_handlers())
