# ruff: noqa: B023, E402, E501, E741  (ad-hoc measurement script, see README.md)
import os
import shutil
import statistics
import sys
import time

import jax

from benchmarks.config import load_config
from benchmarks.states import build_state
from datarax_ckpt import OrbaxCheckpointHandler, _orbax

cfg = load_config("configs/bench/cpu.toml")
case = [c for c in cfg.cases if c.kind == "gpt2"][0]
tree = build_state(case, 0).tree
d = "/tmp/i19/gpt2"
h = OrbaxCheckpointHandler()
if not os.path.exists(d + "/ckpt-1"):
    shutil.rmtree(d, ignore_errors=True)
    h.save(d, tree, step=1)
    h.wait_until_finished()
cached = _orbax._AlignedNumpyHandler._spec


def uncached(self, info, arg):
    self.__dict__.pop("_specs", None)
    return cached(self, info, arg)


res = {"cached": [], "uncached": []}
for r in range(int(sys.argv[1])):
    for m in ["cached", "uncached"] if r % 2 == 0 else ["uncached", "cached"]:
        _orbax._AlignedNumpyHandler._spec = cached if m == "cached" else uncached
        for _ in range(2):
            t = time.process_time()
            out = h.restore(d, tree, step=1)
            jax.block_until_ready(out)
            res[m].append(time.process_time() - t)
            del out
for k, v in res.items():
    print(k, f"{statistics.median(v):.3f}", [f"{x:.3f}" for x in v])
h.close()
