"""Runs a benchmark config end to end and writes results.json, results.md and plot.png."""

from __future__ import annotations

import datetime
import gc
import hashlib
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import psutil

from benchmarks import report
from benchmarks.config import MIB, BenchConfig, CaseConfig, load_config
from benchmarks.floors import FLOOR_NOTES, DiskWriteFloor, measure_floors, with_in_round_samples
from benchmarks.measure import METRIC_DOCS, METRICS, RoundsOutcome, SystemRun, run_interleaved
from benchmarks.states import BenchState, build_state
from benchmarks.systems import Adapter, Unavailable, make_adapter

SCHEMA_VERSION = 1

_PACKAGES = (
    "jax",
    "jaxlib",
    "orbax-checkpoint",
    "flax",
    "numpy",
    "tensorstore",
    "ml_dtypes",
    "psutil",
    "datarax_ckpt",
    "torch",
)

RUN_NOTES = [
    "Times are wall-clock (time.perf_counter) medians over the steady-state repeats; the first "
    "save(s) of each manager are warm-up and reported apart.",
    "Systems are interleaved round-robin within a case: all of a case's managers are created "
    "first, then each round takes one sample of every system (warm-up saves, then steady saves, "
    "back-to-back pairs, restores, metadata restores), round r starting at system r mod n, so "
    "drift of a noisy disk spreads over all systems. Only one save is in flight at a time.",
    "The disk_write_fsync floor takes a turn in every round of steady saves, as one more "
    "system; its figures are the median (and range) over those in-round samples.",
    "Restores read checkpoints that were just written, so they come from a warm page cache.",
    "Every leaf is filled with random values; constant data would flatter compression.",
    "Sizes: MiB/GiB are 2**20/2**30 bytes; bandwidths are GB/s of 1e9 bytes.",
    "Peak RSS: 'extra' is against RSS just before that save(), so memory kept from an earlier "
    "save and reused (a staging pool) does not show there; 'over baseline' adds what the "
    "system's own earlier saves kept in RSS (the sum of its RSS growth over its own samples, "
    "so not what the interleaved other systems keep) and does count it; 'back-to-back' is the "
    "same over a pair of saves issued at once, until both are durable.",
]


class _Progress:
    """Plain progress lines on stderr: elapsed time, case, system, phase."""

    def __init__(self, enabled: bool) -> None:
        self._t0 = time.perf_counter()
        self._enabled = enabled
        self.prefix = ""

    def __call__(self, msg: str) -> None:
        if self._enabled:
            elapsed = time.perf_counter() - self._t0
            print(f"[{elapsed:7.1f}s] {self.prefix}{msg}", file=sys.stderr, flush=True)


def _mount_of(path: Path) -> dict[str, str]:
    """Mount point and filesystem type holding ``path``, from /proc/mounts."""
    target = os.path.realpath(path)
    best = {"mount_point": "?", "fstype": "unknown"}
    try:
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                mnt = fields[1].replace("\\040", " ")
                inside = target == mnt or target.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) >= len(best["mount_point"].replace("?", "")):
                    best = {"mount_point": mnt, "fstype": fields[2]}
    except OSError:
        pass
    return best


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str | None:
    try:
        # In the checkout that holds this package, whatever the working directory.
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _git_commit() -> str | None:
    """HEAD's short hash, with ``-dirty`` when the library's files differ from it."""
    head = _git("rev-parse", "--short", "HEAD")
    if not head:
        return None
    return f"{head}-dirty" if _git("status", "--porcelain", "--", "datarax_ckpt") else head


def library_digest() -> str:
    """SHA-256 (first 12 hex digits) of the library's ``.py`` files, in path order.

    Names the code that ran even where ``.git`` is stale or absent (a copied tree).
    """
    import datarax_ckpt

    root = Path(datarax_ckpt.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def environment(out_dir: Path) -> dict[str, Any]:
    """Describes the machine and software, without the hostname."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in _PACKAGES:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    devices = jax.devices()
    return {
        "versions": versions,
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "ram_total_bytes": psutil.virtual_memory().total,
        "os": f"{platform.system()} {platform.release()} {platform.machine()}",
        "filesystem": _mount_of(out_dir),
        "load_average_at_start": list(os.getloadavg()),
        "git_commit": _git_commit(),
        "library_digest": library_digest(),
        "utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _open_systems(
    names: tuple[str, ...], state: BenchState, directory: Path, log: _Progress
) -> tuple[list[Adapter], dict[str, dict]]:
    """Creates every system's adapter for one case, each in ``directory / name``.

    Args:
        names: The systems, in the config's order.
        state: The case's state.
        directory: The case's checkpoint directory.
        log: Progress lines.

    Returns:
        The adapters created, in order, and the entries of the systems that could not be
        created: ``{"status": "skipped", ...}`` when unavailable, ``{"status": "error", ...}``
        when creating them raised.
    """
    adapters: list[Adapter] = []
    entries: dict[str, dict] = {}
    try:
        for name in names:
            try:
                adapters.append(make_adapter(name, state, directory / name))
            except Unavailable as e:
                log(f"{name} skipped: {e}")
                entries[name] = {"status": "skipped", "reason": str(e)}
            except Exception as e:  # noqa: BLE001 - one failing system must not end the run.
                log(f"ERROR creating {name}: {type(e).__name__}: {e}")
                shutil.rmtree(directory / name, ignore_errors=True)
                entries[name] = {"status": "error", "reason": f"{type(e).__name__}: {e}"}
    except BaseException:  # Interrupted: close what was created before giving up.
        _close_systems(adapters, directory)
        raise
    return adapters, entries


def _close_systems(adapters: list[Adapter], directory: Path) -> dict[str, str]:
    """Closes every adapter and removes its directory, whatever happens.

    Args:
        adapters: The case's adapters.
        directory: The case's checkpoint directory.

    Returns:
        System name to the ``close()`` failure, for those whose ``close()`` raised.
    """
    failures: dict[str, str] = {}
    for adapter in adapters:
        try:
            adapter.close()
        except Exception as e:  # noqa: BLE001 - the others must still be closed.
            failures[adapter.name] = f"close() failed: {e!r}"
        finally:
            shutil.rmtree(directory / adapter.name, ignore_errors=True)
    return failures


def _measure_systems(
    state: BenchState,
    directory: Path,
    config: BenchConfig,
    repeats: int,
    floor: DiskWriteFloor | None,
    log: _Progress,
) -> tuple[dict[str, dict], RoundsOutcome]:
    """Measures every system of one case round-robin; a failure is recorded, not raised.

    Args:
        state: The case's state.
        directory: Where the systems write (one folder each; removed at the end).
        config: The run's config.
        repeats: Steady-state rounds for this case.
        floor: The ``disk_write_fsync`` floor to take turns in the rounds of steady saves.
        log: Progress lines.

    Returns:
        System name to its results entry (in the config's order), and the rounds' outcome
        (with the in-round floor samples).
    """
    adapters, entries = _open_systems(config.systems, state, directory, log)
    runs = [SystemRun(a, state.nbytes, config.rss_interval_ms / 1e3) for a in adapters]
    try:
        outcome = run_interleaved(
            runs, config.warmup, repeats, floor.sample if floor else None, log
        )
    finally:
        close_failures = _close_systems(adapters, directory)
    for run in runs:
        if run.name in outcome.errors:
            entries[run.name] = outcome.errors[run.name]
        elif run.name in close_failures:
            entries[run.name] = {"status": "error", "reason": close_failures[run.name]}
        else:
            entries[run.name] = {
                "status": "ok",
                "state_note": run.adapter.state_note,
                "metrics": run.metrics(),
                "restore_verified": True,
            }
    return {name: entries[name] for name in config.systems}, outcome


def _run_case(
    index: int, case: CaseConfig, config: BenchConfig, work: Path, log: _Progress
) -> dict[str, Any]:
    """Measures one case: its floors, then its systems round-robin.

    Args:
        index: The case's position in the config.
        case: The case.
        config: The run's config.
        work: Scratch directory for checkpoints and floor files.
        log: Progress lines.

    Returns:
        The case's entry in ``results["cases"]``.
    """
    log.prefix = f"({index + 1}/{len(config.cases)}) {case.name}: "
    log("building state")
    state = build_state(case, config.seed + index)
    log(f"{state.nbytes / MIB:.1f} MiB in {state.num_leaves} leaves; floors")
    max_bytes = int(config.floor_max_mb * MIB)
    floors = measure_floors(
        config.floors,
        state.orbax_tree,
        state.nbytes,
        work / "floors",
        config.floor_repeats,
        max_bytes,
        config.seed,
    )
    entry: dict[str, Any] = {
        "name": case.name,
        "kind": case.kind,
        "description": state.description,
        "bytes": state.nbytes,
        "num_leaves": state.num_leaves,
        "repeats": config.case_repeats(case),
        "notes": state.notes,
        "floors": floors,
        "systems": {},
    }
    floor = None
    if "disk_write_fsync" in floors:
        # Made before any system saves, so its buffer is in every system's RSS baseline.
        floor = DiskWriteFloor(state.nbytes, work / "floors", max_bytes, config.seed)
    try:
        entry["systems"], outcome = _measure_systems(
            state, work / case.name, config, config.case_repeats(case), floor, log
        )
    finally:
        if floor is not None:
            floor.close()
    if floor is not None and outcome.floor_samples:
        floors["disk_write_fsync"] = with_in_round_samples(
            floors["disk_write_fsync"], outcome.floor_samples, floor.nbytes, state.nbytes
        )
    if outcome.floor_error:
        floors["disk_write_fsync"]["in_round_error"] = outcome.floor_error
    return entry


def run(
    config_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    workdir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Runs the benchmark described by a config file.

    Writes ``results.json`` (every sample, the environment), ``results.md`` (tables with
    ratios) and ``plot.png`` into ``out_dir``.

    Args:
        config_path: A TOML config, e.g. ``configs/bench/cpu-smoke.toml``.
        out_dir: Where the results go (created if needed).
        workdir: Directory under which a fresh temporary folder receives the checkpoints and
            floor files (``out_dir`` by default); only that folder is removed at the end.
        progress: Print progress lines to stderr.

    Returns:
        The results, as written to ``results.json``.

    Raises:
        ConfigError: The config is invalid (the message names the key).
        FileNotFoundError: The config does not exist.
    """
    config = load_config(config_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parent = Path(workdir) if workdir is not None else out
    parent.mkdir(parents=True, exist_ok=True)
    # Absolute: raw Orbax refuses relative checkpoint paths ("should be absolute").
    work = Path(tempfile.mkdtemp(prefix="bench-work-", dir=parent)).resolve()
    log = _Progress(progress)
    t_start = time.perf_counter()
    results: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "config": config.to_dict(),
        "command": f"python -m benchmarks --config {config_path} --out {out_dir}",
        "environment": environment(work),
        "metrics_doc": METRIC_DOCS,
        "floors_doc": FLOOR_NOTES,
        "notes": list(RUN_NOTES),
        "cases": [],
    }
    try:
        for ci, case in enumerate(config.cases):
            results["cases"].append(_run_case(ci, case, config, work, log))
            # Written after every case, so a run cut short (a lent machine's time limit)
            # still leaves the cases it finished.
            _write_json(out / "results.json", {**results, "complete": False})
            gc.collect()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["elapsed_s"] = time.perf_counter() - t_start
    results["environment"]["load_average_at_end"] = list(os.getloadavg())
    # The whole run's high-water mark (Linux reports KiB): what a machine needs to run it.
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    results["environment"]["peak_process_rss_bytes"] = peak_kib * 1024
    log.prefix = ""
    results["complete"] = True
    _write_json(out / "results.json", results)
    (out / "results.md").write_text(report.markdown(results))
    report.plot(results, out / "plot.png")
    log(f"done in {results['elapsed_s']:.1f}s: {out}/results.json, results.md, plot.png")
    return results


def _write_json(path: Path, results: dict[str, Any]) -> None:
    path.write_text(json.dumps(results, indent=1, default=_jsonable) + "\n")


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


__all__ = ["METRICS", "run"]
