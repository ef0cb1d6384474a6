"""Capture of a state's arrays (packing small leaves, copying large ones) and its inverse."""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts

from datarax_ckpt import _hostcopy, _multihost, _placing
from datarax_ckpt._errors import DeviceMemoryError


@dataclasses.dataclass
class Slot:
    """One array-like leaf to store: a jax.Array or an np.ndarray, and its tree path."""

    value: Any
    path: str


@dataclasses.dataclass(frozen=True)
class StoredSpec:
    """How to read one stored array: as numpy, or as a jax.Array on ``sharding``."""

    lib: str  # "jax" or "numpy"
    shape: tuple[int, ...]
    dtype: Any
    sharding: Any = None


def resolve_snapshot_mode(snapshot: str) -> str:
    """``"auto"`` means a copy within device memory on CPU and a host copy elsewhere."""
    if snapshot != "auto":
        return snapshot
    return "device" if jax.default_backend() == "cpu" else "host"


@functools.partial(jax.jit, static_argnames=("copy_large",))
def _device_snapshot(groups, large, copy_large):
    # One dispatch for the whole tree: per-leaf copies are dispatch-bound (hundreds of
    # leaves) while a fused concatenation runs at memory bandwidth.
    packed = [jnp.concatenate([jnp.ravel(x) for x in group]) for group in groups]
    return packed, ([jnp.copy(x) for x in large] if copy_large else [])


def _to_host(arrays: list[jax.Array]) -> list[Any]:
    if not arrays:
        return []
    try:
        shardings = [x.sharding.with_memory_kind("pinned_host") for x in arrays]
        return jax.device_put(arrays, shardings)
    except (ValueError, NotImplementedError, jax.errors.JaxRuntimeError):
        # Backends without memory kinds: a plain host copy.
        return [np.array(x) for x in arrays]


class ArenaPool:
    """Reuses the host buffers of finished captures.

    A freshly allocated buffer is page-faulted in by the copy itself, which makes the copy
    ~3x slower than into memory already mapped (82 ms against 26 ms for 256 MiB here).
    Training states keep their size from save to save, so the handler gives each capture's
    arena back once its write is committed and the next capture of the same size reuses
    it. At most ``max_free`` arenas are kept; ``clear()`` releases them all.
    """

    def __init__(self, max_free: int = 2):
        self.max_free = max_free
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray:
        with self._lock:
            for i, arena in enumerate(self._free):
                if arena.nbytes == nbytes:
                    return self._free.pop(i)
        return _hostcopy.aligned_empty(nbytes, np.uint8)

    def give(self, arena: np.ndarray | None) -> None:
        if arena is None or arena.nbytes == 0:
            return
        with self._lock:
            self._free.append(arena)
            del self._free[: -self.max_free]

    def clear(self) -> None:
        with self._lock:
            self._free.clear()


_ALIGN = 64
# Packed buffers are split into bins of at most this size, so that a state with many
# packed leaves still reaches Orbax as several arrays written in parallel.
PACK_BIN_BYTES = 64 << 20


def _round_up(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def capture(
    slots: list[Slot],
    *,
    pack_threshold_bytes: int,
    snapshot: str,
    pool: ArenaPool | None = None,
    reuse: Callable[[str, str, Any], bool] | None = None,
) -> tuple[dict[str, Any], list[dict], list[dict], np.ndarray | None]:
    """Copies the slots' data into buffers owned by the checkpoint.

    ``reuse(key, path, value)``, if given, is asked about each large single-process
    ``jax.Array`` leaf; True stores the leaf itself, uncopied (incremental saves: the
    very object saved last time, see ``_incremental``).

    Returns:
        ``(arrays, slot_table, packs, arena)``: the arrays to hand to Orbax keyed by
        storage name, one manifest entry per slot (dtype, shape, where it is stored), one
        manifest entry per packed buffer, and the host arena holding the host copies (to
        give back to ``pool`` once the arrays are no longer used), or None.
    """
    mode = resolve_snapshot_mode(snapshot)
    run = _Capture(slots)
    run.sort(pack_threshold_bytes, reuse)
    run.copy_on_devices(mode)
    arena = run.copy_to_host(pool)
    if run.host_backend and not run.multiprocess:
        run.wrap_for_jax()
    return run.arrays, run.table, run.packs, arena


class _Capture:
    """One capture, in the steps :func:`capture` runs: sort the slots (packed or alone,
    on a device or in host memory), copy on the devices, copy to host memory, wrap."""

    def __init__(self, slots: list[Slot]) -> None:
        self.slots = slots
        self.table: list[dict] = []
        self.sizes: list[int] = []  # elements per slot
        self.jax_buckets: dict[tuple, tuple[dict[str, list[int]], list[int]]] = {}
        self.np_groups: dict[tuple[str, int], list[int]] = {}  # (dtype, bin) -> slots
        self.np_large: list[int] = []
        self.arrays: dict[str, Any] = {}
        self.packs: list[dict] = []
        self.multiprocess = jax.process_count() > 1
        # On a CPU backend, jax arrays live in host memory: a numpy memcpy copies them at
        # ~2x the speed of an XLA copy (measured: 69 ms vs 144 ms for 256 MiB on 2 cores).
        self.host_backend = jax.default_backend() == "cpu"

    def sort(self, pack_threshold_bytes: int, reuse: Callable | None = None) -> None:
        """Records each slot in the table and says where it goes: a device pack or copy
        (per set of devices), a host pack (per dtype, in bins) or a host copy."""
        slots, table, sizes = self.slots, self.table, self.sizes
        jax_buckets, np_groups, np_large = self.jax_buckets, self.np_groups, self.np_large
        multiprocess, host_backend = self.multiprocess, self.host_backend
        open_bins: dict[str, tuple[str, int]] = {}
        bin_bytes: dict[tuple[str, int], int] = {}
        for i, slot in enumerate(slots):
            value = slot.value
            dtype, dtype_name, storable = _dtype_and_name(value.dtype)
            if not storable:
                raise _unstorable(slot.path, dtype)
            shape = value.shape
            table.append({"dtype": dtype_name, "shape": list(shape)})
            sizes.append(math.prod(shape))
            if sizes[i] == 0:
                table[i]["empty"] = True
                continue
            small = sizes[i] * dtype.itemsize <= pack_threshold_bytes
            if multiprocess and isinstance(value, jax.Array):
                if value.is_fully_addressable:
                    # Host-local in a multi-process run (Orbax refuses these): stored like a
                    # numpy array, written once by process 0; the handler checks that every
                    # process holds the same value (_multihost.Coordinator.agree_to_save).
                    value = slot.value = np.asarray(value)
                else:
                    table[i]["global"] = True  # restoring it in multi-process needs a target
            if reuse is not None and not small and isinstance(value, jax.Array):
                if reuse(f"a{i}", slot.path, value):
                    table[i]["key"] = f"a{i}"
                    self.arrays[f"a{i}"] = value
                    continue
            if isinstance(value, jax.Array) and not (host_backend and _single_cpu(value.sharding)):
                devices = value.sharding.device_set
                packable = small and value.is_fully_addressable and len(devices) == 1
                bucket_key = tuple(sorted(d.id for d in devices))
                groups, large = jax_buckets.setdefault(bucket_key, ({}, []))
                if packable:
                    groups.setdefault(dtype_name, []).append(i)
                else:
                    large.append(i)
            elif small:
                nbytes = sizes[i] * dtype.itemsize
                bin_key = open_bins.get(dtype_name, (dtype_name, 0))
                if bin_bytes.get(bin_key, 0) + nbytes > PACK_BIN_BYTES and bin_key in np_groups:
                    bin_key = (dtype_name, bin_key[1] + 1)
                open_bins[dtype_name] = bin_key
                bin_bytes[bin_key] = bin_bytes.get(bin_key, 0) + nbytes
                np_groups.setdefault(bin_key, []).append(i)
            else:
                np_large.append(i)

    def add_pack(self, dtype_name: str, idxs: list[int], buffer: Any, lib: str) -> None:
        offset = 0
        for i in idxs:
            self.table[i]["pack"] = len(self.packs)
            self.table[i]["offset"] = offset
            offset += self.sizes[i]
        key = f"p{len(self.packs)}"
        self.packs.append({"key": key, "dtype": dtype_name, "size": offset, "lib": lib})
        self.arrays[key] = buffer

    def copy_on_devices(self, mode: str) -> None:
        """Packs and copies the slots on devices (then, in "host" mode, to host memory)."""
        try:
            for groups, large in self.jax_buckets.values():
                names = list(groups)
                packed, copies = _device_snapshot(
                    [[self.slots[i].value for i in groups[n]] for n in names],
                    [self.slots[i].value for i in large],
                    copy_large=mode == "device",
                )
                if mode == "host":
                    host = _to_host(packed + [self.slots[i].value for i in large])
                    packed, copies = host[: len(packed)], host[len(packed) :]
                for name, buffer in zip(names, packed, strict=True):
                    self.add_pack(name, groups[name], buffer, "jax")
                for i, copy in zip(large, copies, strict=True):
                    self.table[i]["key"] = f"a{i}"
                    self.arrays[f"a{i}"] = copy
            jax.block_until_ready([v for v in self.arrays.values() if isinstance(v, jax.Array)])
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
                nbytes = sum(s.value.nbytes for s in self.slots if isinstance(s.value, jax.Array))
                raise DeviceMemoryError(
                    f"The {mode} snapshot of the state ({nbytes / 2**20:.1f} MiB of arrays) did "
                    "not fit in memory. Use CheckpointOptions(snapshot='host') to copy straight "
                    "to host memory, or free device memory."
                ) from e
            raise

    def copy_to_host(self, pool: ArenaPool | None) -> np.ndarray | None:
        """Copies the host-packed and host-stored slots; returns the arena holding them."""
        # Host copies: one buffer per dtype for small leaves, one per large leaf, all carved
        # 64-byte aligned from one arena (reused from save to save through ``pool``).
        group_sizes = {
            key: sum(self.sizes[i] for i in idxs) for key, idxs in self.np_groups.items()
        }
        arena_bytes = sum(
            _round_up(n * jnp.dtype(name).itemsize) for (name, _), n in group_sizes.items()
        )
        arena_bytes += sum(_round_up(self.slots[i].value.nbytes) for i in self.np_large)
        arena = (
            (pool.take(arena_bytes) if pool else _hostcopy.aligned_empty(arena_bytes, np.uint8))
            if (arena_bytes)
            else None
        )
        cursor = 0

        def carve(size: int, dtype: Any) -> np.ndarray:
            nonlocal cursor
            dtype = jnp.dtype(dtype)
            view = arena[cursor : cursor + size * dtype.itemsize].view(dtype)
            cursor += _round_up(size * dtype.itemsize)
            return view

        copies = []  # (destination, sources): done together, on several threads
        for (name, _), idxs in self.np_groups.items():
            buffer = carve(group_sizes[(name, _)], name)
            copies.append((buffer, [np.asarray(self.slots[i].value) for i in idxs]))
            self.add_pack(name, idxs, buffer, "host")
        for i in self.np_large:
            source = np.asarray(self.slots[i].value)
            buffer = carve(source.size, source.dtype)
            copies.append((buffer, [source]))
            self.table[i]["key"] = f"a{i}"
            self.arrays[f"a{i}"] = buffer.reshape(source.shape)
        _hostcopy.gather(copies)
        return arena

    def wrap_for_jax(self) -> None:
        """CPU, one process: host copies become jax arrays without a copy."""
        # Wrap as jax.Arrays without a copy (one batched call), so Orbax does not deep-copy
        # them as it does numpy leaves. Not for dtypes jax would narrow (float64 without x64).
        keys = [
            k
            for k, v in self.arrays.items()
            if isinstance(v, np.ndarray) and jax.dtypes.canonicalize_dtype(v.dtype) == v.dtype
        ]
        cpu = jax.local_devices(backend="cpu")[0]
        for k, v in zip(keys, jax.device_put([self.arrays[k] for k in keys], cpu), strict=True):
            self.arrays[k] = v


# Per-leaf work is what a 2000-leaf state pays for: dtype names and sharding checks are
# cached (numpy computes dtype.name anew each time, ~5 us).
@functools.lru_cache(maxsize=256)
def _dtype_and_name(dtype: Any) -> tuple[np.dtype, str, bool]:
    """The dtype, its name, and whether TensorStore (Orbax's storage) can hold it."""
    dtype = jnp.dtype(dtype)
    try:
        ts.dtype(dtype.name)
    except ValueError:
        return dtype, dtype.name, False
    return dtype, dtype.name, True


def _unstorable(path: str, dtype: np.dtype) -> TypeError:
    if jnp.issubdtype(dtype, jnp.unsignedinteger):
        wider = "uint8"
    elif jnp.issubdtype(dtype, jnp.signedinteger):
        wider = "int8"
    else:
        wider = "float32"
    return TypeError(
        f"Leaf {path or '<root>'} has dtype {dtype.name}, which TensorStore (the storage "
        f"under Orbax) cannot store. Convert it before saving, e.g. x.astype(jnp.{wider}) "
        f"(exact for every {dtype.name} value), and back with .astype(jnp.{dtype.name}) "
        "after restoring."
    )


@functools.lru_cache(maxsize=256)
def _single_cpu(sharding: jax.sharding.Sharding) -> bool:
    devices = sharding.device_set
    return (
        len(devices) == 1
        and next(iter(devices)).platform == "cpu"
        and sharding.is_fully_addressable
    )


def default_device() -> jax.Device:
    """Where leaves restored without a target go: ``jax.default_device`` if set, else the
    first local device of the default backend."""
    device = jax.config.jax_default_device
    if isinstance(device, str):  # a platform name: jax.default_device("cpu")
        return jax.local_devices(backend=device)[0]
    return device if device is not None else jax.local_devices()[0]


def nbytes(arrays: Mapping[str, Any]) -> int:
    """Total bytes held by captured arrays."""
    return sum(int(a.nbytes) for a in arrays.values())


def read_specs(
    manifest: dict, requests: Mapping[int, Any]
) -> tuple[dict[str, StoredSpec], Callable[[Mapping[str, Any]], list]]:
    """Plans reading the stored arrays that ``requests`` (slot -> _planning.LeafRequest) need.

    Returns:
        ``(storage, materialize)``: the stored arrays to read with their specs, and a
        function from the loaded arrays to a list of per-slot values.
    """
    table, packs = manifest["slots"], manifest["packs"]
    default = jax.sharding.SingleDeviceSharding(default_device())
    storage: dict[str, StoredSpec] = {}
    for slot, req in requests.items():
        entry = table[slot]
        if "pack" in entry:
            pack = packs[entry["pack"]]
            storage[pack["key"]] = StoredSpec("numpy", (pack["size"],), jnp.dtype(pack["dtype"]))
        elif "key" in entry:
            lib = "jax" if req.lib == "jax" else "numpy"
            if lib == "jax" and req.sharding is None and entry.get("global"):
                if jax.process_count() > 1:
                    raise _multihost.missing_target_error(manifest, slot)
            sharding = (req.sharding or default) if lib == "jax" else None
            storage[entry["key"]] = StoredSpec(lib, tuple(entry["shape"]), req.dtype, sharding)

    def materialize(loaded: Mapping[str, Any]) -> list:
        values: list = [None] * len(table)
        to_device: list[tuple[int, np.ndarray, Any]] = []
        for slot, req in requests.items():
            entry = table[slot]
            shape = tuple(entry["shape"])
            if "key" in entry:
                value = loaded[entry["key"]]
                if req.lib == "jax":
                    values[slot] = value
                    continue
                value = np.asarray(value)
            elif "pack" in entry:
                offset = entry["offset"]
                buffer = np.asarray(loaded[packs[entry["pack"]]["key"]])
                value = buffer[offset : offset + math.prod(shape)].reshape(shape)
            else:
                value = np.zeros(shape, dtype=jnp.dtype(entry["dtype"]))
            if value.dtype != req.dtype:
                value = value.astype(req.dtype)
            if req.lib == "jax":
                to_device.append((slot, value, req.sharding or default))
            else:
                values[slot] = value[()] if req.lib == "npscalar" else value
        if to_device:
            placed = _placing.device_put([v for _, v, _ in to_device], [s for _, _, s in to_device])
            for (slot, _, _), value in zip(to_device, placed, strict=True):
                values[slot] = value
        return values

    return storage, materialize
