"""Typed errors raised by datarax_ckpt."""

from __future__ import annotations

import os
import re


class CheckpointError(Exception):
    """Base class of the errors specific to datarax_ckpt."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The requested directory, step or checkpoint does not exist."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """A save would replace an existing checkpoint and ``overwrite`` is False."""


class CheckpointFormatError(CheckpointError, ValueError):
    """A folder is not a datarax_ckpt checkpoint, or was written by a newer version."""


class StructureMismatchError(CheckpointError, ValueError):
    """A restore target does not match what the checkpoint holds (path, shape, dtype, kind)."""


class ProcessMismatchError(CheckpointError, ValueError):
    """In a multi-process save, the processes passed different non-array data."""


class WriterConflictError(CheckpointError, RuntimeError):
    """A save to a directory that another live handler or process is writing.

    A checkpoint directory has one writer at a time (see ``docs/reliability.md``); the
    message names the other writer's host and pid.
    """


class StepOrderError(CheckpointError, ValueError):
    """A save's step is below a newer step that is committed or still being written.

    Attributes:
        newer: The newer steps, sorted.
    """

    def __init__(self, message: str, newer: list[int]):
        super().__init__(message)
        self.newer = newer


class CheckpointPathError(CheckpointError, ValueError):
    """A checkpoint directory path that cannot be used: empty, a NUL byte, a name too long,
    or not encodable as UTF-8 (TensorStore, under Orbax, takes only UTF-8 paths)."""


class CheckpointNotADirectoryError(CheckpointError, NotADirectoryError):
    """The checkpoint directory, or a folder above it, is a file."""


class DeviceMemoryError(CheckpointError, MemoryError):
    """A device-side snapshot did not fit in device memory."""


class NestingTooDeepError(CheckpointError, ValueError):
    """A state or metadata nests containers deeper than ``MAX_DEPTH`` levels."""


class IncrementalUnsupportedError(CheckpointError, ValueError):
    """``CheckpointOptions(incremental=True)`` on storage without hard links (``s3://``)."""


class BackgroundSaveError(CheckpointError, ExceptionGroup):
    """Several background saves failed before a call could report them: all of them.

    ``exceptions`` holds each save's own error (a note on each names its checkpoint), in
    the order they failed. Catch one kind with ``except* OSError``, or all with
    ``except CheckpointError``. A single failed save is raised as its own error.
    """

    def derive(self, excs):  # split()/subgroup() (and except*) keep the type
        return BackgroundSaveError(self.message, excs)


class CheckpointCorruptedError(CheckpointFormatError):
    """A checkpoint's files are damaged, missing or uncommitted (a checksum does not match).

    Attributes:
        report: The :class:`~datarax_ckpt.VerifyReport` that found the damage, if any.
    """

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


_OS_ERROR_CODE = re.compile(r"\[os_error_code='(\d+)'\]")


def storage_error(error: BaseException) -> BaseException:
    """Returns an ``OSError`` for a storage failure that TensorStore reported as another type.

    TensorStore raises e.g. ``ValueError: RESOURCE_EXHAUSTED: ... No space left on device
    [os_error_code='28']`` for a full disk. The returned ``OSError`` carries the errno
    (``errno.ENOSPC``), so callers can catch and test it; the original is its ``__cause__``.
    Any other error is returned unchanged.
    """
    if isinstance(error, OSError):
        return error
    match = _OS_ERROR_CODE.search(str(error))
    if match is None:
        return error
    code = int(match.group(1))
    converted = OSError(code, f"{os.strerror(code)} ({type(error).__name__}: {error})")
    converted.__cause__ = error
    return converted
