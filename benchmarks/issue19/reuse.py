# ruff: noqa: B023, E402, E501, E741  (ad-hoc measurement script, see README.md)
import shutil

import jax.numpy as jnp
import numpy as np

from datarax_ckpt import OrbaxCheckpointHandler

rng = np.random.default_rng(0)
tree = {f"l{i}": jnp.asarray(rng.standard_normal(1 << 20, dtype=np.float32)) for i in range(4)}
d = "/tmp/i19/reuse"
shutil.rmtree(d, ignore_errors=True)
with OrbaxCheckpointHandler() as h:
    h.save(d, tree, step=1)
    a = h.restore(d, tree, step=1)
    pa = a["l0"].unsafe_buffer_pointer()
    b = h.restore(d, tree, step=1)
    pb = b["l0"].unsafe_buffer_pointer()
    print("held -> new memory:", pa != pb)
    del a
    c = h.restore(d, tree, step=1)
    pc = c["l0"].unsafe_buffer_pointer()
    print("dropped -> reused:", pc == pa, {k: bool((c[k] == tree[k]).all()) for k in c})
    print("b intact", all(bool((b[k] == tree[k]).all()) for k in b))
    print("held:", len(h._directories[next(iter(h._directories))].restore_arena._held))
