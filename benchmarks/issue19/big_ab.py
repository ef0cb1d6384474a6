# ruff: noqa: B023, E402, E501, E741  (ad-hoc measurement script, see README.md)
import contextlib
import os
import shutil
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from datarax_ckpt import OrbaxCheckpointHandler, _arena

n = int(sys.argv[1]) if len(sys.argv) > 1 else 5
gib = float(sys.argv[2]) if len(sys.argv) > 2 else 1
rng = np.random.default_rng(0)
per = int(gib * (1 << 30)) // 4 // 8
tree = {f"l{i}": jnp.asarray(rng.standard_normal(per, dtype=np.float32)) for i in range(8)}
d = f"/tmp/i19/big{gib}"
h = OrbaxCheckpointHandler()
if not os.path.exists(d + "/ckpt-1"):
    shutil.rmtree(d, ignore_errors=True)
    h.save(d, tree, step=1)
    h.wait_until_finished()
files = [os.path.join(r, f) for r, _, fs in os.walk(d + "/ckpt-1/state") for f in fs]
buf = bytearray(64 << 20)


def floor():
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


real = _arena.reusing


def off(arena):
    return contextlib.nullcontext()


res = {"floor": [], "arena v": [], "fresh v": [], "arena nov": [], "fresh nov": []}
floor()
for r in range(n):
    t = time.perf_counter()
    floor()
    res["floor"].append(time.perf_counter() - t)
    for mode in ["arena", "fresh"] if r % 2 == 0 else ["fresh", "arena"]:
        _arena.reusing = real if mode == "arena" else off
        for v in (True, False):
            t = time.perf_counter()
            out = h.restore(d, tree, step=1, verify=v)
            jax.block_until_ready(out)
            res[f"{mode} {'v' if v else 'nov'}"].append(time.perf_counter() - t)
            del out
for k, v in res.items():
    print(f"{k:10s} {statistics.median(v):.3f}", " ".join(f"{x:.3f}" for x in v))
h.close()
