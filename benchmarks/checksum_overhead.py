"""What checksums cost: save() blocking time, background write time, verified restore time.

Usage: ``python -m benchmarks.checksum_overhead [--gib 1] [--repeats 7] [--dir DIR]``.

Saves the same random float32 state (16 leaves) with ``checksums=True`` and ``False``,
alternating, in one process; after each save it waits until the write is committed, so
each ``save()`` is timed alone (after an ``os.sync()``, so the kernel's writeback of the
previous save does not land in the next sample). Prints the medians as a Markdown table and as JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time

import jax
import numpy as np

from benchmarks.measure import handler_round_trip
from datarax_ckpt import OrbaxCheckpointHandler, _integrity


def _state(gib: float, leaves: int = 16) -> dict:
    rng = np.random.default_rng(0)
    n = int(gib * 2**30) // 4 // leaves
    return {f"layer{i}": jax.device_put(rng.random(n, dtype=np.float32)) for i in range(leaves)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.checksum_overhead")
    parser.add_argument("--gib", type=float, default=1.0, help="state size in GiB")
    parser.add_argument("--repeats", type=int, default=7, help="saves per variant")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args(argv)
    root = tempfile.mkdtemp(prefix="ckpt-overhead-", dir=args.dir)
    state = _state(args.gib)
    nbytes = sum(x.nbytes for x in state.values())
    samples: dict[str, dict[str, list[float]]] = {}
    handlers = {
        "checksums": OrbaxCheckpointHandler(checksums=True),
        "no checksums": OrbaxCheckpointHandler(checksums=False, verify_on_restore=False),
    }
    try:
        for i in range(args.repeats + 1):  # the first round warms up (jit, Orbax) and is dropped
            order = list(handlers) if i % 2 == 0 else list(handlers)[::-1]
            for name in order:
                handler, directory = handlers[name], f"{root}/{name.replace(' ', '-')}"
                sample = handler_round_trip(handler, directory, state, i)
                if i == 0:
                    continue
                runs = samples.setdefault(name, {})
                for metric, value in sample.items():
                    runs.setdefault(metric, []).append(value)
    finally:
        for handler in handlers.values():
            handler.close()
        shutil.rmtree(root, ignore_errors=True)
    medians = {
        name: {metric: statistics.median(values) for metric, values in runs.items()}
        for name, runs in samples.items()
    }
    # The hashing itself, as the background thread runs it on the captured arrays.
    manifest, metadata = {"format": "datarax_ckpt"}, {}
    hash_times = []
    for _ in range(5):
        start = time.perf_counter()
        _integrity.compute(state, manifest, metadata)
        hash_times.append(time.perf_counter() - start)
    medians["checksums"]["hash_on_worker_s"] = statistics.median(hash_times)
    result = {
        "state_bytes": nbytes,
        "repeats": args.repeats,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "medians": medians,
        "samples": samples,
    }
    print(
        f"State: {nbytes / 2**30:.2f} GiB float32 random in 16 leaves, {args.repeats} saves "
        f"per variant, backend {result['backend']} ({result['device']}).\n"
    )
    print("| variant | save() blocking (median) | save to committed | restore (verified if on) |")
    print("|---|---|---|---|")
    for name, m in medians.items():
        print(
            f"| {name} | {m['save_blocking_s'] * 1e3:.1f} ms | {m['durable_s']:.2f} s "
            f"| {m['restore_s']:.2f} s |"
        )
    on, off = medians["checksums"], medians["no checksums"]
    for metric in ("save_blocking_s", "durable_s", "restore_s"):
        print(f"{metric}: {100 * (on[metric] / off[metric] - 1):+.1f}% with checksums")
    print(
        f"hashing {nbytes / 2**30:.2f} GiB on the background thread: {on['hash_on_worker_s']:.3f} s"
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
