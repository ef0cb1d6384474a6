# ruff: noqa: B023, E402, E501, E741  (ad-hoc measurement script, see README.md)
import statistics
import sys
import time

import orbax.checkpoint as ocp
from etils import epath

from datarax_ckpt import (
    OrbaxCheckpointHandler,
    _layout,
    _restoring,
    _structure,
)

kind = sys.argv[1]
base = f"/tmp/i19/d-{kind}/ours"
path = epath.Path(base)
folder = path / "ckpt-1"
h = OrbaxCheckpointHandler()
handle = h._enter(path)


def t(name, f, n=30):
    f()
    ts = []
    for _ in range(n):
        a = time.perf_counter()
        f()
        ts.append(time.perf_counter() - a)
    print(f"{name:40s} {statistics.median(ts) * 1e3:8.3f} ms")


t("step_folders", lambda: _layout.step_folders(path))
t("is_committed", lambda: _layout.is_committed(folder))
t("is_path_finalized", lambda: ocp.step.is_path_finalized(folder))
t("_identity", lambda: _restoring._identity(folder))
t("inspect", lambda: _structure.inspect(folder))
t("inspect(arrays=False)", lambda: _structure.inspect(folder, arrays=False))
st = _structure.inspect(folder)
t("ocdbt refs", lambda: list(_structure._ocdbt_refs(folder / "state")))
t("scan", lambda: _structure._safeio.scan(folder))
t(
    "checkpointer ctor+close",
    lambda: ocp.Checkpointer(ocp.CompositeCheckpointHandler(**handle.item_handlers())).close(),
)
t("read_items", lambda: _restoring._read_items(handle, folder, None, False, True))
t("read_items noverify", lambda: _restoring._read_items(handle, folder, None, False, False))
t("read_items meta", lambda: _restoring._read_items(handle, folder, None, True, False))
t("restore()", lambda: h.restore(path, step=1))
h.close()
