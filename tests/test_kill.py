"""Kill at any point: a training loop saving asynchronously is SIGKILLed, then resumed.

Each trial forks a child from a zygote process (``tests/_fault_child.py``) that runs a
training loop saving every step asynchronously with ``keep=2`` retention, and SIGKILLs it
at one of many moments: during the capture, mid-write, during the commit, during
retention's deletion, or at a random time sent from this process. After each kill a
fresh handler must list only committed steps, restore each of them bit-exactly (the
newest included), leave no temporary folder behind, and save again.

The default run covers every kill point a few times (seeded). Set
``DATARAX_CKPT_KILL_TRIALS=200`` to run 200 trials, kill points and timings drawn from a
seeded generator (``DATARAX_CKPT_KILL_SEED`` changes the seed).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _fault_child import POINTS, REACHED, make_state, read_progress
from _trees import assert_identical as assert_same

from datarax_ckpt import CheckpointNotFoundError, OrbaxCheckpointHandler, _writer_lock

KEEP = 2
EXTERNAL = "external"  # killed by this process at a random time, not from a hook
# Kill points that always leave a temporary folder or a half-emptied trash behind.
LEAVE_DEBRIS = ("write.json", "commit.before_rename", "retention.unlink")
ROLLBACK = "rollback.fs"  # tested alone, below
LONG_TRIALS = int(os.environ.get("DATARAX_CKPT_KILL_TRIALS", "0"))
SEED = int(os.environ.get("DATARAX_CKPT_KILL_SEED", "0"))
CHILD = Path(__file__).with_name("_fault_child.py")


def _draw(point: str, rng: random.Random) -> tuple[int, float]:
    """``(nth, delay_ms)`` of one trial at ``point``."""
    if point == "retention.unlink":
        return rng.randint(1, 30), 0.0  # a deleted step holds ~20 files and folders
    if point == "write.arrays":
        return rng.randint(1, 3), rng.uniform(0, 40)  # lands inside TensorStore's writes
    if point == EXTERNAL:
        return 0, rng.uniform(50, 1500)
    return rng.randint(1, 3), 0.0


def _schedule() -> dict[str, list[tuple[int, float]]]:
    """Trials per kill point: 2 each by default (3 external), or LONG_TRIALS in total."""
    rng = random.Random(SEED)
    points = [p for p in POINTS if p != ROLLBACK] + [EXTERNAL]
    if LONG_TRIALS:
        chosen = [points[i % len(points)] for i in range(LONG_TRIALS)]
    else:
        chosen = [p for p in points for _ in range(3 if p == EXTERNAL else 2)]
    schedule: dict[str, list[tuple[int, float]]] = {p: [] for p in points}
    for point in chosen:
        schedule[point].append(_draw(point, rng))
    return schedule


SCHEDULE = _schedule()


class Zygote:
    """A pre-imported process that forks one training child per trial."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(CHILD), "zygote"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def run(self, trial: dict, kill_after_ms: float | None = None) -> dict:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(trial) + "\n")
        self.process.stdin.flush()
        pid = json.loads(self.process.stdout.readline())["pid"]
        if kill_after_ms is not None:
            time.sleep(kill_after_ms / 1000)  # the kill moment itself, not a synchronisation
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # it ended first: the status check below reports it
        line = self.process.stdout.readline()
        assert line, "the zygote process died"
        return json.loads(line)

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


def _leftovers(directory: Path) -> list[str]:
    """Entries of a checkpoint directory that are not committed step folders."""
    return sorted(p.name for p in directory.iterdir() if not re.fullmatch(r"ckpt-\d+", p.name))


def _verify_and_resume(directory: Path, issued: set[int], durable: int) -> int:
    """Checks the directory after a kill like a restarted job would; returns the next step."""
    with OrbaxCheckpointHandler() as handler:
        steps = handler.get_checkpoint_steps(directory)
        assert set(steps) <= issued, f"listed {steps}, but only {sorted(issued)} were saved"
        if durable >= 0:
            assert steps and steps[-1] >= durable, f"step {durable} was durable; listed {steps}"
        for step in steps:  # every listed step is complete: nothing half-written is listed
            assert_same(handler.restore(directory, step=step), make_state(step))
            assert handler.restore(directory, step=step, metadata_only=True) == {"s": step}
        if steps:
            assert_same(handler.restore(directory), make_state(steps[-1]))
        else:
            with pytest.raises(CheckpointNotFoundError):
                handler.restore(directory)
        resume = steps[-1] + 1 if steps else 0
        handler.save(directory, make_state(resume), step=resume, keep=KEEP, metadata={"s": resume})
        handler.wait_until_finished()
        after = handler.get_checkpoint_steps(directory)
        assert after[-1] == resume and len(after) <= KEEP, after
        assert_same(handler.restore(directory), make_state(resume))
    assert _leftovers(directory) == [], "stale temporary folders were not cleaned up"
    issued.add(resume)
    return resume + 1


@pytest.mark.parametrize("point", list(SCHEDULE))
def test_kill_at_any_point_then_resume(zygote, tmp_path, point):
    directory = tmp_path / "run"
    issued: set[int] = set()
    first_step = 0
    for i, (nth, delay_ms) in enumerate(SCHEDULE[point]):
        progress, log = tmp_path / f"progress-{i}", tmp_path / f"log-{i}"
        trial = {
            "directory": str(directory),
            "first_step": first_step,
            "n_steps": 40 if point == EXTERNAL else 8,
            "keep": KEEP,
            "point": "none" if point == EXTERNAL else point,
            "nth": nth,
            "delay_ms": delay_ms,
            "progress": str(progress),
            "log": str(log),
        }
        result = zygote.run(trial, kill_after_ms=delay_ms if point == EXTERNAL else None)
        assert result["signal"] == signal.SIGKILL, (
            f"trial {trial} was not killed: {result}\n{log.read_text()}"
        )
        if point != EXTERNAL:
            assert f"{REACHED} {point}" in log.read_text()
        if point in LEAVE_DEBRIS:  # so the clean-up below is really exercised
            debris = [name for name in _leftovers(directory) if name != _writer_lock.LOCK_NAME]
            assert debris, f"a kill at {point} left no temporary folder"
        trial_issued, durable = read_progress(str(progress))
        issued |= trial_issued
        first_step = _verify_and_resume(directory, issued, durable)


def test_rollback_survives_a_kill_at_every_point_of_its_deletion(zygote, tmp_path):
    """Rolls ``[0, 1, 2, 3]`` back to 1, SIGKILLed before its 1st, 2nd, ... file-system
    change in turn, until one run finishes: after each kill the listed steps are the
    steps up to some step (newest deleted first), each restores bit-exactly, and a
    second rollback finishes the job and leaves no trash behind."""
    template = tmp_path / "template"
    with OrbaxCheckpointHandler() as handler:
        for step in range(4):
            handler.save(template, make_state(step), step=step, metadata={"s": step})
    seen = set()
    for nth in range(1, 400):
        directory, progress = tmp_path / f"run-{nth}", tmp_path / f"progress-{nth}"
        shutil.copytree(template, directory)
        trial = {"directory": str(directory), "rollback_to": 1, "point": ROLLBACK, "nth": nth}
        trial |= {"delay_ms": 0.0, "progress": str(progress), "log": str(tmp_path / "log")}
        result = zygote.run(trial)
        if result["signal"] is None:  # no nth change: the rollback ran to its end
            assert result["code"] == 0, (tmp_path / "log").read_text()
            assert json.loads(progress.read_text()) == [2, 3]
            break
        assert result["signal"] == signal.SIGKILL, result
        with OrbaxCheckpointHandler() as handler:
            steps = handler.get_checkpoint_steps(directory)
            assert steps in ([0, 1], [0, 1, 2], [0, 1, 2, 3]), steps
            seen.add(len(steps))
            for step in steps:
                assert_same(handler.restore(directory, step=step), make_state(step))
            assert handler.rollback(directory, 1) == steps[2:]
            assert handler.get_checkpoint_steps(directory) == [0, 1]
        assert _leftovers(directory) == []
        shutil.rmtree(directory)
    else:
        pytest.fail("the rollback never finished")
    assert seen == {2, 3, 4}, "kills landed before, between and after the two renames"
    assert _leftovers(directory) == [] and sorted(os.listdir(directory)) == ["ckpt-0", "ckpt-1"]
