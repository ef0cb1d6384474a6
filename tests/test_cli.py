"""The datarax-ckpt console script, run for real in a subprocess."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest
from _damage import DAMAGE, PACK_THRESHOLD, make_state

import datarax_ckpt
from datarax_ckpt import OrbaxCheckpointHandler, demo

SCRIPT = pathlib.Path(sys.executable).with_name("datarax-ckpt")


def cli(*args, stdin="", columns="200", cwd=None):
    """Runs the console script with its output piped; ``columns=None`` leaves COLUMNS unset."""
    env = {**os.environ, "COLUMNS": columns, "NO_COLOR": "1", "TERM": "dumb"}
    if columns is None:
        del env["COLUMNS"]
    result = subprocess.run(
        [str(SCRIPT), *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=cwd,
    )
    return result.returncode, result.stdout, result.stderr


@pytest.fixture
def directory(tmp_path):
    with OrbaxCheckpointHandler(pack_threshold_bytes=PACK_THRESHOLD) as handler:
        for step in (1, 2):
            handler.save(tmp_path, make_state(step), step=step, metadata={"epoch": step})
    return tmp_path


def test_the_console_script_is_installed_and_explains_itself():
    assert SCRIPT.exists(), "pip install -e . installs the datarax-ckpt console script"
    code, out, _ = cli("--help")
    assert code == 0
    for command in ("ls", "show", "verify", "rm", "export", "import", "demo", "bench"):
        assert f"  {command} " in out
    assert "Exit status" in out and "3 cancelled" in out
    code, out, _ = cli("--version")
    assert (code, out) == (0, f"datarax-ckpt {datarax_ckpt.__version__}\n")


def test_ls_lists_each_step_with_time_size_status_and_metadata(directory):
    code, out, _ = cli("ls", directory)
    assert code == 0
    rows = [line for line in out.splitlines() if "intact" in line]
    assert len(rows) == 2 and "epoch=1" in rows[0] and "epoch=2" in rows[1]
    assert "KiB" in rows[0]
    (directory / "ckpt-3.orbax-checkpoint-tmp-1234").mkdir()  # left by a killed save
    code, out, _ = cli("ls", directory, "--json")
    entries = json.loads(out)
    assert [(e["name"], e["status"], e["metadata"]) for e in entries] == [
        ("ckpt-1", "intact", {"epoch": 1}),
        ("ckpt-2", "intact", {"epoch": 2}),
        ("ckpt-3.orbax-checkpoint-tmp-1234", "incomplete", None),
    ]
    assert all(e["bytes"] > 4096 for e in entries[:2])


def test_ls_shows_a_live_writers_unfinished_save_as_pending(directory):
    (directory / "ckpt-3.orbax-checkpoint-tmp-1234").mkdir()
    with OrbaxCheckpointHandler() as writer:  # a live writer holds the directory
        writer.save(directory, make_state(4), step=4)
        writer.wait_until_finished()
        (directory / "ckpt-5.orbax-checkpoint-tmp-99").mkdir()  # as its next save would
        code, out, _ = cli("ls", directory, "--json")
        assert code == 0
        assert [(e["name"], e["status"]) for e in json.loads(out)][-1] == (
            "ckpt-5.orbax-checkpoint-tmp-99",
            "pending",
        )
        code, out, _ = cli("ls", directory)
        assert f"pending (writer: host {os.uname().nodename}, pid {os.getpid()})" in out
    assert not (directory / "ckpt-3.orbax-checkpoint-tmp-1234").exists()  # the writer's


def test_show_lists_every_logical_leaf_and_the_metadata(directory):
    code, out, _ = cli("show", directory, "--step", "1", "--json")
    assert code == 0
    doc = json.loads(out)
    leaves = {leaf["path"]: leaf for leaf in doc["leaves"]}
    assert set(leaves) == {"['w']", "['b']", "['rng']", "['name']", "['step']"}
    assert (leaves["['b']"]["kind"], leaves["['b']"]["dtype"]) == ("array", "bfloat16")
    assert (leaves["['b']"]["shape"], leaves["['b']"]["nbytes"]) == ([8], 16)
    assert leaves["['w']"]["shape"] == [1024] and leaves["['name']"]["kind"] == "str"
    assert doc["metadata"] == {"epoch": 1} and doc["step"] == 1
    code, out, _ = cli("show", directory)  # the latest step, for people
    assert code == 0 and "ckpt-2" in out and "key<threefry2x32>" in out and "bfloat16" in out


def test_verify_exits_0_when_everything_is_intact(directory):
    code, out, _ = cli("verify", directory, "--all")
    assert code == 0, out
    assert "2 of 2 checkpoint(s) intact" in out


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_verify_exits_1_and_names_the_damage(directory, damage):
    damaged = DAMAGE[damage](directory / "ckpt-2")
    code, out, _ = cli("verify", directory, "--all")
    assert code == 1
    assert "intact   ckpt-1" in out and "CORRUPT  ckpt-2" in out
    assert damaged.name in out
    if damage != "uncommit":
        assert "['w']" in out
    assert "1 of 2 checkpoint(s) intact" in out


def test_rm_asks_first_and_deletes_with_yes(directory):
    code, _, err = cli("rm", directory, "--step", "2")  # no answer on stdin: cancelled
    assert code == 3 and "Delete" in err and (directory / "ckpt-2").exists()
    code, _, err = cli("rm", directory, "--step", "2", stdin="n\n")
    assert code == 3 and "Cancelled; nothing deleted." in err and (directory / "ckpt-2").exists()
    code, out, _ = cli("rm", directory, "--step", "2", "--yes")
    assert code == 0 and not (directory / "ckpt-2").exists()
    with OrbaxCheckpointHandler() as handler:
        assert handler.get_checkpoint_steps(directory) == [1]


@pytest.mark.parametrize("where", ["empty", "missing", "step-folder"])
def test_a_non_checkpoint_directory_gets_a_helpful_error(directory, tmp_path, where):
    path = {
        "empty": tmp_path / "empty",
        "missing": tmp_path / "missing",
        "step-folder": directory / "ckpt-1",
    }[where]
    if where == "empty":
        path.mkdir()
    code, _, err = cli("ls", path)
    assert code == 2
    expected = {
        "empty": "not a datarax_ckpt checkpoint directory",
        "missing": "does not exist",
        "step-folder": "pass its parent instead",
    }[where]
    assert expected in err


def test_demo_passes_its_options_on():
    code, out, _ = cli("demo", "--help-demo")
    assert code == 0 and "--crash-at" in out


def test_bench_with_a_missing_config_says_where_configs_are(tmp_path):
    code, _, err = cli("bench", tmp_path / "none.toml")
    assert code == 2 and "configs/bench/" in err


def test_rm_deletes_the_unversioned_checkpoint(tmp_path):
    with OrbaxCheckpointHandler() as handler:
        handler.save(tmp_path, {"w": np.ones(3)})  # step=None: checkpoint/
        handler.save(tmp_path, {"w": np.ones(3)}, step=1)
    code, _, err = cli("rm", tmp_path)
    assert code == 2 and "--step N or --unversioned" in err
    code, out, _ = cli("rm", tmp_path, "--unversioned", "--yes")
    assert code == 0 and "checkpoint" in out
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["ckpt-1"]
    code, _, err = cli("rm", tmp_path, "--unversioned", "--yes")
    assert code == 2 and "has no checkpoint/ folder" in err


def demo_checkpoint(path):
    """The checkpoint the demo writes (its model, Adam optimizer and data iterator): 23 leaves."""
    model, optimizer, data = demo.fresh(64, 0)
    with OrbaxCheckpointHandler() as handler:
        state = {"model": model, "optimizer": optimizer, "data": data, "run": "demo"}
        handler.save(path, state, step=25, metadata={"loss": 0.51})


@pytest.mark.parametrize("columns", ["80", None], ids=["COLUMNS=80", "piped"])
def test_show_reads_well_at_80_columns_and_piped(tmp_path, columns):
    demo_checkpoint(tmp_path)
    code, out, _ = cli("show", tmp_path, columns=columns)
    assert code == 0
    lines = out.splitlines()
    assert 23 + 4 <= len(lines) <= 2 * 23 + 5, out  # one line per leaf, two for long paths
    assert all(len(line) <= 80 for line in lines[1:]), out  # lines[0]: the folder's path
    assert "23 leaves" in out and "key<threefry2x32>[]" in out and "float32[64,64]" in out
    leaf_lines = [line for line in lines if line.startswith("  [")]
    assert len(leaf_lines) == 23  # each leaf's line starts with its path


def test_a_raw_orbax_run_is_recognised_imported_and_exported(tmp_path):
    raw, ours, exported = tmp_path / "raw", tmp_path / "ours", tmp_path / "exported"
    with ocp.CheckpointManager(raw, options=ocp.CheckpointManagerOptions(step_prefix="step")) as m:
        for step in (10, 20):
            m.save(step, args=ocp.args.StandardSave({"w": np.full(4, step, np.float32)}))
    for command in ("ls", "show"):
        code, _, err = cli(command, raw)
        assert code == 2 and "is a raw Orbax checkpoint directory (steps 10, 20)" in err
        assert f"datarax-ckpt import {raw} NEW_DIR" in err
    code, out, _ = cli("import", raw, ours)
    assert code == 0 and "Imported 2 checkpoint(s) (10, 20)" in out
    code, out, _ = cli("verify", ours, "--all")
    assert code == 0 and "2 of 2 checkpoint(s) intact" in out
    code, _, err = cli("import", raw, ours)
    assert code == 2 and "already holds checkpoints" in err
    code, out, _ = cli("export", ours, exported, "--step", "10")
    assert code == 0 and "Exported step 10" in out
    assert ocp.StandardCheckpointer().restore(exported)["w"].tolist() == [10.0] * 4
    code, _, err = cli("export", ours, tmp_path / "x", "--format", "npz")
    assert code == 2 and "--format must be one of orbax, safetensors" in err


def test_bench_runs_the_smoke_config_by_default_quietly(tmp_path):
    code, out, err = cli("bench", "--out", tmp_path / "results", cwd=tmp_path)  # not the checkout
    assert code == 0, err
    assert out.strip() == f"Results in {tmp_path / 'results'}/results.md"
    progress = [line for line in err.splitlines() if not line.startswith("[")]
    assert progress == [], progress  # no absl, no Orbax, no JAX warnings between progress lines
    report = (tmp_path / "results" / "results.md").read_text()
    assert "cpu-smoke.toml" in report and "peak process RSS" in report
    if (pathlib.Path(__file__).parent.parent / ".git").exists():
        assert "repository at git unknown" not in report


def test_ctrl_c_exits_130_without_a_traceback(tmp_path):
    env = {**os.environ, "COLUMNS": "80", "NO_COLOR": "1", "TERM": "dumb"}
    args = ["demo", "--steps", "1000000", "--crash-at", "500000", "--width", "64"]
    process = subprocess.Popen(
        [str(SCRIPT), *args, "--dir", str(tmp_path / "run")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert process.stdout.readline().startswith("datarax_ckpt demo")  # it is running
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130
    assert err.strip() == "Interrupted."
