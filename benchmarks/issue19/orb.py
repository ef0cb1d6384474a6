# ruff: noqa: B023, E402, E501, E741  (ad-hoc measurement script, see README.md)
import statistics
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from datarax_ckpt import (
    OrbaxCheckpointHandler,
    _orbax,
    _structure,
)

kind = sys.argv[1]
path = epath.Path(f"/tmp/i19/d-{kind}/ours")
folder = path / "ckpt-1"
h = OrbaxCheckpointHandler()
handle = h._enter(path)
st = _structure.inspect(folder)
man = st.checked
stored = man.stored


def item_args():
    item = {k: _orbax.template(s, d) for k, (d, s) in stored.items()}
    args = {
        k: ocp.RestoreArgs(restore_type=_orbax.AlignedHostArray, dtype=d)
        for k, (d, s) in stored.items()
    }
    return ocp.args.PyTreeRestore(item, restore_args=args, partial_restore=True)


def t(name, f, n=30):
    f()
    ts = []
    for _ in range(n):
        a = time.perf_counter()
        f()
        ts.append(time.perf_counter() - a)
    print(f"{name:40s} {statistics.median(ts) * 1e3:8.3f} ms  min {min(ts) * 1e3:.3f}")


def via_ckptr():
    c = ocp.Checkpointer(ocp.CompositeCheckpointHandler(**handle.item_handlers()))
    c.restore(folder, args=ocp.args.Composite(state=item_args()))
    c.close()


sh = _orbax.state_handler(use_ocdbt=True, use_compression=False)


def direct():
    sh.restore(folder / "state", args=item_args())


m = ocp.CheckpointManager(f"/tmp/i19/d-{kind}/orbax")

meta = {f"l{i}": np.zeros(int(float(kind) * 2**20 / 32), np.float32) for i in range(8)}
ab = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])
    ),
    dict(meta),
)


def raw():
    jax.block_until_ready(m.restore(1, args=ocp.args.StandardRestore(ab)))


for _ in range(2):
    t("checkpointer+composite", via_ckptr)
    t("state handler direct (cached)", direct)
    t("raw orbax manager", raw)
    t("ours restore()", lambda: jax.block_until_ready(h.restore(path, step=1)))
h.close()
m.close()
