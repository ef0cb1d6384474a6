# ruff: noqa: B023, E402, E501, E741  (ad-hoc measurement script, see README.md)
import shutil
import statistics
import sys
import time

import jax.numpy as jnp
import numpy as np

from datarax_ckpt import OrbaxCheckpointHandler, _handler

rng = np.random.default_rng(0)
per = (1 << 30) // 4 // 8
tree = {f"l{i}": jnp.asarray(rng.standard_normal(per, dtype=np.float32)) for i in range(8)}
d = "/tmp/i19/dur"
shutil.rmtree(d, ignore_errors=True)
h = OrbaxCheckpointHandler()
s = [0]


def one():
    s[0] += 1
    t = time.perf_counter()
    h.save(d, tree, step=s[0], keep=1)
    h.wait_until_finished()
    return time.perf_counter() - t


one()
res = {"chunked": [], "whole": []}
for r in range(int(sys.argv[1])):
    for m in ["chunked", "whole"] if r % 2 == 0 else ["whole", "chunked"]:
        _handler._CHUNKED = (
            _handler.ocp.SaveArgs(chunk_byte_size=16 << 20) if m == "chunked" else _handler._WHOLE
        )
        res[m].append(one())
for k, v in res.items():
    print(k, f"{statistics.median(v):.3f}", [f"{x:.3f}" for x in v])
h.close()
