"""Child processes for the fault-injection tests: a training loop that saves and is killed.

``python tests/_fault_child.py zygote`` imports JAX, Orbax and datarax_ckpt once, without
starting JAX's backend or any Python thread, then reads one JSON trial per line on stdin
and forks a fresh child for each. A fork costs milliseconds where importing JAX costs
~2 s, so the kill tests can afford dozens of real SIGKILLs. The child arms a kill point
(a hook on the code path of one phase of a save: capture, write, commit, retention's
deletion), runs :func:`train` and is SIGKILLed there; the zygote reports its exit status.

The hooks only observe and kill: they call the original code unchanged.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from typing import Any

import flax.nnx  # noqa: F401 - imported lazily by datarax_ckpt: preload it before forking
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint._src.path import async_path, deleter

from datarax_ckpt import OrbaxCheckpointHandler, _linking, _snapshot, _writing

REACHED = "kill point reached:"  # written to the log just before the kill

# Kill points, each a hook on one phase of a save; "nth" picks the call that dies. Each
# names the functions it wraps: (owner, name, kill after the call rather than before).
_HOOKS = {
    # the state was encoded, its arrays not yet copied
    "capture.enter": [(_snapshot, "capture", False)],
    # the arrays were copied, the manifest not yet built
    "capture.copied": [(_snapshot, "capture", True)],
    # the worker starts the write: the save is queued, nothing on disk
    "write.enter": [(_writing, "write", False)],
    # array writes scheduled in the tmp folder; dies after delay_ms
    "write.arrays": [(ocp.PyTreeCheckpointHandler, "async_save", True)],
    # a JSON item (manifest/metadata) was written in the tmp folder
    "write.json": [(ocp.JsonCheckpointHandler, "async_save", True)],
    # tmp folder complete with commit_success.txt, not renamed
    "commit.before_rename": [(async_path, "rename", False)],
    # renamed to ckpt-<step>; retention not yet applied
    "commit.after_rename": [(async_path, "rename", True)],
    # retention is about to remove an old step
    "retention.delete": [(deleter.StandardCheckpointDeleter, "delete", False)],
    # retention is removing an old step's files (dies before the nth); deletion of old
    # steps is the only caller of os.unlink/os.rmdir in a save
    "retention.unlink": [(os, "unlink", False), (os, "rmdir", False)],
    # rollback (run alone, see rollback()) is about to change the file system: the trash
    # folder's creation, each step's rename into it, and each deletion that follows
    "rollback.fs": [(os, f, False) for f in ("mkdir", "rename", "unlink", "rmdir")],
}
POINTS = tuple(_HOOKS)
# Kill points of incremental saves only (tests/test_incremental.py).
_HOOKS["write.links"] = [(_linking, "link_folder", False)]  # before the nth array's links

_FROZEN: list[jax.Array] = []


def make_incremental_state(step: int) -> dict:
    """:func:`make_state` plus a frozen 4 MiB base: the very same jax.Array at every step
    of a process (so linked by identity), equal in content across processes (so linked
    by checksum after a restart)."""
    if not _FROZEN:
        rng = np.random.default_rng(1234)
        _FROZEN.append(jnp.asarray(rng.standard_normal((1024, 1024), dtype=np.float32)))
    return {**make_state(step), "base": _FROZEN[0]}


def make_state(step: int) -> dict:
    """A deterministic training state for ``step``: large and packed leaves, key, str."""
    rng = np.random.default_rng(step)
    return {
        "params": {
            # 3 MiB: above the 1 MiB pack threshold, so stored as its own array.
            "w": jnp.asarray(rng.standard_normal((768, 1024), dtype=np.float32)),
            "b": jnp.asarray(rng.standard_normal(1024).astype(jnp.bfloat16)),
        },
        "opt": (
            np.arange(step, step + 10, dtype=np.int64),
            rng.integers(0, 255, 4096, dtype=np.uint8),
        ),
        "rng": jax.random.key(step),
        "step": step,
        "name": f"step-{step}",
    }


# --------------------------------------------------------------------------- kill points


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _die_after(delay_ms: float) -> None:
    if delay_ms <= 0:
        _die()
    else:
        threading.Timer(delay_ms / 1000, _die).start()


class _Counter:
    def __init__(self, point: str, nth: int, delay_ms: float) -> None:
        self.point, self.calls, self.nth, self.delay_ms = point, 0, nth, delay_ms
        self.lock = threading.Lock()

    def hit(self) -> None:
        with self.lock:
            self.calls += 1
            fire = self.calls == self.nth
        if fire:
            os.write(2, f"{REACHED} {self.point} #{self.nth} +{self.delay_ms:.1f} ms\n".encode())
            _die_after(self.delay_ms)


def _wrap(owner: Any, name: str, counter: _Counter, *, after: bool) -> None:
    original = getattr(owner, name)
    if asyncio.iscoroutinefunction(original):

        @functools.wraps(original)
        async def wrapper(*args, **kwargs):
            if not after:
                counter.hit()
            result = await original(*args, **kwargs)
            if after:
                counter.hit()
            return result

    else:

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            if not after:
                counter.hit()
            result = original(*args, **kwargs)
            if after:
                counter.hit()
            return result

    setattr(owner, name, wrapper)


def arm(point: str, nth: int, delay_ms: float) -> None:
    """Installs the hook that SIGKILLs this process at the ``nth`` pass through ``point``
    (``"none"``: no hook)."""
    if point != "none" and point not in _HOOKS:
        raise ValueError(f"unknown kill point {point!r}")
    counter = _Counter(point, nth, delay_ms)
    for owner, name, after in _HOOKS.get(point, []):
        _wrap(owner, name, counter, after=after)


# --------------------------------------------------------------------------- storage faults


def mount_tmpfs(path: str, size_mib: int) -> bool:
    """Mounts a ``size_mib`` tmpfs on ``path``; False where mounting is not allowed.

    ``DATARAX_CKPT_NO_MOUNT=1`` forces the fallback (an injected error), to test it.
    """
    if os.environ.get("DATARAX_CKPT_NO_MOUNT") == "1":
        return False
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    command = ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", path]
    return subprocess.run(command, capture_output=True).returncode == 0


def unmount(path: str) -> None:
    subprocess.run(["umount", "-l", path], capture_output=True)


def make_read_only(path: str, mounted: bool) -> None:
    """Makes ``path`` read-only for this process: a remount, or chmod for a non-root user.

    Root ignores permission bits; without a mount of its own, the fault is injected
    with :func:`inject_storage_error` instead.
    """
    if mounted:
        subprocess.run(["mount", "-o", "remount,ro", path], check=True, capture_output=True)
    elif os.geteuid() != 0:
        os.chmod(path, 0o555)
    else:
        inject_storage_error(errno.EROFS, from_step=0)


def make_writable(path: str, mounted: bool) -> None:
    """Undoes :func:`make_read_only`."""
    if mounted:
        subprocess.run(["mount", "-o", "remount,rw", path], check=True, capture_output=True)
    elif os.geteuid() != 0:
        os.chmod(path, 0o755)
    else:
        clear_storage_errors()


_ORIGINAL_MKDIR = async_path.mkdir


def inject_storage_error(code: int, *, from_step: int) -> None:
    """Fallback fault where no small file system can be mounted: the storage layer (Orbax's
    folder creation, the first write of every checkpoint) raises ``OSError(code)`` for
    ``ckpt-<step>`` with ``step >= from_step`` and for the unversioned ``checkpoint``, as
    a full or read-only disk does there.
    """

    @functools.wraps(_ORIGINAL_MKDIR)
    async def mkdir(path, *args, **kwargs):
        match = re.match(r"(?:ckpt-(\d+)|checkpoint)\.orbax-checkpoint-tmp", epath.Path(path).name)
        if match and (match.group(1) is None or int(match.group(1)) >= from_step):
            raise OSError(code, os.strerror(code), str(path))
        return await _ORIGINAL_MKDIR(path, *args, **kwargs)

    async_path.mkdir = mkdir


def clear_storage_errors() -> None:
    """Undoes :func:`inject_storage_error`."""
    async_path.mkdir = _ORIGINAL_MKDIR


# --------------------------------------------------------------------------- training loop


def train(
    directory: str,
    first_step: int,
    n_steps: int,
    keep: int,
    progress: str,
    incremental: bool = False,
) -> None:
    """Saves ``make_state(step)`` asynchronously for each step, with ``keep`` retention.

    Appends ``issued <step>`` once a save is accepted and ``durable <step>`` after
    :meth:`wait_until_finished` returned (every third step) to the ``progress`` file.
    """
    fd = os.open(progress, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    state = make_incremental_state if incremental else make_state
    with OrbaxCheckpointHandler(incremental=incremental) as handler:
        for step in range(first_step, first_step + n_steps):
            handler.save(directory, state(step), step=step, keep=keep, metadata={"s": step})
            os.write(fd, f"issued {step}\n".encode())
            if step % 3 == 2:
                handler.wait_until_finished()
                os.write(fd, f"durable {step}\n".encode())
    os.write(fd, b"finished\n")
    os.close(fd)


def rollback(directory: str, step: int, progress: str) -> None:
    """Rolls ``directory`` back to ``step`` and writes the deleted steps to ``progress``."""
    with OrbaxCheckpointHandler() as handler:
        deleted = handler.rollback(directory, step)
    with open(progress, "w") as f:
        f.write(json.dumps(deleted))


def read_progress(progress: str) -> tuple[set[int], int]:
    """``(issued steps, last durable step or -1)`` from a progress file."""
    issued, durable = set(), -1
    if os.path.exists(progress):
        with open(progress) as f:
            for line in f:
                kind, _, value = line.strip().partition(" ")
                if kind == "issued":
                    issued.add(int(value))
                elif kind == "durable":
                    durable = max(durable, int(value))
    return issued, durable


def _run_trial(trial: dict) -> None:
    log = os.open(trial["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.dup2(log, 2)
    code = 0
    try:
        arm(trial["point"], trial["nth"], trial["delay_ms"])
        if "rollback_to" in trial:
            rollback(trial["directory"], trial["rollback_to"], trial["progress"])
        else:
            train(
                trial["directory"],
                trial["first_step"],
                trial["n_steps"],
                trial["keep"],
                trial["progress"],
                trial.get("incremental", False),
            )
    except BaseException:  # noqa: BLE001 - reported through the exit status and log
        traceback.print_exc()
        code = 1
    sys.stderr.flush()
    os._exit(code)


def storage_faults(full_dir: str, full_mounted: bool, ro_dir: str, ro_mounted: bool) -> dict:
    """Fills a disk, then makes another read-only mid-run; returns the errnos raised.

    Ends with a save still failing in the background, so that the process exit itself
    is tested: it must not wait for threads of the failed save.
    """
    report: dict[str, Any] = {"full": [], "ro": []}
    handler = OrbaxCheckpointHandler()
    if not full_mounted:
        inject_storage_error(errno.ENOSPC, from_step=3)
    for step in range(30):
        try:
            handler.save(full_dir, make_state(step), step=step)
        except* OSError as e:  # several at once come as one BackgroundSaveError
            report["full"].extend(error.errno for error in e.exceptions)
        if report["full"]:
            break
    while True:  # every failed save is reported once
        try:
            handler.wait_until_finished()
        except* OSError as e:
            report["full"].extend(error.errno for error in e.exceptions)
        else:
            break
    clear_storage_errors()
    handler.save(ro_dir, make_state(0), step=0)
    handler.wait_until_finished()
    make_read_only(ro_dir, ro_mounted)
    handler.save(ro_dir, make_state(1), step=1)
    try:
        handler.close()
    except OSError as e:
        report["ro"].append(e.errno)
    left_at_exit = OrbaxCheckpointHandler()  # closed by the exit hook, its save failing
    left_at_exit.save(ro_dir, make_state(2), step=2)
    return report


def preempted_loop(directory: str, mode: str) -> None:
    """A training loop under a PreemptionGuard, printing ``step <n>`` after each step.

    ``mode`` is ``"exit"`` (SIGTERM ends the process after the save; the loop knows
    nothing of it), ``"flag"`` (the loop stops when ``preemption_requested``),
    ``"sigint"`` (Ctrl-C saves, then raises KeyboardInterrupt) or
    ``"distributed:<port>"`` (under ``jax.distributed``, whose preemption service
    handles SIGTERM). Every 10th step is also saved by the loop itself.
    """
    from datarax_ckpt import PreemptionGuard

    # A test run started as a background job ignores SIGINT and its children inherit
    # that; a training process started from a terminal has Python's default handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if mode.startswith("distributed:"):  # a jax.distributed run (of one process)
        jax.distributed.initialize(f"127.0.0.1:{mode.split(':')[1]}", 1, 0)
    signals = (signal.SIGINT,) if mode == "sigint" else (signal.SIGTERM,)
    with OrbaxCheckpointHandler() as handler:
        guard = PreemptionGuard(
            handler, directory, signals=signals, keep=3, exit_on_preemption=mode != "flag"
        )
        with guard:
            for step in range(1, 100_000):
                state = make_state(step)  # the training step
                if mode.startswith("distributed:"):
                    # A real step takes far longer than JAX's background sync-point exchange;
                    # a loop spinning in microseconds can run past the sync step (seen here
                    # under CPU load: reached_preemption_sync_point never became True).
                    time.sleep(0.01)
                if step % 10 == 0:
                    handler.save(directory, state, step=step, keep=3)
                guard.register(state, step, metadata={"s": step})
                print(f"step {step}", flush=True)
                if mode == "flag" and guard.preemption_requested:
                    print("stopping", flush=True)
                    break
    print("exited cleanly", flush=True)


def zygote() -> None:
    """Forks one child per trial read from stdin; writes its pid, then its exit status."""
    for line in sys.stdin:
        trial = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _run_trial(trial)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        result = {"pid": pid, "signal": None, "code": None}
        if os.WIFSIGNALED(status):
            result["signal"] = os.WTERMSIG(status)
        else:
            result["code"] = os.WEXITSTATUS(status)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["zygote"]:
        zygote()
    elif sys.argv[1:2] == ["preempt"]:
        preempted_loop(sys.argv[2], sys.argv[3])
    elif sys.argv[1:2] == ["storage"]:
        full, full_mounted, ro, ro_mounted = sys.argv[2:6]
        print(json.dumps(storage_faults(full, full_mounted == "1", ro, ro_mounted == "1")))
    else:
        raise SystemExit(
            f"usage: {sys.argv[0]} zygote | storage FULL 0|1 RO 0|1 | preempt DIR exit|flag|sigint"
        )
