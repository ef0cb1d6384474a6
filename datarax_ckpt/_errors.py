"""Typed errors raised by datarax_ckpt."""

from __future__ import annotations


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
