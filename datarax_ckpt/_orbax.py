"""Orbax, in one place: item handlers, the checksums plug-in, one read path, one write
path, the ``CheckpointManager`` and its policy objects, and the ``s3://`` spec builder.

Every other module asks this one (besides ``_layout``, which asks Orbax's public
``step.is_path_finalized`` whether a folder is committed). Three private Orbax names are
used, here only, each because Orbax offers no public hook for it:

* ``orbax.checkpoint._src.serialization.tensorstore_utils``: the function Orbax's own
  ``NumpyHandler`` builds its read spec with (for reads into aligned buffers, below) and
  ``build_kvstore_tspec``, which every array write, read and OCDBT merge goes through and
  which knows no ``s3://`` (:func:`teach_s3_specs`);
* ``orbax.checkpoint._src.metadata.step_metadata_serialization``: to check that Orbax's
  manager can list a step before it reads its ``_CHECKPOINT_METADATA``
  (:func:`step_metadata_error`);
* ``CheckpointManager._checkpoint_deleter`` and ``_maybe_await_cleanup_tmp_directory``:
  marker-first deletion on ``s3://`` and waiting for Orbax's start-up cleanup.

Reading stored arrays into host memory that jax adopts without a copy: Orbax reads a
``jax.Array`` by allocating a numpy buffer, letting TensorStore fill it, then
``jax.device_put``-ing it; on CPU that put is a second full copy because numpy's
buffers are 16-byte aligned and XLA adopts host memory without copying only at 64-byte
alignment. Orbax's plug-in point for this is a ``TypeHandler``: the state item's
``PyTreeCheckpointHandler`` gets a private registry (Orbax's own handlers plus one) in
which :class:`AlignedHostArray` reads through Orbax's ``NumpyHandler`` logic into a
64-byte-aligned buffer. Restoring 1 GiB in 8 leaves on the 2-core CI machine went from
0.93 s (read) + 0.43 s (copy into jax) to 0.54-0.74 s in all (``docs/performance.md``).
Arrays on several devices keep Orbax's ``ArrayHandler`` path (per-shard reads).

Save and keep policies: :class:`CheckpointOptions` fields become Orbax's own policy
objects. Orbax decides; this module only builds its objects. ``keep`` (a save's
argument) is ``LatestN``; ``keep_period`` is ``EveryNSteps``; ``keep_time_interval`` is
``EveryNSeconds``; ``keep_best`` is ``BestN``; together ``AnyPreservationPolicy`` (a step
is kept if any of them keeps it). ``save_interval_steps`` is ``FixedIntervalPolicy``.
``LatestN`` keeps the last saves in save order, which is step order because the handler
refuses a save below a newer step (:mod:`datarax_ckpt._steps`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import datetime
import functools
import json
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from datarax_ckpt import _arena, _layout, _linking, _placing, _s3, _safeio
from datarax_ckpt._layout import ITEM_CHECKSUMS, ITEM_MANIFEST, ITEM_METADATA, ITEM_STATE
from datarax_ckpt.options import CheckpointOptions

try:  # the function Orbax's own NumpyHandler builds its read spec with
    from orbax.checkpoint._src.serialization import tensorstore_utils as _ts_utils
except ImportError:  # pragma: no cover - a future Orbax layout: plain reads, then a copy
    _ts_utils = None

if TYPE_CHECKING:
    from datarax_ckpt._snapshot import StoredSpec

logger = logging.getLogger("datarax_ckpt")
_policies = ocp.checkpoint_managers


# --------------------------------------------------------------------------- reads

# Called with (stored key, array) as each array read by _AlignedNumpyHandler is complete.
_on_read: contextvars.ContextVar[Callable[[str, np.ndarray], None] | None] = contextvars.ContextVar(
    "datarax_ckpt_on_read", default=None
)


@contextlib.contextmanager
def on_read(callback: Callable[[str, np.ndarray], None]) -> Iterator[None]:
    """Calls ``callback(key, array)`` as each host read of :func:`read` completes.

    The callback runs on Orbax's event loop: it must only hand the work elsewhere. Where
    Orbax runs its reads in another context (another thread), it is not called at all.
    """
    token = _on_read.set(callback)
    try:
        yield
    finally:
        _on_read.reset(token)


_MAX_SPECS = 1 << 14  # read specs kept (a few KiB each)


class AlignedHostArray:
    """Restore type: read a stored array as numpy, into 64-byte-aligned memory."""


class _AlignedNumpyHandler(ocp.type_handlers.NumpyHandler):
    """Orbax's NumpyHandler, reading into buffers that XLA can adopt without a copy."""

    def typestr(self) -> str:
        return "datarax_ckpt.aligned_ndarray"

    async def deserialize(self, infos, args=None):
        if _ts_utils is None:  # pragma: no cover
            return await super().deserialize(infos, args)
        args = args or [ocp.RestoreArgs()] * len(infos)
        opened = []
        for info, arg in zip(infos, args, strict=True):
            await info.await_path_creation()
            if not info.is_ocdbt_checkpoint:
                await _ts_utils.assert_parameter_files_exist(
                    info.parent_dir / info.name, self._metadata_key, info.use_zarr3
                )
            opened.append(ts.open(self._spec(info, arg), open=True, context=info.ts_context))
        stores = await _gather_all(opened)
        outs = [_arena.empty(tuple(t.shape), t.dtype.numpy_dtype) for t in stores]
        callback = _on_read.get()

        async def fill(name: str, out: np.ndarray, store: Any) -> None:
            await ts.array(out).write(store)
            if callback is not None:
                callback(name, out)

        await _gather_all([fill(i.name, o, t) for i, o, t in zip(infos, outs, stores, strict=True)])
        return outs

    def _spec(self, info: Any, arg: Any) -> ts.Spec:
        """Orbax's read spec of an array (a pure function of these fields), built once:
        building it cost ~0.5 ms per array, a tenth of a GPT-2 restore's CPU time
        (``docs/performance.md`` #27). The store is still opened at every read."""
        dtype = None if arg.dtype is None else np.dtype(arg.dtype)
        key = (str(info.parent_dir), info.name, info.is_ocdbt_checkpoint, info.use_zarr3)
        key += (self._metadata_key, info.raise_array_data_missing_error, dtype)
        specs = self.__dict__.setdefault("_specs", {})
        spec = specs.get(key)
        if spec is None:
            built = _ts_utils.build_array_read_spec(
                info,
                use_ocdbt=info.is_ocdbt_checkpoint,
                metadata_key=self._metadata_key,
                raise_array_data_missing_error=info.raise_array_data_missing_error,
                target_dtype=arg.dtype,
            )
            if len(specs) >= _MAX_SPECS:
                specs.clear()
            spec = specs[key] = ts.Spec(built.json)
        return spec


async def _gather_all(awaitables: list) -> list:
    """``asyncio.gather``, but raises only once every awaitable has finished.

    A plain gather raises at the first failure (a damaged file) and leaves the other
    TensorStore futures running; Orbax then closes its event loop, and each of them,
    finishing, prints "RuntimeError: Event loop is closed" from a TensorStore thread.
    """
    results = await asyncio.gather(*awaitables, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


class LinkHandler(ocp.type_handlers.NumpyHandler):
    """``TypeHandler`` of :class:`~datarax_ckpt._linking.Linked` leaves (incremental saves):
    hard-links the earlier step's files in the item's commit future, writes nothing.

    Its ``typestr`` is the ``NumpyHandler``'s, so Orbax's tree metadata describes a
    linked array exactly as a written one; reads go through the ordinary handlers.
    """

    async def serialize(self, values, infos, args=None):
        async def link_all() -> None:
            if jax.process_index() != 0:
                return  # like NumpyHandler: one process writes
            for value, info in zip(values, infos, strict=True):
                await info.await_path_creation()
                _linking.link_folder(value.source, info.parent_dir / info.name)

        commit = ocp.future.CommitFutureAwaitingContractedSignals
        return [commit(link_all(), name="datarax_ckpt_links")]


@functools.cache
def _registry():
    th = ocp.type_handlers
    handlers = [(t, th.get_type_handler(t)) for t in th.supported_types()]
    return th.create_type_handler_registry(
        *handlers,
        (AlignedHostArray, _AlignedNumpyHandler()),
        (_linking.Linked, LinkHandler()),  # incremental saves' unchanged arrays
    )


def state_handler(*, use_ocdbt: bool, use_compression: bool) -> ocp.PyTreeCheckpointHandler:
    """The handler of the state item: Orbax's, with aligned host reads available."""
    return ocp.PyTreeCheckpointHandler(
        use_ocdbt=use_ocdbt, use_compression=use_compression, type_handler_registry=_registry()
    )


def reads_to_host(spec: StoredSpec, *, checked: bool = False) -> bool:
    """Whether ``spec`` is read whole into host memory (then put on its device).

    Numpy targets and arrays on one device are. Arrays on several devices are read
    per shard by Orbax, except, when their checksum is to be checked, off CPU (a host
    copy to hash; on CPU the shards are hashed in place).
    """
    if spec.lib != "jax":
        return True
    devices = spec.sharding.device_set
    if len(devices) == 1:
        return True
    return checked and not all(d.platform == "cpu" for d in devices)


def read(
    read_items: Callable[..., dict],
    storage: Mapping[str, StoredSpec],
    *,
    stored: Mapping[str, tuple[Any, tuple[int, ...]]] | None = None,
    checked: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """Reads stored arrays: numpy for those :func:`reads_to_host`, jax for the others.

    Args:
        read_items: Reads Orbax items: ``read_items(state=PyTreeRestore(...))``.
        storage: Stored key to how it is wanted.
        stored: Stored key to ``(dtype, shape)`` as written, to read it unconverted (to
            check a checksum); others are read in ``storage``'s dtype.
        checked: Keys whose checksum will be checked.

    Returns:
        Stored key to the array read.
    """
    stored = stored or {}
    item, restore_args = {}, {}
    for key, spec in storage.items():
        dtype, shape = stored.get(key, (spec.dtype, spec.shape))
        if reads_to_host(spec, checked=key in checked):
            item[key] = template(shape, dtype)
            restore_args[key] = ocp.RestoreArgs(restore_type=AlignedHostArray, dtype=dtype)
        else:
            item[key] = jax.ShapeDtypeStruct(shape, dtype, sharding=spec.sharding)
            restore_args[key] = ocp.ArrayRestoreArgs(
                sharding=spec.sharding, global_shape=shape, dtype=dtype
            )
    if not item:
        return {}
    # Only the requested stored arrays are read: the others are skipped, not loaded.
    state = ocp.args.PyTreeRestore(item, restore_args=restore_args, partial_restore=True)
    loaded = dict(read_items(**{ITEM_STATE: state})[ITEM_STATE])
    for key, value in loaded.items():  # the stored shape, not the manifest's, sized it
        if tuple(value.shape) != tuple(item[key].shape):
            raise ValueError(
                f'DATA_LOSS: Error decoding "{key}/": the stored array holds shape '
                f"{list(value.shape)}, the manifest declares {list(item[key].shape)}"
            )
    return loaded


def template(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A numpy restore template that allocates nothing (a broadcast view of one element).

    Orbax only needs its type, shape and dtype; the reader allocates by the stored
    shape, which is then compared with the declared one.
    """
    return np.broadcast_to(np.zeros((), dtype), shape)


def place(loaded: Mapping[str, Any], storage: Mapping[str, StoredSpec]) -> dict[str, Any]:
    """Casts to the wanted dtypes and puts host arrays meant for jax on their devices.

    One batched put (:func:`datarax_ckpt._placing.device_put`): on CPU it adopts the
    aligned buffers without copying.
    """
    out = dict(loaded)
    for key, value in out.items():
        if value.dtype != storage[key].dtype:
            out[key] = value.astype(storage[key].dtype)
    to_device = [
        k for k, spec in storage.items() if spec.lib == "jax" and not isinstance(out[k], jax.Array)
    ]
    if to_device:
        shardings = [storage[k].sharding for k in to_device]
        placed = _placing.device_put([out[k] for k in to_device], shardings)
        out.update(zip(to_device, placed, strict=True))
    return out


# --------------------------------------------------------------------------- policies


@dataclasses.dataclass(frozen=True)
class _Info:
    """A step as Orbax's policies see it (``PolicyCheckpointInfo``)."""

    step: int
    time: datetime.datetime
    metrics: dict[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class _Metric:
    """Orbax's ``get_metric_fn``: the value of ``name`` in a step's metrics.

    A step recorded under another ``best_metric`` (the option changed between runs)
    ranks worst instead of failing the save that applies retention.
    """

    name: str
    mode: str

    def __call__(self, metrics: dict[str, Any]) -> float:
        value = metrics.get(self.name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        return math.inf if self.mode == "min" else -math.inf


def manager_options(options: CheckpointOptions, keep: int | None) -> dict[str, Any]:
    """``CheckpointManagerOptions`` fields giving a save with ``keep`` its retention."""
    policies: list[Any] = [_policies.LatestN(n=keep)]
    fields: dict[str, Any] = {}
    if keep is not None:  # keep=None keeps every step: nothing to add
        if options.keep_period is not None:
            policies.append(_policies.EveryNSteps(interval_steps=options.keep_period))
        if options.keep_time_interval is not None:
            seconds = int(options.keep_time_interval.total_seconds())
            policies.append(_policies.EveryNSeconds(interval_secs=seconds))
    if options.keep_best is not None:
        metric = _Metric(options.best_metric, options.best_mode)
        # best_fn makes Orbax record each save's metrics in the step (its "metrics" item),
        # so that BestN ranks steps written by earlier runs too.
        fields.update(best_fn=metric, best_mode=options.best_mode)
        if keep is not None:
            policies.append(
                _policies.BestN(
                    get_metric_fn=metric,
                    reverse=options.best_mode == "min",  # BestN keeps the end of the sort
                    n=options.keep_best,
                    keep_checkpoints_without_metrics=False,
                )
            )
    policy = policies[0] if len(policies) == 1 else _policies.AnyPreservationPolicy(policies)
    return {"preservation_policy": policy, **fields}


def metrics(options: CheckpointOptions, metadata: dict | None) -> dict[str, float] | None:
    """The metrics Orbax records for ``keep_best``: ``{best_metric: value}``, or None.

    Raises:
        ValueError: if the metadata holds ``best_metric`` but not as a number.
    """
    if options.keep_best is None or metadata is None or metadata.get(options.best_metric) is None:
        return None
    value = metadata[options.best_metric]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(
            f"metadata[{options.best_metric!r}] is {value!r}, but CheckpointOptions.keep_best "
            "ranks steps by it: pass a number (or leave the key out; such a step is kept "
            "only by keep and the other rules)."
        )
    return {options.best_metric: value}


def on_interval(options: CheckpointOptions, step: int, saving: bool = False) -> bool:
    """Orbax's save decision for ``step``: ``FixedIntervalPolicy(save_interval_steps)``."""
    if options.save_interval_steps is None:
        return True
    context = _policies.DecisionContext(
        is_saving_in_progress=saving,
        reached_preemption=False,  # a preemption save passes force=True (PreemptionGuard)
        multiprocessing_options=ocp.options.MultiprocessingOptions(),
    )
    policy = _policies.FixedIntervalPolicy(options.save_interval_steps)
    now = datetime.datetime.now(tz=datetime.UTC)
    return policy.should_save(_Info(step, now), [], context=context)


# --------------------------------------------------------------------------- item handlers


class ChecksumsHandler(ocp.JsonCheckpointHandler):
    """Orbax handler of the ``checksums`` item, hashing while the arrays are written.

    Saved with :class:`ChecksumsSave`, whose ``compute()`` returns the item (see
    ``_integrity.compute``): the hashing runs in the item's commit future, beside the
    array writes' commit futures, instead of before the save starts. The file is the one
    ``JsonCheckpointHandler`` writes and reads back.
    """

    def __init__(self, filename: str = "metadata"):
        super().__init__(filename)
        self._file = filename

    async def async_save(self, directory, item=None, args=None):
        async def hash_and_write() -> None:
            # An error is kept for the writer rather than raised here: Orbax would raise
            # it before its other writers finish, and they would race the cleanup. The
            # step then commits without checksums (its data is complete and restores).
            try:
                sums = args.compute()
            except Exception as e:  # noqa: BLE001 - reported by the writer (ChecksumsSave)
                args.error = e
                sums = args.unavailable(e)
            if jax.process_index() == 0:
                (directory / self._file).write_text(json.dumps(sums))

        commit = ocp.future.CommitFutureAwaitingContractedSignals
        return [commit(hash_and_write(), name="datarax_ckpt_checksums")]


@ocp.args.register_with_handler(ChecksumsHandler, for_save=True)
@dataclasses.dataclass
class ChecksumsSave(ocp.args.CheckpointArgs):
    """Saves the ``checksums`` item that ``compute()`` returns (called in the background).

    If ``compute()`` raises, the item is ``unavailable(error)`` (a record of why
    checksums are unavailable), the error is kept in ``error``, and the writer reports
    it once the step has committed.
    """

    compute: Callable[[], dict]
    unavailable: Callable[[Exception], dict]
    error: Exception | None = None


@ocp.args.register_with_handler(ChecksumsHandler, for_restore=True)
@dataclasses.dataclass
class ChecksumsRestore(ocp.args.CheckpointArgs):
    """Reads the ``checksums`` item back (a dict).

    Never passed by datarax_ckpt (it reads the file itself), but Orbax needs a handler's
    save and restore args both registered to use the handler for saving at all.
    """


def item_handlers(*, use_ocdbt: bool = True, use_compression: bool = True) -> dict[str, Any]:
    """Orbax handlers of every item of a datarax_ckpt step (for writing and reading).

    The defaults read any checkpoint: Orbax's state handler with datarax_ckpt's host
    reads (:class:`AlignedHostArray`), which wait for every TensorStore read before
    reporting a damaged one.
    """
    return {
        ITEM_STATE: state_handler(use_ocdbt=use_ocdbt, use_compression=use_compression),
        ITEM_MANIFEST: ocp.JsonCheckpointHandler(),
        ITEM_METADATA: ocp.JsonCheckpointHandler(),
        ITEM_CHECKSUMS: ChecksumsHandler(),
    }


# --------------------------------------------------------------------------- read and write


@contextlib.contextmanager
def reader(path: epath.Path, handlers: Mapping[str, Any]) -> Iterator[Callable[..., dict]]:
    """``read_items(**{item: restore args})`` of the step folder ``path``, through a plain
    ``Checkpointer``, never the directory's ``CheckpointManager``: creating a manager
    cleans up the directory, which only its writer may do (``_writer_lock``)."""
    _teach_if_s3(path)
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler(**handlers))

    def read_items(**items: Any) -> dict:
        return checkpointer.restore(path, args=ocp.args.Composite(**items))

    try:
        yield read_items
    finally:
        checkpointer.close()


@contextlib.contextmanager
def state_reader(path: epath.Path, state: Any) -> Iterator[Callable[..., dict]]:
    """``read_items(state=restore args)`` of the step folder ``path`` through ``state``,
    the directory's state item handler (:func:`state_handler`, one per directory),
    never its ``CheckpointManager`` (creating a manager cleans up the directory, which
    only its writer may do, ``_writer_lock``).

    The JSON items were read by the structural check; the commit too was checked there.
    A ``Checkpointer`` and ``CompositeCheckpointHandler`` built per restore, and the
    checkpointer's own commit check (a new event loop and threads), cost 1.5-2.5 ms a
    restore (``docs/performance.md`` #21).
    """
    _teach_if_s3(path)

    def read_items(**items: Any) -> dict:
        return {item: state.restore(path / item, args=args) for item, args in items.items()}

    yield read_items


def read_host(read_items: Callable[..., dict], arrays: Mapping[str, tuple[Any, tuple]]) -> dict:
    """Reads stored arrays ``{key: (dtype, shape)}`` as saved into aligned host memory
    (shapes are not compared: the caller reports a mismatch)."""
    item = {k: template(shape, dtype) for k, (dtype, shape) in arrays.items()}
    args = {
        k: ocp.RestoreArgs(restore_type=AlignedHostArray, dtype=dtype)
        for k, (dtype, _) in arrays.items()
    }
    state = ocp.args.PyTreeRestore(item, restore_args=args, partial_restore=True)
    return read_items(**{ITEM_STATE: state})[ITEM_STATE]


_CHUNK_BYTES = 16 << 20
_CHUNKED = ocp.SaveArgs(chunk_byte_size=_CHUNK_BYTES)
_WHOLE = ocp.SaveArgs()


def save_args(
    manifest: dict, metadata: dict, arrays: Mapping[str, Any], checksums: ChecksumsSave | None
) -> Any:
    """The ``Composite`` args of one step: the state only when it holds arrays."""
    args: dict[str, Any] = {
        ITEM_MANIFEST: ocp.args.JsonSave(manifest),
        ITEM_METADATA: ocp.args.JsonSave(metadata),
    }
    if arrays:
        # Large arrays in chunks of at most 16 MiB: TensorStore reads a chunk into a
        # buffer of its own before copying it out, and a 128 MiB one is fresh memory each
        # time (page faults), while 16 MiB ones reuse malloc's memory. Reading 1 GiB in 8
        # arrays: 1.59 s whole, 0.59 s in 16 MiB chunks (performance.md #25).
        chunks = {k: _CHUNKED if a.nbytes > _CHUNK_BYTES else _WHOLE for k, a in arrays.items()}
        args[ITEM_STATE] = ocp.args.PyTreeSave(arrays, save_args=chunks)
    if checksums is not None:
        args[ITEM_CHECKSUMS] = checksums
    return ocp.args.Composite(**args)


def atomicity(path: epath.Path) -> dict[str, Any]:
    """Keyword arguments giving an Orbax checkpointer ``path``'s commit protocol: on
    ``s3://`` Orbax's commit-file protocol (write in place, ``commit_success.txt`` last)."""
    if not _s3.is_s3(path):
        return {}
    return {
        "atomicity_options": ocp.options.AtomicityOptions(
            mode=ocp.options.AtomicityMode.COMMIT_FILE
        )
    }


def write_unversioned(path: epath.Path, args: Any, handlers: Mapping[str, Any]) -> None:
    """Writes the unversioned ``checkpoint/`` (not a step: retention never sees it) with
    the same atomic commit as a step."""
    _teach_if_s3(path)
    protocol = atomicity(path)  # the commit protocol, for items too
    checkpointer = ocp.Checkpointer(
        ocp.CompositeCheckpointHandler(
            composite_options=ocp.CompositeOptions(**protocol), **handlers
        ),
        **protocol,
    )
    try:
        checkpointer.save(path, args=args)
    finally:
        checkpointer.close()


def create_manager(
    path: epath.Path,
    options: CheckpointOptions,
    keep: int | None,
) -> ocp.CheckpointManager:
    """The ``CheckpointManager`` of a directory for saves with ``keep`` (see ``_directory``)."""
    s3 = _s3.is_s3(path)
    _teach_if_s3(path)
    cleanup = options.cleanup_tmp_directories
    manager = ocp.CheckpointManager(
        path,
        options=ocp.CheckpointManagerOptions(
            step_name_format=NAME_FORMAT,
            **manager_options(options, keep),
            create=False,
            # On s3:// Orbax's cleanup deletes every unmarked folder; _layout's only the
            # library's own.
            cleanup_tmp_directories=cleanup and not s3,
            enable_async_checkpointing=True,
            # Atomic removal (see _layout.TRASH); object stores cannot rename.
            todelete_subdir=None if s3 else _layout.TRASH,
            atomicity_options=atomicity(path).get("atomicity_options"),
            # Create the step's tmp folder on this worker thread, before any write
            # is scheduled: created asynchronously, a failure (read-only or full
            # disk) orphans Orbax threads that wait 300 s for it and block exit.
            async_options=ocp.options.AsyncOptions(create_directories_asynchronously=False),
        ),
        item_handlers=item_handlers(
            use_ocdbt=options.ocdbt, use_compression=options.use_compression
        ),
    )
    # Orbax removes stale temporary folders in the background; finish that now so
    # it cannot race the unversioned checkpoint, which is written beside the steps.
    getattr(manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()
    if s3:
        _use_marker_first_deleter(manager, path)
    return manager


# --------------------------------------------------------------------------- s3://


@functools.cache
def teach_s3_specs() -> None:
    """Wraps Orbax's TensorStore kvstore spec builder, once, so that it knows ``s3://``
    (see ``_s3``): an ``s3://`` directory is given to Orbax's own ``gs://`` builder and
    every ``gcs`` driver in the result becomes ``s3``; other paths are unchanged."""
    from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

    original = ts_utils.build_kvstore_tspec

    @functools.wraps(original)
    def build_kvstore_tspec(directory, *args, **kwargs):
        text = str(directory)
        if not _s3.is_s3(text):
            return original(directory, *args, **kwargs)
        return _s3.to_s3(original("gs://" + text[len(_s3.SCHEME) :], *args, **kwargs))

    build_kvstore_tspec.datarax_s3 = True
    if not getattr(original, "datarax_s3", False):
        ts_utils.build_kvstore_tspec = build_kvstore_tspec


def prepare(path: Any) -> None:
    """Readies Orbax and the shared S3 filesystem for ``path`` (nothing unless ``s3://``);
    called when a handler first opens a directory."""
    if _s3.is_s3(path):
        teach_s3_specs()
        _s3.install()


def _teach_if_s3(path: Any) -> None:
    # Every Orbax entry point of this module on an s3:// path: Orbax knows s3:// first.
    if _s3.is_s3(path):
        teach_s3_specs()


class MarkerFirstDeleter:
    """Orbax ``CheckpointDeleter`` for ``s3://`` that deletes each step's marker first.

    Orbax's own deleter removes a step with one recursive delete, in listing order: a
    kill part-way could leave ``commit_success.txt`` beside missing objects, a step that
    is listed but cannot be restored.
    """

    def __init__(self, directory: epath.Path, name_format: Any):
        self._directory = directory
        self._name_format = name_format

    def delete(self, step: int) -> None:
        if ocp.multihost.is_primary_host(0):
            _s3.delete_step(self._directory / self._name_format.build_name(step))

    def delete_steps(self, steps) -> None:
        for step in steps:
            self.delete(step)

    def close(self) -> None:
        pass


def _use_marker_first_deleter(manager: ocp.CheckpointManager, directory: epath.Path) -> None:
    """Makes retention of ``manager`` delete the commit marker first (see the class)."""
    deleter = getattr(manager, "_checkpoint_deleter", None)
    if deleter is None:  # a newer Orbax moved it: its deleter still works, less safely
        logger.warning("Orbax's deleter not found; %s retention keeps Orbax's order.", directory)
        return
    deleter.close()
    manager._checkpoint_deleter = MarkerFirstDeleter(directory, manager._step_name_format)


# --------------------------------------------------------------------------- listing


@dataclasses.dataclass(frozen=True)
class CkptNameFormat(ocp.step.NameFormat):
    """Orbax ``NameFormat`` naming steps ``ckpt-<step>`` (uncommitted folders ignored)."""

    def build_name(self, step: int) -> str:
        return _layout.step_name(step)

    def _metadata(self, path: epath.Path) -> ocp.step.Metadata | None:
        match = _layout.STEP_RE.match(path.name)
        if match is None or not _layout.is_committed(path):
            return None
        return ocp.step.Metadata(step=int(match.group(1)), path=path)

    def _orbax_metadata(self, path: epath.Path) -> ocp.step.Metadata | None:
        # Orbax reads each listed step's metadata and metrics files: a step where that
        # would block, exhaust memory or raise is left out of its view (restore and
        # verify report it).
        return self._metadata(path) if step_metadata_error(path) is None else None

    def find_all(self, base_path: epath.PathLike) -> Iterator[ocp.step.Metadata]:
        base = epath.Path(base_path)
        if not base.is_dir():
            return iter([])
        candidates = [p for p in base.iterdir() if _layout.STEP_RE.match(p.name)]
        return ocp.step.build_step_metadatas(candidates, self._orbax_metadata)

    def find_step(self, base_path: epath.PathLike, step: int) -> ocp.step.Metadata:
        metadata = self._metadata(epath.Path(base_path) / self.build_name(step))
        if metadata is None:
            raise ValueError(f"No committed {self.build_name(step)} under {base_path}.")
        return metadata


NAME_FORMAT = CkptNameFormat()


def step_metadata_error(step: epath.Path) -> str | None:
    """Why Orbax's CheckpointManager could not list ``step``, or None if it can.

    It reads every listed step's ``_CHECKPOINT_METADATA`` when it starts and on each
    reload: a FIFO there would block it, a huge file exhaust memory, and a JSON value of
    the wrong type raise ``ValueError`` for every step of the directory.
    """
    if not _safeio.safe_to_list(step):
        return "a step folder or metadata file that is a link, FIFO, device or too large"
    try:
        data = _safeio.read_json(step / "_CHECKPOINT_METADATA", _safeio.LISTED_BYTES)
    except (OSError, ValueError):
        return None  # missing or not JSON: Orbax logs it and lists the step anyway
    try:
        from orbax.checkpoint._src.metadata import step_metadata_serialization as orbax_step
    except ImportError:  # pragma: no cover - another Orbax layout: no check
        return None
    try:
        orbax_step.InternalCheckpointMetadata.deserialize(data)
    except Exception as e:  # noqa: BLE001 - any error Orbax's listing would raise
        return f"Orbax cannot read it: {str(e)[:200]}"
    return None


# --------------------------------------------------------------------------- plain Orbax


def save_standard(path: Any, tree: Any) -> None:
    """Writes ``tree`` as a plain Orbax ``StandardCheckpointer`` checkpoint (export)."""
    checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    checkpointer.save(path, args=ocp.args.StandardSave(tree))
    checkpointer.close()


def read_pytree(path: Any) -> Any:
    """Restores one PyTree item as saved: jax arrays on the default device, numpy as numpy."""
    checkpointer = ocp.PyTreeCheckpointer()
    # The handler's metadata, not the checkpointer's: no warning about the step's own file.
    tree = ocp.PyTreeCheckpointHandler().metadata(path).tree
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def restore_args(meta: Any) -> ocp.RestoreArgs:
        if isinstance(meta, ocp.metadata.ScalarMetadata):
            return ocp.RestoreArgs()  # a Python int or float, as saved
        if getattr(meta, "sharding", None) is None:
            return ocp.RestoreArgs(restore_type=np.ndarray)
        # One device whatever the saving topology was: its devices may not exist here.
        return ocp.ArrayRestoreArgs(sharding=device)

    args = jax.tree.map(restore_args, tree)
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
    checkpointer.close()
    return restored
