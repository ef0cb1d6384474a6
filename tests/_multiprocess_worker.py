"""One process of a localhost multi-process cluster, for tests/test_multiprocess.py.

Run by the test as ``python tests/_multiprocess_worker.py SCENARIO --coordinator
127.0.0.1:PORT --num-processes N --process-id I --devices D --directory DIR --out OUT``.
Each process writes what it observed to ``OUT/result-<I>.json``; the test asserts on it.
Importing this module (as the test does, for the expected values) starts nothing.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import sys
import traceback

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

# Sharding of the state when saved (mesh 2 x 2: "data", "model") and when restored
# (mesh 4: "x"): every sharded leaf changes layout between the two.
SAVE_MESH = ((2, 2), ("data", "model"))
SAVE_SPECS = {
    "w": P("data", "model"),
    "emb": P(("data", "model"), None),
    "count": P(),
    "keys": P(("data", "model")),
}
RESTORE_MESH = ((4,), ("x",))
RESTORE_SPECS = {"w": P(None, "x"), "emb": P(None, "x"), "count": P(), "keys": P()}


def expected(step: int) -> dict[str, np.ndarray]:
    """The values saved at ``step``, identical on every process (seeded)."""
    rng = np.random.default_rng(step)
    return {
        "w": rng.standard_normal((64, 32), dtype=np.float32),
        "emb": rng.standard_normal((32, 16), dtype=np.float32).astype(jax.numpy.bfloat16),
        "count": np.array(step, np.int32),
        "keys": rng.integers(0, 2**32, (8, 2), dtype=np.uint32),
        "hist": rng.standard_normal(5),
    }


def make_mesh(layout) -> jax.sharding.Mesh:
    shape, names = layout
    return jax.make_mesh(shape, names, devices=jax.devices())


def _global(value: np.ndarray, sharding) -> jax.Array:
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def make_state(step: int, mesh, specs) -> dict:
    """A training-like state: global sharded arrays plus host-local and Python leaves."""
    e = expected(step)
    sharding = {k: NamedSharding(mesh, s) for k, s in specs.items()}
    keys = jax.random.wrap_key_data(_global(e["keys"], sharding["keys"]), impl="threefry2x32")
    return {
        "params": {"w": _global(e["w"], sharding["w"]), "emb": _global(e["emb"], sharding["emb"])},
        "count": _global(e["count"], sharding["count"]),
        "keys": keys,
        "rng": jax.random.key(7),  # host-local, equal on every process
        "name": "run-a",
        "step": step,
        "lr": 0.5 / step,
        "hist": e["hist"],
        "extra": (None, np.float32(step)),
    }


def make_target(mesh, specs) -> dict:
    """A restore target: the dtype and (new) sharding of every array leaf."""
    e = expected(1)
    sharding = {k: NamedSharding(mesh, s) for k, s in specs.items()}

    def abstract(name):
        return jax.ShapeDtypeStruct(e[name].shape, e[name].dtype, sharding=sharding[name])

    return {
        "params": {"w": abstract("w"), "emb": abstract("emb")},
        "count": abstract("count"),
        "keys": jax.random.wrap_key_data(_global(e["keys"], sharding["keys"])),
        "rng": jax.random.key(0),
        "name": "",
        "step": 0,
        "lr": 0.0,
        "hist": np.zeros(5),
        "extra": (None, np.float32(0)),
    }


def _same_bits(array: jax.Array, value: np.ndarray) -> bool:
    """Every shard this process holds equals ``value`` at its index, bit for bit."""
    if array.dtype != value.dtype or array.shape != value.shape:
        return False
    return all(
        np.asarray(shard.data).tobytes() == np.ascontiguousarray(value[shard.index]).tobytes()
        for shard in array.addressable_shards
    )


def differences(restored: dict, step: int, specs=None, mesh=None) -> list[str]:
    """What in ``restored`` differs from the state saved at ``step`` (and its sharding)."""
    e, bad = expected(step), []
    arrays = {
        "w": restored["params"]["w"],
        "emb": restored["params"]["emb"],
        "count": restored["count"],
        "keys": jax.random.key_data(restored["keys"]),
    }
    for name, array in arrays.items():
        if not _same_bits(array, e[name]):
            bad.append(name)
        if specs is not None and array.sharding != NamedSharding(mesh, specs[name]):
            bad.append(f"{name} sharding {array.sharding}")
    if not jax.numpy.array_equal(
        jax.random.key_data(restored["rng"]), jax.random.key_data(jax.random.key(7))
    ):
        bad.append("rng")
    if restored["rng"].sharding.device_set != {jax.local_devices()[0]}:
        bad.append("rng device")
    for name, value in (("name", "run-a"), ("step", step), ("lr", 0.5 / step)):
        if type(restored[name]) is not type(value) or restored[name] != value:
            bad.append(name)
    if not np.array_equal(restored["hist"], e["hist"]):
        bad.append("hist")
    if (
        restored["extra"] != (None, np.float32(step))
        or type(restored["extra"][1]) is not np.float32
    ):
        bad.append("extra")
    return bad


def leftovers(directory: str) -> list[str]:
    """Backup or temporary folders left in ``directory``."""
    return sorted(n for n in os.listdir(directory) if "backup" in n or "tmp" in n)


# --------------------------------------------------------------------------- scenarios


def scenario_save(args, result: dict) -> None:
    """2 processes x 2 devices: saves, retention, listing, errors, overwrite, restore."""
    from datarax_ckpt import CheckpointError, OrbaxCheckpointHandler, ProcessMismatchError

    pid = jax.process_index()
    mesh, target_mesh = make_mesh(SAVE_MESH), make_mesh(RESTORE_MESH)
    steps_dir = os.path.join(args.directory, "steps")
    plain_dir = os.path.join(args.directory, "plain")
    with OrbaxCheckpointHandler() as handler:
        for step in range(1, 5):
            handler.save(
                steps_dir,
                make_state(step, mesh, SAVE_SPECS),
                step=step,
                keep=2,
                metadata={"step": step},
            )
        # Queued behind the steps, in another directory: both write in the background.
        handler.save(plain_dir, make_state(9, mesh, SAVE_SPECS))
        handler.wait_until_finished()
        result["steps"] = handler.get_checkpoint_steps(steps_dir)
        result["latest"] = handler.latest_step(steps_dir)
        result["listed"] = sorted(
            os.path.basename(p) for p in handler.list_checkpoints(steps_dir).values()
        )
        result["metadata"] = handler.restore(steps_dir, metadata_only=True)

        report = handler.verify(steps_dir)
        result["verify"] = {"ok": report.ok, "problems": [str(p) for p in report.problems]}
        restored = handler.restore(steps_dir, make_target(target_mesh, RESTORE_SPECS), verify=True)
        result["restore_resharded"] = differences(restored, 4, RESTORE_SPECS, target_mesh)
        restored = handler.restore(plain_dir, make_target(mesh, SAVE_SPECS))
        result["restore_plain"] = differences(restored, 9, SAVE_SPECS, mesh)

        # Only host-local and Python leaves: no target needed, each process gets them back.
        local_dir = os.path.join(args.directory, "local")
        handler.save(local_dir, {"rng": jax.random.key(7), "ids": np.arange(3), "tag": "t"})
        back = handler.restore(local_dir)
        result["restore_host_local"] = [
            jax.random.key_data(back["rng"]).tolist(),
            [str(d) for d in back["rng"].sharding.device_set] == [str(jax.local_devices()[0])],
            back["ids"].tolist(),
            back["tag"],
        ]

        try:
            handler.restore(steps_dir)
            result["restore_no_target"] = "no error"
        except ValueError as e:
            result["restore_no_target"] = f"{type(e).__name__}: {e}"

        differing = make_state(5, mesh, SAVE_SPECS)
        differing["local"] = jax.numpy.full((3,), pid, dtype=np.float32)  # host-local
        try:
            handler.save(steps_dir, differing, step=5, keep=2)
            result["mismatch"] = "no error"
        except ProcessMismatchError as e:
            result["mismatch"] = str(e)

        broken = make_state(5, mesh, SAVE_SPECS)
        if pid == 1:
            broken["bad"] = object()
        try:
            handler.save(steps_dir, broken, step=5, keep=2)
            result["one_fails"] = "no error"
        except (TypeError, CheckpointError) as e:
            result["one_fails"] = f"{type(e).__name__}: {e}"
        result["steps_after_errors"] = handler.get_checkpoint_steps(steps_dir)

        # Overwrite the latest step (only it can be), with another keep (Orbax's manager
        # is rebuilt with the new retention on every process).
        state = make_state(40, mesh, SAVE_SPECS)
        handler.save(steps_dir, state, step=4, overwrite=True, metadata={"step": 4})
        handler.wait_until_finished()
        restored = handler.restore(steps_dir, make_target(mesh, SAVE_SPECS), step=4)
        result["overwritten"] = differences(restored, 40)
        result["steps_after_overwrite"] = handler.get_checkpoint_steps(steps_dir)

        # Resuming from an earlier step: refused on every process, then a rollback.
        rolled_dir = os.path.join(args.directory, "rolled")
        for step in (1, 2, 3):
            handler.save(rolled_dir, make_state(step, mesh, SAVE_SPECS), step=step)
        try:
            handler.save(rolled_dir, make_state(2, mesh, SAVE_SPECS), step=2)
            result["step_order"] = "no error"
        except ValueError as e:
            result["step_order"] = f"{type(e).__name__}: {e}"
        result["rolled_back"] = handler.rollback(rolled_dir, 1)
        handler.save(rolled_dir, make_state(2, mesh, SAVE_SPECS), step=2)
        result["steps_after_rollback"] = handler.get_checkpoint_steps(rolled_dir)
        result["leftovers"] = leftovers(steps_dir) + leftovers(plain_dir)


def scenario_restore(args, result: dict) -> None:
    """Any topology: restores the save scenario's checkpoints onto RESTORE_SPECS."""
    from datarax_ckpt import OrbaxCheckpointHandler

    mesh = make_mesh(RESTORE_MESH)
    steps_dir = os.path.join(args.directory, "steps")
    with OrbaxCheckpointHandler() as handler:
        restored = handler.restore(steps_dir, make_target(mesh, RESTORE_SPECS))
        result["restore_latest"] = differences(restored, 40, RESTORE_SPECS, mesh)
        restored = handler.restore(steps_dir, make_target(mesh, RESTORE_SPECS), step=3)
        result["restore_step3"] = differences(restored, 3, RESTORE_SPECS, mesh)
        result["metadata"] = handler.restore(steps_dir, metadata_only=True)
        result["steps_after"] = handler.get_checkpoint_steps(steps_dir)
        result["leftovers"] = leftovers(steps_dir)
        single = os.path.join(args.directory, "single")
        if os.path.isdir(single):
            # Saved by one process (small leaves packed); restored onto global shardings.
            target = {
                "small": jax.ShapeDtypeStruct(
                    (4, 4), np.float32, sharding=NamedSharding(mesh, P("x"))
                ),
                "big": jax.ShapeDtypeStruct(
                    (256, 64), np.float32, sharding=NamedSharding(mesh, P(None, "x"))
                ),
            }
            restored = handler.restore(single, target)
            e = expected(11)
            result["restore_single"] = [
                name
                for name, value in (("small", e["w"][:4, :4]), ("big", np.tile(e["w"], (4, 2))))
                if not _same_bits(restored[name], value)
                or restored[name].sharding != target[name].sharding
            ]


def scenario_incremental(args, result: dict) -> None:
    """2 processes x 2 devices with incremental=True: saves in full, restores bit-exactly."""
    from datarax_ckpt import OrbaxCheckpointHandler

    mesh = make_mesh(SAVE_MESH)
    directory = os.path.join(args.directory, "incremental")
    frozen = make_state(1, mesh, SAVE_SPECS)["params"]["w"]  # the same array at every step
    with OrbaxCheckpointHandler(incremental=True) as handler:
        for step in range(1, 4):
            state = {**make_state(step, mesh, SAVE_SPECS), "frozen": frozen}
            handler.save(directory, state, step=step, keep=2)
        handler.wait_until_finished()
        result["steps"] = handler.get_checkpoint_steps(directory)
        target = make_target(mesh, SAVE_SPECS)
        target["frozen"] = target["params"]["w"]
        restored = handler.restore(directory, target, verify=True)
        result["frozen_same"] = _same_bits(restored.pop("frozen"), expected(1)["w"])
        result["restored"] = differences(restored, 3, SAVE_SPECS, mesh)
    with open(os.path.join(directory, "ckpt-3", "checksums", "metadata")) as f:
        records = json.load(f)["arrays"].values()
    result["linked"] = sorted(r["linked"] for r in records if "linked" in r)


SCENARIOS = {
    "save": scenario_save,
    "restore": scenario_restore,
    "incremental": scenario_incremental,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--directory", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test dumps stacks on a hang
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.devices)
    jax.distributed.initialize(
        args.coordinator, args.num_processes, args.process_id, initialization_timeout=60
    )
    result: dict = {}
    try:
        SCENARIOS[args.scenario](args, result)
    except BaseException:
        result["crashed"] = traceback.format_exc()
        traceback.print_exc()
    with open(os.path.join(args.out, f"result-{args.process_id}.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    return 1 if "crashed" in result else 0


if __name__ == "__main__":
    sys.exit(main())
