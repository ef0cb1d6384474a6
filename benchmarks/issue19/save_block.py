"""``save()`` blocking of 2000 x 64 KiB, with the garbage collections inside it.

Saves the same 2000-leaf float32 state (random values, each leaf put on the device by
its own ``jax.device_put``, as the suite's states are and as ``jax.jit`` outputs are: every
leaf has its own sharding object) N times after 2 warm-up saves,
waiting for each to be durable, and prints the median, p90 and mean time ``save()``
blocked and how many collections of each generation ran inside ``save()``. Compare two
library trees in alternating subprocesses::

    for i in 1 2 3; do for t in /path/to/old /path/to/new; do
      PYTHONPATH=$t python benchmarks/issue19/save_block.py 30; done; done
"""

import gc
import shutil
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

from datarax_ckpt import OrbaxCheckpointHandler


def main(n: int) -> None:
    counts = [0, 0, 0]
    gc_time = [0.0, 0.0]  # total, start of the current collection

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            counts[info["generation"]] += 1
            gc_time[1] = time.perf_counter()
        else:
            gc_time[0] += time.perf_counter() - gc_time[1]

    rng = np.random.default_rng(0)
    tree = {
        f"leaf_{i:05d}": jax.device_put(rng.standard_normal(16384, dtype=np.float32))
        for i in range(2000)
    }
    directory = tempfile.mkdtemp(prefix="save_block-")
    handler = OrbaxCheckpointHandler()
    times, inside = [], [0, 0, 0]
    try:
        for step in range(n + 2):
            if step == 2:
                gc.callbacks.append(on_gc)
            before = list(counts)
            t0 = time.perf_counter()
            handler.save(directory, tree, step=step, metadata={"step": step}, keep=1)
            t1 = time.perf_counter()
            handler.wait_until_finished()
            if step >= 2:
                times.append(t1 - t0)
                inside = [a + c - b for a, b, c in zip(inside, before, counts, strict=True)]
    finally:
        if on_gc in gc.callbacks:
            gc.callbacks.remove(on_gc)
        handler.close()
        shutil.rmtree(directory, ignore_errors=True)
    times.sort()
    print(
        f"save() blocks: median {statistics.median(times) * 1e3:.1f} ms, "
        f"p90 {times[int(0.9 * len(times))] * 1e3:.1f} ms, "
        f"mean {statistics.mean(times) * 1e3:.1f} ms; collections inside save() by "
        f"generation {inside}; gc time in all {gc_time[0] * 1e3:.0f} ms ({n} saves)"
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
