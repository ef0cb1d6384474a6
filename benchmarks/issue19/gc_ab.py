# ruff: noqa: B023, E402, E501, E741  (ad-hoc measurement script, see README.md)
import gc
import shutil
import statistics
import sys
import time

import jax.numpy as jnp
import numpy as np

from datarax_ckpt import OrbaxCheckpointHandler

rng = np.random.default_rng(0)
tree = {f"l{i}": jnp.asarray(rng.standard_normal(16384, dtype=np.float32)) for i in range(2000)}
junk = [{"a": [i, str(i)]} for i in range(int(sys.argv[1]))]
d = "/tmp/i19/gcab"
shutil.rmtree(d, ignore_errors=True)
h = OrbaxCheckpointHandler()
s = 0
res = {"gc on": [], "gc off": []}
for r in range(int(sys.argv[2])):
    for m in ["gc on", "gc off"] if r % 2 == 0 else ["gc off", "gc on"]:
        s += 1
        if m == "gc off":
            gc.disable()
        t, c = time.perf_counter(), time.thread_time()
        h.save(d, tree, step=s, keep=2)
        w, cc = time.perf_counter() - t, time.thread_time() - c
        gc.enable()
        h.wait_until_finished()
        if r >= 2:
            res[m].append((w * 1e3, cc * 1e3))
for k, v in res.items():
    print(
        k,
        "wall",
        round(statistics.median(a for a, b in v), 1),
        "cpu",
        round(statistics.median(b for a, b in v), 1),
    )
h.close()
