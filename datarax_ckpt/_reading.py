"""Reading stored arrays through Orbax into host memory that jax adopts without a copy.

Orbax reads a ``jax.Array`` by allocating a numpy buffer, letting TensorStore fill it,
then ``jax.device_put``-ing it; on CPU that put is a second full copy because numpy's
buffers are 16-byte aligned and XLA adopts host memory without copying only at 64-byte
alignment. Orbax's plug-in point for this is a ``TypeHandler``: the state item's
``PyTreeCheckpointHandler`` gets a private registry (Orbax's own handlers plus one) in
which :class:`AlignedHostArray` reads through Orbax's ``NumpyHandler`` logic into a
64-byte-aligned buffer. Restoring 1 GiB in 8 leaves on the 2-core CI machine went from
0.93 s (read) + 0.43 s (copy into jax) to 0.54-0.74 s in all (``docs/performance.md``).
Arrays on several devices keep Orbax's ``ArrayHandler`` path (per-shard reads).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from datarax_ckpt import _layout, _linking
from datarax_ckpt._snapshot import StoredSpec, aligned_empty

try:  # the function Orbax's own NumpyHandler builds its read spec with
    from orbax.checkpoint._src.serialization import tensorstore_utils as _ts_utils
except ImportError:  # pragma: no cover - a future Orbax layout: plain reads, then a copy
    _ts_utils = None


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
            spec = _ts_utils.build_array_read_spec(
                info,
                use_ocdbt=info.is_ocdbt_checkpoint,
                metadata_key=self._metadata_key,
                raise_array_data_missing_error=info.raise_array_data_missing_error,
                target_dtype=arg.dtype,
            )
            opened.append(ts.open(ts.Spec(spec.json), open=True, context=info.ts_context))
        stores = await _gather_all(opened)
        outs = [
            aligned_empty(math.prod(t.shape), t.dtype.numpy_dtype).reshape(t.shape) for t in stores
        ]
        callback = _on_read.get()

        async def fill(name: str, out: np.ndarray, store: Any) -> None:
            await ts.array(out).write(store)
            if callback is not None:
                callback(name, out)

        await _gather_all([fill(i.name, o, t) for i, o, t in zip(infos, outs, stores, strict=True)])
        return outs


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
    loaded = dict(read_items(**{_layout.ITEM_STATE: state})[_layout.ITEM_STATE])
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

    One batched ``jax.device_put``: on CPU it adopts the aligned buffers without copying.
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
        placed = jax.device_put([out[k] for k in to_device], shardings)
        out.update(zip(to_device, placed, strict=True))
    return out
