"""Content checksums of checkpoints, their verification, and a map from damage to leaves.

Every save records an xxh3-64 checksum of each array handed to Orbax (packed buffers
and large leaves: strings, bytes and PRNG key data live inside the packs) and of the
manifest and metadata JSON, as a fourth Orbax item ``checksums`` committed atomically
with the step. Verification re-reads the arrays through Orbax and compares, checks
Orbax's commit marker, and checks that every file the OCDBT database refers to is
present and long enough. Damage is reported per file and per logical leaf.

Example:
    >>> import tempfile, jax.numpy as jnp
    >>> from datarax_ckpt import OrbaxCheckpointHandler
    >>> directory = tempfile.mkdtemp()
    >>> with OrbaxCheckpointHandler() as handler:
    ...     _ = handler.save(directory, {"w": jnp.ones(3)}, step=1)
    ...     report = handler.verify(directory)
    >>> report.ok, report.checksums_recorded
    (True, True)
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import xxhash
from etils import epath

from datarax_ckpt import _hostcopy, _layout, _orbax, _safeio
from datarax_ckpt._errors import CheckpointError
from datarax_ckpt._manifest import slot_paths, stored_arrays
from datarax_ckpt._report import (
    Problem,
    VerifyReport,
    corrupted,
    first_line,
    is_storage_error,
    step_of,
)
from datarax_ckpt._structure import JSON_FILE, UNAVAILABLE, Structure, inspect, stored_keys_of

ALGORITHM = "xxh3_64"
CHECKSUMS_VERSION = 1
_HASH_CHUNK = 64 << 20  # xxhash releases the GIL per update(): bounded chunks keep it released
_READ_CHUNK = 16 << 20
_VERIFY_BATCH_BYTES = 1 << 30  # arrays re-read per Orbax call during verify (bounds memory)


# Storage errors of TensorStore/Orbax that mean a damaged or missing file.


# --------------------------------------------------------------------------- hashing


def _array_view(value: Any) -> memoryview:
    host = np.ascontiguousarray(np.asarray(value))  # zero-copy for CPU jax and numpy arrays
    return memoryview(host.reshape(-1).view(np.uint8))


def hash_array(value: Any, pause: Callable[[], None] = lambda: None) -> str:
    """xxh3-64 hex digest of an array's bytes (C order), hashed in GIL-free chunks.

    ``pause()`` is called before each chunk (a save's hashing yields to captures).
    """
    view = _array_view(value)
    h = xxhash.xxh3_64()
    for start in range(0, len(view), _HASH_CHUNK):
        pause()
        h.update(view[start : start + _HASH_CHUNK])
    return h.hexdigest()


def _map_threads(fn: Callable[..., Any], calls: list[tuple]) -> list:
    """``[fn(*c) for c in calls]``, on two threads when there is more than one call.

    xxhash releases the GIL, so two arrays hash at once (1 GiB in 8 arrays: 0.12 s on one
    thread, 0.07 s on two, on the 2-core CI machine). The pool lives only for the call, so
    no thread outlives a save.
    """
    if len(calls) < 2:
        return [fn(*c) for c in calls]
    with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="datarax-ckpt-hash") as pool:
        return list(pool.map(lambda c: fn(*c), calls))


def hash_json(value: Any) -> str:
    """xxh3-64 of a JSON value's canonical text (equal for a value and its JSON round trip)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return xxhash.xxh3_64_hexdigest(text.encode("utf-8"))


def compute(
    arrays: Mapping[str, Any],
    manifest: dict,
    metadata: dict,
    known: Mapping[str, str] | None = None,
    linked: Mapping[str, str] | None = None,
) -> dict:
    """The ``checksums`` item of one save: one record per stored array, plus the JSON items.

    Runs in the checksums item's commit future (``_orbax.ChecksumsHandler``), beside the
    array writes, pausing (1 s at most in all) while a ``save()`` captures its state.
    A packed buffer also gets one checksum per leaf packed
    in it (``"slots"``), so damage is traced to the exact leaf. An array that this
    process cannot see whole (sharded over several processes) gets ``{"skipped":
    reason}`` instead of a checksum. ``known``: ``{key: xxh3}`` already computed (an
    incremental save's early hashes and linked arrays); ``linked``: ``{key: step folder
    name}`` of the arrays linked from an earlier step, recorded as ``"linked"``.
    """
    known, linked = known or {}, linked or {}
    segments = _pack_segments(manifest)
    # A save() capturing meanwhile (a back-to-back save) goes first, for at most 1 s.
    pause = _hostcopy.YieldBudget(1.0)

    def record_of(key: str, value: Any) -> dict:
        record = {
            "nbytes": int(value.nbytes),
            "dtype": jnp.dtype(value.dtype).name,
            "shape": list(value.shape),
        }
        if isinstance(value, jax.Array) and not value.is_fully_addressable:
            record["skipped"] = "sharded over several processes"
        else:
            record[ALGORITHM] = known[key] if key in known else hash_array(value, pause)
            if key in linked:
                record["linked"] = linked[key]
            if key in segments:
                flat = np.asarray(value).reshape(-1)
                record["slots"] = {
                    str(slot): hash_array(flat[start:stop], pause)
                    for slot, start, stop in segments[key]
                }
        return record

    records = dict(zip(arrays, _map_threads(record_of, list(arrays.items())), strict=True))
    return {
        "algorithm": ALGORITHM,
        "version": CHECKSUMS_VERSION,
        "arrays": records,
        "items": {
            _layout.ITEM_MANIFEST: hash_json(manifest),
            _layout.ITEM_METADATA: hash_json(metadata),
        },
    }


def unavailable(error: Exception) -> dict:
    """The ``checksums`` item of a save whose hashing raised ``error`` (the step commits
    without checksums: its data is complete and restores)."""
    return {
        "algorithm": ALGORITHM,
        "version": CHECKSUMS_VERSION,
        UNAVAILABLE: f"computing them failed at save time: {error!r}",
    }


def _pack_segments(manifest: dict) -> dict[str, list[tuple[int, int, int]]]:
    """``{pack key: [(slot, first element, end element)]}`` of the packed leaves."""
    out: dict[str, list[tuple[int, int, int]]] = {}
    for slot, entry in enumerate(manifest.get("slots", [])):
        if "pack" in entry:
            key = manifest["packs"][entry["pack"]]["key"]
            start = entry["offset"]
            out.setdefault(key, []).append((slot, start, start + math.prod(entry["shape"])))
    return out


# --------------------------------------------------------------------------- full verify


@contextlib.contextmanager
def reading(structure: Structure) -> Iterator[None]:
    """Turns Orbax/TensorStore errors about damaged files into CheckpointCorruptedError."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:
        if not is_storage_error(e):
            raise
        message = first_line(e)
        key = _key_named(f"{e}\n{message}", structure)
        file = structure.file_of(key) if key else None
        problem = Problem(
            "unreadable_array" if key else "unreadable_file",
            f"Orbax could not read it: {message}",
            file or (_layout.ITEM_STATE if key else None),
            key,
            structure.leaves(key) if key else (),
        )
        raise corrupted(structure.path, [problem]) from e


def _key_named(text: str, structure: Structure) -> str | None:
    """The stored array an Orbax/TensorStore message is about (``"a0/0"``, ``.../a0/0``)."""
    keys = stored_keys_of(structure.manifest) if structure.manifest is not None else []
    for key in sorted(keys, key=len, reverse=True):
        if re.search(rf'(^|["/]){re.escape(key)}/', text):
            return key
    return None


def _compare(key: str, value: np.ndarray, record: dict | None, structure: Structure):
    leaves = structure.leaves(key)
    file = structure.file_of(key) or _layout.ITEM_STATE
    if record is None:
        return Problem("missing_checksum", "no checksum recorded for this array", file, key, leaves)
    if ALGORITHM not in record:
        return None  # skipped at save time (sharded over several processes)
    found = hash_array(value)
    if found != record[ALGORITHM]:
        leaves = _damaged_leaves(value, record, structure) or leaves
        return Problem(
            "checksum_mismatch",
            f"content checksum mismatch: recorded {ALGORITHM} {record[ALGORITHM]}, "
            f"read back {found}",
            file,
            key,
            leaves,
        )
    return None


def check_json_item(structure: Structure, item: str, value: Any) -> None:
    """Raises CheckpointCorruptedError if a JSON item differs from its recorded checksum."""
    problem = _json_problem(structure, item, value)
    if problem is not None:
        raise corrupted(structure.path, [problem])


def _json_problem(structure: Structure, item: str, value: Any) -> Problem | None:
    recorded = ((structure.checksums or {}).get("items") or {}).get(item)
    if recorded is None or hash_json(value) == recorded:
        return None
    return Problem(
        "checksum_mismatch",
        f"content checksum mismatch of the {item} item (tree, Python scalars or metadata)",
        f"{item}/{JSON_FILE}",
    )


def _damaged_leaves(value: Any, record: dict, structure: Structure) -> tuple[str, ...]:
    """The packed leaves whose own checksum differs (empty if not recorded per leaf)."""
    sums = record.get("slots")
    if not sums or structure.manifest is None:
        return ()
    flat = np.asarray(value).reshape(-1)
    bounds = {
        slot: (a, b) for segs in _pack_segments(structure.manifest).values() for slot, a, b in segs
    }
    paths = slot_paths(structure.manifest)
    bad = []
    for slot, expected in sums.items():
        start, stop = bounds.get(int(slot), (0, 0))
        if hash_array(flat[start:stop]) != expected:
            bad.append(paths.get(int(slot), f"slot {slot}"))
    return tuple(bad)


def load_verified(
    read: Callable[..., dict],
    storage: Mapping[str, Any],
    manifest: dict,
    structure: Structure,
    pool: concurrent.futures.Executor,
) -> dict[str, Any]:
    """Reads the stored arrays a restore needs, checking each recorded checksum.

    Arrays with a checksum are read in their stored dtype and hashed before anything
    is returned (in host memory, or shard by shard in place for arrays spread over
    several CPU devices), then put on the requested sharding and cast to the requested
    dtype (:func:`datarax_ckpt._orbax.place`). The others (no record, ``structure``
    without checksums, or a sharding this process cannot hold whole) are read the
    ordinary way. ``pool`` hashes (the directory's two hashing threads).

    Raises:
        CheckpointCorruptedError: naming the file, stored array and leaves that differ.
    """
    records = (structure.checksums or {}).get("arrays") or {}
    stored = stored_arrays(manifest)
    verified = []
    for key, spec in storage.items():
        record = records.get(key)
        whole = spec.lib != "jax" or spec.sharding is None or spec.sharding.is_fully_addressable
        if record is not None and ALGORITHM in record and whole and key in stored:
            verified.append(key)
    checked = frozenset(verified)
    # Each array is hashed as soon as its read completes, beside the others' reads;
    # arrays the aligned reader did not report are hashed once everything is read.
    hashing: dict[str, concurrent.futures.Future] = {}

    def hash_when_read(key: str, value: np.ndarray) -> None:
        if key in checked:
            hashing[key] = pool.submit(_compare, key, value, records.get(key), structure)

    with _orbax.on_read(hash_when_read):
        loaded = _orbax.read(
            read, storage, stored={k: stored[k] for k in verified}, checked=checked
        )
    for key in verified:
        if key not in hashing:
            hashing[key] = pool.submit(_compare, key, loaded[key], records.get(key), structure)
    problems = [p for p in (hashing[k].result() for k in verified) if p]
    if problems:
        raise corrupted(structure.path, problems)
    return _orbax.place(loaded, storage)


def _read_files(structure: Structure, skip: set[str]) -> tuple[list[Problem], int]:
    """Reads every regular file of the scan (up to what the checkpoint needs of it);
    returns problems and the count.

    Symlinks, FIFOs, sockets and devices were reported by the scan and are not opened.
    A file is read up to the bytes the OCDBT index needs of it, or else up to the larger
    of the JSON size limit and twice the declared arrays: a huge (sparse) file in a
    checkpoint costs bounded time.
    """
    declared = 0
    if structure.checked is not None:
        declared = sum(math.prod(s) * d.itemsize for d, s in structure.checked.stored.values())
    cap = max(_safeio.MAX_JSON_BYTES, 2 * declared + (1 << 20))
    problems, count = [], 0
    for rel in sorted(structure.scan.files if structure.scan is not None else ()):
        if rel in skip:
            continue
        count += 1
        try:
            _safeio.read_to_end(structure.path / rel, structure.needed.get(rel, cap))
        except OSError as e:
            problems.append(Problem("unreadable_file", f"cannot be read: {e}", rel))
    return problems, count


def _batches(keys: list[str], sizes: Mapping[str, int]) -> Iterator[list[str]]:
    batch, held = [], 0
    for key in keys:
        if batch and held + sizes[key] > _VERIFY_BATCH_BYTES:
            yield batch
            batch, held = [], 0
        batch.append(key)
        held += sizes[key]
    if batch:
        yield batch


def _absolute(path: epath.PathLike) -> epath.Path:
    path = epath.Path(path)
    return path if "://" in str(path) else path.resolve()  # Orbax wants absolute paths


def verify(
    path: epath.PathLike, *, item_handlers: Mapping[str, Any] | None = None, full: bool = True
) -> VerifyReport:
    """Checks one checkpoint folder; see :meth:`OrbaxCheckpointHandler.verify`.

    Args:
        path: A ``ckpt-<step>`` or ``checkpoint`` folder.
        item_handlers: Orbax item handlers to read it with (defaults suffice).
        full: Also read every file and compare every array with its checksum. False
            runs only the quick check (commit marker, files present and long enough).

    Returns:
        A :class:`VerifyReport`.
    """
    path = _absolute(path)
    structure = inspect(path)
    problems = list(structure.problems)
    notes = tuple(structure.notes)
    recorded = structure.checksums is not None
    step = step_of(path)
    if not full or not path.is_dir():
        return VerifyReport(str(path), step, tuple(problems), recorded, full=False, notes=notes)
    skip = {p.file for p in problems if p.file}  # already found damaged: not read again
    file_problems, files = _read_files(structure, skip)
    problems += file_problems
    for item in (_layout.ITEM_MANIFEST, _layout.ITEM_METADATA):
        value = getattr(structure, item)
        if value is not None and (problem := _json_problem(structure, item, value)):
            problems.append(problem)
    checked = nbytes = 0
    damaged = {p.key for p in problems if p.key is not None}
    # Orbax reads the arrays only from a folder whose entries are all regular files
    # and whose manifest validated (so no buffer is sized by a damaged declaration).
    safe = structure.scan is not None and structure.scan.is_safe_under(_layout.ITEM_STATE)
    if structure.checked is not None and safe:
        arrays = structure.checked.stored
        records = (structure.checksums or {}).get("arrays") or {}
        keys = [k for k in arrays if k not in damaged]
        sizes = {k: math.prod(s) * d.itemsize for k, (d, s) in arrays.items()}
        handlers = dict(item_handlers or _orbax.item_handlers())
        with _orbax.reader(path, {_layout.ITEM_STATE: handlers[_layout.ITEM_STATE]}) as read:
            for batch in _batches(keys, sizes):
                for key, value in _read_arrays(read, batch, arrays, structure):
                    if isinstance(value, Problem):
                        problems.append(value)
                        continue
                    if recorded:
                        if problem := _compare(key, value, records.get(key), structure):
                            problems.append(problem)
                            continue
                        checked += 1
                        nbytes += value.nbytes
    return VerifyReport(
        str(path), step, tuple(problems), recorded, checked, nbytes, files, True, notes
    )


def _read_arrays(read, keys, arrays, structure) -> Iterator[tuple[str, Any]]:
    """Yields ``(key, numpy array or Problem)``; retries one by one if a batch fails."""
    try:
        loaded = _orbax.read_host(read, {k: arrays[k] for k in keys})
    except Exception as e:  # noqa: BLE001 - damage of these arrays: find which, one at a time
        if len(keys) > 1:
            for key in keys:
                yield from _read_arrays(read, [key], arrays, structure)
            return
        key = keys[0]
        yield (
            key,
            Problem(
                "unreadable_array",
                f"Orbax could not read it: {first_line(e)}",
                structure.file_of(key) or _layout.ITEM_STATE,
                key,
                structure.leaves(key),
            ),
        )
        return
    for key in keys:
        value = loaded[key]
        if tuple(value.shape) != tuple(arrays[key][1]):
            value = Problem(
                "unreadable_array",
                f"it holds shape {list(value.shape)}, the manifest declares {list(arrays[key][1])}",
                structure.file_of(key) or _layout.ITEM_STATE,
                key,
                structure.leaves(key),
            )
        yield key, value
