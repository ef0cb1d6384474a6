"""What a checkpoint folder holds: its leaves and the quick structural check (reports:
``_report``).

The quick check (commit marker, every file the OCDBT database refers to present and long
enough) runs before every restore; :mod:`datarax_ckpt._integrity` adds content checksums.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from etils import epath

from datarax_ckpt import _layout, _manifest, _orbax, _s3, _safeio
from datarax_ckpt._errors import CheckpointError
from datarax_ckpt._manifest import leaf_table as leaf_table  # for the CLI and tests
from datarax_ckpt._manifest import leaves_by_key, stored_arrays
from datarax_ckpt._report import Problem, first_line, is_storage_error

COMMIT_MARKER = "commit_success.txt"  # written by Orbax into every committed step folder
CHECKPOINT_METADATA = "_CHECKPOINT_METADATA"
# Key of a checksums item whose checksums could not be computed at save time (the reason).
UNAVAILABLE = "unavailable"
JSON_FILE = "metadata"  # the file name Orbax's JsonCheckpointHandler writes in its item folder
_JSON_ITEMS = (_layout.ITEM_MANIFEST, _layout.ITEM_METADATA, _layout.ITEM_CHECKSUMS)

# --------------------------------------------------------------------------- structure


@dataclasses.dataclass
class Structure:
    """What the quick check learned about a checkpoint folder (no array data read)."""

    path: epath.Path
    problems: list[Problem]
    items: set[str]
    checkpoint_metadata: dict | None = None
    manifest: dict | None = None
    metadata: dict | None = None
    checksums: dict | None = None
    files_by_key: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    scan: _safeio.Scan | None = None  # every entry of the folder, listed with lstat
    checked: _manifest.Manifest | None = None  # the manifest, once validated
    needed: dict[str, int] = dataclasses.field(default_factory=dict)  # OCDBT: bytes per file
    _leaves: dict[str, list[str]] | None = None

    def leaves(self, key: str) -> tuple[str, ...]:
        if self._leaves is None:
            self._leaves = leaves_by_key(self.checked or self.manifest)  # one walk
        return tuple(self._leaves.get(key, ()))

    def file_of(self, key: str) -> str | None:
        files = self.files_by_key.get(key)
        return f"{_layout.ITEM_STATE}/{files[0]}" if files else None


def _read_json(structure: Structure, rel: str) -> Any:
    """A JSON file of the folder, read only if the scan found it a regular file."""
    scan = structure.scan
    if scan is not None and _safeio.is_local(structure.path) and rel not in scan.files:
        if rel in scan.unsafe:
            raise _safeio.UnsafeEntryError(f"a {scan.unsafe[rel]}, not a regular file")
        raise FileNotFoundError(rel)
    return _safeio.read_json(structure.path / rel)


def inspect(path: epath.Path, *, arrays: bool = True) -> Structure:
    """The quick check: entries, commit marker, item folders, JSON items, the manifest
    validated against the files the data needs.

    Reads only small files (JSON items, each with a size limit, and the OCDBT b-tree),
    never array data, and opens nothing that is not a regular file (see
    :mod:`datarax_ckpt._safeio`); ``arrays=False`` skips the array item entirely (for
    metadata-only reads).
    """
    path = epath.Path(path)
    problems: list[Problem] = []
    if not path.is_dir():
        problems.append(Problem("missing_file", "the checkpoint folder does not exist", "."))
        return Structure(path, problems, set())
    structure = Structure(path, problems, set())
    if not _check_entries(structure):
        return structure
    _read_items(structure)
    _check_manifest(structure, arrays)
    if arrays and structure.checked is not None and structure.checked.stored:
        _inspect_state(structure)
    return structure


def _check_entries(structure: Structure) -> bool:
    """Scans the folder (unsafe entries, commit marker); False if nothing more can be read."""
    path, problems = structure.path, structure.problems
    try:
        structure.scan = _safeio.scan(path)
    except OSError as e:
        problems.append(Problem("unreadable_file", f"cannot be listed: {e}", "."))
        return False
    for rel, what in sorted(structure.scan.unsafe.items()):
        problems.append(
            Problem(
                "unsafe_entry",
                f"a {what}, not a regular file or folder: refused, not opened or followed",
                rel,
            )
        )
    if "." in structure.scan.unsafe:
        return False
    if ".orbax-checkpoint-tmp" in path.name or not _layout.is_committed(path):
        problems.append(Problem("not_committed", "a temporary folder of an unfinished save", "."))
    elif COMMIT_MARKER not in structure.scan.files and COMMIT_MARKER not in structure.scan.unsafe:
        problems.append(
            Problem(
                "not_committed",
                "Orbax's commit marker is missing: the save did not finish or the marker "
                "was deleted",
                COMMIT_MARKER,
            )
        )
    return True


def _read_items(structure: Structure) -> None:
    """Reads Orbax's step metadata and the JSON items (manifest, metadata, checksums)."""
    path, problems = structure.path, structure.problems
    try:
        structure.checkpoint_metadata = _read_json(structure, CHECKPOINT_METADATA)
        handlers = structure.checkpoint_metadata.get("item_handlers") or {}
        structure.items = set(handlers) if isinstance(handlers, dict) else set()
        if (reason := _orbax.step_metadata_error(path)) is not None:
            problems.append(Problem("unreadable_file", reason, CHECKPOINT_METADATA))
    except _safeio.UnsafeEntryError:
        pass  # reported by the scan
    except FileNotFoundError:
        problems.append(
            Problem("missing_file", "Orbax's checkpoint metadata is missing", CHECKPOINT_METADATA)
        )
    except (OSError, ValueError, AttributeError) as e:
        problems.append(Problem("unreadable_file", f"unreadable: {e}", CHECKPOINT_METADATA))
    if not structure.items:  # unknown: expect what datarax_ckpt always writes
        structure.items = {_layout.ITEM_MANIFEST, _layout.ITEM_METADATA}
    # Our item folders count even where Orbax's record of them was damaged.
    structure.items |= {i for i in _JSON_ITEMS + (_layout.ITEM_STATE,) if i in structure.scan.dirs}
    for item in sorted(structure.items & set(_JSON_ITEMS)):
        file = f"{item}/{JSON_FILE}"
        try:
            setattr(structure, item, _read_json(structure, file))
        except _safeio.UnsafeEntryError:
            pass  # reported by the scan
        except FileNotFoundError:
            problems.append(Problem("missing_file", f"the {item} item is missing", file))
        except (OSError, ValueError) as e:
            problems.append(Problem("unreadable_file", f"unreadable JSON: {e}", file))
    if isinstance(structure.checksums, dict) and UNAVAILABLE in structure.checksums:
        reason = structure.checksums[UNAVAILABLE]
        structure.checksums = None
        structure.notes.append(f"no checksums recorded ({reason}): the data cannot be compared")
    elif structure.checksums is None and structure.manifest is not None:
        structure.notes.append("no checksums recorded: the data cannot be compared")
    if structure.checksums is not None and not isinstance(structure.checksums, dict):
        problems.append(
            Problem("unreadable_file", "the checksums item is not a JSON object", _CHECKSUMS_FILE)
        )
        structure.checksums = None


_CHECKSUMS_FILE = f"{_layout.ITEM_CHECKSUMS}/{JSON_FILE}"
_MANIFEST_FILE = f"{_layout.ITEM_MANIFEST}/{JSON_FILE}"


def _check_manifest(structure: Structure, arrays: bool) -> None:
    """Validates the manifest once (:func:`_manifest.validate`); problems are recorded."""
    manifest = structure.manifest
    try:
        _manifest.check_format(manifest)
    except CheckpointError:
        # Not ours, or a newer version: the reader says so (CheckpointFormatError),
        # unless the manifest was read and is damaged: no format and version fields,
        # or (recorded) a checksum that differs.
        read = _MANIFEST_FILE in structure.scan.files and not any(
            p.file == _MANIFEST_FILE for p in structure.problems
        )
        if not read:
            return
        recorded = ((structure.checksums or {}).get("items") or {}).get(_layout.ITEM_MANIFEST)
        from datarax_ckpt._integrity import hash_json

        if recorded is not None and hash_json(manifest) != recorded:
            problem = Problem(
                "checksum_mismatch", "the manifest differs from its checksum", _MANIFEST_FILE
            )
            structure.problems.append(problem)
        elif not (
            isinstance(manifest, dict)
            and isinstance(manifest.get("format"), str)
            and type(manifest.get("version")) is int
        ):
            problem = Problem(
                "invalid_manifest", "not a manifest: no format and version", _MANIFEST_FILE
            )
            structure.problems.append(problem)
        return
    orbax_tree = None
    state_metadata = f"{_layout.ITEM_STATE}/_METADATA"
    if arrays and structure.scan is not None and state_metadata in structure.scan.files:
        try:
            orbax_tree = _read_json(structure, state_metadata).get("tree_metadata")
        except (OSError, ValueError, AttributeError) as e:
            structure.problems.append(
                Problem("unreadable_file", f"unreadable JSON: {e}", state_metadata)
            )
            return
        if not isinstance(orbax_tree, dict):
            orbax_tree = {}  # validate() then finds every declared array missing
    records = None
    if structure.checksums is not None:
        records = structure.checksums.get("arrays")
        records = records if isinstance(records, dict) else {}
    try:
        structure.checked = _manifest.validate(manifest, orbax_tree=orbax_tree, checksums=records)
    except _manifest.Invalid as e:
        leaves = (e.leaf,) if e.leaf else ()
        if e.key and not leaves:
            leaves = tuple(structure.leaves(e.key))
        structure.problems.append(Problem(e.kind, str(e), _MANIFEST_FILE, e.key, leaves))


def stored_keys_of(manifest: dict) -> list[str]:
    try:
        return list(stored_arrays(manifest))
    except (KeyError, TypeError, ValueError, AttributeError):
        return _manifest.stored_keys(manifest) if isinstance(manifest, dict) else []


def _inspect_state(structure: Structure) -> None:
    state = structure.path / _layout.ITEM_STATE
    problems = structure.problems
    if not state.is_dir():
        problems.append(
            Problem("missing_item", "the state item (array data) is missing", _layout.ITEM_STATE)
        )
        return
    for name in ("_METADATA",):
        if not (state / name).exists():
            problems.append(
                Problem(
                    "missing_file",
                    "Orbax's tree metadata is missing",
                    f"{_layout.ITEM_STATE}/{name}",
                )
            )
    if structure.scan is not None and not structure.scan.is_safe_under(_layout.ITEM_STATE):
        return  # TensorStore would open them: the unsafe entries are reported instead
    if (state / "manifest.ocdbt").exists():
        _inspect_ocdbt(structure, state)
    elif structure.checked is not None:  # one zarr folder per array
        for key in structure.checked.stored:
            structure.files_by_key[key] = [key]
            if not (state / key).is_dir():
                problems.append(
                    Problem(
                        "missing_file",
                        "the array's folder is missing",
                        f"{_layout.ITEM_STATE}/{key}",
                        key,
                        structure.leaves(key),
                    )
                )


def _kvstore_url(path: epath.Path) -> str | dict:
    text = str(path)
    if _s3.is_s3(text):  # TensorStore does not read AWS_ENDPOINT_URL: a spec with it
        return _s3.kvstore_url_spec(path)
    if "://" in text:
        return text.rstrip("/") + "/"
    return "file://" + str(epath.Path(text).resolve()) + "/"


def _ocdbt_refs(state: epath.Path) -> Iterator[tuple[str | None, str, int]]:
    """``(storage key or None, file relative to state/, bytes needed)`` per OCDBT reference."""
    import tensorstore as ts

    kvstore = ts.KvStore.open(_kvstore_url(state)).result()
    dump = ts.ocdbt.dump(kvstore).result()
    pending = [v["root"]["location"] for v in dump.get("versions", [])[-1:] if v.get("root")]
    while pending:
        location = pending.pop()
        node_file, node_end = _location_file(location)
        yield None, node_file, node_end
        node = ts.ocdbt.dump(kvstore, location).result()
        for entry in node.get("entries", []):
            key = entry.get("key", b"")
            key = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
            chunk = not key.endswith((".zarray", "zarr.json"))
            if "inline_value" in entry and chunk:  # small values live inside the b-tree node
                yield key.split("/", 1)[0], node_file, 0
            for value in entry.values():
                if not isinstance(value, str):
                    continue
                if value.startswith("value:"):
                    yield key.split("/", 1)[0], *_location_file(value)
                elif value.startswith("btreenode:"):
                    pending.append(value)


def _location_file(location: str) -> tuple[str, int]:
    head, offset, length = location.rsplit(":", 2)
    _, base, relative = head.split(":", 2)
    return f"{base}{relative}", int(offset) + int(length)


def _inspect_ocdbt(structure: Structure, state: epath.Path) -> None:
    problems = structure.problems
    try:
        refs = list(_ocdbt_refs(state))
    except ImportError:  # pragma: no cover - tensorstore comes with orbax
        structure.notes.append("tensorstore.ocdbt.dump unavailable: data files not listed")
        return
    except Exception as e:  # noqa: BLE001 - classified below
        if not is_storage_error(e):  # e.g. a filesystem TensorStore cannot list: no verdict
            structure.notes.append(f"data files not listed: {first_line(e)}")
            return
        problems.append(
            Problem(
                "unreadable_file",
                f"the OCDBT index cannot be read: {first_line(e)}",
                f"{_layout.ITEM_STATE}/manifest.ocdbt",
            )
        )
        return
    needed: dict[str, int] = {}
    keys_of: dict[str, set[str]] = {}
    for key, file, end in refs:
        needed[file] = max(needed.get(file, 0), end)
        if key is not None:
            structure.files_by_key.setdefault(key, [])
            if file not in structure.files_by_key[key]:
                structure.files_by_key[key].append(file)
            keys_of.setdefault(file, set()).add(key)
    structure.needed = {f"{_layout.ITEM_STATE}/{f}": end for f, end in needed.items()}
    for file, end in sorted(needed.items()):
        full = state / file
        keys = sorted(keys_of.get(file, ()))
        key = keys[0] if keys else None
        leaves = tuple(p for k in keys for p in structure.leaves(k))
        rel = f"{_layout.ITEM_STATE}/{file}"
        try:
            size = full.stat().length
        except FileNotFoundError:
            problems.append(Problem("missing_file", "a data file is missing", rel, key, leaves))
            continue
        except OSError as e:
            problems.append(Problem("unreadable_file", f"cannot stat: {e}", rel, key, leaves))
            continue
        if size < end:
            problems.append(
                Problem(
                    "truncated_file",
                    f"truncated: {size} bytes, at least {end} expected",
                    rel,
                    key,
                    leaves,
                )
            )
