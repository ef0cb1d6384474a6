"""Multi-process checkpointing: real localhost clusters launched through jax.distributed.

Each cluster runs tests/_multiprocess_worker.py in N processes (CPU devices, a free
port); every process records what it saw in a JSON file that the tests check. A
cluster that hangs is killed after ``CLUSTER_TIMEOUT_S`` and the test fails.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import _multiprocess_worker as worker
import jax
import numpy as np
import pytest
from _trees import cpu_mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from datarax_ckpt import OrbaxCheckpointHandler

WORKER = Path(__file__).with_name("_multiprocess_worker.py")
CLUSTER_TIMEOUT_S = int(os.environ.get("DATARAX_CKPT_CLUSTER_TIMEOUT_S", "150"))
GRACE_S = 10  # after one process fails, how long the others get before being killed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, num_processes: int, devices: int, directory: Path) -> list[dict]:
    """Runs one cluster to completion; returns each process's result, by process index."""
    out = directory.parent / f"{directory.name}-{scenario}-{num_processes}x{devices}"
    out.mkdir()
    coordinator = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
    procs, logs = [], []
    for i in range(num_processes):
        log = open(out / f"log-{i}.txt", "w")  # noqa: SIM115 - closed below
        logs.append(log)
        command = [sys.executable, str(WORKER), scenario, "--coordinator", coordinator]
        command += ["--num-processes", str(num_processes), "--process-id", str(i)]
        command += ["--devices", str(devices), "--directory", str(directory), "--out", str(out)]
        procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env))
    deadline, failed_at = time.monotonic() + CLUSTER_TIMEOUT_S, None
    try:
        for p in procs:
            while p.poll() is None:
                codes = [q.poll() for q in procs]
                if failed_at is None and any(c not in (None, 0) for c in codes):
                    failed_at = time.monotonic()
                now = time.monotonic()
                if now > deadline or (failed_at is not None and now > failed_at + GRACE_S):
                    break
                try:
                    p.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    pass
    finally:
        hung = [p for p in procs if p.poll() is None]
        for p in hung:
            p.send_signal(signal.SIGUSR1)  # the worker prints every thread's stack
        for p in hung:
            try:
                p.wait(timeout=2)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    codes = [p.returncode for p in procs]
    if any(codes):
        tails = "\n".join(
            f"--- process {i} (exit {c}):\n" + (out / f"log-{i}.txt").read_text()[-3000:]
            for i, c in enumerate(codes)
        )
        pytest.fail(f"{scenario} cluster {num_processes}x{devices} failed: {codes}\n{tails}")
    return [json.loads((out / f"result-{i}.json").read_text()) for i in range(num_processes)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Checkpoints written by 2 processes x 2 devices (and one by this single process)."""
    directory = tmp_path_factory.mktemp("multiprocess") / "ckpts"
    directory.mkdir()
    e = worker.expected(11)
    mesh = cpu_mesh((4,), ("x",))
    single = {
        "small": jax.numpy.asarray(e["w"][:4, :4]),  # packed
        "big": jax.device_put(np.tile(e["w"], (4, 2)), NamedSharding(mesh, P("x"))),
    }
    with OrbaxCheckpointHandler() as handler:
        handler.save(directory / "single", single)
    return directory, launch("save", 2, 2, directory)


def test_every_process_sees_retention_listing_and_metadata(saved):
    _, results = saved
    for r in results:
        assert r["steps"] == [3, 4]
        assert r["latest"] == 4
        assert r["listed"] == ["ckpt-3", "ckpt-4"]
        assert r["metadata"] == {"step": 4}
        assert r["verify"] == {"ok": True, "problems": []}


def test_restore_onto_another_mesh_in_the_saving_cluster_is_bit_exact(saved):
    _, results = saved
    for r in results:
        assert r["restore_resharded"] == []
        assert r["restore_plain"] == []  # the unversioned checkpoint, saved concurrently


def test_overwrite_replaces_the_step_and_leaves_no_backup(saved):
    directory, results = saved
    for r in results:
        assert r["overwritten"] == []
        assert r["steps_after_overwrite"] == [3, 4]
        assert r["leftovers"] == []
    assert sorted(os.listdir(directory / "steps")) == ["ckpt-3", "ckpt-4"]


def test_a_save_below_a_newer_step_is_refused_everywhere_and_rollback_is_collective(saved):
    _, results = saved
    for r in results:
        assert r["step_order"].startswith("StepOrderError: Cannot save step 2 to ")
        assert "newer steps [3]" in r["step_order"]
        assert r["rolled_back"] == [2, 3]
        assert r["steps_after_rollback"] == [1, 2]


def test_host_local_values_that_differ_between_processes_are_refused_everywhere(saved):
    _, results = saved
    for r in results:
        assert "process 1: differs from process 0 at ['local']" in r["mismatch"]
        assert "must be equal on every process" in r["mismatch"]
        assert r["steps_after_errors"] == [3, 4]


def test_a_save_that_fails_on_one_process_fails_on_all(saved):
    _, results = saved
    assert results[0]["one_fails"].startswith("CheckpointError: Process 1 failed")
    assert "Leaf ['bad'] has unsupported type" in results[0]["one_fails"]
    assert results[1]["one_fails"].startswith("TypeError: Leaf ['bad']")


def test_host_local_leaves_restore_on_every_process_without_target(saved):
    _, results = saved
    key = jax.random.key_data(jax.random.key(7)).tolist()
    for r in results:
        assert r["restore_host_local"] == [key, True, [0, 1, 2], "t"]


def test_restore_without_target_names_the_sharded_leaf(saved):
    _, results = saved
    for r in results:
        assert r["restore_no_target"].startswith(
            "StructureMismatchError: Leaf ['params']['w'] was saved as a jax.Array"
        )
        assert "NamedSharding to restore onto" in r["restore_no_target"]


def test_restore_on_one_process_with_four_devices_is_bit_exact(saved):
    directory, _ = saved
    mesh = worker.make_mesh(worker.RESTORE_MESH)
    with OrbaxCheckpointHandler() as handler:
        target = worker.make_target(mesh, worker.RESTORE_SPECS)
        restored = handler.restore(directory / "steps", target)
        assert worker.differences(restored, 40, worker.RESTORE_SPECS, mesh) == []
        # In one process no target is needed: arrays come back on one device.
        plain = handler.restore(directory / "steps", step=3)
    assert plain["params"]["w"].sharding.device_set == {jax.local_devices()[0]}
    np.testing.assert_array_equal(plain["params"]["w"], worker.expected(3)["w"])
    assert plain["name"] == "run-a"


def test_restore_on_four_processes_reads_past_crash_debris_the_next_writer_cleans(saved, tmp_path):
    directory, _ = saved
    copy = tmp_path / "ckpts"
    shutil.copytree(directory, copy)
    # A crash between moving ckpt-4 aside and committing its replacement, and a save of
    # step 5 killed while writing (Orbax's temporary folder, never committed).
    (copy / "steps" / "ckpt-4").rename(copy / "steps" / "ckpt-4.datarax-backup")
    shutil.copytree(copy / "steps" / "ckpt-3", copy / "steps" / "ckpt-5.orbax-checkpoint-tmp")
    (copy / "steps" / "ckpt-5.orbax-checkpoint-tmp" / "commit_success.txt").unlink()
    results = launch("restore", 4, 1, copy)
    for r in results:
        assert r["restore_latest"] == []
        assert r["restore_step3"] == []
        assert r["restore_single"] == []  # saved by one process, packed, now resharded
        assert r["metadata"] == {"step": 4}
        assert r["steps_after"] == [3, 4]  # step 4 is read from its backup
        # Readers change nothing (docs/reliability.md): the debris is the writer's.
        assert r["leftovers"] == ["ckpt-4.datarax-backup", "ckpt-5.orbax-checkpoint-tmp"]
    with OrbaxCheckpointHandler() as handler:  # the next writer puts ckpt-4 back, cleans up
        handler.save(copy / "steps", {"x": 1}, step=6)
    assert sorted(os.listdir(copy / "steps")) == ["ckpt-3", "ckpt-4", "ckpt-6"]


def test_the_example_in_the_docs_runs(tmp_path):
    command = "python examples/multihost.py --num-processes 2"
    root = Path(__file__).resolve().parent.parent
    assert command in (root / "docs" / "multihost.md").read_text()
    args = command.split()[1:] + ["--size-mib", "8", "--repeats", "1"]
    args += ["--directory", str(tmp_path / "ckpts"), "--timeout", str(CLUSTER_TIMEOUT_S)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    out = subprocess.run(
        [sys.executable, *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=CLUSTER_TIMEOUT_S + 30,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for i in range(2):
        assert f"[process {i}] restored bit-exactly onto P(None, 'x'): True" in out.stdout
    assert '"processes": 2, "devices": 4' in out.stdout


def _diagnosis(change) -> str:
    """The mismatch message for two processes whose states differ by ``change``."""
    from datarax_ckpt import _multihost, serialization

    def state():
        return {
            "name": "run",
            "step": 1,
            "nested": [np.zeros(2), (None, jax.numpy.ones(3))],
            "big": np.arange(2**18, dtype=np.float32),  # stored on its own, not packed
        }

    payloads = []
    for s in (state(), change(state())):
        arrays, manifest = serialization.serialize(s)
        payloads.append({"call": "same", **_multihost.leaf_digests(arrays, manifest)})
    return str(_multihost._mismatch_error("ckpts", payloads))


@pytest.mark.parametrize(
    "change, where",
    [
        (lambda s: {**s, "name": "other"}, "['name']"),
        (lambda s: {**s, "step": 2}, "['step']"),
        (lambda s: {**s, "nested": [np.ones(2), s["nested"][1]]}, "['nested'][0]"),
        (
            lambda s: {**s, "nested": [s["nested"][0], (None, jax.numpy.zeros(3))]},
            "['nested'][1][1]",
        ),
        (lambda s: {**s, "big": s["big"] + 1}, "['big']"),
        (lambda s: {**s, "extra": 0}, "['extra']"),
        (lambda s: {**s, "nested": tuple(s["nested"])}, "['nested']"),
    ],
)
def test_mismatch_error_names_the_leaf_that_differs(change, where):
    message = _diagnosis(change)
    assert f"process 1: differs from process 0 at {where})" in message
    assert "must be equal on every process" in message
