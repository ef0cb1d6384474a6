"""Disk used by consecutive incremental saves of a fine-tuning state, against one full step.

Saves ``--steps`` consecutive steps of the ``finetune`` state (a frozen bf16 base, f32
trainable arrays and their Adam moments, which change at every step) with
``incremental=True`` and no retention, then measures the directory as ``du`` does (each
hard-linked file counted once); one step saved with incremental off is the reference.
Also times the durable save of each step and one restore of the last step per mode.

Run: ``python -m benchmarks.incremental_disk [--base-mb 1024] [--trainable-mb 16]``
(about a minute on the 2-core VM).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import jax

from benchmarks.config import MIB, CaseConfig
from benchmarks.states import build_state


def du(path: Path) -> int:
    """Bytes of the files under ``path``, each inode counted once (as ``du``)."""
    seen: dict[tuple[int, int], int] = {}
    for parent, _, files in os.walk(path):
        for name in files:
            st = os.stat(os.path.join(parent, name), follow_symlinks=False)
            seen[(st.st_dev, st.st_ino)] = st.st_blocks * 512
    return sum(seen.values())


def run(base_mb: float, trainable_mb: float, steps: int) -> dict:
    from datarax_ckpt import OrbaxCheckpointHandler

    case = CaseConfig(kind="finetune", size_mb=base_mb, trainable_mb=trainable_mb)
    state = build_state(case, seed=0)
    out: dict = {"state": state.description, "steps": steps}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        for incremental in (False, True):
            directory = Path(tmp) / f"incremental-{incremental}"
            durable = []
            with OrbaxCheckpointHandler(incremental=incremental) as handler:
                for step in range(steps if incremental else 2):
                    start = time.perf_counter()
                    handler.save(directory, state.trees(step)[0], step=step)
                    handler.wait_until_finished()
                    durable.append(time.perf_counter() - start)
                start = time.perf_counter()
                jax.block_until_ready(handler.restore(directory, step=step))
                restore = time.perf_counter() - start
            key = "incremental" if incremental else "full"
            out[key] = {
                "first_durable_s": durable[0],
                "later_durable_median_s": statistics.median(durable[1:]),
                "restore_s": restore,
                "disk_bytes": du(directory) if incremental else du(directory / "ckpt-1"),
            }
    out["ratio"] = out["incremental"]["disk_bytes"] / out["full"]["disk_bytes"]
    out["changing_only_ratio"] = (base_mb + steps * 3 * trainable_mb) / (base_mb + 3 * trainable_mb)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-mb", type=float, default=1024)
    parser.add_argument("--trainable-mb", type=float, default=16)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    r = run(args.base_mb, args.trainable_mb, args.steps)
    print(r["state"])
    for key in ("full", "incremental"):
        m = r[key]
        print(
            f"{key:>11}: first save durable {m['first_durable_s']:.3f} s, later saves "
            f"{m['later_durable_median_s']:.3f} s (median), restore {m['restore_s']:.3f} s, "
            f"disk {m['disk_bytes'] / MIB:.1f} MiB"
        )
    print(
        f"{args.steps} incremental steps use {r['ratio']:.2f}x the disk of one full step "
        f"(the changing part alone: {r['changing_only_ratio']:.2f}x)"
    )


if __name__ == "__main__":
    main()
