"""One writer per checkpoint directory: a lock file the kernel releases when its holder dies.

The first ``save()`` of a handler to a directory takes an exclusive ``flock`` on
``<directory>/.datarax-writer.lock`` and writes its host and pid into it; ``close()``
removes the file and releases the lock. Another handler (in this process or another)
that tries to save there meanwhile gets a :class:`~datarax_ckpt.WriterConflictError`
naming the holder, before it writes anything.

Why ``flock`` and not a pid file with an age threshold: the kernel drops the lock the
moment its process ends, SIGKILL included, so a dead writer never blocks the next one and
no timeout has to guess how long a save may take. Holding the lock is also what proves
that leftovers in the directory (temporary folders, backups, trash) belong to no live
writer, so only the holder cleans them up (``_directory.Directory.manager``). The host
and pid in the file are for messages only, never for deciding who holds the lock.

Readers (restore, verify, listing, ``follow``, the CLI) never take the lock: a reader
taking even a shared lock for an instant could make a starting writer fail.

Limits: ``flock`` is advisory, local to one machine or to a file system that forwards it
(Linux NFS does, as POSIX locks); on ``gs://`` and other remote paths there is no lock,
and one writer per directory is again the user's promise. A file system that refuses
``flock`` gets a logged warning and no lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
import weakref

from etils import epath

from datarax_ckpt._errors import WriterConflictError

logger = logging.getLogger("datarax_ckpt")

LOCK_NAME = ".datarax-writer.lock"


def is_local(directory: epath.Path) -> bool:
    return "://" not in str(directory)


class WriterLock:
    """A held writer lock; :meth:`release` (or garbage collection) gives it back."""

    def __init__(self, path: str, fd: int):
        self.path = path
        self._fd: int | None = fd
        self._finalizer = weakref.finalize(self, os.close, fd)
        _HELD.add(self)

    def _forget(self) -> None:
        """In a forked child: close the inherited copy, which leaves the parent's lock held.

        Without this a child that outlives its parent (a data-loader worker, say) would
        keep the lock of a SIGKILLed writer, and the next writer would be refused.
        """
        if self._fd is not None:
            self._fd = None
            self._finalizer()

    def release(self) -> None:
        """Removes the lock file, then releases the lock. Idempotent."""
        if self._fd is None:
            return
        # Removed while still held: a process that opened the file before the removal
        # and locks it after sees that its file is no longer the one at the path.
        try:
            os.unlink(self.path)
        except OSError as e:
            logger.debug("Could not remove %s: %s", self.path, e)
        self._fd = None
        self._finalizer()


_HELD: weakref.WeakSet[WriterLock] = weakref.WeakSet()
os.register_at_fork(after_in_child=lambda: [lock._forget() for lock in list(_HELD)])


def acquire(directory: epath.Path) -> WriterLock | None:
    """Takes the writer lock of ``directory`` (created if missing).

    Returns:
        The lock, or None where no lock can be taken (a remote path, a file system that
        refuses ``flock`` or the lock file: a directory that cannot hold one cannot hold a
        checkpoint either, and the save then reports that storage error as it would have).

    Raises:
        WriterConflictError: if another live handler holds it.
    """
    if not is_local(directory):
        return None
    path = os.path.join(os.fspath(directory), LOCK_NAME)
    while True:
        try:
            os.makedirs(os.fspath(directory), exist_ok=True)
            # Held open read-only (flock needs no write access): a file open for writing
            # would keep its file system from being remounted read-only.
            fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            logger.debug("No writer lock for %s: %s", directory, e)
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise conflict(directory, holder(directory)) from None
            logger.warning("No writer lock for %s (flock refused: %s).", directory, e)
            return None
        try:  # the previous holder may have removed the file between our open and flock
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    record = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
    try:
        with open(path, "w") as f:
            f.write(json.dumps(record))
    except OSError as e:  # the message of a refused writer then lacks host and pid
        logger.debug("Could not record the writer in %s: %s", path, e)
    return WriterLock(path, fd)


def holder(directory: epath.Path) -> dict | None:
    """The ``{"host", "pid", "since"}`` recorded by the lock's last holder, if readable.

    Only a hint: the file stays behind after a SIGKILL (see :func:`is_alive`).
    """
    if not is_local(directory):
        return None
    try:
        with open(os.path.join(os.fspath(directory), LOCK_NAME)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def is_alive(record: dict | None) -> bool:
    """Whether the recorded writer still runs: True unless provably dead.

    A pid on this host is checked with ``kill(pid, 0)``; a writer on another host is
    assumed alive.
    """
    if record is None:
        return False
    if record.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(record["pid"]), 0)
    except ProcessLookupError:
        return False
    except (OSError, KeyError, TypeError, ValueError):
        return True
    return True


def describe(record: dict | None) -> str:
    """``host <h>, pid <p>`` of a lock record, for messages."""
    if not record:
        return "host and pid not recorded yet"
    return f"host {record.get('host')}, pid {record.get('pid')}"


def conflict(directory: epath.Path, record: dict | None) -> WriterConflictError:
    same = (
        record is not None
        and record.get("host") == socket.gethostname()
        and record.get("pid") == os.getpid()
    )
    who = "another OrbaxCheckpointHandler in this process" if same else "another writer"
    since = ""
    if record and isinstance(record.get("since"), int | float):
        since = time.strftime(", since %Y-%m-%d %H:%M:%S", time.localtime(record["since"]))
    return WriterConflictError(
        f"{directory} is being written by {who} ({describe(record)}{since}); a checkpoint "
        f"directory has one writer at a time and nothing was saved. Save to another "
        "directory, or save through the handler that writes it (its lock is released when "
        "it is closed or its process ends). Reading (restore, verify, follow, listing) "
        "beside a writer is fine."
    )
