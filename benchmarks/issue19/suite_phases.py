"""The benchmark suite, with the phases of each ``OrbaxCheckpointHandler.save`` timed inside it.

Runs ``python -m benchmarks`` in this process with wrappers around the encoder, the
capture's steps and the garbage collector's callbacks, then prints one line per ``save()``
(warm-up, steady, then the back-to-back pairs), in milliseconds::

    python benchmarks/issue19/suite_phases.py --config CONFIG.toml --out OUT

For the 2000-leaf case alone, use a config holding only that case with
``floors = ["disk_write_fsync"]``: the disk floor then takes turns in the rounds, as it
does in ``cpu-regression.toml``.
"""

import collections
import gc
import sys
import time

from datarax_ckpt import _handler, _snapshot, serialization

acc: dict[str, float] = collections.defaultdict(float)
active = [False]
rows: list[dict[str, float]] = []


def timed(owner, name, label):
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        if not active[0]:
            return original(*args, **kwargs)
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            acc[label] += time.perf_counter() - start

    setattr(owner, name, wrapper)


timed(serialization._Encoder, "encode", "encode")
timed(_snapshot._Capture, "sort", "sort")
timed(_snapshot._Capture, "copy_to_host", "to_host")
timed(_snapshot._Capture, "copy_on_devices", "on_devices")
gc_start = [0.0]


def on_gc(phase, info):
    if not active[0]:
        return
    if phase == "start":
        gc_start[0] = time.perf_counter()
    else:
        acc[f"gc{info['generation']}"] += time.perf_counter() - gc_start[0]


gc.callbacks.append(on_gc)
original_save = _handler.OrbaxCheckpointHandler.save


def save(self, *args, **kwargs):
    acc.clear()
    active[0] = True
    start = time.perf_counter()
    try:
        return original_save(self, *args, **kwargs)
    finally:
        active[0] = False
        rows.append({"total": time.perf_counter() - start, **acc})


_handler.OrbaxCheckpointHandler.save = save

if __name__ == "__main__":
    from benchmarks.__main__ import main

    rc = main([*sys.argv[1:], "--quiet"])
    keys = ["total", "encode", "sort", "to_host", "on_devices", "gc0", "gc1", "gc2"]
    for row in rows:
        print(" ".join(f"{k}={row.get(k, 0) * 1e3:6.1f}" for k in keys))
    sys.exit(rc)
