"""One checkpoint directory's machinery: its worker thread, its Orbax CheckpointManager,
its queue of pending saves, and the process-wide lock that orders all Orbax work."""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import threading
from types import EllipsisType
from typing import Any

from etils import epath

from datarax_ckpt import _arena, _layout, _multihost, _orbax, _s3, _snapshot, _writer_lock
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
        self._manager: Any = None  # an Orbax CheckpointManager
        self._state_reader: Any = None  # the state item's Orbax handler, for restores
        self._hash_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.restore_arena = _arena.RestoreArena()  # host memory of restores, reused
        self.coordinator = _multihost.Coordinator(str(path))
        self.writer: _writer_lock.WriterLock | None = None
        self.incremental: Any = None  # an _incremental.Tracker, set by the handler
        _orbax.prepare(path)

    def claim(self) -> None:
        """Makes this handler the directory's writer (see ``_writer_lock``); idempotent.

        Called by ``save()`` before anything is written. In a multi-process run only
        process 0 takes the lock: the processes of one job are one writer.

        Raises:
            WriterConflictError: if another live handler writes the directory.
        """
        if self.writer is None and _multihost.is_primary():
            self.writer = _writer_lock.acquire(self.path)

    def item_handlers(self) -> dict[str, Any]:
        return _orbax.item_handlers(
            use_ocdbt=self.options.ocdbt, use_compression=self.options.use_compression
        )

    def state_reader(self) -> Any:
        """The state item's Orbax handler for restores (worker thread), created once.

        Restores call it directly on ``<step>/state``: a ``Checkpointer`` and a
        ``CompositeCheckpointHandler`` built per restore, and the checkpointer's own
        finalized-path check (a new event loop and threads; the commit was checked by
        the structural check), cost 1.5-2.5 ms a restore (performance.md #21).
        """
        if self._state_reader is None:
            self._state_reader = _orbax.state_handler(
                use_ocdbt=self.options.use_ocdbt, use_compression=self.options.use_compression
            )
        return self._state_reader

    def hash_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        """Two threads hashing what restores read (xxhash releases the GIL), kept until
        :meth:`close`: starting them per restore cost ~0.3 ms of a 1 MiB restore."""
        if self._hash_pool is None:
            self._hash_pool = concurrent.futures.ThreadPoolExecutor(
                2, thread_name_prefix="datarax-ckpt-hash"
            )
        return self._hash_pool

    def manager(self, keep: int | None | EllipsisType = ...) -> Any:
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
            if _multihost.is_primary():
                _layout.recover(self.path)
                if _s3.is_s3(self.path) and self.options.cleanup_tmp_directories:
                    _layout.remove_unmarked(self.path)
            self.coordinator.barrier("recovered")  # the others wait for process 0's repairs
            self._manager = _orbax.create_manager(self.path, self.options, self.keep)
        return self._manager

    def make_room(self, nbytes: int, lock: Any) -> bool:
        """Applies the backpressure policy for a save of ``nbytes``; returns False if the
        save must be skipped (``lock``: the handler's, which guards :attr:`pending`)."""
        opts = self.options

        def oldest_if_full() -> Pending | None:
            with lock:
                pending = [p for p in self.pending if not p.future.done()]
            held = sum(p.nbytes for p in pending)
            limit = opts.max_pending_bytes
            over = len(pending) >= opts.max_pending_saves or (
                limit is not None and held + nbytes > limit
            )
            return pending[0] if pending and over else None

        while (oldest := oldest_if_full()) is not None:
            if opts.on_backpressure == "skip":
                return False
            concurrent.futures.wait([oldest.future])
        return True

    def run(self, fn, *args) -> concurrent.futures.Future:
        return ORBAX_LOCK.submit(self.worker, fn, *args)

    def drain(self) -> None:
        """Waits until every job queued so far has finished (errors are reported elsewhere)."""
        self.worker.submit(lambda: None).result()

    def close(self) -> None:
        try:
            if self._manager is not None:
                self.run(self._manager.close).result()
            if self._state_reader is not None:
                self.run(self._state_reader.close).result()
        finally:
            self.worker.shutdown(wait=True)
            if self._hash_pool is not None:
                self._hash_pool.shutdown(wait=True)
            self.pool.clear()
            self.restore_arena.clear()
            if self.writer is not None:
                self.writer.release()
