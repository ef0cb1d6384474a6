"""The datarax-ckpt console script, run for real in a subprocess."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from _damage import DAMAGE, PACK_THRESHOLD, make_state

from datarax_ckpt import OrbaxCheckpointHandler

SCRIPT = pathlib.Path(sys.executable).with_name("datarax-ckpt")


def cli(*args, stdin=""):
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    result = subprocess.run(
        [str(SCRIPT), *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
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
    for command in ("ls", "show", "verify", "rm", "demo", "bench"):
        assert f"  {command} " in out
    assert "Exit status" in out


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
    code, _, err = cli("rm", directory, "--step", "2")  # no answer on stdin: aborted
    assert code != 0 and "Delete" in err and (directory / "ckpt-2").exists()
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
