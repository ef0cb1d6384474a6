"""Putting many host arrays on single CPU devices without jax's per-array Python cost.

A restore of 2,000 packed leaves of 64 KiB hands 2,000 host slices to jax. The public
``jax.device_put(list, shardings)`` spends ~100 us of Python per array (aval
canonicalization, sharding and process checks) before one batched call: 198 ms for the
2,000 slices on the 2-core CI machine, half of that restore. jax's own batched put for
one array, ``pxla.batched_device_put`` (what ``device_put`` ends in), takes 41 ms for
the same slices and, like ``device_put``, adopts 64-byte-aligned host memory without a
copy (``docs/performance.md`` #23). It is private jax API: where it is missing, or for
anything but a plain numpy array of a standard dtype on one CPU device, the public
``jax.device_put`` runs instead.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

# Dtypes whose numpy form is what jax stores (no canonicalization, no sub-byte packing).
_PLAIN = frozenset(
    "bool int8 int16 int32 int64 uint8 uint16 uint32 uint64 float16 bfloat16 float32 "
    "float64 complex64 complex128".split()
)


@functools.cache
def _batched_put() -> tuple[Any, Any] | None:
    try:
        from jax._src import core
        from jax._src.interpreters import pxla

        put, shaped = pxla.batched_device_put, core.ShapedArray
        # One probe put, so that a changed signature in another jax version falls back
        # to the public path here instead of failing every restore.
        probe = np.arange(2, dtype=np.float32)
        cpu = jax.devices("cpu")[0]
        sharding = jax.sharding.SingleDeviceSharding(cpu)
        placed = put(shaped(probe.shape, probe.dtype), sharding, [probe], [cpu])
        if not (isinstance(placed, jax.Array) and np.array_equal(np.asarray(placed), probe)):
            return None
    except Exception:  # pragma: no cover - another jax layout or signature
        return None
    return put, shaped


@functools.lru_cache(maxsize=256)
def _device_for(sharding: Any, dtype: np.dtype) -> Any:
    """The CPU device to put arrays of ``dtype`` on directly, or None (public path)."""
    if not isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return None
    device = next(iter(sharding.device_set))
    plain = (
        device.platform == "cpu"
        and sharding.memory_kind in (None, device.default_memory().kind)
        and dtype.name in _PLAIN
        and jax.dtypes.canonicalize_dtype(dtype) == dtype
    )
    return device if plain else None


@functools.lru_cache(maxsize=4096)
def _aval(shape: tuple[int, ...], dtype: np.dtype) -> Any:
    return _batched_put()[1](shape, dtype)  # immutable: shared by equal leaves


def device_put(values: Sequence[Any], shardings: Sequence[Any]) -> list[Any]:
    """``jax.device_put(values, shardings)``, each array committed to its sharding."""
    out: list[Any] = [None] * len(values)
    slow: list[int] = []
    batched = _batched_put()
    for i, (value, sharding) in enumerate(zip(values, shardings, strict=True)):
        device = None
        if batched is not None and type(value) is np.ndarray and value.size:
            device = _device_for(sharding, value.dtype)
        if device is None:
            slow.append(i)
            continue
        out[i] = batched[0](_aval(value.shape, value.dtype), sharding, [value], [device])
    if slow:
        placed = jax.device_put([values[i] for i in slow], [shardings[i] for i in slow])
        for i, value in zip(slow, placed, strict=True):
            out[i] = value
    return out
