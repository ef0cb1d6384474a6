"""The capture's sort of 2000 ``jax.device_put`` leaves: an old ``_snapshot`` module against
this tree's, in one process, alternating (performance.md #32)::

    python benchmarks/issue19/sort_ab.py /path/to/old/tree 30

Prints the median and minimum for the host-backend path and for the accelerator path
(``host_backend`` forced off: the leaves are sorted into device buckets, nothing is copied).
"""

import importlib.util
import sys
import time

import jax
import numpy as np

from datarax_ckpt import _snapshot as new


def main(old_tree: str, rounds: int) -> None:
    spec = importlib.util.spec_from_file_location(
        "old_snapshot", f"{old_tree}/datarax_ckpt/_snapshot.py"
    )
    old = importlib.util.module_from_spec(spec)
    sys.modules["old_snapshot"] = old
    spec.loader.exec_module(old)
    rng = np.random.default_rng(0)
    values = [jax.device_put(rng.random(16384, dtype=np.float32)) for _ in range(2000)]
    for host in (True, False):
        times: dict[str, list[float]] = {"old": [], "new": []}
        for _ in range(rounds):
            for name, module in (("old", old), ("new", new)):
                capture = module._Capture(values, [""] * len(values))
                capture.host_backend = host
                start = time.perf_counter()
                capture.sort(64 << 10)
                times[name].append(time.perf_counter() - start)
        label = "host backend" if host else "accelerator path"
        print(
            label,
            {
                k: f"median {sorted(v)[len(v) // 2] * 1e3:.2f} ms, min {min(v) * 1e3:.2f} ms"
                for k, v in times.items()
            },
        )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 30)
