"""Physical floors measured on the same machine and directory as the checkpoints."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.config import MIB

_CHUNK = 64 * MIB

FLOOR_NOTES = {
    "memcpy": "numpy copy of random float32 data into a preallocated buffer (bytes copied / s)",
    "disk_write_fsync": (
        "one file written in 64 MiB chunks with os.write, then os.fsync; a run also samples it "
        "once per round of steady saves, taking turns with the systems' saves "
        "(in_round_samples_s), and then the figures are over those in-round samples"
    ),
    "page_cache_read": "the file just written read back (from the page cache) with readinto",
    "pinned_d2h": "jax.device_put of the whole tree to its pinned_host memory kind",
    "d2d": "one jitted copy of the whole tree on the device (bytes copied / s)",
}


def _timed(fn: Callable[[], Any], repeats: int, setup: Callable[[], Any] | None = None) -> list:
    samples = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return samples


def _result(name: str, samples: list[float], buffer_bytes: int, case_bytes: int) -> dict:
    median = statistics.median(samples)
    bandwidth = buffer_bytes / median
    return {
        "method": FLOOR_NOTES[name],
        "buffer_bytes": buffer_bytes,
        "samples_s": samples,
        "median_s": median,
        "min_s": min(samples),
        "max_s": max(samples),
        "bandwidth_gbps": bandwidth / 1e9,
        "time_for_case_s": case_bytes / bandwidth,
    }


def _buffer_bytes(case_bytes: int, max_bytes: int) -> int:
    """Size of the host floors' buffer: the case's bytes, capped, a multiple of 4."""
    return max(4, min(case_bytes, max_bytes)) // 4 * 4


def _write_fsync(path: Path, data: memoryview) -> None:
    """Writes ``data`` to a new ``path`` in 64 MiB chunks with ``os.write``, then fsyncs it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for start in range(0, len(data), _CHUNK):
            chunk = data[start : start + _CHUNK]
            while chunk:
                chunk = chunk[os.write(fd, chunk) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _host_floors(
    names: tuple[str, ...], case_bytes: int, workdir: Path, repeats: int, max_bytes: int, seed: int
) -> dict[str, dict]:
    if not {"memcpy", "disk_write_fsync", "page_cache_read"} & set(names):
        return {}  # no host floor asked for: no buffer to fill
    nbytes = _buffer_bytes(case_bytes, max_bytes)
    src = np.random.default_rng(seed).random(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    out: dict[str, dict] = {}
    if "memcpy" in names:
        np.copyto(dst, src)  # Fault the destination pages in before timing.
        out["memcpy"] = _result(
            "memcpy", _timed(lambda: np.copyto(dst, src), repeats), nbytes, case_bytes
        )
    if "disk_write_fsync" not in names and "page_cache_read" not in names:
        return out
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "floor.bin"
    view = memoryview(src).cast("B")
    read_view = memoryview(dst).cast("B")

    def unlink() -> None:
        path.unlink(missing_ok=True)

    def write() -> None:
        _write_fsync(path, view)

    def read() -> None:
        with open(path, "rb", buffering=0) as f:
            pos = 0
            while pos < nbytes:
                n = f.readinto(read_view[pos : pos + _CHUNK])
                if not n:
                    raise OSError(f"{path}: file ended after {pos} of {nbytes} bytes")
                pos += n

    try:
        write_samples = []
        read_samples = []
        for _ in range(repeats):
            unlink()
            write_samples += _timed(write, 1)
            read_samples += _timed(read, 1)
        if not np.array_equal(src[:1024], dst[:1024]):
            raise OSError(f"{path}: data read back differs from what was written")
    finally:
        unlink()
    if "disk_write_fsync" in names:
        out["disk_write_fsync"] = _result("disk_write_fsync", write_samples, nbytes, case_bytes)
    if "page_cache_read" in names:
        out["page_cache_read"] = _result("page_cache_read", read_samples, nbytes, case_bytes)
    return out


def _device_floors(names: tuple[str, ...], tree: Any, case_bytes: int, repeats: int) -> dict:
    leaves = [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)]
    nbytes = sum(x.nbytes for x in leaves)
    out: dict[str, dict] = {}
    on_host = jax.default_backend() == "cpu"
    for name in ("pinned_d2h", "d2d"):
        if name not in names:
            continue
        if on_host:
            out[name] = {"skipped": "arrays already live in host memory on the cpu backend"}
            continue
        try:
            if name == "pinned_d2h":
                shardings = [x.sharding.with_memory_kind("pinned_host") for x in leaves]

                def run(shardings: list = shardings) -> None:
                    jax.block_until_ready(jax.device_put(leaves, shardings))

            else:
                copy = jax.jit(lambda xs: [jnp.copy(x) for x in xs])

                def run(copy: Callable = copy) -> None:
                    jax.block_until_ready(copy(leaves))

            run()  # Warm-up: compilation and first allocation.
            out[name] = _result(name, _timed(run, repeats), nbytes, case_bytes)
        except Exception as e:  # noqa: BLE001 - a floor that cannot run is reported, not fatal.
            out[name] = {"skipped": f"{type(e).__name__}: {e}"}
    return out


def measure_floors(
    names: tuple[str, ...],
    tree: Any,
    case_bytes: int,
    workdir: Path,
    repeats: int,
    max_bytes: int,
    seed: int = 0,
) -> dict[str, dict]:
    """Measures the requested floors for one case.

    Host floors run on a contiguous buffer of the case's size (capped at ``max_bytes``); device
    floors on the case's own arrays. Each result gives the samples, the bandwidth in GB/s
    (1e9 bytes) and the time the case's bytes would take at that bandwidth.

    Args:
        names: Floors to measure (see ``benchmarks.config.FLOORS``).
        tree: The case's state (its jax.Array leaves are used for device floors).
        case_bytes: Bytes of the case's arrays.
        workdir: Directory on the same filesystem as the checkpoints.
        repeats: Samples per floor.
        max_bytes: Cap on the host buffer.
        seed: Seed for the random buffer.

    Returns:
        Floor name to result; a floor that cannot run here has a ``skipped`` reason instead.
    """
    out = _host_floors(names, case_bytes, workdir, repeats, max_bytes, seed)
    out.update(_device_floors(names, tree, case_bytes, repeats))
    return {name: out[name] for name in names if name in out}


class DiskWriteFloor:
    """The ``disk_write_fsync`` floor one sample at a time, to take turns with the systems' saves.

    Writes the same kind of buffer as ``measure_floors`` (random, the case's size capped at
    ``max_bytes``) to one file, fsyncs it, and deletes the file outside the timed region. The
    buffer lives until ``close()``; make it before the systems' first saves so that it is part of
    every system's RSS baseline.

    Args:
        case_bytes: Bytes of the case's arrays.
        workdir: Directory on the same filesystem as the checkpoints.
        max_bytes: Cap on the buffer.
        seed: Seed for the random buffer.
    """

    def __init__(self, case_bytes: int, workdir: Path, max_bytes: int, seed: int = 0) -> None:
        self.nbytes = _buffer_bytes(case_bytes, max_bytes)
        self._buf: np.ndarray | None = np.random.default_rng(seed).random(
            self.nbytes // 4, dtype=np.float32
        )
        workdir.mkdir(parents=True, exist_ok=True)
        self._path = workdir / "floor-in-round.bin"

    def sample(self) -> float:
        """Writes and fsyncs the buffer once.

        Returns:
            The seconds from opening the file until ``fsync`` returned.
        """
        assert self._buf is not None, "closed"
        view = memoryview(self._buf).cast("B")
        try:
            t0 = time.perf_counter()
            _write_fsync(self._path, view)
            return time.perf_counter() - t0
        finally:
            self._path.unlink(missing_ok=True)
            os.sync()  # the next system's sample must not pay for freeing the file

    def close(self) -> None:
        """Deletes the file, if any, and frees the buffer."""
        self._path.unlink(missing_ok=True)
        self._buf = None

    def __enter__(self) -> DiskWriteFloor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def with_in_round_samples(
    entry: dict[str, Any], samples: list[float], buffer_bytes: int, case_bytes: int
) -> dict[str, Any]:
    """The ``disk_write_fsync`` floor entry with its figures taken over in-round samples.

    Args:
        entry: The entry ``measure_floors`` returned for ``disk_write_fsync``.
        samples: Seconds of the samples taken in the rounds of steady saves (not empty).
        buffer_bytes: Bytes each in-round sample wrote.
        case_bytes: Bytes of the case's arrays.

    Returns:
        The entry, same keys plus ``in_round_samples_s`` and ``up_front_samples_s``: median,
        min, max, bandwidth and time for the case are over the in-round samples; ``samples_s``
        holds the up-front samples followed by the in-round ones.
    """
    out = _result("disk_write_fsync", samples, buffer_bytes, case_bytes)
    out["samples_s"] = [*entry.get("samples_s", []), *samples]
    out["up_front_samples_s"] = list(entry.get("samples_s", []))
    out["in_round_samples_s"] = list(samples)
    return out
