# ruff: noqa: B023, E402, E501, E741  (ad-hoc measurement script, see README.md)
import collections
import json
import os
import statistics
import subprocess
import sys

trees = {"base": os.environ["I19_BASE"], "new": os.environ.get("I19_NEW", os.getcwd())}
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
n = sys.argv[2] if len(sys.argv) > 2 else "15"
res = collections.defaultdict(lambda: collections.defaultdict(list))
for r in range(rounds):
    order = list(trees) if r % 2 == 0 else list(trees)[::-1]
    for tag in order:
        env = dict(os.environ, PYTHONPATH=trees[tag])
        p = subprocess.run(
            [sys.executable, os.path.join(os.path.dirname(__file__), "ab_child.py"), tag, n],
            env=env,
            capture_output=True,
            text=True,
        )
        line = [l for l in p.stdout.splitlines() if l.startswith("RESULT")]
        if not line:
            print(p.stderr[-3000:])
            sys.exit(1)
        for k, v in json.loads(line[0][7:]).items():
            res[k][tag].append(v)
for k, d in res.items():
    b, nw = statistics.median(d["base"]), statistics.median(d["new"])
    print(
        f"{k:22s} base {b:8.2f}  new {nw:8.2f} ms  ({nw / b:5.2f}x)   base {[f'{x:.1f}' for x in d['base']]} new {[f'{x:.1f}' for x in d['new']]}"
    )
