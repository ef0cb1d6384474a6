"""A checkpoint folder is untrusted input: each read-side row of issue 17, as a test.

Every case edits one real checkpoint (two steps, written by the handler) the way an
attacker or a damaged disk would, then runs every reader on it: ``restore()``,
``restore(step=2)``, ``restore(metadata_only=True)``, ``verify()`` and the CLI's
``ls``, ``show`` and ``verify``. Readers that used to hang run in a child process
(``_untrusted_child.py``) with a timeout, so a regression fails instead of hanging CI.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
from _untrusted_child import DECLARED_BYTES, make, ops, state, warm_up
from typer.testing import CliRunner

from datarax_ckpt import (
    CheckpointCorruptedError,
    CheckpointPathError,
    OrbaxCheckpointHandler,
    cli,
)

CHILD = pathlib.Path(__file__).with_name("_untrusted_child.py")
TIMEOUT_S = 300  # generous: the CI machine's two cores are shared
# What a reader may allocate: twice the declared state, plus its fixed buffers (verify
# reads files through one 1 MiB buffer; JSON items are parsed whole).
MEMORY_BOUND = 2 * DECLARED_BYTES + (4 << 20)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pristine") / "run"
    make(str(directory))
    tracemalloc.start()
    warm_up(str(directory))  # so that in-process measurements are of the reading alone
    yield directory
    tracemalloc.stop()


@pytest.fixture
def ckpt(pristine, tmp_path):
    directory = tmp_path / "case" / "run"
    shutil.copytree(pristine, directory, symlinks=True)
    shutil.copytree(pristine, tmp_path / "intact", symlinks=True)  # a child warms up on it
    return directory


def run_child(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(CHILD.parent), *sys.path])}
    return subprocess.run(
        [sys.executable, str(CHILD), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=env,
    )


def readers(directory: pathlib.Path, *, child: bool = False) -> dict:
    """Every reader's outcome; ``child``: in a child process, where a hang fails the test
    (for the cases that used to hang)."""
    if child:
        result = run_child("ops", str(directory), str(directory.parent.parent / "intact"))
        assert result.returncode == 0, result.stderr[-3000:]
        out = json.loads(result.stdout.strip().splitlines()[-1])
        assert "Event loop is closed" not in result.stderr
    else:
        out = ops(str(directory))
    assert out["peak_bytes"] <= MEMORY_BOUND, out
    return out


def assert_fell_back(out: dict, *, cli_verify: str = "exit:1") -> None:
    """Step 2 is refused as corrupt; step 1 is restored in its place; nothing hangs."""
    assert out["restore"] == "equal", out  # the newest intact step: step 1
    assert out["restore_step2"] == "error:CheckpointCorruptedError", out
    assert out["metadata_only"] == "equal", out
    assert out["verify"] == "report:False", out
    assert out["cli_ls"] == "exit:0", out
    assert out["cli_show"] in ("exit:0", "exit:1"), out
    assert out["cli_verify"] == cli_verify, out


def problems(directory: pathlib.Path, step: int = 2) -> list:
    with OrbaxCheckpointHandler() as handler:
        return list(handler.verify(directory, step=step).problems)


def restore_step2_error(directory: pathlib.Path) -> str:
    with OrbaxCheckpointHandler() as handler, pytest.raises(CheckpointCorruptedError) as info:
        handler.restore(directory, step=2)
    return str(info.value)


def edit_manifest(directory: pathlib.Path, edit) -> None:
    path = directory / "ckpt-2" / "manifest" / "metadata"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def slot_of(manifest: dict, name: str) -> dict:
    tree = manifest["tree"]
    return manifest["slots"][tree["c"][tree["k"].index(name)]["s"]]


# ------------------------------------------------------------------ file-system entries


@pytest.mark.parametrize("where", ["x", "state/x"])
def test_symlink_to_dev_zero_is_reported_not_read(ckpt, where):
    os.symlink("/dev/zero", ckpt / "ckpt-2" / where)
    assert_fell_back(readers(ckpt, child=True))
    found = problems(ckpt)
    assert [(p.kind, p.file) for p in found] == [("unsafe_entry", where)]
    assert "symbolic link" in found[0].message


@pytest.mark.parametrize("where", ["fifo", "state/fifo", "state/ocdbt.process_0/d/fifo"])
def test_fifo_anywhere_in_a_step_is_reported_not_opened(ckpt, where):
    os.mkfifo(ckpt / "ckpt-2" / where)
    assert_fell_back(readers(ckpt, child=True))
    assert [(p.kind, p.file) for p in problems(ckpt)] == [("unsafe_entry", where)]


@pytest.mark.parametrize(
    "item", ["metadata/metadata", "manifest/metadata", "checksums/metadata", "_CHECKPOINT_METADATA"]
)
def test_json_item_replaced_by_a_fifo_hangs_no_reader(ckpt, item):
    (ckpt / "ckpt-2" / item).unlink()
    os.mkfifo(ckpt / "ckpt-2" / item)
    assert_fell_back(readers(ckpt, child=True))
    assert "FIFO" in restore_step2_error(ckpt)


def test_manifest_linked_to_dev_zero_is_refused_without_reading(ckpt):
    manifest = ckpt / "ckpt-2" / "manifest" / "metadata"
    manifest.unlink()
    os.symlink("/dev/zero", manifest)
    assert_fell_back(
        readers(ckpt, child=True)
    )  # readers() also bounds the memory each reader takes


def test_huge_sparse_manifest_is_refused_without_reading(ckpt):
    manifest = ckpt / "ckpt-2" / "manifest" / "metadata"
    os.truncate(manifest, 1 << 40)  # 1 TiB, sparse: no disk used
    assert_fell_back(readers(ckpt, child=True))
    assert "more than the" in restore_step2_error(ckpt)


def test_symlinks_out_of_the_directory_are_not_followed(ckpt, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"x" * 100)
    os.mkfifo(outside / "pipe")  # followed, verify would block on it
    os.symlink(outside, ckpt / "ckpt-2" / "state" / "elsewhere")
    os.symlink("..", ckpt / "ckpt-2" / "loop")
    before = {p.name: p.stat().st_atime_ns for p in [outside / "secret"]}
    assert_fell_back(readers(ckpt, child=True))
    with OrbaxCheckpointHandler() as handler:
        report = handler.verify(ckpt, step=2)
        intact = handler.verify(ckpt.parent.parent / "intact", step=2)  # the same step
    assert sorted((p.kind, p.file) for p in report.problems) == [
        ("unsafe_entry", "loop"),
        ("unsafe_entry", "state/elsewhere"),
    ]
    assert report.files_checked == intact.files_checked  # the loop is not walked
    assert {p.name: p.stat().st_atime_ns for p in [outside / "secret"]} == before


def test_the_step_folder_itself_a_symlink_is_refused(ckpt, tmp_path):
    moved = tmp_path / "moved"
    (ckpt / "ckpt-2").rename(moved)
    os.symlink(moved, ckpt / "ckpt-2")
    assert_fell_back(readers(ckpt, child=True))
    assert [(p.kind, p.file) for p in problems(ckpt)] == [("unsafe_entry", ".")]


# ------------------------------------------------------------------ sizes and validation


@pytest.mark.parametrize("leaf", ["big", "w"])  # its own stored array, and a packed leaf
def test_a_leaf_declaring_2_to_the_40_elements_is_refused_before_allocating(ckpt, leaf):
    edit_manifest(ckpt, lambda m: slot_of(m, leaf).update(shape=[1 << 40]))
    assert_fell_back(readers(ckpt))
    message = restore_step2_error(ckpt)
    assert "manifest/metadata" in message and f"['{leaf}']" in message


def test_an_empty_leaf_declaring_1_5_gib_is_refused(ckpt):
    edit_manifest(ckpt, lambda m: slot_of(m, "e").update(shape=[1 << 28, 3]))
    assert_fell_back(readers(ckpt))
    message = restore_step2_error(ckpt)
    assert "declared empty" in message and "['e']" in message
    # verify also finds the manifest differing from its recorded checksum
    assert {p.kind for p in problems(ckpt)} == {"invalid_manifest", "checksum_mismatch"}


@pytest.mark.parametrize(
    ("edit", "wording"),
    [
        (lambda m: slot_of(m, "big").update(shape=[-1, 2048]), "negative dimension"),
        (lambda m: slot_of(m, "big").update(dtype="object"), "dtype 'object'"),
        (lambda m: slot_of(m, "name").update(dtype="<U10"), "dtype '<U10'"),
        (lambda m: m["tree"]["c"][0].update(s=99), "bad or shared slot 99"),
        (lambda m: slot_of(m, "w").update(pack=7), "pack 7"),
        (lambda m: slot_of(m, "w").update(offset=600), "does not fit in pack p0"),
        (lambda m: m["tree"]["c"][0].update(t="pickle"), "unknown node kind 'pickle'"),
        (lambda m: slot_of(m, "big").update(key="../../etc"), "unsafe stored key"),
        (lambda m: slot_of(m, "big").update(shape=[1024]), "declared [1024] but Orbax wrote"),
        (lambda m: slot_of(m, "big").update(shape=[4096]), "but its checksum record says"),
    ],
)
def test_a_manifest_that_cannot_describe_the_data_is_corrupt(ckpt, edit, wording):
    edit_manifest(ckpt, edit)
    assert_fell_back(readers(ckpt))
    message = restore_step2_error(ckpt)
    assert "manifest/metadata" in message and wording in message
    result = CliRunner().invoke(cli.app, ["show", str(ckpt)])
    assert (
        result.exit_code == 1
        and result.exception is None
        or isinstance(result.exception, SystemExit)
    )
    assert "Traceback" not in result.output and wording in result.output


def test_without_checksums_a_larger_declared_shape_is_caught_by_the_reader(tmp_path):
    with OrbaxCheckpointHandler(checksums=False, pack_threshold_bytes=16) as handler:
        handler.save(tmp_path, {"w": np.arange(64, dtype=np.float32)}, step=1)
    path = tmp_path / "ckpt-1" / "manifest" / "metadata"
    manifest = json.loads(path.read_text())
    manifest["slots"][0]["shape"] = [1 << 40]  # Orbax's record ([64]) is no larger
    path.write_text(json.dumps(manifest))
    with OrbaxCheckpointHandler() as handler:
        with pytest.raises(CheckpointCorruptedError, match=r"holds shape \[64\].*\['w'\]"):
            handler.restore(tmp_path, step=1)
        report = handler.verify(tmp_path, step=1)
    assert [(p.kind, p.leaves) for p in report.problems] == [("unreadable_array", ("['w']",))]


@pytest.mark.parametrize("options", [{"use_ocdbt": False}, {"incremental": True}])
def test_a_missing_chunk_file_of_the_per_array_layout_is_corruption(tmp_path, options):
    # Without OCDBT (use_ocdbt=False, or incremental saves) each stored array is its own
    # folder; a deleted chunk file must read as damage, and restore fall back past it.
    steps = {n: {"w": np.arange(1 << 18, dtype=np.float32) * n, "b": np.ones(3)} for n in (1, 2)}
    with OrbaxCheckpointHandler(**options) as handler:
        for n, tree in steps.items():
            handler.save(tmp_path, tree, step=n)
    (chunk,) = [p for p in (tmp_path / "ckpt-2" / "state").glob("*/0") if p.stat().st_size > 4096]
    chunk.unlink()
    with OrbaxCheckpointHandler() as handler:
        with pytest.raises(CheckpointCorruptedError, match=r"is missing.*\['w'\]"):
            handler.restore(tmp_path, step=2)
        np.testing.assert_array_equal(handler.restore(tmp_path)["w"], steps[1]["w"])
        assert not handler.verify(tmp_path, step=2).ok


@pytest.mark.parametrize("levels", [150, 50_000])
def test_a_deeply_nested_manifest_is_corrupt_not_a_recursion_error(ckpt, levels):
    def nest(manifest):
        node = manifest["tree"]
        for _ in range(levels):
            node = {"t": "list", "c": [node]}
        manifest["tree"] = node

    path = ckpt / "ckpt-2" / "manifest" / "metadata"
    manifest = json.loads(path.read_text())
    nest(manifest)
    text = json.dumps(manifest) if levels < 900 else None
    if text is None:  # json.dumps itself recurses: write the nesting by hand
        inner = json.dumps(json.loads(path.read_text())["tree"])
        text = json.dumps({**json.loads(path.read_text()), "tree": "@"}).replace(
            '"@"', '{"t": "list", "c": [' * levels + inner + "]}" * levels
        )
    path.write_text(text)
    assert_fell_back(readers(ckpt))
    message = restore_step2_error(ckpt)
    assert ("nested more than 100 levels" if levels < 900 else "nested too deeply") in message


def test_a_missing_checksum_record_is_corruption_not_unchecked(ckpt):
    path = ckpt / "ckpt-2" / "checksums" / "metadata"
    sums = json.loads(path.read_text())
    del sums["arrays"]["a1"]  # the record of "big"
    path.write_text(json.dumps(sums))
    # ... and a byte of that array flipped: restore must not return it.
    data = max((ckpt / "ckpt-2" / "state").rglob("*"), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 1
    data.write_bytes(bytes(raw))
    assert_fell_back(readers(ckpt))
    assert "no checksum recorded" in restore_step2_error(ckpt)
    assert ("missing_checksum", "a1") in [(p.kind, p.key) for p in problems(ckpt)]


# ------------------------------------------------------------------ paths and stderr


def test_a_directory_name_not_utf8_gets_a_clear_error(pristine, tmp_path):
    directory = os.path.join(os.fsencode(tmp_path), b"run-\xff\xfe")
    shutil.copytree(os.fsencode(pristine), directory, symlinks=True)
    name = os.fsdecode(directory)
    with OrbaxCheckpointHandler() as handler:
        with pytest.raises(CheckpointPathError, match="not valid UTF-8.*rename the folder"):
            handler.restore(name)
        with pytest.raises(CheckpointPathError, match="not valid UTF-8"):
            handler.verify(name)
    result = CliRunner().invoke(cli.app, ["verify", name, "--all"])
    assert result.exit_code == 2 and "not valid UTF-8" in result.output
    assert "intact" not in result.output


def test_damaged_ocdbt_data_leaves_no_event_loop_traceback_on_stderr(ckpt):
    # The b-tree node file (the smallest data file) damaged: every read fails properly.
    files = [p for p in (ckpt / "ckpt-2" / "state").rglob("d/*") if p.is_file()]
    for path in files:
        raw = bytearray(path.read_bytes())
        for i in range(0, len(raw), 7):
            raw[i] ^= 0x5A
        path.write_bytes(bytes(raw))
    result = run_child("ops", str(ckpt), str(ckpt.parent.parent / "intact"))
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["restore_step2"] == "error:CheckpointCorruptedError", out
    assert out["verify"] == "report:False" and out["cli_verify"] == "exit:1", out
    assert "Event loop is closed" not in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


def test_an_intact_checkpoint_reads_back_exactly(ckpt):
    out = readers(ckpt)
    assert {k: v for k, v in out.items() if k not in ("peak_bytes", "peaks", "seconds")} == {
        "restore": "equal",
        "restore_step2": "equal",
        "metadata_only": "equal",
        "verify": "report:True",
        "cli_ls": "exit:0",
        "cli_show": "exit:0",
        "cli_verify": "exit:0",
    }
    with OrbaxCheckpointHandler() as handler:
        assert handler.restore(ckpt)["name"] == state(2)["name"]


def test_a_state_nested_max_depth_levels_restores_and_verifies(tmp_path):
    # What save() accepts, restore() reads: a leaf at level MAX_DEPTH (the root is 1).
    from datarax_ckpt._manifest import MAX_DEPTH

    deep = 1.5
    for _ in range(MAX_DEPTH - 1):
        deep = {"a": deep}
    with OrbaxCheckpointHandler() as handler:
        handler.save(tmp_path, deep, step=1)
        assert handler.restore(tmp_path) == deep
        assert handler.verify(tmp_path).ok
    result = CliRunner().invoke(cli.app, ["show", str(tmp_path)])
    assert result.exit_code == 0, result.output
