"""Options of :class:`~datarax_ckpt.OrbaxCheckpointHandler`."""

from __future__ import annotations

import dataclasses
import datetime
from typing import Literal

# Leaves at or below this many bytes are packed into one contiguous buffer per
# dtype before they reach Orbax, which pays ~1.5 ms of write time per stored leaf.
# 1 MiB was chosen by running benchmarks/ on the GPT-2-small and 2000 x 64 KiB states:
# above it packing gains nothing measurable, below it per-leaf cost dominates.
DEFAULT_PACK_THRESHOLD_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class CheckpointOptions:
    """How an :class:`~datarax_ckpt.OrbaxCheckpointHandler` saves and restores.

    Attributes:
        async_save: If True (default), ``save()`` returns once the state is captured
            and the write continues in the background. If False, ``save()`` returns
            only when the checkpoint is committed on disk.
        use_compression: Compress arrays with zstd (Orbax's default). Off by default:
            random float32 shrinks only to ~87% while saves and restores slow down
            (measured in ``docs/benchmarks.md``); turn it on for smaller files.
        use_ocdbt: Store arrays in Orbax's OCDBT key-value store (Orbax's default). None
            (default): OCDBT, except with ``incremental`` saves, which store one folder
            per array (OCDBT's shared data files cannot be linked array by array).
        pack_threshold_bytes: Single-device leaves of at most this many bytes are
            packed into one buffer per dtype (0 disables packing).
        snapshot: Where the state is copied before ``save()`` returns, so that later
            donation or mutation of the caller's arrays cannot reach the checkpoint.
            ``"auto"``: ``"device"`` on CPU, ``"host"`` on accelerators. On CPU either
            mode pins jax arrays instead of copying them (a numpy view keeps jax from
            donating or freeing the buffer until the write is done) and copies numpy
            arrays.
            ``"device"``: one jitted copy within device memory (on an accelerator this
            costs device memory equal to the state's size, then drains in the background).
            ``"host"``: a device-to-host copy into pinned host memory.
        max_pending_saves: How many saves may be captured but not yet durable. A save
            beyond it applies ``on_backpressure``. Bounds host memory to about
            ``max_pending_saves`` copies of the state.
        max_pending_bytes: Optional bound on the bytes held by pending snapshots.
        on_backpressure: ``"wait"`` (default): the save waits for earlier writes to
            drain. ``"skip"``: the save is dropped with a logged warning and returns None.
        cleanup_tmp_directories: Remove temporary folders left by a killed save when
            this handler first saves to a directory (it then holds the directory's
            writer lock, so no live writer owns them). Reads never remove anything.
        checksums: Record an xxh3-64 checksum of every stored array (and of the manifest
            and metadata) with each save, hashed in the background beside the write. It lets
            ``verify()`` and ``restore()`` detect silent corruption (see ``docs/trust.md``
            for its measured cost).
        verify_on_restore: Check the recorded checksums of everything ``restore()`` reads
            before returning it (default True; measured: -2% to +11% on a 1 GiB restore
            on the 2-core CI machine, see ``docs/trust.md``). ``restore(verify=...)``
            overrides it per call.
        save_interval_steps: Save only steps that are multiples of this (Orbax's
            ``FixedIntervalPolicy``): ``save()`` at another step writes nothing and
            returns None, so a training loop can call it every step; ``save(...,
            force=True)`` saves anyway. See also ``handler.should_save``.
        keep_period: Keep every step that is a multiple of this forever, beside the
            newest ``keep`` (Orbax's ``EveryNSteps``).
        keep_best: Keep the best ``keep_best`` steps by ``best_metric``, beside the
            newest ``keep`` (Orbax's ``BestN``). A step whose metadata lacks the metric
            is not a candidate: it is kept only by the other rules.
        best_metric: The top-level ``metadata`` key whose number ranks steps for
            ``keep_best`` (e.g. ``"eval_loss"``). Required with ``keep_best``.
        best_mode: ``"min"`` (default): a smaller metric is better; ``"max"``: larger.
        incremental: Write only the stored arrays whose content differs from the newest
            committed step of the directory; hard-link the others from it (equality by
            the very same ``jax.Array`` object or by dtype, shape and xxh3 checksum).
            Off by default (see ``docs/design.md``, "Incremental saves"); needs
            ``checksums``, local or network file systems (not ``s3://``), and links only
            in single-process runs.
        keep_time_interval: Keep one step per this interval forever (e.g.
            ``datetime.timedelta(hours=1)``; whole seconds, at least 1 s), beside the
            newest ``keep`` (Orbax's ``EveryNSeconds``, timed by each step's commit).

        ``keep_period``, ``keep_best`` and ``keep_time_interval`` only add to a save's
        ``keep``: with ``keep=None`` every step is kept anyway.

    Raises:
        ValueError: if a value is out of range.
        TypeError: if a value has the wrong type.

    Example:
        >>> from datarax_ckpt import CheckpointOptions
        >>> CheckpointOptions(use_compression=True).use_compression
        True
    """

    async_save: bool = True
    use_compression: bool = False
    use_ocdbt: bool | None = None
    pack_threshold_bytes: int = DEFAULT_PACK_THRESHOLD_BYTES
    snapshot: Literal["auto", "device", "host"] = "auto"
    max_pending_saves: int = 2
    max_pending_bytes: int | None = None
    on_backpressure: Literal["wait", "skip"] = "wait"
    cleanup_tmp_directories: bool = True
    checksums: bool = True
    verify_on_restore: bool = True
    save_interval_steps: int | None = None
    keep_period: int | None = None
    keep_best: int | None = None
    best_metric: str | None = None
    best_mode: Literal["min", "max"] = "min"
    keep_time_interval: datetime.timedelta | None = None
    # Off by default: see docs/design.md ("Incremental saves") for the measured trade-off.
    incremental: bool = False

    @property
    def ocdbt(self) -> bool:
        """Whether the state item is an OCDBT store (``use_ocdbt`` resolved)."""
        return (not self.incremental) if self.use_ocdbt is None else self.use_ocdbt

    def __post_init__(self):
        for name in (
            "async_save",
            "use_compression",
            "cleanup_tmp_directories",
            "checksums",
            "verify_on_restore",
            "incremental",
        ):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"CheckpointOptions.{name} must be a bool, got {value!r}.")
        if self.use_ocdbt is not None and not isinstance(self.use_ocdbt, bool):
            raise TypeError(
                f"CheckpointOptions.use_ocdbt must be a bool or None, got {self.use_ocdbt!r}."
            )
        if self.incremental and (self.use_ocdbt or not self.checksums):
            raise ValueError(
                "CheckpointOptions(incremental=True) needs checksums=True (equal arrays are "
                "found by their recorded checksums) and use_ocdbt None or False (unchanged "
                "arrays are hard-linked folder by folder, which OCDBT's shared data files do "
                f"not allow); got checksums={self.checksums}, use_ocdbt={self.use_ocdbt}."
            )
        _check_int("pack_threshold_bytes", self.pack_threshold_bytes, minimum=0)
        _check_int("max_pending_saves", self.max_pending_saves, minimum=1)
        if self.max_pending_bytes is not None:
            _check_int("max_pending_bytes", self.max_pending_bytes, minimum=1)
        _check_choice("snapshot", self.snapshot, ("auto", "device", "host"))
        _check_choice("on_backpressure", self.on_backpressure, ("wait", "skip"))
        for name in ("save_interval_steps", "keep_period", "keep_best"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1)
        _check_choice("best_mode", self.best_mode, ("min", "max"))
        if self.best_metric is not None and (
            not isinstance(self.best_metric, str) or not self.best_metric
        ):
            raise TypeError(
                f"CheckpointOptions.best_metric must be a metadata key (a non-empty str), "
                f"got {self.best_metric!r}."
            )
        if (self.keep_best is None) != (self.best_metric is None):
            raise ValueError(
                "CheckpointOptions.keep_best and best_metric go together: keep_best=K keeps "
                "the K best steps by the metadata value named by best_metric, e.g. "
                f'keep_best=3, best_metric="eval_loss" (got keep_best={self.keep_best!r}, '
                f"best_metric={self.best_metric!r})."
            )
        interval = self.keep_time_interval
        if interval is not None:
            if not isinstance(interval, datetime.timedelta):
                raise TypeError(
                    "CheckpointOptions.keep_time_interval must be a datetime.timedelta, "
                    f"got {interval!r}."
                )
            if interval.total_seconds() < 1:
                raise ValueError(
                    "CheckpointOptions.keep_time_interval must be at least 1 second (Orbax "
                    f"counts whole seconds), got {interval}."
                )


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"CheckpointOptions.{name} must be an int, got {value!r}.")
    if value < minimum:
        raise ValueError(f"CheckpointOptions.{name} must be >= {minimum}, got {value}.")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"CheckpointOptions.{name} must be one of {choices}, got {value!r}.")
