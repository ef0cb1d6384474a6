"""OrbaxCheckpointHandler: non-blocking, exact checkpoints on Orbax's CheckpointManager."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import logging
import threading
import weakref
from collections.abc import Iterator
from typing import Any

from etils import epath

from datarax_ckpt import (
    _directory,
    _follow,
    _hostcopy,
    _incremental,
    _layout,
    _orbax,
    _report,
    _restoring,
    _safeio,
    _snapshot,
    _steps,
    _validate,
    _writing,
    serialization,
)
from datarax_ckpt._errors import (
    BackgroundSaveError,
    CheckpointExistsError,
    storage_error,
)
from datarax_ckpt._typing import PathLike, PyTree
from datarax_ckpt.options import CheckpointOptions

logger = logging.getLogger("datarax_ckpt")


_LIVE_HANDLERS: weakref.WeakSet[OrbaxCheckpointHandler] = weakref.WeakSet()


def _finish_pending_saves_at_exit() -> None:
    # Runs before concurrent.futures stops accepting work at interpreter exit (Orbax
    # needs its executors to finish a save), so pending saves commit instead of vanishing.
    for handler in list(_LIVE_HANDLERS):
        try:
            handler.close()
        except Exception:  # noqa: BLE001 - nothing left to raise to at exit
            logger.exception("A pending checkpoint failed while the process was exiting")


getattr(threading, "_register_atexit", atexit.register)(_finish_pending_saves_at_exit)


class OrbaxCheckpointHandler:
    """Saves and restores JAX training states without stopping the training loop.

    Each directory gets one Orbax ``CheckpointManager`` (created lazily, cached), which
    names steps ``ckpt-<step>``, applies ``keep`` retention and writes in the background.
    ``save()`` captures the state (a private copy, so later donation or mutation of the
    caller's arrays cannot reach the checkpoint) and returns; the write continues on a
    per-directory worker thread.

    Concurrency contract: thread-safe. Calls from several threads are serialized per
    directory in the order they acquire the handler. Writes to different directories
    (and of different handlers) run one at a time, because Orbax's asynchronous save
    machinery is not safe to run twice at once in one process. Multi-process-safe
    when every process makes the same calls (Orbax coordinates through
    ``jax.distributed``). One writer per directory, enforced: the first ``save()`` to a
    directory locks it until :meth:`close`, and a save by another handler or process
    raises :class:`~datarax_ckpt.WriterConflictError`. Any number of readers (restore,
    verify, listing, :meth:`follow`, even in other processes) may run beside the writer;
    they create, move and delete nothing (``docs/reliability.md``).

    Multi-process runs (after ``jax.distributed.initialize``): every process calls
    ``save``, ``restore`` and ``verify`` with the same directory and arguments, each
    with its view of the global state. Arrays sharded over processes are written by
    the processes that hold them; everything else is written once, by process 0, and
    must be equal on every process (checked at each save). Listing reads the disk on
    each process and needs no collective call. See ``docs/multihost.md``.

    Errors of background writes are never swallowed: they are raised, with the step
    and directory noted, by the next call on this handler, by
    :meth:`wait_until_finished` or by :meth:`close`. Saves still pending when the
    interpreter exits are completed before it exits.

    Args:
        options: A :class:`~datarax_ckpt.CheckpointOptions`; defaults if None.
        **overrides: Field overrides of ``options``, e.g. ``async_save=False``.

    Raises:
        TypeError: for an unknown option name or a wrongly typed value.
        ValueError: for an out-of-range option value.

    Example:
        >>> import tempfile, jax.numpy as jnp
        >>> from datarax_ckpt import OrbaxCheckpointHandler
        >>> directory = tempfile.mkdtemp()
        >>> with OrbaxCheckpointHandler() as handler:
        ...     _ = handler.save(directory, {"w": jnp.ones(3), "step": 10}, step=10)
        ...     restored = handler.restore(directory)
        ...     latest = handler.latest_step(directory)
        >>> restored["step"], latest
        (10, 10)
    """

    def __init__(self, options: CheckpointOptions | None = None, **overrides: Any):
        options = options if options is not None else CheckpointOptions()
        if not isinstance(options, CheckpointOptions):
            raise TypeError(f"options must be a CheckpointOptions, got {type(options).__name__}.")
        self.options = dataclasses.replace(options, **overrides) if overrides else options
        self._lock = threading.RLock()  # serializes public calls' critical sections
        self._state = threading.Lock()  # guards pending queues and errors; never held while waiting
        self._directories: dict[str, _directory.Directory] = {}
        self._errors: list[BaseException] = []
        self._closed = False
        _LIVE_HANDLERS.add(self)

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> OrbaxCheckpointHandler:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except Exception:  # do not mask the exception that is already propagating
            logger.exception("Error while closing the checkpoint handler")

    def close(self) -> None:
        """Waits for pending saves, releases threads and managers, raises their errors.

        Idempotent. The handler cannot be used afterwards.

        Raises:
            Exception: the error of a background write not yet reported, or a
                BackgroundSaveError holding each of several.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            directories = list(self._directories.values())
            self._directories.clear()
        for directory in directories:
            try:
                directory.close()
            except Exception as e:  # noqa: BLE001 - reported below like a write error
                self._record(e)
        self._raise_errors()

    def wait_until_finished(self) -> None:
        """Blocks until every pending save is committed on disk.

        Raises:
            Exception: the error of a background write not yet reported, or a
                BackgroundSaveError holding each of several.
        """
        with self._lock:
            directories = list(self._directories.values())
        for directory in directories:
            directory.drain()
        self._raise_errors()

    # ------------------------------------------------------------------ saving

    def save(
        self,
        directory: PathLike,
        target: PyTree,
        *,
        step: int | None = None,
        metadata: dict | None = None,
        keep: int | None = None,
        overwrite: bool = False,
        force: bool = False,
    ) -> str | None:
        """Captures ``target`` and writes it in the background.

        A step is never saved below a newer step (committed, or pending in this
        handler): to resume from an earlier step, :meth:`rollback` first.

        Args:
            directory: The checkpoint directory (created if needed).
            target: The state: a pytree, a Flax NNX module or optimizer, a
                :class:`~datarax_ckpt.Checkpointable`, or any nest of them.
            step: None writes ``<directory>/checkpoint/``; an int >= 0 writes
                ``<directory>/ckpt-<step>/``.
            metadata: A JSON-serializable dict stored beside the state.
            keep: After this save commits, keep only the newest ``keep`` steps by step
                number (None keeps all), and those that ``keep_period``, ``keep_best``
                or ``keep_time_interval`` keep. The unversioned checkpoint is never
                deleted.
            overwrite: Replace an existing checkpoint of the same name (the latest
                step, or the unversioned one). If the new save fails, the old one is
                put back.
            force: Save even at a step off ``CheckpointOptions.save_interval_steps``.

        Returns:
            The path of the checkpoint folder, or None if nothing was saved: the step
            is off ``save_interval_steps``, or ``on_backpressure="skip"`` and too many
            saves were pending.

        Raises:
            TypeError: for an unsupported leaf (named by path) or argument type.
            ValueError: for a bad ``step``, ``keep`` or ``metadata`` value.
            StepOrderError: (a ValueError) if a newer step is committed or pending; it
                names them. Nothing is written.
            FileExistsError: if the checkpoint exists and ``overwrite`` is False.
            WriterConflictError: if another live handler (in this process or another)
                is writing ``directory``; it names that writer's host and pid.
            CheckpointPathError: (a ValueError) if ``directory`` is empty, holds a NUL
                byte or a name too long, or is not valid UTF-8.
            CheckpointNotADirectoryError: (a NotADirectoryError) if ``directory`` or a
                folder above it is a file.
            NestingTooDeepError: (a ValueError) if the state or metadata nests deeper
                than ``serialization.MAX_DEPTH`` levels; it names the path.
            ProcessMismatchError: (a ValueError, multi-process runs) if the processes
                passed different non-array data; it names the leaves. No process saves.
            CheckpointError: (multi-process runs) if the save failed on another process
                before writing; that process raises its own error. No process saves.
            Exception: an error of an earlier background write (several at once: a
                BackgroundSaveError, an ExceptionGroup of them).
        """
        # Marked first thing, before anything releases the GIL: an earlier save's worker
        # about to start its Orbax work then waits for this capture (on few cores Orbax's
        # Python save path would otherwise take the GIL and CPU from it).
        with _hostcopy.capturing() as capture:
            return self._save(capture, directory, target, step, metadata, keep, overwrite, force)

    def _save(self, capture, directory, target, step, metadata, keep, overwrite, force):
        step = _validate.step(step)
        _validate.keep(keep)
        _validate.flag("overwrite", overwrite)
        _validate.flag("force", force)
        metadata = _validate.metadata(metadata)
        _orbax.metrics(self.options, metadata)  # a bad keep_best metric: before writing
        if self.options.incremental:  # before the path is looked at (s3:// would connect)
            _incremental.check_supported(directory)
        path = _validate.save_directory(directory)
        name = _layout.step_name(step)
        with self._lock_for(capture):
            self._check_open()
            self._raise_errors()
            if not (force or step is None or _orbax.on_interval(self.options, step)):
                return None  # off save_interval_steps
            handle = self._handle_for(path)
            try:
                with self._state:
                    queued = any(p.name == name for p in handle.pending)
                    pending = [_steps.step_of(p.name) for p in handle.pending]
                _steps.check_order(path, step, [s for s in pending if s is not None])
                if not overwrite and (queued or _layout.exists(path / name)):
                    raise CheckpointExistsError(
                        f"{path / name} already exists. Pass overwrite=True to replace it, or "
                        "save under a new step."
                    )
                reuse = handle.incremental.capture() if handle.incremental else None
                arrays, manifest, arena, fill = serialization.encode_and_capture(
                    target,
                    pack_threshold_bytes=self.options.pack_threshold_bytes,
                    snapshot=self.options.snapshot,
                    pool=handle.pool,
                    reuse=reuse,
                )
                capture.end()
                handle.claim()  # one writer per directory; after the checks, before writing
                nbytes = _snapshot.nbytes(arrays)
                room = handle.make_room(nbytes, self._state)
            except Exception as e:
                handle.coordinator.report_failure(e)  # multi-process: the others raise too
                raise
            # Multi-process: process 0 writes the non-array data for all, so check it is
            # equal everywhere; if any process skips (backpressure), all skip.
            room = handle.coordinator.agree_to_save(
                arrays, manifest, metadata, [name, keep, overwrite], room
            )
            if not room:
                handle.pool.give(arena)
                logger.warning(
                    "Skipped the save of %s: %d saves are still being written "
                    "(CheckpointOptions.on_backpressure='skip').",
                    path / name,
                    len(handle.pending),
                )
                return None
            if handle.incremental:
                handle.incremental.accept(reuse)
            objects = reuse.objects if reuse else {}
            future = handle.run(
                _writing.write,
                handle,
                step,
                arrays,
                manifest,
                metadata,
                keep,
                overwrite,
                objects,
                fill,
            )
            pending = _directory.Pending(future, nbytes, name, arena)
            with self._state:
                handle.pending.append(pending)
            future.add_done_callback(lambda f: self._finished(handle, pending))
        if not self.options.async_save:
            handle.drain()
            self._raise_errors()
        return str(epath.Path(directory) / name)

    @contextlib.contextmanager
    def _lock_for(self, capture: _hostcopy.capturing) -> Iterator[None]:
        """``self._lock``; while waiting for it (another thread's save holds it, perhaps
        waiting for the worker) this save does not count as capturing."""
        if not self._lock.acquire(blocking=False):
            capture.end()
            self._lock.acquire()
            capture.begin()
        try:
            yield
        finally:
            self._lock.release()

    def _finished(self, handle: _directory.Directory, pending: _directory.Pending) -> None:
        with self._state:
            if pending in handle.pending:
                handle.pending.remove(pending)
        handle.pool.give(pending.arena)
        pending.arena = None
        error = pending.future.exception()
        if error is not None:
            error = storage_error(error)  # e.g. a full disk: an OSError with errno ENOSPC
            error.add_note(
                f"datarax_ckpt: raised by the background save of {handle.path / pending.name}."
            )
            self._record(error)

    def _record(self, error: BaseException) -> None:
        with self._state:
            self._errors.append(error)

    def _raise_errors(self) -> None:
        """Raises every background error not yet reported, each exactly once: one alone,
        several together as a :class:`BackgroundSaveError` (an ``ExceptionGroup``)."""
        with self._state:
            errors, self._errors = self._errors, []
        if len(errors) == 1:
            raise errors[0]
        if errors:
            raise BackgroundSaveError(
                f"{len(errors)} background checkpoint saves failed (a note on each error "
                "names its checkpoint)",
                errors,
            )

    # ------------------------------------------------------------------ restoring

    def restore(
        self,
        directory: PathLike,
        target: PyTree = None,
        *,
        step: int | None = None,
        metadata_only: bool = False,
        verify: bool | None = None,
        fallback: bool = True,
        partial: bool = False,
    ) -> Any:
        """Restores a checkpoint, after this handler's pending saves to ``directory``.

        Every restore first runs a quick check (commit marker, every file present and
        long enough); with ``verify`` it also compares what it reads with the checksums
        recorded at save time. Corrupt data is never returned: with ``step=None`` a
        corrupt latest step is skipped with a logged warning and the newest intact step
        is restored instead; with an explicit ``step`` it raises.

        Safe beside a writer in another process: it changes nothing on disk, and a step
        that the writer's retention deletes while it is read is not mistaken for a
        corrupt one (``step=None`` then reads the new latest step).

        Args:
            directory: The checkpoint directory.
            target: None returns the saved tree with its original types. A
                :class:`~datarax_ckpt.Checkpointable` gets ``set_state`` and is
                returned; a Flax NNX object is updated in place and returned; any other
                pytree (an ``nnx.State`` included) is rebuilt with the target's
                structure, each ``jax.Array`` or ``jax.ShapeDtypeStruct`` leaf giving the
                dtype and sharding to restore onto (see the guide's "Abstract targets").
            step: None restores the latest step (or the unversioned checkpoint when
                there are no steps); an int restores exactly ``ckpt-<step>``.
            metadata_only: Return only the metadata dict saved with the checkpoint.
            verify: Compare every array (and the manifest and metadata) read with its
                recorded checksum; None uses ``CheckpointOptions.verify_on_restore``.
                Checkpoints written without checksums restore unchecked.
            fallback: With ``step=None``, restore the newest intact step when the
                latest is corrupt or incomplete. False raises instead.
            partial: Restore only the target's part of the checkpoint: its dicts (and
                NNX States) may leave out keys, which are then not read. A target key
                the checkpoint lacks is an error either way.

        Returns:
            The restored state, the updated target, or the metadata dict.

        Raises:
            FileNotFoundError: if the directory, the step or any checkpoint is missing,
                or the step was deleted (by the writer's retention) while it was read;
                the message lists the available steps.
            StructureMismatchError: (a ValueError) if ``target`` does not match (with
                ``partial``, if it has a leaf the checkpoint lacks).
            TypeError: if ``target`` is an int (``restore(d, 1)``: use ``step=1``).
            StructureMismatchError: in a multi-process run, if a leaf saved sharded across
                processes has no target leaf giving the sharding to restore onto.
            CheckpointFormatError: (a ValueError) if the folder is not a datarax_ckpt
                checkpoint or was written by a newer format version.
            CheckpointCorruptedError: (a CheckpointFormatError) if the step is corrupt
                or incomplete (and, for ``step=None``, no older step is intact or
                ``fallback`` is False); it names the file and the leaves.
        """
        _validate.target(target)
        step = _validate.step(step)
        _validate.flag("metadata_only", metadata_only)
        _validate.flag("partial", partial)
        _validate.flag("fallback", fallback)
        verify = self.options.verify_on_restore if verify is None else verify
        _validate.flag("verify", verify)
        path = _validate.directory(directory)
        handle = self._enter(path)
        # jax.default_device and jax.set_mesh are per thread: the read runs on the worker.
        context = _restoring.caller_context()
        read = functools.partial(
            _restoring.read, handle, target, step, metadata_only, verify, fallback, partial
        )
        return handle.run(_restoring.in_context, context, read).result()

    def verify(self, directory: PathLike, step: int | None = None) -> _report.VerifyReport:
        """Re-reads a checkpoint (after pending saves) and checks everything it holds.

        Checks that the step is committed (Orbax's commit marker), that every file the
        data needs is present and long enough and that every file under the folder can
        be read, then re-reads every stored array through Orbax and compares it (and
        the manifest and metadata) with the checksums recorded at save time.

        Args:
            directory: The checkpoint directory.
            step: The step to check; None checks the latest step (or the unversioned
                checkpoint when there are no steps).

        Returns:
            A :class:`~datarax_ckpt.VerifyReport`; ``report.ok`` is True when intact and
            ``report.problems`` names each damaged file and the leaves it holds.
            Checkpoints written without checksums report ``checksums_recorded=False``.

        Raises:
            FileNotFoundError: if the directory or the step does not exist.

        Example:
            >>> import tempfile, jax.numpy as jnp
            >>> from datarax_ckpt import OrbaxCheckpointHandler
            >>> directory = tempfile.mkdtemp()
            >>> with OrbaxCheckpointHandler() as handler:
            ...     _ = handler.save(directory, {"w": jnp.ones(3)}, step=1)
            ...     handler.verify(directory, step=1).ok
            True
        """
        step = _validate.step(step)
        path = _validate.directory(directory)
        handle = self._enter(path)
        return handle.run(_restoring.verify, handle, step).result()

    # ------------------------------------------------------------------ listing

    def get_checkpoint_steps(self, directory: PathLike, *, wait: bool = True) -> list[int]:
        """Sorted steps committed in ``directory``.

        Args:
            directory: The checkpoint directory; a missing one has no steps.
            wait: True waits for this handler's pending saves first. False lists what
                is committed now, without stalling a training loop (see
                :meth:`pending_steps` for the rest).
        """
        path = _validate.directory(directory)
        _validate.flag("wait", wait)
        if wait:
            self._enter(path).drain()
        else:
            self._check_open()
        self._raise_errors()
        return _layout.committed_steps(path)

    def latest_step(self, directory: PathLike, *, wait: bool = True) -> int | None:
        """The newest committed step in ``directory``, or None (``wait`` as in
        :meth:`get_checkpoint_steps`)."""
        steps = self.get_checkpoint_steps(directory, wait=wait)
        return steps[-1] if steps else None

    def list_checkpoints(self, directory: PathLike, *, wait: bool = True) -> dict[int, str]:
        """``{step: folder path}`` of the committed steps in ``directory`` (``wait`` as
        in :meth:`get_checkpoint_steps`)."""
        path = _validate.directory(directory)
        steps = self.get_checkpoint_steps(path, wait=wait)
        return {s: str(path / _layout.step_name(s)) for s in steps}

    def pending_steps(self, directory: PathLike) -> list[int]:
        """Sorted steps this handler has accepted for ``directory`` and not yet committed.

        Never waits. A step leaves this list once committed (then it is listed by
        ``get_checkpoint_steps(wait=False)``) or failed (its error is raised by the
        next call).
        """
        path = _validate.directory(directory)
        with self._lock:
            self._check_open()
            handle = self._handle_for(path)
        with self._state:
            names = [p.name for p in handle.pending if not p.future.done()]
        return sorted(s for s in map(_steps.step_of, names) if s is not None)

    def should_save(self, directory: PathLike, step: int) -> bool:
        """True if ``save(directory, ..., step=step)`` would save: ``step`` is above every
        step committed or pending, and on ``CheckpointOptions.save_interval_steps``
        (Orbax's ``FixedIntervalPolicy``). Never waits.

        Example:
            >>> import tempfile
            >>> from datarax_ckpt import OrbaxCheckpointHandler
            >>> handler = OrbaxCheckpointHandler(save_interval_steps=100)
            >>> directory = tempfile.mkdtemp()
            >>> [s for s in range(0, 301, 50) if handler.should_save(directory, s)]
            [0, 100, 200, 300]
            >>> handler.close()
        """
        step = _validate.step(step)
        if step is None:
            raise TypeError("should_save needs an int step >= 0, got None.")
        path = _validate.directory(directory)
        pending = self.pending_steps(path)
        if not _orbax.on_interval(self.options, step, saving=bool(pending)):
            return False  # decided without listing the directory
        self._raise_errors()
        return not (any(s >= step for s in pending) or _steps.committed_above(path, step - 1))

    def rollback(self, directory: PathLike, step: int) -> list[int]:
        """Deletes every committed step above ``step`` (after this handler's pending saves).

        The way to resume training from an earlier step: :meth:`save` refuses a step
        below a newer one. Steps are deleted newest first, each leaving the listing with
        one atomic rename, so a crash midway leaves intact steps up to some step above
        ``step``; calling ``rollback`` again finishes. In a multi-process run every
        process calls it.

        Args:
            directory: The checkpoint directory.
            step: The step to roll back to; it need not exist. The unversioned
                checkpoint is never deleted.

        Returns:
            The deleted steps, sorted.

        Raises:
            WriterConflictError: if another live handler is writing ``directory``.
            Exception: an error of an earlier background write (nothing is deleted).

        Example:
            >>> import tempfile, jax.numpy as jnp
            >>> from datarax_ckpt import OrbaxCheckpointHandler
            >>> directory = tempfile.mkdtemp()
            >>> with OrbaxCheckpointHandler() as handler:
            ...     for s in (1, 2, 3):
            ...         _ = handler.save(directory, {"w": jnp.ones(2)}, step=s)
            ...     deleted = handler.rollback(directory, 1)
            ...     steps = handler.get_checkpoint_steps(directory)
            >>> deleted, steps
            ([2, 3], [1])
        """
        step = _validate.step(step)
        if step is None:
            raise TypeError("rollback needs an int step >= 0, got None.")
        path = _validate.directory(directory)
        with self._lock:  # no save of another thread slips in between
            handle = self._enter(path)
            handle.drain()
            self._raise_errors()
            handle.claim()  # deleting steps is writing: one writer per directory
            return handle.run(_steps.rollback, handle, step).result()

    def follow(
        self,
        directory: PathLike,
        *,
        after: int | None = None,
        timeout: float | None = None,
        poll_interval: float = 1.0,
    ) -> Iterator[int]:
        """Yields each committed step of ``directory`` as it appears, in increasing order.

        For an evaluation job beside a training job (another process) writing the
        directory. Only reads: it never waits for this handler's own saves and never
        blocks the writer. A step that retention deleted before ``follow`` looked is
        not yielded; one deleted after it was yielded raises
        :class:`~datarax_ckpt.CheckpointNotFoundError` on ``restore(step=...)``.

        Args:
            directory: The checkpoint directory; it need not exist yet.
            after: Yield only steps above it; None yields every step on disk first.
            timeout: End after this many seconds without a new step; None never ends.
            poll_interval: Seconds between looks after a new step; while none comes the
                wait doubles, up to 16 times this. Each look is one directory listing.

        Returns:
            An iterator of step numbers.

        Raises:
            TypeError, ValueError: for a bad argument (checked at the call).
            RuntimeError: if the handler is closed while following.

        Example:
            >>> import tempfile, jax.numpy as jnp
            >>> from datarax_ckpt import OrbaxCheckpointHandler
            >>> directory = tempfile.mkdtemp()
            >>> with OrbaxCheckpointHandler() as handler:
            ...     _ = handler.save(directory, {"w": jnp.ones(3)}, step=1)
            ...     handler.wait_until_finished()
            ...     list(handler.follow(directory, timeout=0))
            [1]
        """
        path = _validate.directory(directory)
        _follow.check_args(after, timeout, poll_interval)
        self._check_open()
        return _follow.follow(path, after, timeout, poll_interval, self._check_open)

    # ------------------------------------------------------------------ helpers

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("This OrbaxCheckpointHandler is closed; create a new one.")

    def _handle_for(self, path: epath.Path) -> _directory.Directory:
        key = str(path) if "://" in str(path) else str(path.resolve())
        handle = self._directories.get(key)
        if handle is None:
            handle = self._directories[key] = _directory.Directory(path, self.options)
            if self.options.incremental:
                handle.incremental = _incremental.Tracker()
        return handle

    def _enter(self, path: epath.Path) -> _directory.Directory:
        _safeio.check_utf8(path)  # TensorStore takes only UTF-8 paths
        with self._lock:
            self._check_open()
            self._raise_errors()
            return self._handle_for(path)
