"""PreemptionGuard: save the latest state when the job is told to stop, then let it stop."""

from __future__ import annotations

import functools
import logging
import signal
import threading
import types
from collections.abc import Callable
from typing import Any

from datarax_ckpt import _validate
from datarax_ckpt._handler import OrbaxCheckpointHandler
from datarax_ckpt._typing import PathLike, PyTree

logger = logging.getLogger("datarax_ckpt")

_STATE_FUNCTIONS = (types.FunctionType, types.MethodType, functools.partial)


def _sync_manager() -> Any:
    """JAX's preemption sync manager when ``jax.distributed`` runs one, else None."""
    from jax._src import distributed  # as jax.experimental.multihost_utils reaches it

    if distributed.global_state.client is None:
        return None
    manager = distributed.global_state.preemption_sync_manager
    if manager is None:
        raise RuntimeError(
            "PreemptionGuard in a jax.distributed run needs JAX's preemption service, so "
            "that every process saves at the same step. Enable it with "
            "jax.config.update('jax_enable_preemption_service', True) before "
            "jax.distributed.initialize()."
        )
    return manager


def _check_signals(signals: Any) -> tuple[signal.Signals, ...]:
    items = tuple(signals) if isinstance(signals, tuple | list) else ()
    try:
        checked = tuple(signal.Signals(s) for s in items if not isinstance(s, bool))
    except ValueError:
        checked = ()
    if not checked or len(checked) != len(items):
        raise ValueError(
            f"signals must be a non-empty tuple of signals such as (signal.SIGTERM,), got "
            f"{signals!r}."
        )
    uncatchable = [s.name for s in checked if s in (signal.SIGKILL, signal.SIGSTOP)]
    if uncatchable:
        raise ValueError(f"{uncatchable} cannot be caught; a preemption guard cannot act on it.")
    return checked


class PreemptionGuard:
    """Saves the latest registered state when a preemption signal arrives, then exits.

    Cluster schedulers send SIGTERM some seconds before they evict a job. Inside
    ``with PreemptionGuard(...)``, that signal only sets :attr:`preemption_requested`;
    the training loop keeps going until its next :meth:`register` call, which saves the
    state it is given, waits until the checkpoint is committed, then delivers the
    signal as it would have been delivered without the guard (by default SIGTERM ends
    the process, with the usual status -15, shell status 143). Saving at that point,
    on the loop's own thread, means the state is complete and its arrays are not
    being donated, and no lock of the handler can be held by the interrupted code.
    Leaving the ``with`` block after a signal saves the last registered state first.

    Loops that prefer to stop by themselves pass ``exit_on_preemption=False``:
    :meth:`register` then saves and returns True, and the loop ends when
    :attr:`preemption_requested` is True (as with Orbax's preemption policy).

    In a ``jax.distributed`` run the guard installs no signal handler: JAX's
    preemption service already handles SIGTERM and picks one step for all processes;
    :meth:`register` asks it (``multihost_utils.reached_preemption_sync_point``), so
    every process must call :meth:`register` at every step with the same step ids.
    After the save every process raises ``SystemExit(143)``. JAX computes that step in
    the background; a loop whose steps take microseconds (not a real training step) can
    run past it, and then the preemption is never reported (seen in a test loop under
    CPU load, fixed by a 10 ms step).

    Args:
        handler: The handler that saves.
        directory: The checkpoint directory.
        signals: The signals that mean "preemption" (SIGTERM by default; add
            ``signal.SIGINT`` to also save on Ctrl-C).
        keep: ``keep`` of the preemption save (None keeps all steps).
        exit_on_preemption: After the save, deliver the signal (True, default) or
            return True from :meth:`register` and let the loop stop (False).

    Raises:
        TypeError: if ``handler`` is not an :class:`~datarax_ckpt.OrbaxCheckpointHandler`,
            or ``keep``/``exit_on_preemption`` has the wrong type.
        ValueError: if ``signals`` is empty or holds something other than a signal, or
            ``keep`` is < 1.

    Example:
        >>> import tempfile, jax.numpy as jnp
        >>> from datarax_ckpt import OrbaxCheckpointHandler, PreemptionGuard
        >>> directory = tempfile.mkdtemp()
        >>> with OrbaxCheckpointHandler() as handler:
        ...     with PreemptionGuard(handler, directory) as guard:
        ...         for step in range(3):
        ...             state = {"w": jnp.full(3, step)}
        ...             _ = guard.register(state, step)  # saves, then exits after a SIGTERM
        ...     steps = handler.get_checkpoint_steps(directory)
        >>> guard.preemption_requested, steps  # no signal came: nothing was saved
        (False, [])
    """

    def __init__(
        self,
        handler: OrbaxCheckpointHandler,
        directory: PathLike,
        *,
        signals: tuple[signal.Signals | int, ...] = (signal.SIGTERM,),
        keep: int | None = None,
        exit_on_preemption: bool = True,
    ):
        if not isinstance(handler, OrbaxCheckpointHandler):
            raise TypeError(
                f"handler must be an OrbaxCheckpointHandler, got {type(handler).__name__}."
            )
        self.signals = _check_signals(signals)
        _validate.keep(keep)
        _validate.flag("exit_on_preemption", exit_on_preemption)
        self.handler = handler
        self.directory = directory
        self.keep = keep
        self.exit_on_preemption = exit_on_preemption
        self._received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}
        self._registered: tuple[Any, int, dict | None] | None = None
        self._sync = None
        self._active = False
        self._delivered = False
        self.saved_step: int | None = None
        """The step saved because of the preemption, once saved."""

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> PreemptionGuard:
        if self._active:
            raise RuntimeError("This PreemptionGuard is already active.")
        self._sync = _sync_manager()
        if self._sync is None:
            if threading.current_thread() is not threading.main_thread():
                raise RuntimeError(
                    "PreemptionGuard must be entered on the main thread: Python delivers "
                    "signals only there."
                )
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        self._active = True
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self._received is not None and self.saved_step is None:
                if self._registered is None:
                    logger.warning("Preempted before any state was registered: nothing saved.")
                else:
                    self._save(*self._registered)
        finally:
            self._restore_handlers()
            self._active = False
        if self._received is not None and self.exit_on_preemption and exc_type is None:
            self._deliver()

    def _restore_handlers(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        del frame
        if self._received is None:
            self._received = signal.Signals(signum)
            logger.warning(
                "Received %s: the next register() saves the state, then the process %s.",
                self._received.name,
                "exits" if self.exit_on_preemption else "is told to stop",
            )

    # ------------------------------------------------------------------ the loop's side

    @property
    def preemption_requested(self) -> bool:
        """True once a preemption signal arrived (or JAX's sync point was reached)."""
        return self._received is not None

    def register(
        self,
        state: PyTree | Callable[[], PyTree],
        step: int,
        *,
        metadata: dict | None = None,
    ) -> bool:
        """Records the latest state; after a preemption signal, saves it and exits.

        Call it once per training step, after the step's update, with the new state.
        Without a pending preemption this only keeps a reference (no copy, no I/O).

        Args:
            state: The state to save on preemption, or a function (a ``def`` or
                ``lambda``, a bound method, a ``functools.partial``) returning it, called
                only when a save is due. Any other object is the state itself: a Flax
                NNX module is saved, not called.
            step: The step of ``state``. If this step was already saved to the
                directory (for instance by the loop's own periodic save), it is not
                saved again: the guard only waits until it is committed.
            metadata: Metadata of the preemption save; the guard adds
                ``"preempted_by": <signal name>``.

        Returns:
            True if the state was saved because of a preemption (with
            ``exit_on_preemption=True`` the signal is delivered instead, so this
            returns only if the previous disposition of the signal lets it return).

        Raises:
            RuntimeError: if the guard is not active (use it as a context manager).
            Exception: an error of the preemption save or an earlier background save.
        """
        if not self._active:
            raise RuntimeError("Call register() inside `with PreemptionGuard(...) as guard:`.")
        self._registered = (state, step, metadata)
        if self._received is None and self._sync is not None:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self._received = signal.SIGTERM  # what JAX's preemption notifier listens to
        if self._received is None or self.saved_step is not None:
            return False
        self._save(state, step, metadata)
        if self.exit_on_preemption:
            self._deliver()
        return True

    def _deliver(self) -> None:
        """Hands the signal to the disposition it had before the guard (once).

        In a ``jax.distributed`` run JAX's notifier owns SIGTERM and would swallow it
        again: the process exits with the status a SIGTERM death gets in a shell (143).
        """
        assert self._received is not None
        if not self._delivered:
            self._delivered = True
            self._restore_handlers()
            if self._sync is not None:
                raise SystemExit(128 + self._received)
            signal.raise_signal(self._received)

    def _save(self, state: Any, step: int, metadata: dict | None) -> None:
        assert self._received is not None
        self.handler.wait_until_finished()
        if step in self.handler.get_checkpoint_steps(self.directory):
            logger.warning("Preemption: step %d is already saved in %s.", step, self.directory)
        else:
            if isinstance(state, _STATE_FUNCTIONS):
                state = state()
            metadata = {**(metadata or {}), "preempted_by": self._received.name}
            self.handler.save(  # force: saved even off CheckpointOptions.save_interval_steps
                self.directory, state, step=step, keep=self.keep, metadata=metadata, force=True
            )
            self.handler.wait_until_finished()
            logger.warning("Preemption: saved step %d to %s.", step, self.directory)
        self.saved_step = step
