"""Incremental saves: unchanged arrays are hard-linked from the previous step, not written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _fault_child import make_incremental_state, read_progress
from _trees import assert_identical
from test_kill import LEAVE_DEBRIS, Zygote, _leftovers

from datarax_ckpt import (
    CheckpointCorruptedError,
    CheckpointOptions,
    IncrementalUnsupportedError,
    OrbaxCheckpointHandler,
)

SCRIPT = Path(sys.executable).with_name("datarax-ckpt")


def finetune_state(step: int, base: dict) -> dict:
    """A frozen base (the same arrays every step) and a small trainable head + moments."""
    rng = np.random.default_rng(step)
    head = rng.standard_normal((256, 1024), dtype=np.float32)  # 1 MiB: packed
    return {
        "base": base,
        "head": jnp.asarray(head),
        "opt": {"mu": jnp.asarray(head * 0.1), "nu": jnp.asarray(head**2), "count": step},
        "bias": jnp.full(8, step, jnp.float32),  # packed with other small leaves
    }


def make_base() -> dict:
    rng = np.random.default_rng(99)
    return {
        "w1": jnp.asarray(rng.standard_normal((512, 1024), dtype=np.float32)),
        "w2": jnp.asarray(rng.standard_normal((1024, 512)).astype(jnp.bfloat16)),
    }


def files(folder: Path) -> dict[str, os.stat_result]:
    """``{relative path: stat}`` of every file under ``folder``."""
    return {str(p.relative_to(folder)): p.stat() for p in folder.rglob("*") if p.is_file()}


def records(folder: Path) -> dict[str, dict]:
    return json.loads((folder / "checksums" / "metadata").read_text())["arrays"]


def unique_bytes(directory: Path) -> int:
    """Bytes on disk under ``directory``, each hard-linked file counted once (as du)."""
    seen = {}
    for path in directory.rglob("*"):
        if path.is_file():
            st = path.stat()
            seen[(st.st_dev, st.st_ino)] = st.st_size
    return sum(seen.values())


def test_unchanged_arrays_are_hard_links_to_the_previous_step(tmp_path):
    base = make_base()
    with OrbaxCheckpointHandler(incremental=True) as handler:
        for step in range(3):
            handler.save(tmp_path, finetune_state(step, base), step=step)
        handler.wait_until_finished()
        for step in range(3):
            assert_identical(handler.restore(tmp_path, step=step), finetune_state(step, base))
    first, last = files(tmp_path / "ckpt-0"), files(tmp_path / "ckpt-2")
    linked = {k for k, r in records(tmp_path / "ckpt-2").items() if r.get("linked") == "ckpt-1"}
    assert len(linked) == 2  # the two base arrays; head, moments and the pack are new
    for rel, st in last.items():
        key = rel.split("/")[1] if rel.startswith("state/") else None
        shared = rel in first and first[rel].st_ino == st.st_ino
        assert shared == (key in linked), rel
    assert "linked" not in json.dumps(records(tmp_path / "ckpt-0"))


def test_retention_keeps_linked_data_alive_and_leaves_nothing_unreferenced(tmp_path):
    """20 steps with keep=2: the surviving steps restore bit-exactly, and the directory
    holds exactly the files they name: one base, two heads (no orphan, no trash)."""
    base = make_base()
    with OrbaxCheckpointHandler(incremental=True) as handler:
        for step in range(20):
            # The base is re-created every step (equal content, new objects): linked by
            # checksum, not by identity.
            fresh = jax.tree.map(lambda x: jnp.array(x, copy=True), base)
            handler.save(tmp_path, finetune_state(step, fresh), step=step, keep=2)
        handler.wait_until_finished()
        assert handler.get_checkpoint_steps(tmp_path) == [18, 19]
        for step in (18, 19):
            assert_identical(handler.restore(tmp_path, step=step), finetune_state(step, base))
            assert handler.verify(tmp_path, step=step).ok
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-18", "ckpt-19"]
    # Every file's link count is the number of names it has in these two steps: no other
    # name (an old step, the trash) keeps any data alive.
    names: dict[int, int] = {}
    for folder in ("ckpt-18", "ckpt-19"):
        for st in files(tmp_path / folder).values():
            names[st.st_ino] = names.get(st.st_ino, 0) + 1
    for folder in ("ckpt-18", "ckpt-19"):
        for rel, st in files(tmp_path / folder).items():
            assert st.st_nlink == names[st.st_ino], rel
    # The base is stored once: the directory's bytes are the two steps' less what they share.
    old, new = files(tmp_path / "ckpt-18"), files(tmp_path / "ckpt-19")
    shared = {st.st_ino: st.st_size for st in new.values()} | {}
    shared = sum(size for ino, size in shared.items() if ino in {st.st_ino for st in old.values()})
    assert shared >= sum(x.nbytes for x in base.values())
    total = unique_bytes(tmp_path / "ckpt-18") + unique_bytes(tmp_path / "ckpt-19") - shared
    assert unique_bytes(tmp_path) == total


def test_abstract_and_partial_restores_read_linked_arrays(tmp_path):
    base = make_base()
    with OrbaxCheckpointHandler(incremental=True) as handler:
        for step in range(2):
            handler.save(tmp_path, finetune_state(step, base), step=step)
        expected = finetune_state(1, base)

        def like(x):
            return jax.ShapeDtypeStruct(x.shape, x.dtype)

        abstract = {
            "base": {k: like(v) for k, v in base.items()},
            "head": like(expected["head"]),
            "opt": {"mu": like(expected["head"]), "nu": like(expected["head"]), "count": 0},
            "bias": like(expected["bias"]),
        }
        assert_identical(handler.restore(tmp_path, abstract), expected)
        partial = handler.restore(tmp_path, {"base": abstract["base"]}, partial=True)
        assert_identical(partial, {"base": base})


def test_verify_and_restore_detect_damage_in_linked_data(tmp_path):
    base = make_base()
    with OrbaxCheckpointHandler(incremental=True) as handler:
        for step in range(2):
            handler.save(tmp_path, finetune_state(step, base), step=step)
        handler.wait_until_finished()
    linked = [k for k, r in records(tmp_path / "ckpt-1").items() if "linked" in r]
    chunk = next((tmp_path / "ckpt-0" / "state" / linked[0]).glob("0*"))
    with open(chunk, "r+b") as f:  # the file both steps name
        f.seek(100)
        f.write(b"\xff" * 8)
    with OrbaxCheckpointHandler(incremental=True) as handler:
        report = handler.verify(tmp_path, step=1)
        assert not report.ok
        assert {p.key for p in report.problems} == {linked[0]}
        assert {p.kind for p in report.problems} == {"checksum_mismatch"}
        with pytest.raises(CheckpointCorruptedError, match="checksum mismatch"):
            handler.restore(tmp_path, step=1)


def test_restore_falls_back_past_a_damaged_newest_step(tmp_path):
    base = make_base()
    with OrbaxCheckpointHandler(incremental=True) as handler:
        for step in range(3):
            handler.save(tmp_path, finetune_state(step, base), step=step)
        handler.wait_until_finished()
    new = [k for k, r in records(tmp_path / "ckpt-2").items() if "linked" not in r]
    chunk = max((tmp_path / "ckpt-2" / "state").glob(f"{new[0]}/0*"))
    chunk.write_bytes(b"\0" * chunk.stat().st_size)  # only step 2 names this file
    with OrbaxCheckpointHandler(incremental=True) as handler:
        assert_identical(handler.restore(tmp_path), finetune_state(1, base))
        assert handler.verify(tmp_path, step=1).ok


def test_an_overwrite_links_from_the_step_it_replaces(tmp_path):
    base = make_base()
    with OrbaxCheckpointHandler(incremental=True) as handler:
        handler.save(tmp_path, finetune_state(0, base), step=5)
        handler.save(tmp_path, finetune_state(1, base), step=5, overwrite=True)
        handler.wait_until_finished()
        assert_identical(handler.restore(tmp_path, step=5), finetune_state(1, base))
        assert handler.verify(tmp_path, step=5).ok
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-5"]  # no backup left
    linked = {r.get("linked") for r in records(tmp_path / "ckpt-5").values()}
    assert linked == {None, "ckpt-5"}


def test_a_restarted_writer_links_by_checksum_from_disk(tmp_path):
    base = make_base()
    with OrbaxCheckpointHandler(incremental=True) as handler:
        handler.save(tmp_path, finetune_state(0, base), step=0)
    code = (
        "import sys, jax.numpy as jnp, numpy as np\n"
        "sys.path.insert(0, sys.argv[2])\n"
        "from test_incremental import finetune_state, make_base\n"
        "from datarax_ckpt import OrbaxCheckpointHandler\n"
        "with OrbaxCheckpointHandler(incremental=True) as h:\n"
        "    h.save(sys.argv[1], finetune_state(1, make_base()), step=1)\n"
    )
    tests = str(Path(__file__).parent)
    subprocess.run([sys.executable, "-c", code, str(tmp_path), tests], check=True, timeout=300)
    linked = [k for k, r in records(tmp_path / "ckpt-1").items() if r.get("linked") == "ckpt-0"]
    assert len(linked) == 2
    with OrbaxCheckpointHandler() as handler:  # any reader: nothing special to read it
        assert_identical(handler.restore(tmp_path), finetune_state(1, base))


def test_everything_changed_means_nothing_linked(tmp_path):
    with OrbaxCheckpointHandler(incremental=True) as handler:
        for step in range(2):
            handler.save(tmp_path, finetune_state(step, make_base_for(step)), step=step)
        handler.wait_until_finished()
        assert_identical(handler.restore(tmp_path), finetune_state(1, make_base_for(1)))
    assert not any("linked" in r for r in records(tmp_path / "ckpt-1").values())


def make_base_for(step: int) -> dict:
    return jax.tree.map(lambda x: x + step, make_base())


def test_options_and_storage_incremental_saves_need(tmp_path):
    with pytest.raises(ValueError, match="needs checksums=True"):
        CheckpointOptions(incremental=True, checksums=False)
    with pytest.raises(ValueError, match="OCDBT's shared data files"):
        CheckpointOptions(incremental=True, use_ocdbt=True)
    assert CheckpointOptions(incremental=True).ocdbt is False
    assert CheckpointOptions().ocdbt is True
    with OrbaxCheckpointHandler(incremental=True) as handler:
        with pytest.raises(IncrementalUnsupportedError, match="S3 has no links"):
            handler.save("s3://bucket/run", {"w": jnp.ones(3)}, step=1)


# --------------------------------------------------------------------------- the CLI


def cli(*args):
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    result = subprocess.run(
        [str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )
    return result.returncode, result.stdout, result.stderr


def test_cli_ls_shows_new_and_total_bytes_and_show_marks_linked_arrays(tmp_path):
    base = make_base()
    with OrbaxCheckpointHandler(incremental=True) as handler:
        for step in range(2):
            handler.save(tmp_path, finetune_state(step, base), step=step)
    code, out, err = cli("ls", tmp_path, "--json")
    assert code == 0, err
    rows = {r["step"]: r for r in json.loads(out)}
    base_bytes = sum(x.nbytes for x in base.values())
    assert rows[0]["new_bytes"] == rows[0]["bytes"]
    written = rows[1]["bytes"] - base_bytes  # less the linked arrays' small .zarray files
    assert written - 1024 < rows[1]["new_bytes"] < written
    code, out, err = cli("ls", tmp_path)
    header = next(line for line in out.splitlines() if "quick check" in line)
    assert code == 0 and header.index("new") < header.index("size"), out
    assert "│ 3.0 MiB │ 6.0 MiB │" in out, out  # step 1 wrote the head, not the base
    code, out, err = cli("show", tmp_path, "--json")
    linked = {leaf["path"]: leaf["linked"] for leaf in json.loads(out)["leaves"]}
    assert linked["['base']['w1']"] == linked["['base']['w2']"] == "ckpt-0"
    assert linked["['head']"] is None
    code, out, err = cli("show", tmp_path)
    lines = [line for line in out.splitlines() if "['base']['w1']" in line]
    assert code == 0 and "(linked from ckpt-0)" in lines[0], out


def test_cli_copy_makes_a_standalone_step(tmp_path):
    base = make_base()
    directory, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    with OrbaxCheckpointHandler(incremental=True) as handler:
        for step in range(2):
            handler.save(directory, finetune_state(step, base), step=step)
    code, out, err = cli("copy", directory, elsewhere, "--step", "1")
    assert code == 0 and "standalone, verified" in out, err
    assert all(st.st_nlink == 1 for st in files(elsewhere / "ckpt-1").values())
    assert not any("linked" in r for r in records(elsewhere / "ckpt-1").values())
    for rel in files(directory / "ckpt-1"):
        (directory / "ckpt-1" / rel).unlink()  # the source is gone: the copy still reads
    with OrbaxCheckpointHandler() as handler:
        assert_identical(handler.restore(elsewhere, step=1), finetune_state(1, base))
        assert handler.verify(elsewhere, step=1).ok
    code, _, err = cli("copy", directory.parent / "run", elsewhere, "--step", "0")
    assert code == 0, err
    code, _, err = cli("copy", directory, elsewhere, "--step", "0")
    assert code != 0 and "already exists" in err


# --------------------------------------------------------------------------- kill


KILL_POINTS = [
    ("write.enter", 2, 0.0),
    ("write.links", 2, 0.0),
    ("write.arrays", 3, 10.0),
    ("write.json", 2, 0.0),
    ("commit.before_rename", 3, 0.0),
    ("commit.after_rename", 2, 0.0),
    ("retention.unlink", 9, 0.0),
]


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


def test_a_kill_at_any_point_of_incremental_saves_leaves_the_newest_step_restorable(
    zygote, tmp_path
):
    """Each trial runs the kill harness's training loop with incremental saves (a frozen
    base linked at every step, keep=2) and SIGKILLs it at one point; the next writer must
    restore every listed step bit-exactly, clean up, and link its own save again."""
    directory, first, issued = tmp_path / "run", 0, set()
    for i, (point, nth, delay_ms) in enumerate(KILL_POINTS):
        progress, log = tmp_path / f"progress-{i}", tmp_path / f"log-{i}"
        trial = {
            "directory": str(directory),
            "first_step": first,
            "n_steps": 8,
            "keep": 2,
            "point": point,
            "nth": nth,
            "delay_ms": delay_ms,
            "progress": str(progress),
            "log": str(log),
            "incremental": True,
        }
        result = zygote.run(trial)
        assert result["signal"] == signal.SIGKILL, f"{trial}: {result}\n{log.read_text()}"
        if point in LEAVE_DEBRIS or point == "write.links":
            assert [n for n in _leftovers(directory) if not n.startswith(".datarax-writer")]
        trial_issued, durable = read_progress(str(progress))
        issued |= trial_issued
        with OrbaxCheckpointHandler(incremental=True) as handler:
            steps = handler.get_checkpoint_steps(directory)
            assert set(steps) <= issued and (durable < 0 or steps[-1] >= durable), steps
            for step in steps:
                restored = handler.restore(directory, step=step)
                assert_identical(restored, make_incremental_state(step))
            first = steps[-1] + 1 if steps else 0
            handler.save(directory, make_incremental_state(first), step=first, keep=2)
            handler.wait_until_finished()
            assert_identical(handler.restore(directory), make_incremental_state(first))
        issued.add(first)
        assert _leftovers(directory) == []
        if len(steps) >= 1:  # the resumed save linked the base from the step before it
            assert any(r.get("linked") for r in records(directory / f"ckpt-{first}").values())
        first += 1


# --------------------------------------------------------------------------- fine-tuning


def test_lora_fine_tuning_of_a_frozen_nnx_model_writes_only_the_trainable_part(tmp_path):
    """Flax NNX's LoRA pattern: a pretrained base is frozen, LoRA adapters and a head are
    trained (nnx.Optimizer over the trainable filter). Each step's checkpoint writes the
    adapters, the head and their Adam moments; the base kernels are linked."""
    import optax
    from flax import nnx

    class Model(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.base1 = nnx.Linear(1024, 1024, rngs=rngs)  # 4 MiB kernels, frozen
            self.base2 = nnx.Linear(1024, 1024, rngs=rngs)
            self.lora = nnx.LoRA(1024, 4, 1024, rngs=rngs)
            self.head = nnx.Linear(1024, 8, rngs=rngs)

        def __call__(self, x):
            return self.head(nnx.relu(self.base2(nnx.relu(self.base1(x)))) + self.lora(x))

    trainable = nnx.Any(nnx.LoRAParam, nnx.PathContains("head"))
    model = Model(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=trainable)
    x = jax.random.normal(jax.random.key(1), (16, 1024))
    y = jax.random.normal(jax.random.key(2), (16, 8))

    @nnx.jit
    def train_step(model, optimizer):
        def loss_fn(model):
            return ((model(x) - y) ** 2).mean()

        grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, trainable))(model)
        optimizer.update(model, grads)

    base_kernel = np.asarray(model.base1.kernel[...])
    with OrbaxCheckpointHandler(incremental=True) as handler:
        for step in range(1, 4):
            train_step(model, optimizer)
            handler.save(
                tmp_path, {"model": nnx.state(model), "opt": nnx.state(optimizer)}, step=step
            )
        fresh = Model(nnx.Rngs(5))
        fresh_opt = nnx.Optimizer(fresh, optax.adam(1e-2), wrt=trainable)
        restored = handler.restore(
            tmp_path, {"model": nnx.state(fresh), "opt": nnx.state(fresh_opt)}
        )
    nnx.update(fresh, restored["model"])
    nnx.update(fresh_opt, restored["opt"])
    assert_identical(nnx.to_pure_dict(nnx.state(fresh)), nnx.to_pure_dict(nnx.state(model)))
    assert_identical(nnx.to_pure_dict(nnx.state(fresh_opt)), nnx.to_pure_dict(nnx.state(optimizer)))
    assert np.array_equal(base_kernel, np.asarray(model.base1.kernel[...]))  # truly frozen
    show = json.loads(cli("show", tmp_path, "--json")[1])
    linked = {leaf["path"] for leaf in show["leaves"] if leaf["linked"] == "ckpt-2"}
    assert any("base1" in p and "kernel" in p for p in linked), linked
    assert any("base2" in p and "kernel" in p for p in linked), linked
    assert not any("lora" in p or "head" in p for p in linked), linked


def test_an_array_that_stops_changing_is_linked_again(tmp_path):
    """A trained array is written without being hashed first while it keeps changing;
    once its checksum shows it stopped, the next save links it again."""

    def adapter(step: int) -> jax.Array:  # 2.3 MiB: stored on its own
        return jnp.asarray(np.random.default_rng(step).standard_normal((600, 1024), np.float32))

    with OrbaxCheckpointHandler(incremental=True) as handler:
        for step in range(6):
            state = {"adapter": adapter(min(step, 3)), "bias": jnp.full(8, step, jnp.float32)}
            handler.save(tmp_path, state, step=step)  # the adapter stops changing at 3
        handler.wait_until_finished()
        assert_identical(handler.restore(tmp_path, step=5)["adapter"], adapter(3))
    linked = [bool(records(tmp_path / f"ckpt-{s}")["a0"].get("linked")) for s in range(6)]
    assert linked == [False, False, False, False, False, True]


def test_multi_process_incremental_saves_are_full_saves_that_restore(tmp_path):
    """In a jax.distributed run (2 processes x 2 CPU devices) incremental saves do not
    link (each process would have to agree on every decision): they save in full, and
    every step restores bit-exactly on every process."""
    from test_multiprocess import launch

    directory = tmp_path / "ckpts"
    directory.mkdir()
    for result in launch("incremental", 2, 2, directory):
        assert result["steps"] == [2, 3]
        assert result["restored"] == [] and result["frozen_same"] is True
        assert result["linked"] == []
