"""Multi-process checkpointing on one machine: N JAX processes save one sharded state.

Run it with::

    python examples/multihost.py --num-processes 2

The launcher starts 2 local processes (each with ``--devices-per-process`` CPU
devices), joined through ``jax.distributed`` on a free localhost port. Every process
builds its part of a global state (float32 layers sharded over all devices, plus a
host-local PRNG key, a step counter and a config string), calls ``save`` with it,
then restores it onto a *different* sharding and checks every shard bit for bit. The
save and restore times of process 0 are printed (medians over ``--repeats``).

On a real cluster, run the same program once per host with ``--process-id``,
``--coordinator host0:port``, ``--num-processes``, ``--platform gpu`` (or tpu) and a
``--directory`` every host can reach (a shared file system or a ``gs://`` bucket):
those are what the launcher passes to each local process. See docs/multihost.md.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument(
        "--devices-per-process",
        type=int,
        default=None,
        help="CPU devices per process (default: 4 // num-processes, at least 1)",
    )
    parser.add_argument(
        "--directory", default=None, help="checkpoint directory (default: a temp dir)"
    )
    parser.add_argument("--size-mib", type=int, default=64, help="total float32 state size")
    parser.add_argument("--layers", type=int, default=8, help="number of float32 leaves")
    parser.add_argument("--repeats", type=int, default=3, help="timed saves and restores")
    parser.add_argument(
        "--timeout", type=float, default=600, help="launcher: seconds before killing"
    )
    parser.add_argument("--process-id", type=int, default=None, help="set: run as that process")
    parser.add_argument("--coordinator", default=None, help="host:port of process 0")
    parser.add_argument("--platform", default="cpu", help="JAX platform (cpu, gpu, tpu)")
    args = parser.parse_args(argv)
    if args.devices_per_process is None:
        args.devices_per_process = max(1, 4 // args.num_processes)
    return args


# ----------------------------------------------------------------------------- launcher


def launch(args: argparse.Namespace) -> int:
    """Starts the processes on this machine and waits for them (stops all on a failure)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    directory = args.directory or tempfile.mkdtemp(prefix="datarax-multihost-")
    command = [sys.executable, __file__, "--directory", directory]
    command += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(args.num_processes)]
    command += ["--devices-per-process", str(args.devices_per_process)]
    command += ["--size-mib", str(args.size_mib), "--layers", str(args.layers)]
    command += ["--repeats", str(args.repeats), "--platform", args.platform]
    procs = [
        subprocess.Popen([*command, "--process-id", str(i)]) for i in range(args.num_processes)
    ]
    deadline = time.monotonic() + args.timeout
    try:
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
                print("A process failed or timed out; stopping the others.", file=sys.stderr)
                break
            try:
                procs[0].wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    print(f"Checkpoints are in {directory}")
    return 1 if any(p.returncode for p in procs) else 0


# ----------------------------------------------------------------------------- one process


def run(args: argparse.Namespace) -> int:
    """What every process runs: the same calls, each with its view of the global state."""
    import jax

    jax.config.update("jax_platforms", args.platform)
    if args.platform == "cpu":
        jax.config.update("jax_num_cpu_devices", args.devices_per_process)
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)

    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from datarax_ckpt import OrbaxCheckpointHandler

    mesh = jax.make_mesh((jax.device_count(),), ("x",))
    block = 16  # rows generated from one seed: values do not depend on the topology
    rows = args.size_mib * 2**20 // 4 // 1024 // args.layers
    rows -= rows % (block * jax.device_count())
    shape = (rows, 1024)

    def layer(i: int, index) -> np.ndarray:
        # Each process generates only the rows it holds (random float32, seeded per block).
        start, stop, _ = index[0].indices(rows)
        values = [
            np.random.default_rng([i, b]).random((block, shape[1]), dtype=np.float32)
            for b in range(start // block, stop // block)
        ]
        return np.concatenate(values)[:, index[1]]

    saved = NamedSharding(mesh, P("x", None))  # rows split over all devices
    state = {
        "params": {
            f"layer{i}": jax.make_array_from_callback(shape, saved, lambda idx, i=i: layer(i, idx))
            for i in range(args.layers)
        },
        "step": 0,  # Python scalars, strings and host-local arrays: equal on every process,
        "config": "example",  # written once, by process 0
        "rng": jax.random.key(0),
    }
    restore_onto = NamedSharding(mesh, P(None, "x"))  # columns: a different layout
    target = {
        "params": {
            name: jax.ShapeDtypeStruct(shape, np.float32, sharding=restore_onto)
            for name in state["params"]
        },
        "step": 0,
        "config": "",
        "rng": jax.random.key(1),
    }

    save_s, capture_s, restore_s = [], [], []
    with OrbaxCheckpointHandler() as handler:
        for step in range(args.repeats):
            state["step"] = step
            multihost_utils.sync_global_devices(f"save-{step}")
            start = time.perf_counter()
            handler.save(args.directory, state, step=step, keep=2, metadata={"step": step})
            capture_s.append(time.perf_counter() - start)
            handler.wait_until_finished()
            save_s.append(time.perf_counter() - start)
        for step in range(args.repeats):
            multihost_utils.sync_global_devices(f"restore-{step}")
            start = time.perf_counter()
            restored = handler.restore(args.directory, target)
            jax.block_until_ready(restored)
            restore_s.append(time.perf_counter() - start)
        steps = handler.get_checkpoint_steps(args.directory)

    exact = all(
        np.asarray(shard.data).tobytes() == layer(i, shard.index).tobytes()
        for i in range(args.layers)
        for shard in restored["params"][f"layer{i}"].addressable_shards
    )
    exact &= restored["step"] == args.repeats - 1 and restored["config"] == "example"
    print(f"[process {jax.process_index()}] restored bit-exactly onto P(None, 'x'): {exact}")
    if jax.process_index() == 0:
        summary = {
            "processes": jax.process_count(),
            "devices": jax.device_count(),
            "state_mib": args.layers * rows * 1024 * 4 / 2**20,
            "save_s": statistics.median(save_s),
            "save_returns_s": statistics.median(capture_s),
            "restore_s": statistics.median(restore_s),
            "steps_kept": steps,
        }
        print("RESULT " + json.dumps(summary), flush=True)
    return 0 if exact else 1


def main() -> int:
    args = parse_args()
    if args.process_id is None:
        return launch(args)
    if args.coordinator is None or args.directory is None:
        sys.exit("--process-id needs --coordinator and --directory (the same on every process)")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
