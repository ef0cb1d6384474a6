"""Capture of a state's arrays (packing small leaves, copying large ones) and its inverse."""

from __future__ import annotations

import atexit
import dataclasses
import functools
import itertools
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
    values: list[Any],
    paths: list[str],
    *,
    pack_threshold_bytes: int,
    snapshot: str,
    pool: ArenaPool | None = None,
    reuse: Callable[[str, str, Any], bool] | None = None,
) -> tuple[dict[str, Any], list[dict], list[dict], np.ndarray | None, Callable[[], None] | None]:
    """Copies the leaves' data into buffers owned by the checkpoint, or pins it.

    On CPU (one process), a jax array's numpy view pins its buffer: jax neither donates
    nor frees a buffer while a view of it lives (:func:`views_pin_buffers`). Such leaves
    are not copied inside ``save()``: a large one is stored through its view, and the
    copies into packed buffers are left to ``fill``, which the writer thread calls before
    anything reads the packs. numpy leaves, which the caller may write to, are copied
    here.

    Args:
        values: The array-like leaves to store, each a jax.Array or an np.ndarray; slot
            ``i`` is ``values[i]``.
        paths: Their tree paths, for error messages.
        pack_threshold_bytes: Leaves of at most this many bytes are packed.
        snapshot: ``"auto"``, ``"device"`` or ``"host"`` (``CheckpointOptions.snapshot``).
        pool: Where the host arena is taken from (and later given back to).
        reuse: ``reuse(key, path, value)``, if given, is asked about each large
            single-process ``jax.Array`` leaf; True stores the leaf itself, uncopied
            (incremental saves: the very object saved last time, see ``_incremental``).

    Returns:
        ``(arrays, slot_table, packs, arena, fill)``: the arrays to hand to Orbax keyed
        by storage name, one manifest entry per slot (dtype, shape, where it is stored),
        one manifest entry per packed buffer, the host arena holding the host copies (to
        give back to ``pool`` once the arrays are no longer used) or None, and the
        function that makes the copies still due into ``arrays`` (it holds the pinning
        views until then), or None if none are.
    """
    mode = resolve_snapshot_mode(snapshot)
    run = _Capture(values, paths)
    run.sort(pack_threshold_bytes, reuse)
    run.copy_on_devices(mode)
    arena = run.copy_to_host(pool)
    if run.host_backend and not run.multiprocess:
        run.wrap_for_jax()
    run.values = run.paths = []  # the caller's leaves: not kept by ``fill``
    return run.arrays, run.table, run.packs, arena, (run.fill if run.deferred else None)


class _Capture:
    """One capture, in the steps :func:`capture` runs: sort the slots (packed or alone,
    on a device or in host memory), copy on the devices, copy to host memory, wrap."""

    def __init__(self, values: list[Any], paths: list[str]) -> None:
        self.values = values
        self.paths = paths
        self.table: list[dict] = []
        self.sizes: list[int] = []  # elements per slot
        self.jax_buckets: dict[tuple, tuple[dict[str, list[int]], list[int]]] = {}
        self.host_packs: dict[int, list[int]] = {}  # pack index -> its slots, in order
        self.np_large: list[int] = []
        self.arrays: dict[str, Any] = {}
        self.packs: list[dict] = []
        # Copies from pinned CPU views into packs, left for the writer (copy_to_host).
        self.deferred: list[tuple[np.ndarray, list[np.ndarray]]] = []
        self.deferred_keys: set[str] = set()  # the packs they fill
        self.multiprocess = jax.process_count() > 1
        # On a CPU backend, jax arrays live in host memory: a numpy memcpy copies them at
        # ~2x the speed of an XLA copy (measured: 69 ms vs 144 ms for 256 MiB on 2 cores).
        self.host_backend = jax.default_backend() == "cpu"

    def sort(self, pack_threshold_bytes: int, reuse: Callable | None = None) -> None:
        """Records each slot in the table and says where it goes: a device pack or copy
        (per set of devices), a host pack (per dtype, in bins of at most
        ``PACK_BIN_BYTES``, each numbered and laid out here) or a host copy."""
        # One pass, a few dict operations per slot: 2,000-leaf states pay it per save().
        # Leaves mostly share a dtype object and a device, so their facts are looked up
        # again only when those change (by identity: hashing either is slower, a sharding
        # runs Python code for it).
        values, table, sizes, packs = self.values, self.table, self.sizes, self.packs
        multiprocess, host_backend = self.multiprocess, self.host_backend
        open_bins: dict[str, list] = {}  # dtype name -> [pack index, bytes] of its open bin
        seen_dtype = seen_sharding = seen_device = placement = None
        for i, value in enumerate(values):
            dtype = value.dtype
            if dtype is not seen_dtype:
                dtype_name, itemsize, storable = _dtype_info(dtype)
                if not storable:
                    raise _unstorable(self.paths[i], jnp.dtype(dtype))
                seen_dtype = dtype
            shape = value.shape
            size = math.prod(shape)
            sizes.append(size)
            entry = {"dtype": dtype_name, "shape": shape}
            table.append(entry)
            if size == 0:
                entry["empty"] = True
                continue
            nbytes = size * itemsize
            small = nbytes <= pack_threshold_bytes
            is_jax = not isinstance(value, np.ndarray)  # a jax.Array (see capture())
            if multiprocess and is_jax:
                if value.is_fully_addressable:
                    # Host-local in a multi-process run (Orbax refuses these): stored like a
                    # numpy array, written once by process 0; the handler checks that every
                    # process holds the same value (_multihost.Coordinator.agree_to_save).
                    value = values[i] = np.asarray(value)
                    is_jax = False
                else:
                    entry["global"] = True  # restoring it in multi-process needs a target
            if reuse is not None and not small and is_jax:
                if reuse(f"a{i}", self.paths[i], value):
                    entry["key"] = f"a{i}"
                    self.arrays[f"a{i}"] = value
                    continue
            if is_jax:
                if value.sharding is not seen_sharding:
                    seen_sharding = value.sharding
                    # jit and device_put give each array its own sharding object: looked up
                    # by its device (one object per device) where jax exposes it.
                    device = _device_of(seen_sharding)
                    if device is None:
                        placement, seen_device = _placement(seen_sharding), None
                    elif device is not seen_device:
                        placement, seen_device = _device_placement(device), device
                on_one_cpu, bucket_key, one_local = placement
                if not (host_backend and on_one_cpu):
                    groups, large = self.jax_buckets.setdefault(bucket_key, ({}, []))
                    if small and one_local:
                        groups.setdefault(dtype_name, []).append(i)
                    else:
                        large.append(i)
                    continue
            if small:
                open_bin = open_bins.get(dtype_name)
                if open_bin is None or open_bin[1] + nbytes > PACK_BIN_BYTES:
                    open_bin = open_bins[dtype_name] = [len(packs), 0]
                    self.host_packs[len(packs)] = []
                    packs.append(
                        {"key": f"p{len(packs)}", "dtype": dtype_name, "size": 0, "lib": "host"}
                    )
                pack = packs[open_bin[0]]
                entry["pack"] = open_bin[0]
                entry["offset"] = pack["size"]
                pack["size"] += size
                open_bin[1] += nbytes
                self.host_packs[open_bin[0]].append(i)
            else:
                self.np_large.append(i)

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
                    [[self.values[i] for i in groups[n]] for n in names],
                    [self.values[i] for i in large],
                    copy_large=mode == "device",
                )
                if mode == "host":
                    host = _to_host(packed + [self.values[i] for i in large])
                    packed, copies = host[: len(packed)], host[len(packed) :]
                for name, buffer in zip(names, packed, strict=True):
                    self.add_pack(name, groups[name], buffer, "jax")
                for i, copy in zip(large, copies, strict=True):
                    self.table[i]["key"] = f"a{i}"
                    self.arrays[f"a{i}"] = copy
            jax.block_until_ready([v for v in self.arrays.values() if isinstance(v, jax.Array)])
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
                nbytes = sum(v.nbytes for v in self.values if isinstance(v, jax.Array))
                raise DeviceMemoryError(
                    f"The {mode} snapshot of the state ({nbytes / 2**20:.1f} MiB of arrays) did "
                    "not fit in memory. Use CheckpointOptions(snapshot='host') to copy straight "
                    "to host memory, or free device memory."
                ) from e
            raise

    def copy_to_host(self, pool: ArenaPool | None) -> np.ndarray | None:
        """Copies the host-packed and host-stored slots; returns the arena holding them.

        CPU jax arrays are pinned instead of copied where :func:`views_pin_buffers`
        holds: a large one is stored through its view, uncopied, and copies into packs
        are left in ``self.deferred`` for the writer thread. numpy leaves (the caller
        may write to them) are always copied here.
        """
        # Host copies: one buffer per host pack, one per copied large leaf, all carved
        # 64-byte aligned from one arena (reused from save to save through ``pool``).
        values, packs, table = self.values, self.packs, self.table
        pin = self.host_backend and not self.multiprocess and pinning_known()
        # (slot, its numpy array: a view to keep, or a source to copy)
        large = [(i, np.asarray(values[i])) for i in self.np_large]
        arena_bytes = sum(
            _round_up(packs[n]["size"] * _dtype_info(packs[n]["dtype"])[1]) for n in self.host_packs
        )
        arena_bytes += sum(
            _round_up(array.nbytes) for i, array in large if not _pinned(values[i], pin)
        )
        arena = None
        if arena_bytes:
            arena = (
                pool.take(arena_bytes) if pool else _hostcopy.aligned_empty(arena_bytes, np.uint8)
            )
        cursor = 0

        def carve(size: int, dtype: Any) -> np.ndarray:
            nonlocal cursor
            dtype = jnp.dtype(dtype)
            view = arena[cursor : cursor + size * dtype.itemsize].view(dtype)
            cursor += _round_up(size * dtype.itemsize)
            return view

        copies = []  # (destination, sources): done together, on several threads
        for n, idxs in self.host_packs.items():
            buffer = carve(packs[n]["size"], packs[n]["dtype"])
            self.arrays[packs[n]["key"]] = buffer
            mutable = [isinstance(values[i], np.ndarray) for i in idxs] if pin else None
            if pin and not any(mutable):
                self.deferred.append((buffer, _pins([values[i] for i in idxs], packs[n]["dtype"])))
                self.deferred_keys.add(packs[n]["key"])
                continue
            sources = [np.asarray(values[i]) for i in idxs]
            if not pin or all(mutable):
                copies.append((buffer, sources))
            else:  # numpy and jax leaves of one dtype: runs of each, copied now or later
                start = 0
                pairs = zip(mutable, sources, strict=True)
                for now, group in itertools.groupby(pairs, key=lambda pair: pair[0]):
                    run = [source for _, source in group]
                    size = sum(source.size for source in run)
                    (copies if now else self.deferred).append((buffer[start : start + size], run))
                    start += size
                self.deferred_keys.add(packs[n]["key"])
        for i, array in large:
            table[i]["key"] = f"a{i}"
            if _pinned(values[i], pin):
                self.arrays[f"a{i}"] = array  # the view itself: it pins the buffer
                continue
            buffer = carve(array.size, array.dtype)
            copies.append((buffer, [array]))
            self.arrays[f"a{i}"] = buffer.reshape(array.shape)
        _hostcopy.gather(copies)
        return arena

    def wrap_for_jax(self) -> None:
        """CPU, one process: host copies become jax arrays without a copy (packs still to
        be filled: once filled, by :meth:`fill`)."""
        keys = [k for k in self.arrays if k not in self.deferred_keys]
        _wrap_for_jax(self.arrays, keys)

    def fill(self) -> None:
        """Makes the deferred copies (on the writer thread), then wraps their packs."""
        _hostcopy.gather([(out, [np.asarray(x) for x in pins]) for out, pins in self.deferred])
        self.deferred = []  # the views: no longer pinned by this capture
        if self.host_backend and not self.multiprocess:
            _wrap_for_jax(self.arrays, sorted(self.deferred_keys))


def _wrap_for_jax(arrays: dict[str, Any], keys: list[str]) -> None:
    # Wrap as jax.Arrays without a copy (one batched call), so Orbax does not deep-copy
    # them as it does numpy leaves. Not for dtypes jax would narrow (float64 without x64).
    keys = [
        k
        for k in keys
        if isinstance(arrays[k], np.ndarray)
        and jax.dtypes.canonicalize_dtype(arrays[k].dtype) == arrays[k].dtype
    ]
    if keys:
        cpu = jax.local_devices(backend="cpu")[0]
        for k, v in zip(keys, jax.device_put([arrays[k] for k in keys], cpu), strict=True):
            arrays[k] = v


# Per-leaf work is what a 2000-leaf state pays for: dtype facts and sharding checks are
# cached (numpy computes dtype.name anew each time, ~5 us).
@functools.lru_cache(maxsize=256)
def _dtype_info(dtype: Any) -> tuple[str, int, bool]:
    """The dtype's name, its item size, and whether TensorStore (Orbax's storage) can
    hold it."""
    dtype = jnp.dtype(dtype)
    try:
        ts.dtype(dtype.name)
    except ValueError:
        return dtype.name, dtype.itemsize, False
    return dtype.name, dtype.itemsize, True


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
def _placement(sharding: jax.sharding.Sharding) -> tuple[bool, tuple[int, ...], bool]:
    """Where a sharding puts an array: ``(on one CPU device of this process, its devices'
    ids in order, on one device of this process)``."""
    devices = sharding.device_set
    one_local = len(devices) == 1 and sharding.is_fully_addressable
    on_cpu = one_local and next(iter(devices)).platform == "cpu"
    return on_cpu, tuple(sorted(d.id for d in devices)), one_local


_SINGLE_DEVICE = jax.sharding.SingleDeviceSharding


def _device_of(sharding: jax.sharding.Sharding) -> jax.Device | None:
    """The device of a ``SingleDeviceSharding``, read without hashing the sharding or
    building its device set (~1.2 us each, per leaf: arrays out of ``jax.jit`` or
    ``jax.device_put`` do not share sharding objects); None for other shardings, or a
    jax that keeps the device elsewhere."""
    if type(sharding) is not _SINGLE_DEVICE:
        return None
    return getattr(sharding, "_device", None)


@functools.lru_cache(maxsize=64)
def _device_placement(device: jax.Device) -> tuple[bool, tuple[int, ...], bool]:
    """:func:`_placement` of a sharding on ``device`` alone."""
    return _placement(_SINGLE_DEVICE(device))


# dtypes jax exports through the buffer protocol (others, bfloat16 among them, raise).
_BUFFER_DTYPES = frozenset(np.dtype(t).name for t in "?bBhHiIlLqQefdFD")


def _pins(values: list[Any], dtype_name: str) -> list[Any]:
    """Pins for CPU jax arrays of one dtype: memoryviews (an external reference each, the
    cheapest: no numpy array made inside ``save()``), or numpy views."""
    if dtype_name in _BUFFER_DTYPES:
        try:
            return [memoryview(value) for value in values]
        except (BufferError, TypeError, ValueError):
            pass
    return [np.asarray(value) for value in values]


def _pinned(value: Any, pin: bool) -> bool:
    """Whether a host-stored slot's value is pinned by its view rather than copied now:
    a jax array (not an np.ndarray, which the caller may write to) when ``pin``."""
    return pin and not isinstance(value, np.ndarray)


_pin_lock = threading.Lock()
_pin_answer: list[bool] = []  # the probe's answer, once known
_pin_probe: list[threading.Thread] = []  # the probe started by pinning_known()


def views_pin_buffers() -> bool:
    """Whether a numpy view of a CPU ``jax.Array`` pins its buffer (checked once).

    A view is an external reference to the PJRT buffer: jax 0.10 then declines to donate
    the array (silently: the jitted function gets a fresh output buffer) and, if the
    array is deleted, frees the memory only once the view is gone. ``save()`` on CPU
    relies on it to capture jax arrays without copying them. The first call runs the
    case (a donation under a view, then a donation that could reuse the memory: one
    small compilation, ~60 ms); if the view's bytes change or anything raises, the answer
    is False and captures copy, as they did before.
    """
    with _pin_lock:
        if not _pin_answer:
            _pin_answer.append(_probe_pinning())
        return _pin_answer[0]


def pinning_known() -> bool:
    """:func:`views_pin_buffers` if it is known; else starts it on a background thread
    (so that no ``save()`` waits for its compilation) and returns False: that capture
    copies."""
    if _pin_answer:
        return _pin_answer[0]
    with _pin_lock:
        if not _pin_probe:
            probe = threading.Thread(
                target=views_pin_buffers, name="datarax-ckpt-pin-probe", daemon=True
            )
            _pin_probe.append(probe)
            probe.start()
            atexit.register(probe.join)  # not cut off inside XLA at interpreter exit
    return False


def _probe_pinning() -> bool:
    try:
        cpu = jax.local_devices(backend="cpu")[0]

        def owned(value: float) -> jax.Array:
            # A buffer XLA owns: jax copies a host array that is not 64-byte aligned.
            host = np.empty(4097, np.float32)
            host = host[1:] if host.ctypes.data % 64 == 0 else host[:4096]
            host[:] = value
            return jax.device_put(host, cpu)

        x = owned(1.0)
        view = np.asarray(x)
        overwrite = jax.jit(lambda a: a * 0 - 1, donate_argnums=0)
        out = overwrite(x)
        x.delete()
        again = overwrite(owned(2.0))  # donated: its output may take freed memory
        jax.block_until_ready((out, again))
        return bool((view == 1.0).all() and (np.asarray(out) == -1).all())
    except Exception:  # any failure: copy, as before
        return False


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
