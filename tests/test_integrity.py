"""Checksums, verify, restore(verify=True) and fallback to the newest intact step."""

import doctest
import json
import logging
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import xxhash
from _damage import DAMAGE, KIND, PACK_THRESHOLD, make_state
from _trees import assert_identical, cpu_mesh
from jax.sharding import NamedSharding, PartitionSpec

from datarax_ckpt import (
    CheckpointCorruptedError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    OrbaxCheckpointHandler,
    VerifyReport,
    _integrity,
    _structure,
    _writer_lock,
)


@pytest.fixture
def handler():
    with OrbaxCheckpointHandler(pack_threshold_bytes=PACK_THRESHOLD) as h:
        yield h


@pytest.fixture
def two_steps(handler, tmp_path):
    """Steps 1 and 2 of different states; returns ``(directory, {step: state})``."""
    states = {1: make_state(1), 2: make_state(2)}
    for step, state in states.items():
        handler.save(tmp_path, state, step=step, metadata={"epoch": step})
    handler.wait_until_finished()
    return tmp_path, states


def assert_bit_exact(restored, state):
    assert restored.keys() == state.keys()
    for key, value in state.items():
        got = restored[key]
        if isinstance(value, jax.Array) and jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
            value, got = jax.random.key_data(value), jax.random.key_data(got)
        if isinstance(value, jax.Array):
            assert got.dtype == value.dtype and got.shape == value.shape
            assert np.asarray(got).tobytes() == np.asarray(value).tobytes()
        else:
            assert got == value and type(got) is type(value)


def test_every_save_records_xxh3_of_what_orbax_stores(two_steps):
    directory, states = two_steps
    record = json.loads((directory / "ckpt-2" / "checksums" / "metadata").read_text())
    manifest = json.loads((directory / "ckpt-2" / "manifest" / "metadata").read_text())
    key_of_w = manifest["slots"][manifest["tree"]["c"][0]["s"]]["key"]
    expected = xxhash.xxh3_64_hexdigest(np.asarray(states[2]["w"]).tobytes())
    assert record["algorithm"] == "xxh3_64"
    assert record["arrays"][key_of_w] == {
        "xxh3_64": expected,
        "nbytes": 4096,
        "dtype": "float32",
        "shape": [1024],
    }
    # packed buffers (holding the string and the key data) are covered too
    stored = {p["key"] for p in manifest["packs"]} | {key_of_w}
    assert set(record["arrays"]) == stored
    assert set(record["items"]) == {"manifest", "metadata"}


def test_checksums_are_computed_off_the_callers_thread(tmp_path, monkeypatch):
    threads = []
    compute = _integrity.compute

    def spy(*args):
        threads.append(threading.current_thread())
        return compute(*args)

    monkeypatch.setattr(_integrity, "compute", spy)
    with OrbaxCheckpointHandler() as handler:
        handler.save(tmp_path, make_state(0), step=0)
    assert threads and threads[0] is not threading.current_thread()


def test_a_failure_while_hashing_is_raised_and_the_step_still_restores(tmp_path, monkeypatch):
    # Hashing runs in the checksums item's commit future, beside Orbax's array writes.
    # If it fails, the step commits without checksums (its data is complete), older
    # steps are kept, and the error surfaces on the next call.
    state = make_state(2)
    with OrbaxCheckpointHandler() as handler:
        handler.save(tmp_path, make_state(1), step=1)
        handler.wait_until_finished()

        def broken(*args):
            raise RuntimeError("hashing failed")

        monkeypatch.setattr(_integrity, "compute", broken)
        handler.save(tmp_path, state, step=2, keep=2)
        with pytest.raises(CheckpointError, match="committed without content checksums") as e:
            handler.wait_until_finished()
        assert isinstance(e.value.__cause__, RuntimeError)
        assert sorted(os.listdir(tmp_path)) == [_writer_lock.LOCK_NAME, "ckpt-1", "ckpt-2"]
        report = handler.verify(tmp_path, step=2)
        assert report.ok and not report.checksums_recorded
        assert_identical(handler.restore(tmp_path, state, step=2), state)
        monkeypatch.undo()
        handler.save(tmp_path, make_state(3), step=3, keep=2)
        handler.wait_until_finished()
        assert handler.get_checkpoint_steps(tmp_path) == [2, 3]
        assert handler.verify(tmp_path, step=3).ok


def test_an_intact_checkpoint_verifies(handler, two_steps):
    directory, _ = two_steps
    report = handler.verify(directory)
    assert isinstance(report, VerifyReport)
    assert report.ok and report.step == 2 and report.checksums_recorded and report.full
    assert report.arrays_checked >= 2 and report.bytes_checked > 4096
    assert report.files_checked > 5
    assert handler.verify(directory, step=1).ok


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damage_is_detected_and_fallback_restores_the_previous_step(
    handler, two_steps, damage, caplog
):
    directory, states = two_steps
    damaged = DAMAGE[damage](directory / "ckpt-2")
    name = damaged.name

    report = handler.verify(directory, step=2)
    assert not report.ok
    assert [p.kind for p in report.problems] == [KIND[damage]]
    assert name in str(report.problems[0])
    if damage != "uncommit":
        assert report.problems[0].leaves == ("['w']",)
    assert handler.verify(directory, step=1).ok

    with pytest.raises(CheckpointCorruptedError, match=name) as info:
        handler.restore(directory, step=2, verify=True)
    if damage != "uncommit":
        assert "['w']" in str(info.value)
    assert isinstance(info.value, CheckpointFormatError | CheckpointError)
    assert not info.value.report.ok

    with pytest.raises(CheckpointCorruptedError, match=name):
        handler.restore(directory, fallback=False)

    with caplog.at_level(logging.WARNING, logger="datarax_ckpt"):
        restored = handler.restore(directory)
    assert_bit_exact(restored, states[1])
    warnings = "\n".join(r.getMessage() for r in caplog.records)
    assert "step 2" in warnings and name in warnings and "Restored step 1" in warnings


def test_a_byte_flip_is_caught_only_by_checksums(handler, two_steps):
    """Orbax itself returns the flipped data: without the checksum it would go unnoticed."""
    directory, states = two_steps
    DAMAGE["flip"](directory / "ckpt-2")
    unchecked = handler.restore(directory, step=2, verify=False)
    assert not np.array_equal(np.asarray(unchecked["w"]), np.asarray(states[2]["w"]))
    with pytest.raises(CheckpointCorruptedError, match="checksum mismatch"):
        handler.restore(directory, step=2)  # verify_on_restore is on by default


def test_damage_inside_a_packed_buffer_names_the_exact_leaf(tmp_path):
    a = np.zeros(300, np.float32)
    b = np.arange(300, dtype=np.float32) + 0.5
    state = {"a": jnp.asarray(a), "b": jnp.asarray(b), "c": jnp.ones(300)}  # one 3.6 KB pack
    handler = OrbaxCheckpointHandler()  # default threshold: all three leaves packed
    handler.save(tmp_path, state, step=1)
    handler.wait_until_finished()
    files = [p for p in (tmp_path / "ckpt-1" / "state").rglob("*") if p.is_file()]
    for path in files:
        raw = bytearray(path.read_bytes())
        at = raw.find(b.tobytes())
        if at >= 0:
            raw[at + 400] ^= 0x10  # inside the bytes of "b" only
            path.write_bytes(bytes(raw))
            break
    else:
        raise AssertionError("the bytes of 'b' were not found on disk")
    report = handler.verify(tmp_path)
    handler.close()
    assert [(p.kind, p.key, p.leaves) for p in report.problems] == [
        ("checksum_mismatch", "p0", ("['b']",))
    ]


# After a failed read, a TensorStore callback reaches Orbax's already closed asyncio loop
# ("Event loop is closed", printed by the interpreter): Orbax's noise, not ours.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_errors_orbax_raises_on_damaged_files_become_corruption_errors(tmp_path):
    """Without OCDBT each array is a plain zarr file; TensorStore itself fails to read it."""
    states = {1: make_state(1), 2: make_state(2)}
    with OrbaxCheckpointHandler(use_ocdbt=False, pack_threshold_bytes=PACK_THRESHOLD) as handler:
        for step, state in states.items():
            handler.save(tmp_path, state, step=step)
        handler.wait_until_finished()
        chunks = [p for p in (tmp_path / "ckpt-2" / "state").glob("a*/0")]
        assert len(chunks) == 1  # the chunk of "w"
        os.truncate(chunks[0], 100)
        with pytest.raises(CheckpointCorruptedError, match=r"Orbax could not read.*\['w'\]"):
            handler.restore(tmp_path, step=2, verify=False)
        report = handler.verify(tmp_path)
        assert [(p.kind, p.leaves) for p in report.problems] == [("unreadable_array", ("['w']",))]
        assert_bit_exact(handler.restore(tmp_path), states[1])


def test_a_changed_python_scalar_in_the_manifest_is_detected(handler, two_steps):
    directory, _ = two_steps
    path = directory / "ckpt-2" / "manifest" / "metadata"
    manifest = json.loads(path.read_text())
    node = manifest["tree"]["c"][manifest["tree"]["k"].index("step")]
    node["v"] = 7  # still valid JSON, still a valid manifest: only the checksum can tell
    path.write_text(json.dumps(manifest))
    report = handler.verify(directory, step=2)
    assert [(p.kind, p.file) for p in report.problems] == [
        ("checksum_mismatch", "manifest/metadata")
    ]
    with pytest.raises(CheckpointCorruptedError, match="manifest"):
        handler.restore(directory, step=2)
    assert handler.restore(directory)["step"] == 1


def test_changed_metadata_is_detected_by_metadata_only_restore(handler, two_steps):
    directory, _ = two_steps
    (directory / "ckpt-2" / "metadata" / "metadata").write_text('{"epoch": 3}')
    with pytest.raises(CheckpointCorruptedError, match="metadata"):
        handler.restore(directory, step=2, metadata_only=True)
    assert handler.restore(directory, metadata_only=True) == {"epoch": 1}


def test_every_step_corrupt_raises_naming_them(handler, two_steps):
    directory, _ = two_steps
    DAMAGE["truncate"](directory / "ckpt-1")
    DAMAGE["delete"](directory / "ckpt-2")
    with pytest.raises(CheckpointCorruptedError, match=r"Every step .*\(\[1, 2\]\)"):
        handler.restore(directory)


def test_checkpoints_without_checksums_restore_and_say_so(tmp_path):
    state = make_state(3)
    with OrbaxCheckpointHandler(checksums=False) as old:
        old.save(tmp_path, state, step=3)
    assert not (tmp_path / "ckpt-3" / "checksums").exists()
    with OrbaxCheckpointHandler() as handler:
        assert_bit_exact(handler.restore(tmp_path, verify=True), state)
        report = handler.verify(tmp_path)
    assert report.ok and not report.checksums_recorded
    assert "no checksums recorded" in " ".join(report.notes)


def test_unversioned_checkpoint_is_verified_and_checked(handler, tmp_path):
    state = make_state(4)
    handler.save(tmp_path, state)
    handler.wait_until_finished()
    assert handler.verify(tmp_path).ok
    DAMAGE["flip"](tmp_path / "checkpoint")
    assert not handler.verify(tmp_path).ok
    with pytest.raises(CheckpointCorruptedError, match=r"\['w'\]"):
        handler.restore(tmp_path)


def test_verify_of_a_missing_step_lists_the_steps(handler, two_steps):
    directory, _ = two_steps
    with pytest.raises(CheckpointNotFoundError, match=r"step 5 .* \[1, 2\]"):
        handler.verify(directory, step=5)


def test_verified_restore_keeps_target_sharding_and_dtype(handler, tmp_path):
    mesh = cpu_mesh((4,), ("x",))
    sharding = NamedSharding(mesh, PartitionSpec("x"))
    w = jax.device_put(jnp.arange(4096, dtype=jnp.float32), sharding)
    handler.save(tmp_path, {"w": w, "v": jnp.arange(4096.0)}, step=1)
    target = {"w": w, "v": jnp.zeros(4096, jnp.bfloat16)}
    restored = handler.restore(tmp_path, target, verify=True)
    assert restored["w"].sharding == sharding
    assert np.array_equal(restored["w"], w)
    assert restored["v"].dtype == jnp.bfloat16
    assert np.array_equal(restored["v"], jnp.arange(4096.0).astype(jnp.bfloat16))


def test_leaf_table_lists_packed_leaves_one_by_one(two_steps):
    directory, _ = two_steps
    manifest = json.loads((directory / "ckpt-1" / "manifest" / "metadata").read_text())
    leaves = {leaf.path: leaf for leaf in _structure.leaf_table(manifest)}
    assert set(leaves) == {"['w']", "['b']", "['rng']", "['name']", "['step']"}
    assert (leaves["['b']"].dtype, leaves["['b']"].shape, leaves["['b']"].nbytes) == (
        "bfloat16",
        (8,),
        16,
    )
    assert leaves["['b']"].stored.startswith("p")  # packed, still one logical leaf
    assert (leaves["['rng']"].kind, leaves["['rng']"].dtype) == ("key", "key<threefry2x32>")
    assert (leaves["['name']"].kind, leaves["['name']"].nbytes) == ("str", 5)
    assert (leaves["['step']"].kind, leaves["['step']"].value) == ("int", 1)


def test_docstring_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = doctest.testmod(_integrity, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_verified_restore_hashes_each_array_as_its_read_completes(handler, tmp_path, monkeypatch):
    # Hashing overlaps the remaining reads: every array read whole is handed to the
    # hashing threads from inside the read, and hashed exactly once.
    from datarax_ckpt import _orbax

    rng = np.random.default_rng(3)
    state = {f"w{i}": jnp.asarray(rng.standard_normal(300_000), jnp.float32) for i in range(3)}
    state["small"] = [jnp.asarray(rng.standard_normal(8), jnp.float32) for _ in range(4)]
    handler.save(tmp_path, state, step=1)
    events = []
    real_read, real_on_read, real_compare = _orbax.read, _orbax.on_read, _integrity._compare

    def read(*args, **kwargs):
        out = real_read(*args, **kwargs)
        events.append("read done")
        return out

    def on_read(callback):
        return real_on_read(lambda key, value: (events.append(f"read {key}"), callback(key, value)))

    def compare(key, *args):
        events.append(f"hash {key}")
        return real_compare(key, *args)

    monkeypatch.setattr(_orbax, "read", read)
    monkeypatch.setattr(_orbax, "on_read", on_read)
    monkeypatch.setattr(_integrity, "_compare", compare)
    restored = handler.restore(tmp_path, verify=True)
    assert_identical(restored, state)
    reads = [e for e in events[: events.index("read done")] if e.startswith("read ")]
    hashes = sorted(e.split()[1] for e in events if e.startswith("hash "))
    assert len(reads) == 4  # three leaves stored alone and one pack
    assert hashes == sorted(e.split()[1] for e in reads)
