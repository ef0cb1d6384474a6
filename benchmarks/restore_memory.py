"""Memory and bytes read by restores onto abstract targets, and by partial restores.

Run ``python -m benchmarks.restore_memory [--gib 1] [--dir DIR]``. It saves a
``{"model": ..., "optimizer": ...}`` state of ``--gib`` GiB (float32 leaves of 32 MiB; the
model is 3 of every 32, ~9% of the bytes), then, each in a fresh interpreter:

* restores it whole onto a tree of ``jax.ShapeDtypeStruct``: the peak extra RSS
  (``ru_maxrss`` after the restore minus before it) against the state's size;
* restores only ``{"model": ...}`` with ``partial=True``: the bytes of the stored arrays
  the plan asks for, and the bytes the process read (``rchar`` of ``/proc/self/io``,
  which counts reads served from the page cache too).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

LEAF = 32 * 2**20  # bytes per leaf
MODEL_LEAVES = 3  # of every 32


def _layout(gib: float) -> dict[str, int]:
    n = max(int(gib * 2**30) // LEAF, 2)
    model = max(n * MODEL_LEAVES // 32, 1)
    return {"model": model, "optimizer": n - model}


def _abstract(counts: dict[str, int], parts: list[str]) -> dict:
    import jax
    import jax.numpy as jnp

    rows = LEAF // 4 // 1024
    sds = jax.ShapeDtypeStruct((rows, 1024), jnp.float32)
    return {p: {f"w{i}": sds for i in range(counts[p])} for p in parts}


def _save(directory: str, counts: dict[str, int]) -> None:
    import jax.numpy as jnp

    from datarax_ckpt import OrbaxCheckpointHandler

    rows = LEAF // 4 // 1024
    state = {
        part: {f"w{i}": jnp.full((rows, 1024), float(i), jnp.float32) for i in range(n)}
        for part, n in counts.items()
    }
    with OrbaxCheckpointHandler() as handler:
        handler.save(directory, state, step=1)


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def _restore(directory: str, counts: dict[str, int], partial: bool) -> dict:
    import psutil

    from datarax_ckpt import OrbaxCheckpointHandler, serialization

    parts = ["model"] if partial else list(counts)
    target = _abstract(counts, parts)
    manifest = json.loads((Path(directory) / "ckpt-1" / "manifest" / "metadata").read_text())
    plan = serialization.plan_restore(manifest, target, partial=partial)
    requested = sum(s.dtype.itemsize * int(_prod(s.shape)) for s in plan.storage.values())
    with OrbaxCheckpointHandler() as handler:
        handler.restore(directory, step=1, metadata_only=True)  # warm up Orbax's code paths
        rss_before = psutil.Process().memory_info().rss
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        rchar = _rchar()
        restored = handler.restore(directory, target, step=1, partial=partial)
        read = _rchar() - rchar
        peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        rss_after = psutil.Process().memory_info().rss
    assert list(restored) == parts
    return {
        "requested_bytes": requested,
        "rchar_bytes": read,
        "peak_extra_rss_bytes": peak_after - max(peak_before, rss_before),
        "retained_rss_bytes": rss_after - rss_before,
    }


def _prod(shape) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.restore_memory")
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--dir", default=None, help="where to save (default: a temp dir)")
    parser.add_argument("--phase", choices=["save", "abstract", "partial"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    counts = _layout(args.gib)
    if args.phase == "save":
        _save(args.dir, counts)
        return 0
    if args.phase is not None:
        print(json.dumps(_restore(args.dir, counts, partial=args.phase == "partial")))
        return 0
    directory = args.dir or tempfile.mkdtemp(prefix="restore-memory-")
    total = sum(counts.values()) * LEAF
    model = counts["model"] * LEAF
    results = {}
    for phase in ("save", "abstract", "partial"):
        cmd = [sys.executable, "-m", "benchmarks.restore_memory", "--gib", str(args.gib)]
        out = subprocess.run(
            [*cmd, "--dir", directory, "--phase", phase], capture_output=True, text=True, check=True
        )
        if phase != "save":
            results[phase] = json.loads(out.stdout.strip().splitlines()[-1])
    mib = 2**20
    a, p = results["abstract"], results["partial"]
    print(f"state: {total / mib:.0f} MiB ({model / mib:.0f} MiB model = {model / total:.1%})")
    print(
        f"abstract restore: peak extra RSS {a['peak_extra_rss_bytes'] / mib:.0f} MiB "
        f"= {a['peak_extra_rss_bytes'] / total:.2f}x the state; retained "
        f"{a['retained_rss_bytes'] / mib:.0f} MiB; read {a['rchar_bytes'] / mib:.0f} MiB"
    )
    print(
        f"partial restore of the model: requested {p['requested_bytes'] / mib:.0f} MiB "
        f"({p['requested_bytes'] / total:.1%} of the state), read (rchar) "
        f"{p['rchar_bytes'] / mib:.0f} MiB ({p['rchar_bytes'] / total:.1%})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
