"""Runs a benchmark config end to end and writes results.json, results.md and plot.png."""

from __future__ import annotations

import datetime
import gc
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import jax
import psutil

from benchmarks import report
from benchmarks.config import MIB, BenchConfig, load_config
from benchmarks.floors import FLOOR_NOTES, measure_floors
from benchmarks.measure import METRIC_DOCS, METRICS, measure_system
from benchmarks.states import BenchState, build_state
from benchmarks.systems import Unavailable, make_adapter

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
    "Restores read checkpoints that were just written, so they come from a warm page cache.",
    "Every leaf is filled with random values; constant data would flatter compression.",
    "Sizes: MiB/GiB are 2**20/2**30 bytes; bandwidths are GB/s of 1e9 bytes.",
    "Peak RSS: 'extra' is against RSS just before that save(), so memory kept from an earlier "
    "save and reused (a staging pool) does not show there; 'over baseline' is against RSS "
    "before the system's first save and does count it; 'back-to-back' is the same over a pair "
    "of saves issued at once, until both are durable.",
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
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _git_commit() -> str | None:
    """HEAD's short hash, with ``-dirty`` when the library's files differ from it."""
    head = _git("rev-parse", "--short", "HEAD")
    if not head:
        return None
    return f"{head}-dirty" if _git("status", "--porcelain", "--", "datarax_ckpt") else head


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
        "utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _run_system(
    name: str, state: BenchState, directory: Path, config: BenchConfig, repeats: int, log: _Progress
) -> dict:
    """Measures one system on one case; a failure is recorded, not raised."""
    try:
        adapter = make_adapter(name, state, directory)
    except Unavailable as e:
        log(f"skipped: {e}")
        return {"status": "skipped", "reason": str(e)}
    except Exception as e:  # noqa: BLE001 - one failing system must not end the run.
        log(f"ERROR creating it: {type(e).__name__}: {e}")
        shutil.rmtree(directory, ignore_errors=True)
        return {"status": "error", "reason": f"{type(e).__name__}: {e}"}
    result: dict[str, Any] = {"status": "ok", "state_note": adapter.state_note}
    try:
        result["metrics"] = measure_system(
            adapter, state.nbytes, config.warmup, repeats, config.rss_interval_ms / 1e3, log
        )
        result["restore_verified"] = True
    except Exception as e:  # noqa: BLE001 - one failing system must not end the run.
        log(f"ERROR {type(e).__name__}: {e}")
        result = {"status": "error", "reason": f"{type(e).__name__}: {e}"}
        result["traceback"] = traceback.format_exc()
    finally:
        try:
            adapter.close()
        except Exception as e:  # noqa: BLE001
            if result["status"] == "ok":
                result = {"status": "error", "reason": f"close() failed: {e!r}"}
        shutil.rmtree(directory, ignore_errors=True)
    return result


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
            log.prefix = f"({ci + 1}/{len(config.cases)}) {case.name}: "
            log("building state")
            state = build_state(case, config.seed + ci)
            log(f"{state.nbytes / MIB:.1f} MiB in {state.num_leaves} leaves; floors")
            entry: dict[str, Any] = {
                "name": case.name,
                "kind": case.kind,
                "description": state.description,
                "bytes": state.nbytes,
                "num_leaves": state.num_leaves,
                "repeats": config.case_repeats(case),
                "notes": state.notes,
                "floors": measure_floors(
                    config.floors,
                    state.orbax_tree,
                    state.nbytes,
                    work / "floors",
                    config.floor_repeats,
                    int(config.floor_max_mb * MIB),
                    config.seed,
                ),
                "systems": {},
            }
            for name in config.systems:
                log.prefix = f"({ci + 1}/{len(config.cases)}) {case.name} / {name}: "
                entry["systems"][name] = _run_system(
                    name, state, work / case.name / name, config, config.case_repeats(case), log
                )
            results["cases"].append(entry)
            del state
            gc.collect()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["elapsed_s"] = time.perf_counter() - t_start
    results["environment"]["load_average_at_end"] = list(os.getloadavg())
    log.prefix = ""
    (out / "results.json").write_text(json.dumps(results, indent=1, default=_jsonable) + "\n")
    (out / "results.md").write_text(report.markdown(results))
    report.plot(results, out / "plot.png")
    log(f"done in {results['elapsed_s']:.1f}s: {out}/results.json, results.md, plot.png")
    return results


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


__all__ = ["METRICS", "run"]
