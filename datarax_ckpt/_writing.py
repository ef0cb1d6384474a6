"""The write step of a save: one checkpoint through Orbax, on its directory's worker."""

from __future__ import annotations

from datarax_ckpt import _directory, _hostcopy, _integrity, _layout, _multihost, _orbax, _steps
from datarax_ckpt._errors import CheckpointError, CheckpointExistsError


def write(
    handle: _directory.Directory, step, arrays, manifest, metadata, keep, overwrite, objects, fill
) -> None:
    """Worker thread: writes one checkpoint through Orbax and waits until committed.

    ``fill``, if not None, first makes the copies the capture left for this thread (CPU:
    packing pinned jax arrays, see ``_snapshot.capture``). In a multi-process run only
    process 0 creates, moves and deletes folders; the others wait at barriers, so nobody
    races it.
    """
    _hostcopy.yield_to_captures()  # a save() capturing right now goes first
    if fill is not None:
        fill()
    primary = _multihost.is_primary()
    if primary:
        handle.path.mkdir(parents=True, exist_ok=True)
        _layout.clear_impostors(handle.path)  # before Orbax renames into the trash
    checksums = None
    path = handle.path / _layout.step_name(step)
    stored, known, linked, sums = arrays, {}, {}, {}
    if handle.incremental and step is not None:  # unchanged arrays: linked, not written
        stored, known, linked = handle.incremental.plan(handle.path, path.name, arrays)
    if handle.options.checksums:  # hashed beside the array writes; only process 0 writes

        def compute() -> dict:
            sums.update(_integrity.compute(arrays, manifest, metadata, known, linked))
            return sums

        checksums = _orbax.ChecksumsSave(compute if primary else dict, _integrity.unavailable)
    args = _orbax.save_args(manifest, metadata, stored, checksums)
    manager = handle.manager() if step is None else handle.manager(keep)
    backup = None
    _steps.check_order(handle.path, step, [])  # another process may have saved since
    committed = _layout.is_committed(path)
    handle.coordinator.barrier("checked")  # every process looked before anything moves
    if committed:
        if not overwrite:
            raise CheckpointExistsError(
                f"{path} was created by someone else while this save was queued."
            )
        backup = _layout.move_aside(path) if primary else _layout.backup_path(path)
        handle.coordinator.barrier("moved-aside")
    try:
        if step is None:
            _orbax.write_unversioned(path, args, handle.item_handlers())
        else:
            if backup is not None or manager.all_steps() != _layout.committed_steps(handle.path):
                manager.reload()  # the disk changed: Orbax retains what is there
            metrics = _orbax.metrics(handle.options, metadata)
            manager.save(step, args=args, force=True, metrics=metrics)
            manager.wait_until_finished()
    except BaseException:
        if primary:
            _layout.remove_partial(handle.path, path.name)
            if backup is not None:
                _layout.put_back(path, backup)
        if step is not None:
            manager.reload()
        raise
    if handle.incremental and step is not None:
        handle.incremental.committed(path, sums, objects)  # the next save links from it
    if backup is not None and primary:
        _layout.discard(backup)  # renamed away first: a reader may be reading it
    if primary:
        _layout.empty_trash(handle.path)
    handle.coordinator.barrier("committed")  # listing on any process now sees it
    if checksums is not None and checksums.error is not None:
        raise CheckpointError(
            f"{path} was committed without content checksums: computing them failed "
            f"({checksums.error!r}). Its data is complete and restores; verify() "
            "reports checksums_recorded=False for it. Save again to record them."
        ) from checksums.error
