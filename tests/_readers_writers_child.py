"""One process of tests/test_readers_writers.py: a training job or an evaluation job.

Usage: ``python _readers_writers_child.py ROLE DIRECTORY RESULT_JSON N_STEPS``, ROLE one of
``writer``, ``restore``, ``follow``, ``verify``, ``hold``. Each role records what it
saw and every exception it met in RESULT_JSON; the test judges them.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from typer.testing import CliRunner

from datarax_ckpt import CheckpointNotFoundError, OrbaxCheckpointHandler, cli

KEEP = 3
DONE = "writer-done"  # created beside the directory once the writer has closed


def make_state(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {
        "params": {"w": jnp.asarray(rng.standard_normal((64, 32), np.float32))},
        "opt": {"mu": rng.standard_normal(300).astype(np.float16), "count": step},
        "step": step,
    }


def same(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, int | str):
        return type(a) is type(b) and a == b
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


class _Count(logging.Handler):
    """Counts the restore retries datarax_ckpt logs (a step deleted while being read)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.retries = 0

    def emit(self, record):
        if "was deleted while being" in record.getMessage():
            self.retries += 1


def writer(directory: Path, result: dict, n_steps: int) -> None:
    readers = int(os.environ.get("RW_READERS", "0"))  # start once they have imported jax
    deadline = time.monotonic() + 240
    while len(list(directory.parent.glob("ready-*"))) <= readers:
        assert time.monotonic() < deadline, "the readers did not start"
        time.sleep(0.05)
    with OrbaxCheckpointHandler() as handler:
        for step in range(n_steps):
            time.sleep(0.02)  # the training step
            keep = int(os.environ.get("RW_KEEP", KEEP))
            handler.save(directory, make_state(step), step=step, keep=keep, metadata={"s": step})
            result["saves"] += 1
        handler.wait_until_finished()
        result["final_steps"] = handler.get_checkpoint_steps(directory)


def _check(result: dict, state, step: int, n_steps: int) -> None:
    if not (0 <= step < n_steps and same(state, make_state(step))):
        result["wrong"].append(step)


def _wait_for_first_step(directory: Path) -> None:
    with OrbaxCheckpointHandler() as handler:
        while not handler.get_checkpoint_steps(directory):
            time.sleep(0.02)


def restore_loop(directory: Path, result: dict, n_steps: int) -> None:
    """An evaluation job that restores the latest step, and the oldest one it listed."""
    _wait_for_first_step(directory)
    newest = -1
    while not (directory.parent / DONE).exists():
        with OrbaxCheckpointHandler() as handler:  # a fresh handler each time
            steps = handler.get_checkpoint_steps(directory)
            state = handler.restore(directory)
            _check(result, state, state["step"], n_steps)
            if state["step"] < newest:
                result["went_back"].append([newest, state["step"]])
            newest = state["step"]
            result["restores"] += 1
            try:  # likely deleted by retention by now
                state = handler.restore(directory, step=steps[0])
                _check(result, state, steps[0], n_steps)
                result["restores_of_listed"] += 1
            except CheckpointNotFoundError as e:
                assert f"step {steps[0]}" in str(e) and "Available steps" in str(e), e
                result["not_found"] += 1
                if any("while it was being read" in n for n in getattr(e, "__notes__", ())):
                    result["deleted_mid_read"] += 1


def follow_loop(directory: Path, result: dict, n_steps: int) -> None:
    """The evaluation loop of the guide, ``timeout`` ending each round of follow()."""
    last = None
    with OrbaxCheckpointHandler() as handler:
        while True:
            done = (directory.parent / DONE).exists()
            for step in handler.follow(
                directory, after=last, timeout=0 if done else 1.0, poll_interval=0.05
            ):
                if last is not None and step <= last:
                    result["wrong"].append(step)
                last = step
                result["yields"].append(step)
                try:
                    state = handler.restore(directory, step=step)
                except CheckpointNotFoundError:
                    result["not_found"] += 1  # retention deleted it first
                    continue
                _check(result, state, step, n_steps)
                result["restores"] += 1
            if done:
                return


def verify_loop(directory: Path, result: dict, n_steps: int) -> None:
    """A monitoring job: verify the latest step, and list the directory with the CLI."""
    _wait_for_first_step(directory)
    runner = CliRunner()
    while not (directory.parent / DONE).exists():
        with OrbaxCheckpointHandler() as handler:
            report = handler.verify(directory)
        if not report.ok or report.step is None or not 0 <= report.step < n_steps:
            result["wrong"].append(str(report))
        result["verifies"] += 1
        listed = runner.invoke(cli.app, ["ls", str(directory), "--json"])
        if listed.exit_code != 0 or listed.exception is not None:
            trace = "".join(traceback.format_exception(listed.exception))
            result["errors"].append(f"ls exit {listed.exit_code}: {listed.output}\n{trace}")
            continue
        for row in json.loads(listed.stdout):
            result["statuses"][row["status"]] = result["statuses"].get(row["status"], 0) + 1
        result["listings"] += 1


def hold(directory: Path, result: dict, n_steps: int) -> None:
    """A writer that saves, forks a worker (as data loaders do), then waits to be killed."""
    handler = OrbaxCheckpointHandler()
    handler.save(directory, make_state(0), step=0)
    handler.wait_until_finished()
    worker = os.fork()
    if worker == 0:  # outlives its parent, holding whatever it inherited
        time.sleep(600)
        os._exit(0)
    print("ready", worker, flush=True)
    time.sleep(600)


ROLES = {
    "writer": writer,
    "restore": restore_loop,
    "follow": follow_loop,
    "verify": verify_loop,
    "hold": hold,
}


def main() -> None:
    role, directory, out, n_steps = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    counter = _Count()
    logging.getLogger("datarax_ckpt").addHandler(counter)
    logging.getLogger("datarax_ckpt").setLevel(logging.DEBUG)
    result = {
        "role": role,
        "pid": os.getpid(),
        "errors": [],
        "wrong": [],
        "went_back": [],
        "statuses": {},
        "yields": [],
        **dict.fromkeys(
            [
                "saves",
                "restores",
                "restores_of_listed",
                "not_found",
                "deleted_mid_read",
                "verifies",
                "listings",
            ],
            0,
        ),
    }
    (directory.parent / f"ready-{role}").touch()
    try:
        ROLES[role](directory, result, n_steps)
    except BaseException:  # noqa: BLE001 - recorded for the test to report
        result["errors"].append(traceback.format_exc())
    finally:
        result["retries"] = counter.retries
        Path(out).write_text(json.dumps(result))
        if role == "writer":
            (directory.parent / DONE).touch()


if __name__ == "__main__":
    main()
