# ruff: noqa: B023, E402, E501, E741  (ad-hoc measurement script, see README.md)
import shutil
import statistics
import time

import numpy as np
import tensorstore as ts

base = "/tmp/i19/chunks"
shutil.rmtree(base, ignore_errors=True)
n = 1 << 25  # 128 MiB float32
data = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
stores = {}
for name, chunk in [("c128", n), ("c16", n // 8), ("c4", n // 32)]:
    spec = {
        "driver": "zarr",
        "kvstore": {"driver": "ocdbt", "base": f"file://{base}/{name}/"},
        "path": "a",
        "metadata": {"shape": [n], "chunks": [chunk], "dtype": "<f4", "compressor": None},
    }
    s = ts.open(spec, create=True, open=True).result()
    for i in range(8):
        s2 = ts.open({**spec, "path": f"a{i}"}, create=True, open=True).result()
        s2.write(data).result()
    stores[name] = [ts.open({**spec, "path": f"a{i}"}, open=True).result() for i in range(8)]
outs = [np.empty(n, np.float32) for _ in range(8)]
for o in outs:
    o[:] = 0


def read(name, fresh):
    t = time.perf_counter()
    dst = [np.empty(n, np.float32) for _ in range(8)] if fresh else outs
    fs = [ts.array(o).write(s) for o, s in zip(dst, stores[name], strict=False)]
    for f in fs:
        f.result()
    return time.perf_counter() - t


res = {}
for _r in range(5):
    for name in stores:
        for fresh in (False, True):
            res.setdefault((name, fresh), []).append(read(name, fresh))
for k, v in res.items():
    print(k, f"{statistics.median(v):.3f}", [f"{x:.3f}" for x in v])
