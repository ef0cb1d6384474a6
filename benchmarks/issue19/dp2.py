# ruff: noqa: B023, E402, E501, E741  (ad-hoc measurement script, see README.md)
import statistics
import time

import jax
import numpy as np

from datarax_ckpt import _placing
from datarax_ckpt._snapshot import aligned_empty

jax.config.update("jax_num_cpu_devices", 2)
devs = jax.devices()
vals, shs = [], []
for dt in [
    "float32",
    "bfloat16",
    "int8",
    "bool",
    "float64",
    "int64",
    "uint32",
    "complex64",
    "float16",
]:
    v = np.arange(24).astype(dt).reshape(2, 3, 4)
    for d in devs:
        vals.append(v)
        shs.append(jax.sharding.SingleDeviceSharding(d))
a = _placing.device_put(vals, shs)
b = jax.device_put(vals, shs)
for x, y in zip(a, b, strict=False):
    assert (
        x.dtype == y.dtype
        and x.shape == y.shape
        and x.sharding == y.sharding
        and x.committed == y.committed
        and x.weak_type == y.weak_type
    ), (x, y)
    assert np.array_equal(np.asarray(x), np.asarray(y))
print("same ok", len(a))
pack = aligned_empty(2000 * 16384, np.float32)
pack[:] = 1
leaves = [pack[i * 16384 : (i + 1) * 16384] for i in range(2000)]
sh = [jax.sharding.SingleDeviceSharding(devs[0])] * 2000
for f in (jax.device_put, _placing.device_put):
    ts = []
    for _ in range(7):
        t = time.perf_counter()
        r = f(leaves, sh)
        jax.block_until_ready(r)
        ts.append(time.perf_counter() - t)
    print(f.__module__, statistics.median(ts) * 1e3)
print("aliased", r[3].unsafe_buffer_pointer() == leaves[3].ctypes.data)
