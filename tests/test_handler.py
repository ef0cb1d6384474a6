"""OrbaxCheckpointHandler: versioning, retention, metadata, overwrite, restore, targets, faults."""

import collections
import functools
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from _trees import assert_identical, cpu_mesh
from flax import nnx

from datarax_ckpt import (
    CheckpointExistsError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    OrbaxCheckpointHandler,
    StructureMismatchError,
    _snapshot,
    _writer_lock,
)

Pair = collections.namedtuple("Pair", "first second")
LOCK = _writer_lock.LOCK_NAME  # held by an open handler that saved to the directory


def make_state(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "params": {
            "w": jnp.asarray(rng.standard_normal((64, 32)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal(32), jnp.bfloat16),
        },
        "big": jnp.asarray(rng.standard_normal(400_000), jnp.float32),  # stored unpacked
        "step": int(seed),
        "rng": jax.random.key(seed),
        "run": f"run-{seed} ✓",
        "history": (1.5, None, [b"raw"]),
    }


def listing(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# ------------------------------------------------------------------ saving and layout


def test_save_returns_the_folder_and_restore_gets_exact_state(handler, tmp_path):
    state = make_state(3)
    assert handler.save(tmp_path, state, step=3) == str(tmp_path / "ckpt-3")
    assert handler.save(tmp_path, state) == str(tmp_path / "checkpoint")
    assert_identical(handler.restore(tmp_path), state)
    assert_identical(handler.restore(tmp_path, step=3), state)
    # The writer lock of this open handler (docs/reliability.md) sits beside the steps.
    assert sorted(os.listdir(tmp_path)) == [LOCK, "checkpoint", "ckpt-3"]


def test_unversioned_checkpoint_is_restored_when_there_are_no_steps(handler, tmp_path):
    handler.save(tmp_path, {"a": 1})
    assert handler.restore(tmp_path) == {"a": 1}
    assert handler.get_checkpoint_steps(tmp_path) == []
    assert handler.latest_step(tmp_path) is None


def test_keep_retention_with_async_saves_leaves_newest_and_no_temporaries(handler, tmp_path):
    handler.save(tmp_path, {"x": jnp.ones(3)})  # unversioned: never deleted by retention
    for step in range(1, 6):
        handler.save(tmp_path, make_state(step), step=step, keep=2)
    handler.wait_until_finished()
    assert handler.get_checkpoint_steps(tmp_path) == [4, 5]
    assert sorted(os.listdir(tmp_path)) == [LOCK, "checkpoint", "ckpt-4", "ckpt-5"]
    assert handler.list_checkpoints(tmp_path) == {
        4: str(tmp_path / "ckpt-4"),
        5: str(tmp_path / "ckpt-5"),
    }
    assert_identical(handler.restore(tmp_path, step=4), make_state(4))


def test_keep_none_keeps_everything(handler, tmp_path):
    for step in range(4):
        handler.save(tmp_path, {"s": step}, step=step)
    assert handler.get_checkpoint_steps(tmp_path) == [0, 1, 2, 3]
    assert handler.latest_step(tmp_path) == 3


def test_steps_are_managed_by_one_orbax_manager_per_directory(handler, tmp_path):
    handler.save(tmp_path / "a", {"s": 1}, step=1)
    handler.save(tmp_path / "b", {"s": 1}, step=1)
    handler.save(tmp_path / "a", {"s": 2}, step=2)
    handler.wait_until_finished()
    # Internals on purpose: which object writes the steps (Orbax's manager, one per
    # directory) is the design this test pins, and no public call shows it.
    managers = {k: d._manager for k, d in handler._directories.items()}
    assert len(managers) == 2
    assert all(isinstance(m, ocp.CheckpointManager) for m in managers.values())
    # A raw Orbax manager with the same name format sees our steps.
    from datarax_ckpt._orbax import NAME_FORMAT

    raw = ocp.CheckpointManager(
        tmp_path / "a", options=ocp.CheckpointManagerOptions(step_name_format=NAME_FORMAT)
    )
    assert list(raw.all_steps()) == [1, 2]
    raw.close()


def test_sync_mode_commits_before_returning(tmp_path):
    with OrbaxCheckpointHandler(async_save=False) as h:
        h.save(tmp_path, {"w": jnp.ones(4)}, step=0)
        assert (tmp_path / "ckpt-0").is_dir()
        assert not [p for p in os.listdir(tmp_path) if "tmp" in p]


def test_back_to_back_saves_all_commit(handler, tmp_path):
    states = [make_state(s) for s in range(6)]
    for step, state in enumerate(states):
        handler.save(tmp_path, state, step=step)
    for step, state in enumerate(states):
        assert_identical(handler.restore(tmp_path, step=step), state)


# ------------------------------------------------------------------ metadata


def test_metadata_is_separate_and_exact(handler, tmp_path):
    meta = {"lr": 3e-4, "epoch": 2, "name": "run", "ok": True, "none": None, "list": [1, "a"]}
    state = {"w": jnp.ones(2)}
    handler.save(tmp_path, state, step=1, metadata=meta)
    restored_meta = handler.restore(tmp_path, step=1, metadata_only=True)
    assert restored_meta == meta and type(restored_meta["epoch"]) is int
    assert_identical(handler.restore(tmp_path, step=1), state)  # not mixed into the state


def test_metadata_only_does_not_read_the_state(handler, tmp_path):
    handler.save(tmp_path, {"w": jnp.ones(100_000)}, step=1, metadata={"k": 1})
    handler.wait_until_finished()
    for child in (tmp_path / "ckpt-1" / "state").rglob("*"):
        if child.is_file():
            child.write_bytes(b"garbage")
    assert handler.restore(tmp_path, step=1, metadata_only=True) == {"k": 1}


def test_metadata_defaults_to_empty_dict(handler, tmp_path):
    handler.save(tmp_path, {"a": 1}, step=1)
    assert handler.restore(tmp_path, metadata_only=True) == {}


@pytest.mark.parametrize(
    "meta, error, match",
    [
        ({"a": object()}, TypeError, r"metadata\['a'\] is a object"),
        ({1: "x"}, TypeError, "JSON object keys must be str"),
        ({"t": (1, 2)}, TypeError, "use a list"),
        ({"x": np.ones(2)}, TypeError, r"metadata\['x'\] is a ndarray"),
        ([1], TypeError, "metadata must be a dict"),
    ],
)
def test_bad_metadata_is_rejected_before_disk(handler, tmp_path, meta, error, match):
    with pytest.raises(error, match=match):
        handler.save(tmp_path / "d", {"a": 1}, step=1, metadata=meta)
    assert not (tmp_path / "d").exists()


def test_metadata_takes_numpy_and_jax_scalars_and_non_finite_floats(handler, tmp_path):
    # A diverging run's loss must not crash the save that lets it be debugged.
    meta = {
        "loss": jnp.float32(float("nan")),
        "grad_norm": np.float64("inf"),
        "min": float("-inf"),
        "lr": np.float32(0.1),
        "step": np.int64(7),
        "ok": np.bool_(True),
        "acc": jnp.asarray(0.5, jnp.bfloat16),
    }
    handler.save(tmp_path, {"a": 1}, step=1, metadata=meta)
    back = handler.restore(tmp_path, metadata_only=True)
    assert [type(v) for v in back.values()] == [float, float, float, float, int, bool, float]
    assert np.isnan(back["loss"]) and back["grad_norm"] == float("inf") and back["min"] < 0
    assert back["lr"] == float(np.float32(0.1)) and back["step"] == 7 and back["acc"] == 0.5


# ------------------------------------------------------------------ overwrite


def test_existing_step_raises_and_changes_nothing(handler, tmp_path):
    handler.save(tmp_path, {"v": 1}, step=1)
    handler.save(tmp_path, {"v": 1})
    handler.wait_until_finished()
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    with pytest.raises(FileExistsError, match="overwrite=True"):
        handler.save(tmp_path, {"v": 2}, step=1)
    with pytest.raises(CheckpointExistsError):
        handler.save(tmp_path, {"v": 2})
    handler.wait_until_finished()
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_a_step_still_queued_counts_as_existing(handler, tmp_path):
    handler.save(tmp_path, make_state(), step=7)
    with pytest.raises(FileExistsError):
        handler.save(tmp_path, make_state(), step=7)


@pytest.mark.parametrize("step", [None, 4])
def test_overwrite_replaces(handler, tmp_path, step):
    handler.save(tmp_path, {"v": 1}, step=step)
    handler.save(tmp_path, {"v": 2, "s": "new"}, step=step, overwrite=True)
    assert handler.restore(tmp_path, step=step) == {"v": 2, "s": "new"}
    assert not [p for p in os.listdir(tmp_path) if "backup" in p or "tmp" in p]


@pytest.mark.parametrize("step", [None, 4])
def test_failed_overwrite_keeps_the_old_checkpoint(tmp_path, monkeypatch, step):
    with OrbaxCheckpointHandler() as h:
        h.save(tmp_path, {"v": 1}, step=step, metadata={"m": 1})
        h.wait_until_finished()

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "save", fail)
    monkeypatch.setattr(ocp.Checkpointer, "save", fail)
    h = OrbaxCheckpointHandler()
    h.save(tmp_path, {"v": 2}, step=step, overwrite=True)
    with pytest.raises(OSError, match="No space left"):
        h.wait_until_finished()
    assert h.restore(tmp_path, step=step) == {"v": 1}
    assert h.restore(tmp_path, step=step, metadata_only=True) == {"m": 1}
    assert not [p for p in os.listdir(tmp_path) if "backup" in p or "tmp" in p]
    h.close()


# ------------------------------------------------------------------ restore


def test_missing_step_lists_available_steps(handler, tmp_path):
    for step in (2, 5):
        handler.save(tmp_path, {"s": step}, step=step)
    with pytest.raises(FileNotFoundError, match=r"step 3 .*Available steps: \[2, 5\]"):
        handler.restore(tmp_path, step=3)


def test_missing_or_empty_directory_raises(handler, tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        handler.restore(tmp_path / "nope")
    assert not (tmp_path / "nope").exists()
    with pytest.raises(FileNotFoundError, match="No checkpoint in"):
        handler.restore(tmp_path)
    assert handler.get_checkpoint_steps(tmp_path / "nope") == []


def test_a_raw_orbax_folder_is_not_a_datarax_checkpoint(handler, tmp_path):
    from datarax_ckpt._orbax import NAME_FORMAT

    raw = ocp.CheckpointManager(
        tmp_path, options=ocp.CheckpointManagerOptions(step_name_format=NAME_FORMAT)
    )
    raw.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave({"a": np.ones(2)})))
    raw.close()
    with pytest.raises(CheckpointFormatError, match="not written by datarax_ckpt"):
        handler.restore(tmp_path, step=1)


def test_restore_into_pytree_target_keeps_structure_dtype_and_sharding(handler, tmp_path):
    state = {"opt": Pair(jnp.arange(8.0), None), "n": 3}
    handler.save(tmp_path, state, step=1)
    mesh = cpu_mesh((4,), ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    target = {"opt": Pair(jax.device_put(jnp.zeros(8, jnp.bfloat16), sharding), None), "n": 0}
    restored = handler.restore(tmp_path, target)
    assert isinstance(restored["opt"], Pair) and restored["n"] == 3
    assert restored["opt"].first.dtype == jnp.bfloat16
    assert restored["opt"].first.sharding == sharding
    np.testing.assert_array_equal(np.asarray(restored["opt"].first, np.float32), np.arange(8.0))


def test_sharded_arrays_round_trip(handler, tmp_path):
    mesh = cpu_mesh((2, 2), ("a", "b"))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a", "b"))
    x = jax.device_put(jnp.arange(64.0).reshape(8, 8), sharding)
    handler.save(tmp_path, {"x": x}, step=0)
    restored = handler.restore(tmp_path, {"x": x})["x"]
    assert restored.sharding == sharding
    np.testing.assert_array_equal(restored, x)


def test_wrong_target_raises_naming_the_path(handler, tmp_path):
    handler.save(tmp_path, {"w": jnp.ones(3)}, step=1)
    with pytest.raises(StructureMismatchError, match=r"\['w'\].*shape \(5,\)"):
        handler.restore(tmp_path, {"w": jnp.ones(5)})


class Iterator:
    """A data-pipeline iterator with get_state/set_state (the Checkpointable protocol)."""

    def __init__(self):
        self.position, self.epoch, self.seed_key = 0, 0, jax.random.key(0)

    def get_state(self):
        return {"position": self.position, "epoch": self.epoch, "key": self.seed_key}

    def set_state(self, state):
        self.position, self.epoch, self.seed_key = state["position"], state["epoch"], state["key"]


def test_checkpointable_target_gets_set_state(handler, tmp_path):
    it = Iterator()
    it.position, it.epoch, it.seed_key = 1234, 3, jax.random.key(9)
    handler.save(tmp_path, {"pipeline": it, "step": 10}, step=10)
    fresh = Iterator()
    restored = handler.restore(tmp_path, {"pipeline": fresh, "step": 0})
    assert restored["pipeline"] is fresh and restored["step"] == 10
    assert (fresh.position, fresh.epoch) == (1234, 3)
    assert (jax.random.key_data(fresh.seed_key) == jax.random.key_data(it.seed_key)).all()
    top = Iterator()
    assert handler.save(tmp_path, it, step=11)
    assert handler.restore(tmp_path, top, step=11) is top and top.position == 1234


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(4, 8, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        self.l2 = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.drop(nnx.relu(self.l1(x))))


def test_nnx_model_and_optimizer_are_updated_in_place(handler, tmp_path):
    model = MLP(nnx.Rngs(0, dropout=1))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    x = jnp.ones((3, 4))

    @nnx.jit
    def train_step(model, optimizer):
        grads = nnx.grad(lambda m: (m(x) ** 2).mean())(model)
        optimizer.update(model, grads)

    train_step(model, optimizer)
    handler.save(tmp_path, {"model": model, "optimizer": optimizer}, step=1)
    expected = nnx.state(model).to_pure_dict(), nnx.state(optimizer).to_pure_dict()

    fresh_model = MLP(nnx.Rngs(42, dropout=43))
    fresh_opt = nnx.Optimizer(fresh_model, optax.adam(1e-2), wrt=nnx.Param)
    out = handler.restore(tmp_path, {"model": fresh_model, "optimizer": fresh_opt})
    assert out["model"] is fresh_model and out["optimizer"] is fresh_opt
    assert_identical(nnx.state(fresh_model).to_pure_dict(), expected[0])
    assert_identical(nnx.state(fresh_opt).to_pure_dict(), expected[1])
    # Training continues identically.
    train_step(model, optimizer)
    train_step(fresh_model, fresh_opt)
    assert_identical(nnx.state(fresh_model).to_pure_dict(), nnx.state(model).to_pure_dict())


def test_optax_state_round_trips_with_its_types(handler, tmp_path):
    params = {"w": jnp.ones((3, 3)), "b": jnp.zeros(3)}
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    opt_state = tx.init(params)
    handler.save(tmp_path, opt_state, step=0)
    restored = handler.restore(tmp_path, tx.init(params))
    assert jax.tree.structure(restored) == jax.tree.structure(opt_state)
    assert_identical(restored, opt_state)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"step": -1}, ValueError, "step must be >= 0, got -1"),
        ({"step": 1.5}, TypeError, r"step must be None or an int >= 0, got 1.5 \(float\)"),
        ({"step": "3"}, TypeError, "step must be None or an int"),
        ({"step": True}, TypeError, "step must be None or an int"),
        ({"step": 1, "keep": 0}, ValueError, "keep must be >= 1"),
        ({"step": 1, "keep": -2}, ValueError, "keep must be >= 1"),
        ({"step": 1, "keep": 2.0}, TypeError, "keep must be None or an int"),
        ({"step": 1, "overwrite": "yes"}, TypeError, "overwrite must be a bool"),
    ],
)
def test_bad_arguments_raise_before_disk(handler, tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        handler.save(tmp_path / "d", {"a": jnp.ones(2)}, **kwargs)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("step", [np.int64(3), np.uint8(3), jnp.asarray(3)], ids=repr)
def test_integer_numpy_and_jax_scalars_are_steps(handler, tmp_path, step):
    # Training loops often hold the step as an array (e.g. an optimizer's step counter).
    assert handler.save(tmp_path, {"a": 1}, step=step) == str(tmp_path / "ckpt-3")
    assert handler.get_checkpoint_steps(tmp_path) == [3]
    assert handler.restore(tmp_path, step=step) == {"a": 1}


@pytest.mark.parametrize("step", [np.float32(3), jnp.asarray(True), jnp.arange(2)], ids=repr)
def test_non_integer_array_steps_are_refused(handler, tmp_path, step):
    with pytest.raises(TypeError, match="step must be None or an int"):
        handler.save(tmp_path / "d", {"a": 1}, step=step)
    assert not (tmp_path / "d").exists()


def test_unsupported_leaf_leaves_nothing_on_disk(handler, tmp_path):
    with pytest.raises(TypeError, match=r"Leaf \['model'\]\['act'\] has unsupported type"):
        handler.save(tmp_path / "d", {"model": {"act": object()}}, step=1)
    assert not (tmp_path / "d").exists()
    handler.save(tmp_path / "d", {"ok": 1}, step=1)  # the handler still works
    assert handler.get_checkpoint_steps(tmp_path / "d") == [1]


def test_directory_that_is_a_file(handler, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        handler.save(tmp_path / "f", {"a": 1}, step=1)


def test_rejected_save_does_not_hang_process_exit(tmp_path):
    code = textwrap.dedent(
        f"""
        import jax.numpy as jnp
        from datarax_ckpt import OrbaxCheckpointHandler
        h = OrbaxCheckpointHandler()
        h.save({str(tmp_path)!r}, {{"ok": jnp.ones(3)}}, step=1)
        try:
            h.save({str(tmp_path)!r}, {{"bad": object()}}, step=2)
        except TypeError:
            print("rejected")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "rejected" in out.stdout
    assert sorted(os.listdir(tmp_path)) == ["ckpt-1"]  # committed at exit, nothing else


def test_closed_handler_refuses_calls(tmp_path):
    h = OrbaxCheckpointHandler()
    h.close()
    h.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        h.save(tmp_path, {"a": 1}, step=1)


# ------------------------------------------------------------------ background errors


@pytest.mark.parametrize("surface", ["next_save", "next_listing", "wait_until_finished", "close"])
def test_background_write_errors_surface(tmp_path, monkeypatch, surface):
    real_save = ocp.CheckpointManager.save

    def failing_save(self, step, *args, **kwargs):
        if step == 2:
            raise OSError(5, "Input/output error (injected)")
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", failing_save)
    h = OrbaxCheckpointHandler()
    h.save(tmp_path, {"a": 1}, step=1)
    h.save(tmp_path, {"a": 2}, step=2)
    with pytest.raises(OSError, match="injected") as info:
        if surface == "next_save":
            # Internals on purpose: the failure must have happened before the next
            # save() for this case, and the public wait (wait_until_finished) would
            # itself surface it.
            for directory in h._directories.values():
                directory.drain()
            h.save(tmp_path, {"a": 3}, step=3)
        elif surface == "next_listing":
            h.get_checkpoint_steps(tmp_path)
        elif surface == "wait_until_finished":
            h.wait_until_finished()
        else:
            h.close()
    assert any("background save of" in note for note in info.value.__notes__)
    if surface != "close":
        h.wait_until_finished()  # reported once, then cleared
        assert h.get_checkpoint_steps(tmp_path) == [1]
        assert not [p for p in os.listdir(tmp_path) if "tmp" in p]
        h.close()


# ------------------------------------------------------------------ donation, crash, threads


@pytest.mark.parametrize("pinned", [True, False], ids=["pinned-views", "copied"])
def test_donating_saved_arrays_does_not_corrupt_the_checkpoint(
    handler, tmp_path, monkeypatch, pinned
):
    # The training loop of the JAX docs on donation: the state is donated to the next
    # step right after save() returns, while the write is still in flight. On CPU the
    # capture pins the arrays' buffers instead of copying them (views_pin_buffers); the
    # "copied" case is the fallback where jax would donate anyway.
    if pinned:
        assert _snapshot.views_pin_buffers()  # this jax: save() on CPU does not copy
    else:
        monkeypatch.setattr(_snapshot, "pinning_known", lambda: False)
    rng = np.random.default_rng(0)
    state = {
        "w": jnp.asarray(rng.standard_normal(300_000), jnp.float32),  # stored alone
        "b": jnp.asarray(rng.standard_normal(16), jnp.float32),  # packed
        "n": rng.standard_normal(16).astype(np.float32),  # numpy, packed with "b"
        "c": jnp.arange(8.0),  # packed after it
    }
    expected = jax.tree.map(np.array, state)

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(s):
        return jax.tree.map(lambda x: x * 0 - 7, s)

    handler.save(tmp_path, state, step=1)
    new_state = jax.block_until_ready(train_step({"w": state["w"]}))
    state["n"][:] = 0  # numpy leaves are the caller's to write to
    state["c"].delete()
    # Pinned: jax declines to donate a buffer the checkpoint holds; copied: it donates.
    assert state["w"].is_deleted() is not pinned
    assert (np.asarray(new_state["w"]) == -7).all()
    handler.wait_until_finished()
    restored = handler.restore(tmp_path, step=1)
    for k in expected:
        np.testing.assert_array_equal(restored[k], expected[k])
    # Once written, nothing is pinned: the arrays donate as usual.
    alive = {k: state[k] for k in ("w", "b") if not state[k].is_deleted()}
    jax.block_until_ready(train_step(alive))
    assert sorted(alive) == (["b", "w"] if pinned else ["b"])
    assert all(v.is_deleted() for v in alive.values())


def test_every_dtype_survives_deleting_the_state_right_after_save(handler, tmp_path):
    # Pinned captures take memoryviews (numpy dtypes) or numpy views (bfloat16, float8,
    # int4: no buffer export); either way deleting the arrays at once must not matter.
    assert _snapshot.views_pin_buffers()  # known now: this save pins, it does not copy
    rng = np.random.default_rng(1)
    dtypes = ["float32", "float16", "int8", "uint16", "int64", "bool", "complex64"]
    dtypes += ["bfloat16", "float8_e4m3fn", "int4"]
    state = {}
    for name in dtypes:
        values = rng.integers(-7, 8, size=(3, 5)) if "int" in name else rng.standard_normal(15)
        for shape in [(), (3, 5), (300, 700)]:  # 0-d, packed, stored alone
            size = math.prod(shape)
            data = np.resize(values, size).reshape(shape)
            state[f"{name}{shape}"] = jnp.asarray(data.astype(jnp.dtype(name)))
    expected = {k: np.asarray(v).copy() for k, v in state.items()}
    handler.save(tmp_path, state, step=1)
    for value in state.values():
        value.delete()
    restored = handler.restore(tmp_path, step=1)
    for k, value in expected.items():
        assert restored[k].dtype == value.dtype, k
        np.testing.assert_array_equal(np.asarray(restored[k]), value, err_msg=k)


def test_jitted_state_on_several_cpu_devices_survives_donation_right_after_save(handler, tmp_path):
    # A training loop's state comes out of jax.jit (every leaf has its own sharding
    # object), on more than one device, and is donated to the next step at once.
    assert _snapshot.views_pin_buffers()  # this save pins the single-device leaves
    cpu = jax.devices("cpu")
    sharded = jax.sharding.NamedSharding(cpu_mesh((4,), ("x",)), jax.sharding.PartitionSpec("x"))
    rng = np.random.default_rng(2)

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(params):
        return jax.tree.map(lambda x: x * 2, params)

    def jitted(n):
        fresh = {f"w{i}": np.float32(rng.standard_normal(64)) for i in range(n)}
        return train_step(jax.device_put(fresh, cpu[0]))

    state = {
        "params": jitted(4),
        "rng": jax.random.key(3),
        "sharded": jax.device_put(np.arange(16.0, dtype=np.float32), sharded),
        "head": jitted(2),
        "side": {f"v{i}": jax.device_put(np.float32(rng.standard_normal(8)), cpu[1]) for i in "ab"},
    }
    expected = {k: jax.tree.map(np.array, v) for k, v in state.items() if k != "rng"}
    shardings = jax.tree.map(lambda x: x.sharding, state)
    handler.save(tmp_path, state, step=1)
    for part in ("params", "head"):
        jax.block_until_ready(train_step(state[part]))
    for value in state["side"].values():
        value.delete()
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    restored = handler.restore(tmp_path, target, step=1)
    assert jax.tree.map(lambda x: x.sharding, restored) == shardings
    assert jax.random.key_impl(restored["rng"]) == jax.random.key_impl(state["rng"])
    np.testing.assert_array_equal(
        jax.random.key_data(restored["rng"]), jax.random.key_data(state["rng"])
    )
    for path, value in jax.tree_util.tree_leaves_with_path({k: restored[k] for k in expected}):
        want = functools.reduce(lambda node, key: node[key.key], path, expected)
        np.testing.assert_array_equal(np.asarray(value), want, err_msg=str(path))


def test_sigkill_during_async_save_keeps_previous_step(tmp_path):
    code = textwrap.dedent(
        f"""
        import os, signal
        import numpy as np, jax.numpy as jnp
        from datarax_ckpt import OrbaxCheckpointHandler
        h = OrbaxCheckpointHandler()
        h.save({str(tmp_path)!r}, {{"w": jnp.arange(10.0), "s": 1}}, step=1)
        h.wait_until_finished()
        big = jnp.asarray(np.random.default_rng(0).standard_normal(32_000_000), jnp.float32)
        h.save({str(tmp_path)!r}, {{"w": big, "s": 2}}, step=2)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert out.returncode == -signal.SIGKILL, out.stderr.decode()[-2000:]
    with OrbaxCheckpointHandler() as h:
        assert h.get_checkpoint_steps(tmp_path) == [1]
        restored = h.restore(tmp_path)
        assert restored["s"] == 1
        h.save(tmp_path, {"w": jnp.ones(2), "s": 2}, step=2)
        assert h.restore(tmp_path)["s"] == 2
    assert sorted(os.listdir(tmp_path)) == ["ckpt-1", "ckpt-2"]  # no stale temporaries


def test_many_threads_share_one_handler(handler, tmp_path):
    errors = []
    steps = iter(range(20))
    in_order = threading.Lock()  # steps must reach save() in increasing order

    def worker(index):
        try:
            for _ in range(5):
                with in_order:
                    step = next(steps)
                    state = {"v": jnp.full(8, step, jnp.int32), "s": step}
                    handler.save(tmp_path, state, step=step)
                restored = handler.restore(tmp_path, step=step)
                assert restored["s"] == step and int(restored["v"][0]) == step
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert handler.get_checkpoint_steps(tmp_path) == list(range(20))


# ------------------------------------------------------------------ backpressure


def test_skip_policy_drops_saves_when_the_queue_is_full(tmp_path, caplog, monkeypatch):
    # The real Orbax save, held until the three later saves have been issued: the queue
    # (one pending save allowed) is then full for each of them, whatever the machine's load.
    release = threading.Event()
    real_save = ocp.CheckpointManager.save

    def held_save(self, *args, **kwargs):
        assert release.wait(timeout=120), "the test never released the first write"
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", held_save)
    big = {"w": jnp.asarray(np.random.default_rng(1).standard_normal(1_000_000), jnp.float32)}
    with OrbaxCheckpointHandler(max_pending_saves=1, on_backpressure="skip") as h:
        results = [h.save(tmp_path, big, step=s) for s in range(4)]
        release.set()
        h.wait_until_finished()
        steps = h.get_checkpoint_steps(tmp_path)
        assert h.save(tmp_path, big, step=4) is not None  # room again once the write is done
    assert results[0] is not None and results[1:] == [None, None, None]
    assert steps == [0]
    assert sum("Skipped the save" in r.message for r in caplog.records) == 3


@pytest.mark.parametrize(
    ("options", "ocdbt"),
    [({}, True), ({"use_ocdbt": False}, False), ({"incremental": True}, False)],
)
def test_the_state_item_layout_follows_the_options(tmp_path, options, ocdbt):
    # OCDBT by default (Orbax's default: few files per step); one folder per stored array
    # when asked for, or with incremental saves (which hard-link those folders).
    with OrbaxCheckpointHandler(**options) as h:
        h.save(tmp_path, {"w": np.arange(1 << 18, dtype=np.float32)}, step=1)
    state = tmp_path / "ckpt-1" / "state"
    assert (state / "manifest.ocdbt").exists() == ocdbt
    per_array = [p.name for p in state.iterdir() if p.is_dir() and p.name in ("a0", "p0")]
    assert bool(per_array) != ocdbt
