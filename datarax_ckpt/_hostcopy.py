"""Host memory copies spread over a few threads.

One core does not saturate memory bandwidth, and numpy releases the GIL while it copies:
on the 2-core CI machine a 1 GiB copy takes 96 ms on one thread and 53 ms on two, and
gathering 2000 leaves of 64 KiB into one buffer 24 ms against 13.5 ms
(``docs/performance.md``). A copy is shared between a small pool of threads (as many as
the process may run on, at most 4) and the calling thread: ``save()`` itself, for leaves it
must copy (numpy leaves; any leaf on CPU while pinning is unknown, see
``_snapshot.views_pin_buffers``), or the writer thread filling packs from pinned views.

Copies are kept as large as the balance allows: glibc's ``memcpy`` switches to
non-temporal stores above a threshold (114 MiB on that machine), and the same 1 GiB
copied in 8 MiB pieces took 170 ms instead of 98 ms on one thread.

A ``save()`` also marks itself as capturing (:class:`capturing`) so that background work
of earlier saves waits for it (:func:`yield_to_captures`): on few cores Orbax's Python
save path and the checksum hashing would otherwise take the GIL and the CPU from the copy
the training loop is waiting for (back-to-back ``save()`` of GPT-2 small: 256-467 ms
before, 90-99 ms after, like a lone ``save()``).
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

# Below this many bytes in all, one thread is faster than handing work to others.
_SERIAL_BYTES = 4 << 20

_pool_lock = threading.Lock()
# How many save() calls are capturing their state right now (see capturing).
_capturing = 0
_idle = threading.Condition()
_pool_instance: concurrent.futures.ThreadPoolExecutor | None = None


class capturing:  # noqa: N801 - used like a function: ``with capturing() as c``
    """Marks a ``save()`` capturing its state (see :func:`yield_to_captures`).

    ``end()`` ends the mark early and ``begin()`` starts it again (both idempotent), e.g.
    around waiting for a lock; leaving the ``with`` block ends it.
    """

    _open = False

    def __enter__(self) -> capturing:
        self.begin()
        return self

    def begin(self) -> None:
        global _capturing
        if not self._open:
            self._open = True
            with _idle:
                _capturing += 1

    def end(self) -> None:
        global _capturing
        if self._open:
            self._open = False
            with _idle:
                _capturing -= 1
                _idle.notify_all()

    def __exit__(self, *exc: object) -> None:
        self.end()


def yield_to_captures(timeout: float = 1.0) -> None:
    """Waits (at most ``timeout`` seconds) while a ``save()`` is capturing its state.

    Background work of earlier saves calls it before it starts: on few cores it would
    otherwise take CPU time and the GIL from the capture the caller waits for.
    """
    if _capturing and timeout > 0:
        with _idle:
            _idle.wait_for(lambda: not _capturing, timeout)


class YieldBudget:
    """:func:`yield_to_captures` for a loop, waiting at most ``seconds`` in all."""

    def __init__(self, seconds: float):
        self._deadline = time.monotonic() + seconds

    def __call__(self) -> None:
        if _capturing:
            yield_to_captures(self._deadline - time.monotonic())


def threads() -> int:
    """Threads a copy uses: the CPUs this process may run on, at most 4."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    global _pool_instance
    with _pool_lock:
        if _pool_instance is None:
            _pool_instance = concurrent.futures.ThreadPoolExecutor(
                max_workers=threads() - 1, thread_name_prefix="datarax-ckpt-copy"
            )
        return _pool_instance


def gather(jobs: Sequence[tuple[np.ndarray, Sequence[np.ndarray]]]) -> None:
    """Fills each destination with its sources' elements, in order (C order).

    Args:
        jobs: ``(destination, sources)`` pairs: ``destination`` is a 1-D contiguous array
            with as many elements as the ``sources`` hold together, of the same dtype.

    Example:
        >>> import numpy as np
        >>> out = np.empty(5, np.float32)
        >>> gather([(out, [np.ones(2, np.float32), np.zeros((1, 3), np.float32)])])
        >>> out.tolist()
        [1.0, 1.0, 0.0, 0.0, 0.0]
    """
    total = sum(destination.nbytes for destination, _ in jobs)
    workers = threads() if total >= _SERIAL_BYTES else 1
    share = -(-total // workers)
    units: list[tuple[int, Callable[[], None]]] = []
    for destination, sources in jobs:
        units.extend(_units(destination, sources, share))
    if workers == 1 or len(units) == 1:
        for _, unit in units:
            unit()
        return
    # Longest first, each to the least loaded thread: balanced, and no copy is cut
    # smaller than it has to be.
    plans: list[list[Callable[[], None]]] = [[] for _ in range(workers)]
    loads = [0] * workers
    for nbytes, unit in sorted(units, key=lambda u: -u[0]):
        i = loads.index(min(loads))
        plans[i].append(unit)
        loads[i] += nbytes
    futures = [_pool().submit(_run, plan) for plan in plans[1:] if plan]
    try:
        _run(plans[0])
    finally:
        for future in futures:
            future.result()


def _run(units: list[Callable[[], None]]) -> None:
    for unit in units:
        unit()


def _units(
    destination: np.ndarray, sources: Sequence[np.ndarray], share: int
) -> list[tuple[int, Callable[[], None]]]:
    """Cuts one job into copies: a contiguous source larger than a quarter of ``share``
    into parts of at most ``share``, runs of smaller sources into concatenations of about
    a quarter of ``share``."""
    # Per small source: one attribute read and an append (2,000 sources per save()); the
    # concatenation flattens each source itself (axis=None), whatever its layout.
    units: list[tuple[int, Callable[[], None]]] = []
    itemsize = destination.itemsize
    quarter = share // 4
    run: list[np.ndarray] = []
    run_start = offset = run_bytes = 0

    def close_run() -> None:
        nonlocal run, run_bytes
        if run:
            out = destination[run_start:offset]
            units.append((run_bytes, functools.partial(np.concatenate, run, axis=None, out=out)))
        run, run_bytes = [], 0

    for source in sources:
        nbytes = source.nbytes
        if nbytes <= quarter:
            if not run:
                run_start = offset
            run.append(source)
            offset += nbytes // itemsize
            run_bytes += nbytes
            if run_bytes >= quarter:
                close_run()
            continue
        close_run()
        size = nbytes // itemsize
        if not source.flags.c_contiguous:  # copied in its own shape, in one piece
            out = destination[offset : offset + size].reshape(source.shape)
            units.append((nbytes, functools.partial(np.copyto, out, source)))
            offset += size
            continue
        flat = source.reshape(-1)
        parts = -(-nbytes // share)
        step = -(-size // parts)
        for start in range(0, size, step):
            stop = min(size, start + step)
            out = destination[offset + start : offset + stop]
            copy = functools.partial(np.copyto, out, flat[start:stop])
            units.append(((stop - start) * itemsize, copy))
        offset += size
    close_run()
    return units


def aligned_empty(size: int, dtype: Any, align: int = 64) -> np.ndarray:
    """A 1-D array whose data is ``align``-byte aligned (XLA wraps those without a copy)."""
    dtype = np.dtype(dtype)
    raw = np.empty(size * dtype.itemsize + align, np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start : start + size * dtype.itemsize].view(dtype)
