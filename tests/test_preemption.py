"""PreemptionGuard: a real signal makes the next register() save, commit, then exit."""

from __future__ import annotations

import doctest
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import jax.numpy as jnp
import pytest
from _fault_child import make_state
from _trees import assert_identical as assert_same
from flax import nnx

from datarax_ckpt import OrbaxCheckpointHandler, PreemptionGuard, preemption

CHILD = Path(__file__).with_name("_fault_child.py")


def _state(step: int) -> dict:
    return {"w": jnp.full((4,), float(step)), "step": step}


# --------------------------------------------------------------------------- in this process


def test_signal_sets_the_flag_and_the_next_register_saves_once(handler, tmp_path):
    with PreemptionGuard(handler, tmp_path, exit_on_preemption=False) as guard:
        assert guard.register(_state(0), 0) is False
        assert not guard.preemption_requested
        signal.raise_signal(signal.SIGTERM)  # a real SIGTERM, handled by the guard
        assert guard.preemption_requested
        assert guard.register(_state(1), 1, metadata={"lr": 0.1}) is True
        assert guard.register(_state(2), 2) is False  # saved once
    assert guard.saved_step == 1
    assert handler.get_checkpoint_steps(tmp_path) == [1]
    assert_same(handler.restore(tmp_path), _state(1))
    metadata = handler.restore(tmp_path, metadata_only=True)
    assert metadata == {"lr": 0.1, "preempted_by": "SIGTERM"}


def test_no_signal_saves_nothing_and_restores_the_previous_handlers(handler, tmp_path):
    def previous(signum, frame):
        pass

    old = signal.signal(signal.SIGTERM, previous)
    sigint_before = signal.getsignal(
        signal.SIGINT
    )  # not always Python's: a background job ignores it
    try:
        with PreemptionGuard(handler, tmp_path, signals=(signal.SIGTERM, signal.SIGINT)) as g:
            assert signal.getsignal(signal.SIGTERM) == g._on_signal
            for step in range(3):
                g.register(_state(step), step)
        assert signal.getsignal(signal.SIGTERM) is previous
        assert signal.getsignal(signal.SIGINT) is sigint_before
    finally:
        signal.signal(signal.SIGTERM, old)
    assert handler.get_checkpoint_steps(tmp_path) == []
    assert g.saved_step is None


def test_exit_delivers_the_signal_to_its_previous_handler_after_the_commit(handler, tmp_path):
    delivered = []

    def previous(signum, frame):
        delivered.append((signum, handler.get_checkpoint_steps(tmp_path)))

    old = signal.signal(signal.SIGTERM, previous)
    try:
        with PreemptionGuard(handler, tmp_path) as guard:
            guard.register(_state(0), 0)
            signal.raise_signal(signal.SIGTERM)
            assert delivered == []  # held back until the state is saved
            guard.register(_state(1), 1)
    finally:
        signal.signal(signal.SIGTERM, old)
    assert delivered == [(signal.SIGTERM, [1])]  # committed before the signal went on


def test_leaving_the_block_after_a_signal_saves_the_last_registered_state(handler, tmp_path):
    with PreemptionGuard(handler, tmp_path, exit_on_preemption=False) as guard:
        guard.register(_state(7), 7)
        signal.raise_signal(signal.SIGTERM)
    assert guard.saved_step == 7
    assert_same(handler.restore(tmp_path, step=7), _state(7))


def test_a_state_function_is_called_only_when_a_save_is_due(handler, tmp_path):
    calls = []

    def current_state():
        calls.append(1)
        return _state(len(calls))

    with PreemptionGuard(handler, tmp_path, exit_on_preemption=False) as guard:
        for step in range(5):
            guard.register(current_state, step)
        assert calls == []
        signal.raise_signal(signal.SIGTERM)
        guard.register(current_state, 5)
    assert calls == [1]
    assert_same(handler.restore(tmp_path, step=5), _state(1))


def test_a_callable_module_is_saved_not_called(handler, tmp_path):
    model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    with PreemptionGuard(handler, tmp_path, exit_on_preemption=False) as guard:
        signal.raise_signal(signal.SIGTERM)
        guard.register(model, 3)
    restored = handler.restore(tmp_path, nnx.Linear(2, 3, rngs=nnx.Rngs(1)))
    assert_same(restored.kernel[...], model.kernel[...])


def test_a_step_the_loop_already_saved_is_not_saved_twice(handler, tmp_path):
    with PreemptionGuard(handler, tmp_path, exit_on_preemption=False) as guard:
        handler.save(tmp_path, _state(10), step=10, metadata={"by": "loop"})
        signal.raise_signal(signal.SIGTERM)
        assert guard.register(_state(10), 10) is True
    assert guard.saved_step == 10
    assert handler.restore(tmp_path, metadata_only=True) == {"by": "loop"}


def test_register_outside_the_block_and_off_main_thread_entry_are_refused(handler, tmp_path):
    guard = PreemptionGuard(handler, tmp_path)
    with pytest.raises(RuntimeError, match="inside `with PreemptionGuard"):
        guard.register(_state(0), 0)
    errors = []

    def enter():
        try:
            guard.__enter__()
        except RuntimeError as e:
            errors.append(str(e))

    thread = threading.Thread(target=enter)
    thread.start()
    thread.join()
    assert errors and "main thread" in errors[0]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"signals": ()}, ValueError, "non-empty tuple of signals"),
        ({"signals": (signal.SIGKILL,)}, ValueError, "cannot be caught"),
        ({"signals": ("SIGTERM",)}, ValueError, "non-empty tuple of signals"),
        ({"keep": 0}, ValueError, "keep must be >= 1"),
        ({"exit_on_preemption": "yes"}, TypeError, "exit_on_preemption must be a bool"),
    ],
)
def test_bad_arguments(handler, tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        PreemptionGuard(handler, tmp_path, **kwargs)


def test_handler_must_be_a_handler(tmp_path):
    with pytest.raises(TypeError, match="handler must be an OrbaxCheckpointHandler"):
        PreemptionGuard(object(), tmp_path)


def test_docstring_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = doctest.testmod(preemption, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# --------------------------------------------------------------------------- real child processes


def _run_until_signalled(directory: Path, mode: str, sig: signal.Signals, at_step: int):
    """Starts a training child, signals it once it printed ``step <at_step>``."""
    child = subprocess.Popen(
        [sys.executable, str(CHILD), "preempt", str(directory), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    printed = []
    for line in child.stdout:
        printed.append(line.strip())
        if line.strip() == f"step {at_step}":
            child.send_signal(sig)
            break
    rest, stderr = child.communicate(timeout=120)
    printed += rest.splitlines()
    steps = [int(line.split()[1]) for line in printed if line.startswith("step ")]
    return child.returncode, printed, steps, stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("mode", "sig", "returncode"),
    [
        ("exit", signal.SIGTERM, -signal.SIGTERM),  # ended by the signal, as without a guard
        ("sigint", signal.SIGINT, -signal.SIGINT),  # KeyboardInterrupt, Python exits by SIGINT
        ("flag", signal.SIGTERM, 0),  # the loop stops by itself
        pytest.param(
            "distributed",
            signal.SIGTERM,
            143,  # JAX's preemption service; SystemExit(143)
            # Opt-in: in about 1 of 4 full-suite runs JAX's preemption service never
            # reported the sync point after the SIGTERM (the child trained on until the
            # 120 s timeout), while it passed 10 of 10 runs alone. Under investigation;
            # see docs/reliability.md. Run it with DATARAX_CKPT_JAX_PREEMPTION=1.
            marks=pytest.mark.skipif(
                not os.environ.get("DATARAX_CKPT_JAX_PREEMPTION"),
                reason="flaky in JAX's preemption service; DATARAX_CKPT_JAX_PREEMPTION=1 runs it",
            ),
            id="distributed-15-143",
        ),
    ],
)
def test_real_signal_to_a_training_process(tmp_path, mode, sig, returncode):
    if mode == "distributed":
        mode = f"distributed:{_free_port()}"
    returncode_seen, printed, steps, stderr = _run_until_signalled(tmp_path, mode, sig, 12)
    assert returncode_seen == returncode, stderr[-3000:]
    with OrbaxCheckpointHandler() as handler:
        listed = handler.get_checkpoint_steps(tmp_path)
        saved = listed[-1]
        if mode == "flag":
            assert printed[-2:] == ["stopping", "exited cleanly"]
            assert saved == steps[-1]  # the step at which the loop stopped
        else:
            assert "exited cleanly" not in printed
            assert saved == steps[-1] + 1  # the register() after the signal saved, then exited
        assert saved >= 12
        saves = sorted({*range(10, saved + 1, 10), saved})  # the loop's own and the guard's
        assert listed == saves[-3:]  # keep=3
        assert_same(handler.restore(tmp_path), make_state(saved))
        metadata = handler.restore(tmp_path, metadata_only=True)
        if saved % 10:
            assert metadata == {"s": saved, "preempted_by": sig.name}
        else:  # the loop had saved this very step: the guard did not save it again
            assert metadata == {}
