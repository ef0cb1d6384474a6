# ruff: noqa: B023, E402, E501, E741  (ad-hoc measurement script, see README.md)
import json
import shutil
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from datarax_ckpt import OrbaxCheckpointHandler

tag = sys.argv[1]
n = int(sys.argv[2])
rng = np.random.default_rng(0)


def eq(mb):
    per = int(mb * 2**20 / 4 / 8)
    return {f"l{i}": jnp.asarray(rng.standard_normal(per, dtype=np.float32)) for i in range(8)}


trees = {
    "1MiB": eq(1),
    "4MiB": eq(4),
    "2000x64K": {
        f"l{i}": jnp.asarray(rng.standard_normal(16384, dtype=np.float32)) for i in range(2000)
    },
}
h = OrbaxCheckpointHandler()
out = {}
for name, tree in trees.items():
    d = f"/tmp/i19/ab-{tag}-{name}"
    shutil.rmtree(d, ignore_errors=True)
    h.save(d, tree, step=1, metadata={"step": 1})
    h.wait_until_finished()
    reps = n if name != "2000x64K" else max(3, n // 3)
    fns = {
        "restore": lambda: jax.block_until_ready(h.restore(d, tree, step=1)),
        "meta": lambda: h.restore(d, step=1, metadata_only=True),
    }
    if name == "2000x64K":
        s = [1]

        def sv():
            s[0] += 1
            t = time.perf_counter()
            h.save(d, tree, step=s[0], metadata={"step": s[0]})
            dt = time.perf_counter() - t
            h.wait_until_finished()
            return dt

    for k, f in fns.items():
        f()
        f()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        out[f"{name} {k}"] = statistics.median(ts) * 1e3
    if name == "2000x64K":
        sv()
        out[f"{name} save"] = statistics.median([sv() for _ in range(reps)]) * 1e3
    shutil.rmtree(d, ignore_errors=True)
h.close()
print("RESULT", json.dumps(out))
