"""Host memory for restores, reused once the arrays of an earlier restore are dropped.

A restore reads into host buffers that jax adopts without a copy (``_orbax``). Fresh
memory is zeroed by the kernel on first touch, inside TensorStore's copy: 0.17-0.2 s per
GiB on the 2-core CI machine once huge pages are at hand, 1.1 s per GiB with 4 KiB
pages, and up to 2.9 s per GiB the first time a process maps it (the kernel compacts
memory for huge pages). A restore of a state whose previous restore was dropped (an
evaluation loop, a benchmark) can read into that earlier memory instead.

A buffer is reused only when nothing but the arena refers to it: every array handed
out (a ``jax.Array`` that adopted it, a numpy view, a packed leaf's slice) holds a
reference to it until it is gone, and jax releases its reference only once XLA has
freed the buffer. Between restores the arena keeps at most the buffers of the last
restore (``close()`` of the handler drops them).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import sys
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from datarax_ckpt._hostcopy import aligned_empty

_ALIGN = 64
# Smaller buffers come from malloc's warm free lists anyway: not worth a scan.
MIN_BYTES = 1 << 20

_current: contextvars.ContextVar[RestoreArena | None] = contextvars.ContextVar(
    "datarax_ckpt_restore_arena", default=None
)


def _free_refcount() -> int:
    """``sys.getrefcount`` of a buffer held only by the arena's list, seen in its loop."""
    held = [np.empty(1)]
    for buffer in held:
        return sys.getrefcount(buffer)
    raise AssertionError  # pragma: no cover


_FREE = _free_refcount()


class RestoreArena:
    """The host buffers of one directory's restores (see the module docstring)."""

    def __init__(self) -> None:
        self._held: list[np.ndarray] = []
        self._used: set[int] = set()
        self._lock = threading.Lock()

    def empty(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """A 64-byte-aligned array, in reused memory when a free buffer fits exactly."""
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < MIN_BYTES:
            return aligned_empty(math.prod(shape), dtype).reshape(shape)
        with self._lock:
            raw = None
            for buffer in self._held:
                if buffer.nbytes == nbytes + _ALIGN and sys.getrefcount(buffer) == _FREE:
                    raw = buffer
                    break
            if raw is None:
                raw = np.empty(nbytes + _ALIGN, np.uint8)
                self._held.append(raw)
            self._used.add(id(raw))
        start = (-raw.ctypes.data) % _ALIGN
        return raw[start : start + nbytes].view(dtype).reshape(shape)

    def finish(self) -> None:
        """Drops the buffers the restore that just ended did not use and nobody holds."""
        with self._lock:
            keep = []
            for buffer in self._held:
                if id(buffer) in self._used or sys.getrefcount(buffer) != _FREE:
                    keep.append(buffer)
            self._held, self._used = keep, set()

    def clear(self) -> None:
        with self._lock:
            self._held, self._used = [], set()


def _release_dropped() -> None:
    """Lets jax drop the host references of arrays deleted since its last collection.

    jax releases them in batches (at its next garbage collection), so without this an
    array dropped just before a restore would still hold its buffer. The function is
    jaxlib's own, run on every ``gc`` pass (``jax._src.lib``); where it is missing,
    such buffers are reused at a later restore.
    """
    try:
        from jax._src.lib import _jax
    except ImportError:  # pragma: no cover - another jaxlib layout
        return
    collect = getattr(_jax, "collect_garbage", None)
    if collect is not None:
        collect()


@contextlib.contextmanager
def reusing(arena: RestoreArena) -> Iterator[None]:
    """Reads of :func:`empty` in this context take memory from ``arena``."""
    _release_dropped()
    token = _current.set(arena)
    try:
        yield
    finally:
        _current.reset(token)
        arena.finish()


def empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A 64-byte-aligned array for a read: from the current arena, else newly allocated."""
    arena = _current.get()
    if arena is None:
        return aligned_empty(math.prod(shape), dtype).reshape(shape)
    return arena.empty(tuple(shape), dtype)
