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
    "disk_write_fsync": "one file written in 64 MiB chunks with os.write, then os.fsync",
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


def _host_floors(
    names: tuple[str, ...], case_bytes: int, workdir: Path, repeats: int, max_bytes: int, seed: int
) -> dict[str, dict]:
    nbytes = max(4, min(case_bytes, max_bytes)) // 4 * 4
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
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for start in range(0, nbytes, _CHUNK):
                chunk = view[start : start + _CHUNK]
                while chunk:
                    chunk = chunk[os.write(fd, chunk) :]
            os.fsync(fd)
        finally:
            os.close(fd)

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
