# ruff: noqa: B023, E402, E501, E741  (ad-hoc measurement script, see README.md)
import importlib.util
import statistics
import sys
import time

from datarax_ckpt import _safeio

spec = importlib.util.spec_from_file_location("mb", "/tmp/i19/manifest_before.py")
mb = importlib.util.module_from_spec(spec)
sys.modules["mb"] = mb
spec.loader.exec_module(mb)
from datarax_ckpt import _manifest as ma

folder = "/tmp/i19/many/ckpt-1"
raw = _safeio.read_json(folder + "/manifest/metadata")
orb = _safeio.read_json(folder + "/state/_METADATA")
cs = _safeio.read_json(folder + "/checksums/metadata")
res = {"before": [], "after": []}
for r in range(30):
    for k, m in (("before", mb), ("after", ma)) if r % 2 == 0 else (("after", ma), ("before", mb)):
        t = time.thread_time()
        m.validate(raw, orbax_tree=orb.get("tree_metadata"), checksums=cs.get("arrays"))
        res[k].append(time.thread_time() - t)
for k, v in res.items():
    print(k, f"{statistics.median(v) * 1e3:.2f} ms cpu")
