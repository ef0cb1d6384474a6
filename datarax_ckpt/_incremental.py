"""Incremental saves: which stored arrays of a save equal the previous committed step's.

With ``CheckpointOptions(incremental=True)`` a save writes only the stored arrays whose
content differs from the newest committed step of its directory; each other one is
hard-linked from that step (:mod:`datarax_ckpt._linking`). Equality is decided only by
sound evidence, in this order:

1. **The same object.** A large ``jax.Array`` leaf that is the very object saved at the
   same leaf path by the previous save (a weak reference, so nothing is kept alive) is
   not even copied at capture: ``jax.Array`` is immutable, and that previous save's
   stored array and checksum are known once it has committed.
2. **The same content.** Any other stored array whose dtype and shape match an array of
   the previous step is hashed (xxh3-64, as the checksums item records it) before the
   write; it is linked when dtype, shape and checksum all match a recorded array. The
   hash is reused for the new step's checksums, so nothing is hashed twice. Arrays whose
   dtype and shape match nothing are not hashed early (they cannot be equal): they are
   written and hashed beside the write, as without incremental saves.

Hashing early is serial with the write, while the checksums item hashes beside it. So a
stored array that differed from its predecessor at the last save (a trained weight, a
moment) is written without looking first, at no risk: writing is always correct. Its
checksum, computed beside the write, shows whether it has stopped changing; if it has,
the next save looks again. Nothing is ever linked on such a guess, only written.

The previous step's checksums are kept in memory from the last save of this handler, or
read from the step's ``checksums`` item after a restart. Everything is decided on the
directory's worker thread, just before the write, against the step committed then.

Example:
    >>> import tempfile, jax.numpy as jnp
    >>> from datarax_ckpt import OrbaxCheckpointHandler
    >>> directory = tempfile.mkdtemp()
    >>> base = jnp.ones((512, 1024))  # 2 MiB, frozen
    >>> with OrbaxCheckpointHandler(incremental=True) as handler:
    ...     for step in range(3):
    ...         _ = handler.save(directory, {"base": base, "head": jnp.full(4, step)}, step=step)
    ...     restored = handler.restore(directory, step=2)
    >>> float(restored["head"][0])
    2.0
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import shutil
import threading
import weakref
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from datarax_ckpt import _integrity, _layout, _s3, _safeio
from datarax_ckpt._errors import CheckpointError, IncrementalUnsupportedError
from datarax_ckpt._linking import Linked

_CHECKSUMS_FILE = f"{_layout.ITEM_CHECKSUMS}/metadata"


def check_supported(path: Any) -> None:
    """Raises IncrementalUnsupportedError for a directory incremental saves cannot use.

    Object stores have no hard links (server-side copies would rewrite the bytes, which
    is what incremental saves avoid), so ``s3://`` is refused before anything is written.
    """
    if isinstance(path, str | os.PathLike) and _s3.is_s3(os.fspath(path)):
        raise IncrementalUnsupportedError(
            f"CheckpointOptions(incremental=True) cannot save to {path}: incremental saves "
            "hard-link unchanged arrays from the previous step, and S3 has no links. Use "
            "incremental=False for s3:// directories (or save to a local or network file "
            "system and copy the steps)."
        )


def active() -> bool:
    """Incremental saves link only in single-process runs (multi-process saves are full)."""
    return jax.process_count() == 1


@dataclasses.dataclass
class Source:
    """The committed step a save may link from."""

    folder: epath.Path
    records: dict[str, dict]  # the step's checksum records, by stored key
    objects: dict[str, weakref.ref] = dataclasses.field(default_factory=dict)
    inode: int | None = None  # of ``folder`` when it was committed (None: read from disk)


class Capture:
    """One save's capture hook: passes a large ``jax.Array`` leaf through uncopied when
    it is the very object the previous save held at the same leaf path."""

    def __init__(self, seen: Mapping[str, weakref.ref]):
        self._seen = seen
        self.paths: dict[str, weakref.ref] = {}
        self.objects: dict[str, weakref.ref] = {}  # stored key -> the caller's array

    def __call__(self, key: str, path: str, value: Any) -> bool:
        ref = weakref.ref(value)
        self.paths[path] = ref
        self.objects[key] = ref
        old = self._seen.get(path)
        return old is not None and old() is value and not value.is_deleted()


class Tracker:
    """Per directory: what earlier saves stored, for the next incremental save.

    ``capture()`` and ``accept()`` run on the saving thread (under the handler's lock);
    ``plan()`` and ``committed()`` on the directory's worker.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[str, weakref.ref] = {}
        self._source: Source | None = None
        self._compared: dict[str, dict] = {}  # the records the last plan compared with
        self._changing: set[str] = set()  # keys that differed at the last save

    def capture(self) -> Capture | None:
        if not active():
            return None
        with self._lock:
            return Capture(dict(self._seen))

    def accept(self, capture: Capture | None) -> None:
        """Records the leaves of a save that was accepted (enqueued)."""
        if capture is not None:
            with self._lock:
                self._seen = capture.paths

    def committed(self, folder: epath.Path, sums: dict | None, objects: Mapping) -> None:
        """Records the step just committed as the source of the next save."""
        records = (sums or {}).get("arrays")
        with self._lock:
            if not isinstance(records, dict):
                self._source, self._changing = None, set()
                return
            self._source = Source(folder, records, dict(objects), _inode(folder))
            old = self._compared
            self._changing = {
                k
                for k, r in records.items()
                if _usable(r) and _usable(old.get(k)) and _content(r) != _content(old[k])
            }

    def plan(
        self, directory: epath.Path, name: str, arrays: Mapping[str, Any]
    ) -> tuple[dict[str, Any], dict[str, str], dict[str, str]]:
        """Decides which of a save's stored arrays are linked.

        Args:
            directory: The checkpoint directory.
            name: The folder being written (``ckpt-<step>``); when it replaces the newest
                step (an overwrite), the links come from that step's backup.
            arrays: The save's stored arrays.

        Returns:
            ``(for_orbax, known, linked)``: the arrays with :class:`Linked` in place of
            each unchanged one, ``{key: xxh3}`` of every array hashed here or linked, and
            ``{key: name of the step linked from}``.
        """
        if not active():  # multi-process runs save in full
            return dict(arrays), {}, {}
        source = self._source_for(directory)
        with self._lock:
            self._compared = source.records if source is not None else {}
            changing = self._changing
        if source is None or not arrays:
            return dict(arrays), {}, {}
        # An overwrite moves the step it replaces aside before Orbax writes: link from there.
        link_from = source.folder
        if source.folder.name == name:
            link_from = _layout.backup_path(source.folder)
        by_object: dict[int, str] = {}
        for key, ref in source.objects.items():
            obj = ref()
            if obj is not None and _usable(source.records.get(key)):
                by_object[id(obj)] = key
        by_content: dict[tuple, str] = {}
        shapes = set()
        for key, record in source.records.items():
            if _usable(record):
                by_content.setdefault(_content(record), key)
                shapes.add(_content(record)[1:])
        matches: dict[str, str] = {}
        to_hash = []
        for key, value in arrays.items():
            old = by_object.get(id(value))
            if old is not None and source.objects[old]() is value:
                matches[key] = old
            elif key in changing:
                continue  # written (see the module docstring); its checksum comes after
            elif (_dtype(value), tuple(value.shape)) in shapes and _whole(value):
                to_hash.append(key)
        known = {}
        for key, digest in zip(to_hash, _hash_all([arrays[k] for k in to_hash]), strict=True):
            known[key] = digest
            old = by_content.get((digest, _dtype(arrays[key]), tuple(arrays[key].shape)))
            if old is not None:
                matches[key] = old
        state = source.folder / _layout.ITEM_STATE
        out, linked = dict(arrays), {}
        for key, old in matches.items():
            if not (state / old).is_dir():  # e.g. written by OCDBT: nothing to link
                continue
            value = arrays[key]
            where = os.fspath(link_from / _layout.ITEM_STATE / old)
            out[key] = Linked(where, np.dtype(value.dtype), tuple(value.shape))
            known[key] = source.records[old][_integrity.ALGORITHM]
            linked[key] = source.folder.name.removesuffix(_layout.BACKUP_SUFFIX)
        return out, known, linked

    def _source_for(self, directory: epath.Path) -> Source | None:
        with self._lock:
            source = self._source
        # The step this handler committed last is still the newest while its folder is
        # the same (a rename keeps the inode): only this writer adds or removes steps
        # (one writer per directory), and its rollback() deletes the folder. No listing.
        if source is not None and source.inode is not None:
            if source.inode == _inode(source.folder):
                return source
        folders = _layout.step_folders(directory)
        return _read_source(folders[max(folders)]) if folders else None


def _read_source(folder: epath.Path) -> Source | None:
    """The checksum records of a step written by another process or an earlier run.

    A checkpoint folder is untrusted: a record is used only if well-formed, and what it
    claims is checked again when the new step is verified or restored (a linked array is
    the very bytes its recorded checksum must match).
    """
    sums = _read_json_or_none(folder / _CHECKSUMS_FILE)
    records = sums.get("arrays") if isinstance(sums, dict) else None
    if not isinstance(records, dict) or sums.get("algorithm") != _integrity.ALGORITHM:
        return None
    return Source(folder, {k: v for k, v in records.items() if _usable(v)})


def _read_json_or_none(path: epath.Path) -> Any:
    try:
        return _safeio.read_json(path, _safeio.MAX_JSON_BYTES)
    except (OSError, ValueError):
        return None


def _usable(record: Any) -> bool:
    return (
        isinstance(record, dict)
        and isinstance(record.get(_integrity.ALGORITHM), str)
        and isinstance(record.get("dtype"), str)
        and isinstance(record.get("shape"), list)
    )


def _content(record: dict) -> tuple:
    return (record[_integrity.ALGORITHM], record["dtype"], tuple(record["shape"]))


def _dtype(value: Any) -> str:
    return jnp.dtype(value.dtype).name


def _whole(value: Any) -> bool:
    return not isinstance(value, jax.Array) or value.is_fully_addressable


def _inode(folder: epath.Path) -> int | None:
    try:
        return os.stat(folder).st_ino
    except OSError:
        return None


def _hash_all(values: list) -> list[str]:
    """xxh3-64 of each array, on two threads (xxhash releases the GIL)."""
    if len(values) < 2:
        return [_integrity.hash_array(v) for v in values]
    with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="datarax-ckpt-hash") as pool:
        return list(pool.map(_integrity.hash_array, values))


def linked_arrays(checksums: Any) -> dict[str, str]:
    """``{stored key: step folder it was linked from}`` of a step's checksums item."""
    records = checksums.get("arrays") if isinstance(checksums, dict) else None
    if not isinstance(records, dict):
        return {}
    return {
        k: r["linked"]
        for k, r in records.items()
        if isinstance(r, dict) and isinstance(r.get("linked"), str)
    }


def new_bytes(folder: epath.Path, checksums: Any, total: int) -> int:
    """Bytes of ``folder`` that this step wrote: ``total`` less its linked arrays' files."""
    shared = 0
    for key in linked_arrays(checksums):
        for parent, _, files in os.walk(folder / _layout.ITEM_STATE / key):
            for name in files:
                try:
                    shared += os.stat(os.path.join(parent, name), follow_symlinks=False).st_size
                except OSError:
                    pass
    return max(total - shared, 0)


def copy_step(folder: epath.Path, out: epath.Path) -> epath.Path:
    """Copies one committed step folder into ``out`` (created) as a standalone step.

    Every file is copied, hard links included (``cp -r`` does the same): the copy shares
    nothing with ``folder``'s directory, restores and verifies on its own, and is what
    to move to another machine; its checksum records no longer mark arrays as linked.
    Symlinks (never written by datarax_ckpt) are refused.

    Returns:
        The new step folder, ``out/<folder name>``.

    Raises:
        FileExistsError: if ``out`` already holds a folder of that name.
    """
    destination = epath.Path(out) / folder.name
    if destination.exists():
        raise FileExistsError(f"{destination} already exists; copy into another folder.")
    scan = _safeio.scan(folder)
    if scan.unsafe:
        first = sorted(scan.unsafe)[0]
        raise CheckpointError(f"{folder}/{first} is a {scan.unsafe[first]}: not copied.")
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.parent / f".{folder.name}.datarax-copy"
    if tmp.exists():
        tmp.rmtree()
    shutil.copytree(os.fspath(folder), os.fspath(tmp))
    sums = tmp / _CHECKSUMS_FILE
    if linked_arrays(doc := _read_json_or_none(sums)):
        for record in doc["arrays"].values():  # the copy wrote every byte: nothing linked
            if isinstance(record, dict):
                record.pop("linked", None)
        sums.write_text(json.dumps(doc))
    tmp.rename(destination)  # a killed copy leaves only the hidden tmp folder
    return destination
