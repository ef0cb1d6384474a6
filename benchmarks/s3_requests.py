"""S3 requests and throughput of datarax_ckpt against a local S3 server (moto, loopback).

Counts the HTTP requests one save, one restore and one retention deletion cost for a
GPT-2-small-shaped training state (448 leaves), and compares save/restore throughput
with raw TensorStore writing and reading the same bytes through the same ``s3`` driver.

The GPT-2 state is scaled down (``--width-scale``, default 1/8: every 2-D leaf is 64x
smaller) and the pack threshold with it (1 MiB x scale^2), so that exactly the leaves
stored on their own at full size are stored on their own here: the request count is
that of the full-size state, except for large arrays cut into more data files.

    python -m benchmarks.s3_requests            # about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import sys
import time

import numpy as np


class _Counter(logging.Handler):
    """Counts the requests the moto server logs (``"PUT /bucket/key HTTP/1.1" 200``)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        for method in ("GET", "PUT", "POST", "HEAD", "DELETE"):
            if f'"{method} ' in message:
                self.counts[method] += 1

    def take(self) -> dict[str, int]:
        counts, self.counts = dict(self.counts), collections.Counter()
        return {**counts, "total": sum(counts.values())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width-scale", type=float, default=0.125)
    parser.add_argument("--throughput-mib", type=int, default=64)
    args = parser.parse_args(argv)

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    import _s3server

    server, env = _s3server.start()
    os.environ.update(env)
    counter = _Counter()
    logging.getLogger("werkzeug").addHandler(counter)
    logging.getLogger("werkzeug").setLevel(logging.INFO)
    _s3server.create_bucket("bench")

    import jax
    import tensorstore as ts

    from benchmarks.config import CaseConfig
    from benchmarks.states import build_state
    from datarax_ckpt import OrbaxCheckpointHandler, _s3

    case = CaseConfig(kind="gpt2", width_scale=args.width_scale)
    state = build_state(case, seed=0)
    threshold = int((1 << 20) * args.width_scale**2)
    directory = "s3://bench/gpt2"
    print(f"{state.description}: {state.num_leaves} leaves, {state.nbytes / 2**20:.1f} MiB")
    with OrbaxCheckpointHandler(pack_threshold_bytes=threshold) as handler:
        handler.get_checkpoint_steps(directory)  # the manager and its first listing
        counter.take()
        handler.save(directory, state.tree, step=1)
        handler.wait_until_finished()
        save = counter.take()
        handler.restore(directory, step=1)
        restore = counter.take()
        handler.save(directory, state.tree, step=2, keep=1)
        handler.wait_until_finished()
        save_keep = counter.take()
    print(f"requests per save (pack threshold {threshold} B): {save}")
    print(f"requests per verified restore: {restore}")
    print(f"requests per save that also deletes one step (keep=1): {save_keep}")

    # Throughput: raw TensorStore floor vs save/restore, same bytes, same server.
    n = 4
    per = args.throughput_mib * 2**20 // 4 // n
    arrays = {f"a{i}": np.random.default_rng(i).random(per, dtype=np.float32) for i in range(n)}
    nbytes = sum(a.nbytes for a in arrays.values())

    def raw_write() -> None:
        futures = []
        for key, a in arrays.items():
            spec = {
                "driver": "zarr3",
                "kvstore": _s3.kvstore_spec("bench", f"raw/{key}/"),
                "metadata": {"shape": list(a.shape), "data_type": "float32"},
                "create": True,
                "delete_existing": True,
            }
            futures.append(ts.open(spec).result().write(a))
        for f in futures:
            f.result()

    def raw_read() -> None:
        stores = [
            ts.open({"driver": "zarr3", "kvstore": _s3.kvstore_spec("bench", f"raw/{k}/")})
            for k in arrays
        ]
        for s in [s.result().read() for s in stores]:
            s.result()

    tree = {k: jax.numpy.asarray(a) for k, a in arrays.items()}
    rows = []
    for name, fn in (("raw TensorStore write", raw_write), ("raw TensorStore read", raw_read)):
        t = time.perf_counter()
        fn()
        rows.append((name, time.perf_counter() - t))
    with OrbaxCheckpointHandler() as handler:
        t = time.perf_counter()
        handler.save("s3://bench/tp", tree, step=1)
        handler.wait_until_finished()
        rows.append(("datarax_ckpt save (until committed)", time.perf_counter() - t))
        t = time.perf_counter()
        handler.restore("s3://bench/tp", step=1)
        rows.append(("datarax_ckpt restore (verified)", time.perf_counter() - t))
    counter.take()
    for name, seconds in rows:
        print(f"{name:38s} {seconds:6.2f} s  {nbytes / 2**20 / seconds:7.1f} MiB/s")
    server.stop()


if __name__ == "__main__":
    main()
