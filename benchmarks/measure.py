"""The measurement protocol: warm-up, steady saves, back-to-back saves, restores, RSS, du."""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import psutil

from benchmarks.systems import Adapter, remove_path

#: Every metric each system reports (``None`` where a metric does not apply to a system).
METRICS = (
    "warmup_save_blocking_s",
    "warmup_durable_s",
    "save_blocking_s",
    "back_to_back_blocking_s",
    "durable_s",
    "durable_throughput_gbps",
    "restore_s",
    "restore_metadata_s",
    "peak_rss_extra_mb",
    "peak_rss_over_baseline_mb",
    "back_to_back_peak_rss_over_baseline_mb",
    "rss_retained_mb",
    "disk_bytes",
)

METRIC_DOCS = {
    "warmup_save_blocking_s": "save() blocking time of the manager's first save(s), excluded",
    "warmup_durable_s": "time to durable of the warm-up save(s)",
    "save_blocking_s": "time save() blocks the caller, nothing else in flight",
    "back_to_back_blocking_s": "time save() blocks when called right after another save()",
    "durable_s": "from the start of save() until wait_until_finished() returns",
    "durable_throughput_gbps": "state bytes / durable_s, in GB/s (1e9 bytes)",
    "restore_s": "restore onto the device, block_until_ready on every leaf",
    "restore_metadata_s": "metadata_only restore (datarax_ckpt only)",
    "peak_rss_extra_mb": "peak host RSS during save..durable minus RSS before save, MiB",
    "peak_rss_over_baseline_mb": (
        "peak host RSS during save..durable minus RSS before the system's first save, MiB "
        "(counts buffers kept between saves, e.g. a reused staging arena)"
    ),
    "back_to_back_peak_rss_over_baseline_mb": (
        "the same over a back-to-back pair of saves, until both are durable, MiB"
    ),
    "rss_retained_mb": "host RSS after durable minus RSS before save, MiB",
    "disk_bytes": "du of the step folder (allocated blocks)",
}


class RssSampler:
    """Samples this process's RSS in a thread while the ``with`` block runs.

    Attributes:
        baseline: RSS in bytes when the block began.
        peak: Highest RSS seen, in bytes.
        end: RSS when the block ended.
    """

    def __init__(self, interval_s: float) -> None:
        self._interval = interval_s
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self.baseline = self.peak = self.end = 0

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __enter__(self) -> RssSampler:
        self.baseline = self.peak = self._proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.end = self._proc.memory_info().rss
        self.peak = max(self.peak, self.end)


def disk_usage(path: Path) -> int:
    """Bytes allocated on disk under ``path``, as ``du`` counts them (hard links once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    paths = [path] if path.is_file() else [Path(r) / f for r, _, fs in os.walk(path) for f in fs]
    for p in paths:
        st = p.lstat()
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def _leaf_value(x: Any) -> Any:
    """A comparable host value for one leaf of any system's state."""
    if isinstance(x, str):
        return x
    if type(x).__module__.startswith("torch"):
        import torch

        flat = x.detach().cpu().contiguous().reshape(-1)
        return flat.view(torch.uint8).numpy() if flat.numel() > 1 else flat.float().item()
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    arr = np.asarray(x)
    if arr.size == 1:
        return arr.item()
    return arr.reshape(-1).view(np.uint8)


def check_same(name: str, restored: Any, reference: Any) -> None:
    """Raises if ``restored`` does not hold exactly the values of ``reference``."""
    got, want = jax.tree.leaves(restored), jax.tree.leaves(reference)
    if len(got) != len(want):
        raise AssertionError(f"{name}: restore returned {len(got)} leaves, expected {len(want)}")
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        va, vb = _leaf_value(a), _leaf_value(b)
        same = np.array_equal(va, vb) if isinstance(va, np.ndarray) else va == vb
        if not same:
            raise AssertionError(f"{name}: restored leaf {i} differs from the saved value")


def summarize(samples: list[float]) -> dict[str, Any]:
    """Median, min and max of ``samples``, with the samples themselves."""
    if not samples:
        return {"samples": [], "median": None, "min": None, "max": None}
    return {
        "samples": samples,
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
    }


def _block(tree: Any) -> None:
    for leaf in jax.tree.leaves(tree):
        if hasattr(leaf, "block_until_ready"):
            leaf.block_until_ready()


def measure_system(
    adapter: Adapter,
    nbytes: int,
    warmup: int,
    repeats: int,
    rss_interval_s: float,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, dict[str, Any]]:
    """Runs the protocol on one adapter and returns ``{metric: summary}`` for every metric.

    Protocol (steps increase monotonically; folders of older steps are deleted between
    samples, outside the timed regions, so that the disk does not fill):

    1. ``warmup`` saves, each waited on; reported separately.
    2. ``repeats`` steady saves: blocking time, time to durable, RSS, du of the step folder.
    3. ``repeats`` back-to-back pairs: save, then save again at once; the second is timed,
       and RSS is sampled until both are durable.
    4. ``repeats`` restores of the last step (the first is checked against the saved values),
       then ``repeats`` metadata-only restores where the system has them.

    Args:
        adapter: The system, already created on an empty directory.
        nbytes: Bytes of the state's arrays, for throughput.
        warmup: Warm-up saves.
        repeats: Samples of each steady-state metric.
        rss_interval_s: RSS sampling period.
        log: Receives one line per phase.

    Returns:
        Metric name to ``{"samples", "median", "min", "max"}``.
    """
    m: dict[str, list[float]] = {k: [] for k in METRICS}
    step = 0
    baseline = psutil.Process().memory_info().rss
    for i in range(warmup + repeats):
        step += 1
        phase = "warm-up" if i < warmup else "save"
        log(f"{phase} {i + 1 if i < warmup else i - warmup + 1}")
        with RssSampler(rss_interval_s) as rss:
            t0 = time.perf_counter()
            adapter.save(step)
            t1 = time.perf_counter()
            adapter.wait()
            t2 = time.perf_counter()
        if i < warmup:
            m["warmup_save_blocking_s"].append(t1 - t0)
            m["warmup_durable_s"].append(t2 - t0)
        else:
            m["save_blocking_s"].append(t1 - t0)
            m["durable_s"].append(t2 - t0)
            m["durable_throughput_gbps"].append(nbytes / (t2 - t0) / 1e9)
            m["peak_rss_extra_mb"].append((rss.peak - rss.baseline) / 2**20)
            m["peak_rss_over_baseline_mb"].append((rss.peak - baseline) / 2**20)
            m["rss_retained_mb"].append((rss.end - rss.baseline) / 2**20)
            m["disk_bytes"].append(disk_usage(adapter.step_path(step)))
        if step > 1:
            remove_path(adapter.step_path(step - 1))
    for i in range(repeats):
        log(f"back-to-back {i + 1}")
        with RssSampler(rss_interval_s) as rss:
            adapter.save(step + 1)
            t0 = time.perf_counter()
            adapter.save(step + 2)
            m["back_to_back_blocking_s"].append(time.perf_counter() - t0)
            adapter.wait()
        m["back_to_back_peak_rss_over_baseline_mb"].append((rss.peak - baseline) / 2**20)
        remove_path(adapter.step_path(step))
        remove_path(adapter.step_path(step + 1))
        step += 2
    for i in range(repeats):
        log(f"restore {i + 1}")
        t0 = time.perf_counter()
        restored = adapter.restore(step)
        _block(restored)
        m["restore_s"].append(time.perf_counter() - t0)
        if i == 0:
            check_same(adapter.name, restored, adapter.reference())
        del restored
    if adapter.has_metadata_restore:
        for _ in range(repeats):
            t0 = time.perf_counter()
            adapter.restore_metadata(step)
            m["restore_metadata_s"].append(time.perf_counter() - t0)
    out = {k: summarize(v) for k, v in m.items()}
    if not adapter.has_metadata_restore:
        out["restore_metadata_s"]["note"] = "not offered by this system"
    return out
