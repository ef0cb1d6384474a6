"""The measurement protocol: warm-up, steady saves, back-to-back saves, restores, RSS, du.

Within one case the systems are measured round-robin (``run_interleaved``): one sample of each
system per round, the order rotated each round, so that slow drift of the machine (the disk
above all) is spread over every system instead of landing on whichever ran last.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

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
        "peak host RSS during save..durable minus RSS before that save, plus the RSS this "
        "system's own earlier saves kept (the sum of its rss_retained), MiB: counts buffers a "
        "system keeps between saves (e.g. a reused staging arena) but not what the case's "
        "other, interleaved systems keep"
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


def handler_round_trip(
    handler: Any, directory: str, tree: Any, step: int, target: Any = None
) -> dict:
    """One save of ``tree`` by a datarax_ckpt handler, waited on, then one restore.

    ``os.sync()`` runs before the save and before the restore, so the kernel's writeback of
    earlier work lands in neither sample.

    Args:
        handler: An ``OrbaxCheckpointHandler``.
        directory: Where to save (``keep=1``).
        tree: The state.
        step: The step to save.
        target: The restore target (None: the saved tree's own types).

    Returns:
        ``save_blocking_s``, ``durable_s`` (save to committed) and ``restore_s`` (blocked on).
    """
    os.sync()
    start = time.perf_counter()
    handler.save(directory, tree, step=step, keep=1)
    blocking = time.perf_counter() - start
    handler.wait_until_finished()
    durable = time.perf_counter() - start
    os.sync()
    start = time.perf_counter()
    jax.block_until_ready(handler.restore(directory, target, step=step))
    return {
        "save_blocking_s": blocking,
        "durable_s": durable,
        "restore_s": time.perf_counter() - start,
    }


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


@dataclasses.dataclass(frozen=True)
class SaveSample:
    """One ``save()`` waited on until durable.

    Attributes:
        blocking_s: Time ``save()`` held the caller.
        durable_s: From the start of ``save()`` until ``wait()`` returned.
        rss_before: RSS just before ``save()``, in bytes.
        rss_peak: Highest RSS seen from ``save()`` until durable, in bytes.
        rss_end: RSS once durable, in bytes.
    """

    blocking_s: float
    durable_s: float
    rss_before: int
    rss_peak: int
    rss_end: int


def save_sample(adapter: Adapter, step: int, rss_interval_s: float) -> SaveSample:
    """Saves ``step``, nothing else in flight, and waits until it is durable.

    Args:
        adapter: The system.
        step: A step this adapter has not saved yet.
        rss_interval_s: RSS sampling period.

    Returns:
        The blocking and durable times and the RSS seen around the save.
    """
    with RssSampler(rss_interval_s) as rss:
        t0 = time.perf_counter()
        adapter.save(step)
        t1 = time.perf_counter()
        adapter.wait()
        t2 = time.perf_counter()
    return SaveSample(t1 - t0, t2 - t0, rss.baseline, rss.peak, rss.end)


def back_to_back_sample(
    adapter: Adapter, step: int, rss_interval_s: float
) -> tuple[float, int, int, int]:
    """Saves ``step`` and, at once, ``step + 1``; waits until both are durable.

    Args:
        adapter: The system.
        step: The first of two steps this adapter has not saved yet.
        rss_interval_s: RSS sampling period.

    Returns:
        The time the second ``save()`` blocked, and the RSS in bytes before the pair, at
        its peak until both were durable, and once both were durable.
    """
    with RssSampler(rss_interval_s) as rss:
        adapter.save(step)
        t0 = time.perf_counter()
        adapter.save(step + 1)
        blocking = time.perf_counter() - t0
        adapter.wait()
    return blocking, rss.baseline, rss.peak, rss.end


def restore_sample(adapter: Adapter, step: int, check: bool) -> float:
    """Restores ``step`` onto the device and blocks on every leaf.

    Args:
        adapter: The system.
        step: A durable step.
        check: Also check the restored values against the saved ones (outside the timing).

    Returns:
        The restore time in seconds.

    Raises:
        AssertionError: ``check`` is set and a restored leaf differs.
    """
    t0 = time.perf_counter()
    restored = adapter.restore(step)
    _block(restored)
    elapsed = time.perf_counter() - t0
    if check:
        check_same(adapter.name, restored, adapter.reference())
    return elapsed


def metadata_restore_sample(adapter: Adapter, step: int) -> float:
    """Restores only the metadata of ``step``.

    Args:
        adapter: A system with ``has_metadata_restore``.
        step: A durable step.

    Returns:
        The time in seconds.
    """
    t0 = time.perf_counter()
    adapter.restore_metadata(step)
    return time.perf_counter() - t0


class SystemRun:
    """One system's part of a case: its adapter, its next step, its RSS baseline, its samples.

    Each method takes one sample of a phase and records it; ````run_interleaved```` calls
    them round-robin across systems. Steps increase monotonically; the folders of older steps
    are deleted after each sample, outside the timed regions, so at most three steps of the
    system are on disk at any time.

    Args:
        adapter: The system, already created on an empty directory.
        nbytes: Bytes of the state's arrays, for throughput.
        rss_interval_s: RSS sampling period.
    """

    def __init__(self, adapter: Adapter, nbytes: int, rss_interval_s: float) -> None:
        self.adapter = adapter
        self._nbytes = nbytes
        self._rss_interval = rss_interval_s
        self._step = 0
        self._kept = 0  # RSS this system's own saves kept so far, in bytes
        self._samples: dict[str, list[float]] = {k: [] for k in METRICS}

    @property
    def name(self) -> str:
        """The system's name."""
        return self.adapter.name

    def _drop(self, step: int) -> None:
        if step >= 1:
            remove_path(self.adapter.step_path(step))

    def _over_baseline_mb(self, before: int, peak: int, end: int) -> float:
        """Peak over the RSS before the sample, plus what this system kept earlier."""
        over = (peak - before + self._kept) / 2**20
        # Memory given back below the starting level (a collected earlier state) is not
        # memory kept: the sum stays >= 0, so no figure comes out negative (once -206 MiB).
        self._kept = max(0, self._kept + end - before)
        return over

    def warmup(self, round_index: int) -> None:
        """One warm-up save, waited on; what it keeps in RSS counts in later samples.

        Args:
            round_index: The round (unused; every phase method takes it).
        """
        self._step += 1
        s = save_sample(self.adapter, self._step, self._rss_interval)
        self._samples["warmup_save_blocking_s"].append(s.blocking_s)
        self._samples["warmup_durable_s"].append(s.durable_s)
        self._over_baseline_mb(s.rss_before, s.rss_peak, s.rss_end)
        self._drop(self._step - 1)

    def steady(self, round_index: int) -> None:
        """One steady save: blocking, durable, throughput, RSS and du of the step folder.

        Args:
            round_index: The round (unused).
        """
        self._step += 1
        s = save_sample(self.adapter, self._step, self._rss_interval)
        m = self._samples
        m["save_blocking_s"].append(s.blocking_s)
        m["durable_s"].append(s.durable_s)
        m["durable_throughput_gbps"].append(self._nbytes / s.durable_s / 1e9)
        m["peak_rss_extra_mb"].append((s.rss_peak - s.rss_before) / 2**20)
        m["peak_rss_over_baseline_mb"].append(
            self._over_baseline_mb(s.rss_before, s.rss_peak, s.rss_end)
        )
        m["rss_retained_mb"].append((s.rss_end - s.rss_before) / 2**20)
        m["disk_bytes"].append(disk_usage(self.adapter.step_path(self._step)))
        self._drop(self._step - 1)

    def back_to_back(self, round_index: int) -> None:
        """One back-to-back pair: the second ``save()`` is timed, RSS until both are durable.

        Args:
            round_index: The round (unused).
        """
        blocking, *rss = back_to_back_sample(self.adapter, self._step + 1, self._rss_interval)
        self._samples["back_to_back_blocking_s"].append(blocking)
        over = self._over_baseline_mb(*rss)
        self._samples["back_to_back_peak_rss_over_baseline_mb"].append(over)
        self._drop(self._step)
        self._drop(self._step + 1)
        self._step += 2

    def restore(self, round_index: int) -> None:
        """One restore of the last step; in round 0 it is checked against the saved values.

        Args:
            round_index: The round; the restore of round 0 is checked.
        """
        self._samples["restore_s"].append(
            restore_sample(self.adapter, self._step, check=round_index == 0)
        )

    def restore_metadata(self, round_index: int) -> None:
        """One metadata-only restore of the last step (only systems that offer it).

        Args:
            round_index: The round (unused).
        """
        seconds = metadata_restore_sample(self.adapter, self._step)
        self._samples["restore_metadata_s"].append(seconds)

    def metrics(self) -> dict[str, dict[str, Any]]:
        """Every metric's summary.

        Returns:
            Metric name to ``{"samples", "median", "min", "max"}``; ``restore_metadata_s``
            carries a ``note`` where the system does not offer it.
        """
        out = {k: summarize(v) for k, v in self._samples.items()}
        if not self.adapter.has_metadata_restore:
            out["restore_metadata_s"]["note"] = "not offered by this system"
        return out


_T = TypeVar("_T")


def rotated(items: Sequence[_T], round_index: int) -> list[_T]:
    """``items`` in order, starting at ``round_index % len(items)`` and wrapping around.

    Args:
        items: The participants of a round.
        round_index: The round, from 0.

    Returns:
        The order for that round (empty for no items).
    """
    if not items:
        return []
    k = round_index % len(items)
    return [*items[k:], *items[:k]]


@dataclasses.dataclass
class RoundsOutcome:
    """What ``run_interleaved`` returns besides the samples kept in each ``SystemRun``.

    Attributes:
        errors: System name to ``{"status": "error", "reason", "traceback"}`` for each system
            that raised; it took no further part.
        floor_samples: Seconds of each in-round floor sample, in order.
        floor_error: Why the in-round floor stopped, when it raised.
    """

    errors: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    floor_samples: list[float] = dataclasses.field(default_factory=list)
    floor_error: str | None = None


_FLOOR = "floor"  # Stands for the in-round floor in a round's order.

#: The phases, in order: label, whether it takes ``repeats`` rounds (else ``warmup``), method.
_PHASES: tuple[tuple[str, bool, Callable[[SystemRun, int], None]], ...] = (
    ("warm-up", False, SystemRun.warmup),
    ("save", True, SystemRun.steady),
    ("back-to-back", True, SystemRun.back_to_back),
    ("restore", True, SystemRun.restore),
    ("metadata restore", True, SystemRun.restore_metadata),
)


def run_interleaved(
    runs: Sequence[SystemRun],
    warmup: int,
    repeats: int,
    floor: Callable[[], float] | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> RoundsOutcome:
    """Measures the systems of one case round-robin.

    Phases, in order: ``warmup`` rounds of warm-up saves, then ``repeats`` rounds each of steady
    saves, back-to-back pairs, restores (round 0's checked against the saved values) and
    metadata-only restores (systems that offer them). A round takes one sample of every system
    still running; round ``r`` starts at participant ``r % n`` so that no system always goes
    first (or always follows the same one). In the rounds of steady saves ``floor``, when given,
    is one more participant. A system that raises is recorded in the outcome and drops out of
    the remaining rounds; the others go on. Nothing is closed here.

    Args:
        runs: One per system, in the config's order, adapters freshly created.
        warmup: Rounds of warm-up saves.
        repeats: Rounds of each steady-state phase.
        floor: Takes one floor sample and returns its seconds (e.g. a write+fsync).
        log: Receives one line per sample.

    Returns:
        The systems that failed and the in-round floor samples.
    """
    outcome = RoundsOutcome()
    active = list(runs)
    for label, steady, method in _PHASES:
        rounds = repeats if steady else warmup
        for r in range(rounds):
            members: list[Any] = [
                run
                for run in active
                if method is not SystemRun.restore_metadata or run.adapter.has_metadata_restore
            ]
            if method is SystemRun.steady and floor is not None and active:
                members.append(_FLOOR)
            for member in rotated(members, r):
                if member is _FLOOR:
                    log(f"{label} {r + 1}/{rounds}: floor")
                    floor = _floor_sample(floor, outcome, log)  # None once it has failed.
                    continue
                log(f"{label} {r + 1}/{rounds}: {member.name}")
                try:
                    method(member, r)
                except Exception as e:  # noqa: BLE001 - one failing system must not end the run.
                    log(f"ERROR {member.name}: {type(e).__name__}: {e}")
                    outcome.errors[member.name] = {
                        "status": "error",
                        "reason": f"{type(e).__name__}: {e}",
                        "traceback": traceback.format_exc(),
                    }
                    active.remove(member)
    return outcome


def _floor_sample(
    floor: Callable[[], float], outcome: RoundsOutcome, log: Callable[[str], None]
) -> Callable[[], float] | None:
    """Takes one in-round floor sample into ``outcome``; returns ``None`` once it has failed."""
    try:
        outcome.floor_samples.append(floor())
    except Exception as e:  # noqa: BLE001 - a floor that cannot run is reported, not fatal.
        log(f"in-round floor failed: {type(e).__name__}: {e}")
        outcome.floor_error = f"{type(e).__name__}: {e}"
        return None
    return floor
