"""One checkpoint directory's machinery: its worker thread, its Orbax CheckpointManager,
its queue of pending saves, and the process-wide lock that orders all Orbax work."""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import threading
from types import EllipsisType
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

from datarax_ckpt import (
    _integrity,
    _layout,
    _multihost,
    _reading,
    _retention,
    _s3,
    _snapshot,
    _writer_lock,
)
from datarax_ckpt.options import CheckpointOptions


class _SubmissionOrderLock:
    """A lock granted to jobs in the order they were submitted (a ticket lock).

    Multi-process runs need the order, not just the exclusion: a job may wait at a
    barrier for the same job on the other processes, and with a plain lock two
    directories' workers could take it in different orders on two processes and wait
    for each other until the barrier times out. Every process submits the same jobs in
    the same order, so tickets make them run in the same order everywhere.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._issued = 0
        self._serving = 0

    def submit(self, executor, fn, *args) -> concurrent.futures.Future:
        # Ticket and enqueue together: a worker must never hold a job whose ticket comes
        # after one still waiting behind it in its own queue.
        with self._cond:
            future = executor.submit(self._run, self._issued, fn, *args)
            self._issued += 1
            return future

    def _run(self, ticket: int, fn, *args):
        with self._cond:
            self._cond.wait_for(lambda: self._serving == ticket)
        try:
            return fn(*args)
        finally:
            with self._cond:
                self._serving += 1
                self._cond.notify_all()


# Orbax keeps process-global state for async saves (operation ids and the signals that
# order directory creation before writes): two CheckpointManagers saving at once from two
# threads write into folders that do not exist yet. Every Orbax call of every handler in
# this process therefore runs under this lock; per-directory order is kept by the workers.
ORBAX_LOCK = _SubmissionOrderLock()


@dataclasses.dataclass
class Pending:
    future: concurrent.futures.Future
    nbytes: int
    name: str
    arena: Any = None  # host buffers of the capture, reused once the write has finished


class Directory:
    """Everything the handler keeps for one checkpoint directory.

    All Orbax calls for a directory run on its single worker thread, in submission
    order: the CheckpointManager (not thread-safe) is only ever touched by that thread,
    and a restore queued after a save sees that save (read-your-writes).
    """

    def __init__(self, path: epath.Path, options: CheckpointOptions):
        self.path = path
        self.options = options
        self.worker = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"datarax-ckpt:{path.name}"
        )
        self.pending: collections.deque[Pending] = collections.deque()
        self.keep: int | None = None  # the retention the manager was built with
        self.pool = _snapshot.ArenaPool(max_free=options.max_pending_saves)
        self._manager: ocp.CheckpointManager | None = None
        self.coordinator = _multihost.Coordinator(str(path))
        self.writer: _writer_lock.WriterLock | None = None
        self.incremental: Any = None  # an _incremental.Tracker, set by the handler
        if _s3.is_s3(path):
            _s3.install()

    def claim(self) -> None:
        """Makes this handler the directory's writer (see ``_writer_lock``); idempotent.

        Called by ``save()`` before anything is written. In a multi-process run only
        process 0 takes the lock: the processes of one job are one writer.

        Raises:
            WriterConflictError: if another live handler writes the directory.
        """
        if self.writer is None and _multihost.is_primary():
            self.writer = _writer_lock.acquire(self.path)

    def atomicity(self) -> dict[str, Any]:
        """Keyword arguments giving an Orbax checkpointer this directory's commit protocol."""
        return {"atomicity_options": _s3.atomicity_options()} if _s3.is_s3(self.path) else {}

    def item_handlers(self) -> dict[str, Any]:
        return {
            _layout.ITEM_STATE: _reading.state_handler(
                use_ocdbt=self.options.ocdbt, use_compression=self.options.use_compression
            ),
            _layout.ITEM_MANIFEST: ocp.JsonCheckpointHandler(),
            _layout.ITEM_METADATA: ocp.JsonCheckpointHandler(),
            _layout.ITEM_CHECKSUMS: _integrity.ChecksumsHandler(),
        }

    def manager(self, keep: int | None | EllipsisType = ...) -> ocp.CheckpointManager:
        """The directory's CheckpointManager (worker thread, writes only); created on first use.

        Only a writer creates it, after :meth:`claim`: creating it removes every temporary
        folder and finishes interrupted overwrites and deletions, which is safe only when
        no other live process writes the directory. Reads go through Orbax without it.

        ``keep``: the retention of the save about to run. Orbax takes retention policies
        only when a manager is created, so a ``keep`` that differs from the last save's
        rebuilds the manager (a loop that passes the same ``keep`` builds it once).
        """
        if keep is not ... and keep != self.keep:
            self.keep = keep
            if self._manager is not None:
                self._manager.close()
                self._manager = None
        if self._manager is None:
            s3 = _s3.is_s3(self.path)
            cleanup = self.options.cleanup_tmp_directories
            if _multihost.is_primary():
                _layout.recover(self.path)
                if s3 and cleanup:
                    _layout.remove_unmarked(self.path)
            self.coordinator.barrier("recovered")  # the others wait for process 0's repairs
            self._manager = ocp.CheckpointManager(
                self.path,
                options=ocp.CheckpointManagerOptions(
                    step_name_format=_layout.NAME_FORMAT,
                    **_retention.manager_options(self.options, self.keep),
                    create=False,
                    # On s3:// Orbax's cleanup deletes every unmarked folder; ours above
                    # only the library's own.
                    cleanup_tmp_directories=cleanup and not s3,
                    enable_async_checkpointing=True,
                    # Atomic removal (see _layout.TRASH); object stores cannot rename.
                    todelete_subdir=None if s3 else _layout.TRASH,
                    atomicity_options=_s3.atomicity_options() if s3 else None,
                    # Create the step's tmp folder on this worker thread, before any write
                    # is scheduled: created asynchronously, a failure (read-only or full
                    # disk) orphans Orbax threads that wait 300 s for it and block exit.
                    async_options=ocp.options.AsyncOptions(create_directories_asynchronously=False),
                ),
                item_handlers=self.item_handlers(),
            )
            # Orbax removes stale temporary folders in the background; finish that now so
            # it cannot race the unversioned checkpoint, which is written beside the steps.
            getattr(self._manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()
            if s3:
                _s3.configure_manager(self._manager, self.path)
        return self._manager

    def run(self, fn, *args) -> concurrent.futures.Future:
        return ORBAX_LOCK.submit(self.worker, fn, *args)

    def drain(self) -> None:
        """Waits until every job queued so far has finished (errors are reported elsewhere)."""
        self.worker.submit(lambda: None).result()

    def close(self) -> None:
        try:
            if self._manager is not None:
                self.run(self._manager.close).result()
        finally:
            self.worker.shutdown(wait=True)
            self.pool.clear()
            if self.writer is not None:
                self.writer.release()
