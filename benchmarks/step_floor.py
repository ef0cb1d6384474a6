"""A frozen state saved again, against the fixed cost of one Orbax step.

Issue 20 asks for a fully frozen 1 GiB state saved again (``incremental=True``) to be
durable in 50 ms or less. Whatever the library does, each step is an Orbax step: a
temporary folder, the items' metadata files, the commit rename and retention. This
script measures that floor beside the frozen save, round-robin in one process, so the
load of the machine hits all of them alike:

* ``orbax tiny``: raw ``CheckpointManager(max_to_keep=2)`` saving a 16-byte state;
* ``ours tiny``: ``OrbaxCheckpointHandler`` saving the same 16 bytes, ``keep=2``;
* ``ours frozen``: the handler with ``incremental=True`` saving the same 1 GiB (8 leaves
  of random float32) again, ``keep=2``.

Each figure is the durable time: ``save()`` then ``wait_until_finished()``.

Run: ``python -m benchmarks.step_floor [--mb 1024] [--repeats 15]`` (about a minute
on the 2-core VM).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time

import jax.numpy as jnp
import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=1024, help="size of the frozen state (MiB)")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    import orbax.checkpoint as ocp

    from datarax_ckpt import CheckpointOptions, OrbaxCheckpointHandler

    rng = np.random.default_rng(0)
    leaf = args.mb * 2**20 // 8 // 4
    frozen = {f"w{i}": jnp.asarray(rng.standard_normal(leaf, dtype=np.float32)) for i in range(8)}
    tiny = {"a": jnp.asarray(rng.standard_normal(4, dtype=np.float32))}

    root = tempfile.mkdtemp(prefix="step_floor_")
    manager = ocp.CheckpointManager(
        f"{root}/orbax", options=ocp.CheckpointManagerOptions(max_to_keep=2)
    )
    ours = OrbaxCheckpointHandler()
    incremental = OrbaxCheckpointHandler(CheckpointOptions(incremental=True))

    def orbax_tiny(step: int) -> None:
        manager.save(step, args=ocp.args.StandardSave(tiny))
        manager.wait_until_finished()

    def ours_tiny(step: int) -> None:
        ours.save(f"{root}/ours", tiny, step=step, keep=2)
        ours.wait_until_finished()

    def ours_frozen(step: int) -> None:
        incremental.save(f"{root}/frozen", frozen, step=step, keep=2)
        incremental.wait_until_finished()

    cases = {"orbax tiny": orbax_tiny, "ours tiny": ours_tiny, "ours frozen": ours_frozen}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():  # warm-up; the frozen state's first save is full
        fn(0)
    for step in range(1, args.repeats + 1):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn(step)
            times[name].append(time.perf_counter() - start)
    manager.close()
    ours.close()
    incremental.close()
    shutil.rmtree(root)

    floor = statistics.median(times["orbax tiny"])
    print(f"frozen state: {args.mb} MiB in 8 leaves; {args.repeats} rounds, round-robin")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(
            f"{name:12s} durable median {med * 1e3:6.1f} ms  "
            f"[{min(ts) * 1e3:.1f}-{max(ts) * 1e3:.1f}]  {med / floor:.2f}x orbax tiny"
        )


if __name__ == "__main__":
    main()
