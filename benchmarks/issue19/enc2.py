# ruff: noqa: B023, E402, E501, E741  (ad-hoc measurement script, see README.md)
import gc
import statistics
import time

import jax.numpy as jnp
import numpy as np

from datarax_ckpt import _hostcopy, _snapshot, serialization

rng = np.random.default_rng(0)
tree = {f"l{i}": jnp.asarray(rng.standard_normal(16384, dtype=np.float32)) for i in range(2000)}
pool = _snapshot.ArenaPool()
R = {"encode": [], "capture": [], "total_wall": [], "copy_only": []}
for _r in range(15):
    w = time.perf_counter()
    gc.disable()
    t = time.thread_time()
    enc = serialization._Encoder()
    root = enc.encode(tree, "")
    R["encode"].append(time.thread_time() - t)
    t = time.thread_time()
    arrays, slots, packs, arena = _snapshot.capture(
        enc.slots, pack_threshold_bytes=1 << 20, snapshot="auto", pool=pool
    )
    R["capture"].append(time.thread_time() - t)
    gc.enable()
    R["total_wall"].append(time.perf_counter() - w)
    pool.give(arena)
    srcs = [np.asarray(s.value) for s in enc.slots]
    dst = np.empty(sum(x.nbytes for x in srcs), np.uint8).view(np.float32)
    t = time.perf_counter()
    _hostcopy.gather([(dst, srcs)])
    R["copy_only"].append(time.perf_counter() - t)
for k, v in R.items():
    print(f"{k:12s} {statistics.median(v) * 1e3:.1f} ms  min {min(v) * 1e3:.1f}")
