"""The manifest format: its one tree walk, its views, and its validation.

A manifest read from disk is untrusted. :func:`validate` checks it once per restore,
before anything is allocated: node kinds known, nesting at most :data:`MAX_DEPTH`,
dtypes from an allow-list, shapes of non-negative ints with a bounded byte count, slot
and pack indices in range, every packed leaf inside its pack, ``empty`` leaves empty,
and, given Orbax's own record of the stored arrays and the checksums item, that the
declared arrays are the ones stored (and each has its checksum record). The result is
a :class:`Manifest` that the restore plans from without checking again.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any

import jax.numpy as jnp
import numpy as np

from datarax_ckpt import _validate
from datarax_ckpt._errors import CheckpointFormatError

FORMAT_NAME = "datarax_ckpt"
FORMAT_VERSION = 1  # major version: readers refuse a newer one.

# Deepest nesting read: the limit save() applies (the root is level 1, each node's
# children one level below), so that what save() accepts, restore() reads. The walk
# below is iterative; the planner recurses ~3 Python frames per level, well inside
# Python's default recursion limit of 1000.
MAX_DEPTH = _validate.MAX_DEPTH
# Largest array declared (bytes): anything larger cannot be a real leaf (numpy sizes are
# int64) and is refused before a buffer is allocated for it.
MAX_ARRAY_BYTES = 1 << 56

_CONTAINERS = frozenset({"dict", "list", "tuple", "node", "obj", "nnx"})
_LEAVES = frozenset(
    {"array", "key", "str", "bytes", "int", "float", "bool", "complex", "none", "fn"}
)
_LIBS = frozenset({"jax", "numpy", "npscalar"})
_KEY_NAME = re.compile(r"^[A-Za-z0-9_]{1,64}$")  # stored array names: "p0", "a3"
_CANDIDATE_DTYPES = (
    "bool int2 int4 int8 int16 int32 int64 uint8 uint16 uint32 uint64 float16 bfloat16 "
    "float32 float64 complex64 complex128 float4_e2m1fn float8_e3m4 float8_e4m3fn "
    "float8_e4m3fnuz float8_e4m3b11fnuz float8_e5m2 float8_e5m2fnuz float8_e8m0fnu"
).split()


@functools.cache
def allowed_dtypes() -> dict[str, np.dtype]:
    """``{name: dtype}`` of the dtypes a checkpoint may declare (jax and TensorStore both
    know them; the save side refuses the others)."""
    import tensorstore as ts

    out = {}
    for name in _CANDIDATE_DTYPES:
        try:
            out[name] = jnp.dtype(name)
            ts.dtype(name)
        except (TypeError, ValueError):
            out.pop(name, None)
    return out


class Invalid(Exception):
    """A manifest that cannot describe a real checkpoint (internal; see :func:`validate`).

    Attributes:
        kind: The :class:`~datarax_ckpt.Problem` kind to report.
        leaf: The tree path concerned, if known.
        key: The stored array concerned, if known.
    """

    def __init__(self, message: str, *, leaf: str | None = None, key: str | None = None):
        super().__init__(message)
        self.kind = "invalid_manifest"
        self.leaf = leaf
        self.key = key


def check_format(manifest: Any, where: str = "checkpoint") -> None:
    """Raises CheckpointFormatError unless ``manifest`` is one this version can read."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointFormatError(
            f"{where} has no datarax_ckpt manifest: it was not written by datarax_ckpt "
            "(a raw Orbax checkpoint can be read with orbax.checkpoint directly)."
        )
    version = manifest.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
        raise CheckpointFormatError(
            f"{where} was written in datarax_ckpt format version {version!r}; this "
            f"datarax_ckpt reads versions <= {FORMAT_VERSION}. Upgrade datarax_ckpt."
        )


def _join(path: str, key: str | int, attr: bool = False) -> str:
    return f"{path}.{key}" if attr else f"{path}[{key!r}]"


def _is_int(x: Any) -> bool:
    return type(x) is int or (isinstance(x, int) and not isinstance(x, bool))


def walk(tree: Any, *, containers: bool = False) -> list[tuple[str, dict]]:
    """``(tree path, node)`` of every leaf (and with ``containers``, of every container
    too, before its children), depth first; iterative, so never a RecursionError. Checks
    each container's fields and the depth on the way. The root's path is ``<root>``.

    Raises:
        Invalid: for an unknown kind, a malformed container or nesting over MAX_DEPTH.
    """
    out: list[tuple[str, dict]] = []
    stack: list[tuple[Any, str, int]] = [(tree, "", 1)]
    while stack:
        node, path, depth = stack.pop()
        where = path or "<root>"
        if not isinstance(node, dict) or not isinstance(node.get("t"), str):
            raise Invalid(f"a tree node at {where} is not an object with a kind", leaf=where)
        kind = node["t"]
        if kind in _LEAVES:
            out.append((where, node))
            continue
        if kind not in _CONTAINERS:
            raise Invalid(f"unknown node kind {kind[:40]!r} at {where}", leaf=where)
        if containers:
            out.append((where, node))
        if depth >= MAX_DEPTH:
            raise Invalid(
                f"the tree is nested more than {MAX_DEPTH} levels deep (at {where[:200]})",
                leaf=where[:200],
            )
        children = node.get("c")
        if kind in ("obj", "nnx"):
            if not isinstance(children, dict) or not isinstance(node.get("type"), str):
                raise Invalid(f"a malformed {kind} node at {where}", leaf=where)
            sub = f"{path}.get_state()" if kind == "obj" else path
            stack.append((children, sub, depth + 1))
            continue
        if not isinstance(children, list):
            raise Invalid(f"a malformed {kind} node at {where}", leaf=where)
        if kind in ("list", "tuple"):
            named = [(f"{path}[{i}]", c) for i, c in enumerate(children)]
        else:
            keys = node.get("k")
            if not isinstance(keys, list) or len(keys) != len(children):
                raise Invalid(f"a {kind} node at {where}: keys and children differ", leaf=where)
            if not all(isinstance(k, str) or _is_int(k) for k in keys):
                raise Invalid(f"a {kind} node at {where} has a key not str or int", leaf=where)
            if kind == "dict" and len(set(map(repr, keys))) != len(keys):
                raise Invalid(f"a dict at {where} has a repeated key", leaf=where)
            if kind == "node" and not isinstance(node.get("type"), str):
                raise Invalid(f"a malformed node at {where}", leaf=where)
            attr = kind == "node"
            named = [
                (_join(path, k, attr=attr and isinstance(k, str)), c)
                for k, c in zip(keys, children, strict=True)
            ]
        stack.extend((c, p, depth + 1) for p, c in reversed(named))
    return out


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A validated manifest: the raw dict and the views every reader needs.

    Attributes:
        raw: The manifest as read (a dict).
        leaves: ``(tree path, node)`` of every leaf, in tree order.
        slot_paths: ``{slot index: tree path}``.
        stored: ``{stored key: (dtype, shape)}`` of the arrays Orbax holds.
    """

    raw: dict
    leaves: list[tuple[str, dict]]
    slot_paths: dict[int, str]
    stored: dict[str, tuple[np.dtype, tuple[int, ...]]]


def _dtype(value: Any, what: str, leaf: str | None = None) -> np.dtype:
    dtype = allowed_dtypes().get(value) if isinstance(value, str) else None
    if dtype is None:
        raise Invalid(f"{what} declares dtype {str(value)[:40]!r}, not one stored", leaf=leaf)
    return dtype


def _shape(value: Any, dtype: np.dtype, what: str, leaf: str | None = None) -> tuple[int, ...]:
    # The common case first, with the same checks (2,000 leaves: ~2x faster). A tuple is
    # a manifest still in memory (save() keeps the arrays' shape tuples); JSON has lists.
    if (type(value) is list or type(value) is tuple) and len(value) <= 64:
        for d in value:
            if type(d) is not int or d < 0:
                break
        else:
            if math.prod(value) * dtype.itemsize <= MAX_ARRAY_BYTES:
                return tuple(value)
    if not isinstance(value, list | tuple) or len(value) > 64 or not all(map(_is_int, value)):
        raise Invalid(f"{what} declares a shape that is not a list of ints", leaf=leaf)
    if any(d < 0 for d in value):
        raise Invalid(f"{what} declares a negative dimension {value}", leaf=leaf)
    if math.prod(value) * dtype.itemsize > MAX_ARRAY_BYTES:
        raise Invalid(f"{what} declares {value} elements: larger than any real array", leaf=leaf)
    return tuple(value)


def validate(
    raw: Any,
    *,
    orbax_tree: dict | None = None,
    checksums: dict | None = None,
) -> Manifest:
    """Checks a manifest read from disk; see the module docstring.

    Args:
        raw: The parsed manifest (format and version already checked: :func:`check_format`).
        orbax_tree: The ``tree_metadata`` of Orbax's ``state/_METADATA``, to check the
            declared stored arrays against; None skips it.
        checksums: The ``arrays`` records of the checksums item; None when none recorded.

    Returns:
        The validated :class:`Manifest`.

    Raises:
        Invalid: naming the leaf and stored array at fault.
    """
    slots, packs = raw.get("slots"), raw.get("packs")
    if not isinstance(slots, list) or not isinstance(packs, list):
        raise Invalid("the manifest has no slot or pack table")
    leaves = walk(raw.get("tree"))
    stored: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
    for i, pack in enumerate(packs):
        if not isinstance(pack, dict):
            raise Invalid(f"pack {i} is not an object")
        key = pack.get("key")
        if not isinstance(key, str) or not _KEY_NAME.match(key) or key in stored:
            raise Invalid(f"pack {i} has a missing, repeated or unsafe key {str(key)[:40]!r}")
        dtype = _dtype(pack.get("dtype"), f"pack {key}")
        if not _is_int(pack.get("size")):
            raise Invalid(f"pack {key} declares no size", key=key)
        stored[key] = (dtype, _shape([pack["size"]], dtype, f"pack {key}"))
    paths: dict[int, str] = {}
    for path, node in leaves:
        kind = node["t"]
        if kind == "bool" and not isinstance(node.get("v"), bool):
            raise Invalid(f"the bool at {path} has no bool value", leaf=path)
        if kind == "int" and not _is_int(node.get("v")):
            raise Invalid(f"the int at {path} has no int value", leaf=path)
        if kind == "float" and not isinstance(node.get("v"), int | float | str):
            raise Invalid(f"the float at {path} has no value", leaf=path)
        if kind == "fn" and not isinstance(node.get("name"), str):
            raise Invalid(f"the function at {path} has no name", leaf=path)
        if kind == "complex":
            v = node.get("v")
            if not (isinstance(v, list) and len(v) == 2):
                raise Invalid(f"the complex at {path} has no value", leaf=path)
        if kind in ("array", "key", "str", "bytes"):
            slot = node.get("s")
            if not _is_int(slot) or not 0 <= slot < len(slots) or slot in paths:
                raise Invalid(f"the leaf at {path} has a bad or shared slot {slot!r}", leaf=path)
            paths[slot] = path
            _check_slot(node, slots[slot], packs, stored, path)
    if orbax_tree is not None:
        _check_against_orbax(stored, orbax_tree)
    if checksums is not None:
        _check_against_checksums(stored, checksums)
    return Manifest(raw, leaves, paths, stored)


def _check_slot(node: dict, entry: Any, packs: list, stored: dict, path: str) -> None:
    kind = node["t"]
    if not isinstance(entry, dict):
        raise Invalid(f"the slot of {path} is not an object", leaf=path)
    dtype = _dtype(entry.get("dtype"), f"the leaf at {path}", path)
    shape = _shape(entry.get("shape"), dtype, f"the leaf at {path}", path)
    size = math.prod(shape)
    name = entry["dtype"]  # an allowed dtype's name (numpy computes dtype.name anew)
    if kind in ("str", "bytes") and (name != "uint8" or len(shape) != 1):
        raise Invalid(f"the {kind} at {path} is not stored as a 1-D uint8 array", leaf=path)
    impl = node.get("impl")
    if kind == "key" and (name != "uint32" or not shape or not isinstance(impl, str)):
        raise Invalid(f"the PRNG key at {path} has no uint32 key data or impl", leaf=path)
    if kind == "array" and node.get("lib") not in _LIBS:
        raise Invalid(f"the array at {path} has an unknown library", leaf=path)
    if kind == "array" and node.get("lib") == "npscalar" and shape:
        raise Invalid(f"the numpy scalar at {path} declares shape {list(shape)}", leaf=path)
    if "key" in entry:
        key = entry["key"]
        if not isinstance(key, str) or not _KEY_NAME.match(key) or key in stored:
            raise Invalid(f"the leaf at {path} has a repeated or unsafe stored key", leaf=path)
        stored[key] = (dtype, shape)
    elif "pack" in entry:
        index, offset = entry["pack"], entry.get("offset")
        if not _is_int(index) or not 0 <= index < len(packs):
            raise Invalid(f"the leaf at {path} names a pack {index!r} not stored", leaf=path)
        pack = packs[index]
        if pack["dtype"] != name:
            raise Invalid(
                f"the leaf at {path} ({name}) is in pack {pack['key']} of {pack['dtype']}",
                leaf=path,
                key=pack["key"],
            )
        if not _is_int(offset) or offset < 0 or offset + size > pack["size"]:
            raise Invalid(
                f"the leaf at {path} ({size} elements at offset {offset!r}) does not fit in "
                f"pack {pack['key']} of {pack['size']} elements",
                leaf=path,
                key=pack["key"],
            )
    elif size != 0:
        raise Invalid(
            f"the leaf at {path} is declared empty but has shape {list(shape)} ({size} elements)",
            leaf=path,
        )


def _check_against_orbax(stored: dict, tree: dict) -> None:
    written: dict[str, Any] = {}
    for entry in tree.values() if isinstance(tree, dict) else ():
        keys = entry.get("key_metadata") if isinstance(entry, dict) else None
        if isinstance(keys, list) and len(keys) == 1 and isinstance(keys[0], dict):
            value = entry.get("value_metadata")
            shape = value.get("write_shape", "?") if isinstance(value, dict) else None
            written[str(keys[0].get("key"))] = shape
    for key, (_, shape) in stored.items():
        if key not in written:
            raise Invalid(f"stored array {key} is declared but Orbax holds no such array", key=key)
        found = written[key]
        if found == "?":
            continue  # an Orbax that does not record it
        # Orbax records the shape of the chunks it wrote (a shard's, or smaller), never
        # larger than the array; the reader then checks the stored shape itself.
        if (
            not isinstance(found, list)
            or len(found) != len(shape)
            or any(not _is_int(f) or f > s for f, s in zip(found, shape, strict=True))
        ):
            raise Invalid(
                f"stored array {key} is declared {list(shape)} but Orbax wrote {found}", key=key
            )


def _check_against_checksums(stored: dict, records: dict) -> None:
    for key, (dtype, shape) in stored.items():
        record = records.get(key) if isinstance(records, dict) else None
        if not isinstance(record, dict):
            error = Invalid(
                "no checksum recorded for this array in a checkpoint saved with checksums",
                key=key,
            )
            error.kind = "missing_checksum"
            raise error
        declared = (record.get("dtype"), record.get("shape"))
        if ("dtype" in record or "shape" in record) and declared != (dtype.name, list(shape)):
            raise Invalid(
                f"stored array {key} is declared {dtype.name}{list(shape)} but its checksum "
                f"record says {declared[0]}{declared[1]}",
                key=key,
            )


def stored_keys(raw: dict) -> list[str]:
    """Stored keys a manifest names, leniently (for reports about a broken manifest)."""
    keys = []
    for entry in list(raw.get("packs") or []) + list(raw.get("slots") or []):
        if isinstance(entry, dict) and isinstance(entry.get("key"), str):
            keys.append(entry["key"])
    return keys


# --------------------------------------------------------------------------- views


@dataclasses.dataclass(frozen=True)
class LeafInfo:
    """One logical leaf of a saved tree, as the manifest describes it."""

    path: str
    kind: str  # "array", "key", "str", "bytes", "int", "float", "bool", "complex", "none"
    dtype: str
    shape: tuple[int, ...] | None
    nbytes: int
    stored: str  # "a3", "p0[12:15]", "manifest" or "empty"
    lib: str | None = None  # for arrays: "jax", "numpy" or "npscalar"
    value: Any = None  # Python scalars only

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["shape"] = list(self.shape) if self.shape is not None else None
        return out


def _storage_of(manifest: dict, slot: int) -> tuple[str | None, str]:
    entry = manifest["slots"][slot]
    if "key" in entry:
        return entry["key"], entry["key"]
    if "pack" in entry:
        key = manifest["packs"][entry["pack"]]["key"]
        size = math.prod(entry["shape"])
        return key, f"{key}[{entry['offset']}:{entry['offset'] + size}]"
    return None, "empty"


def leaf_table(manifest: dict | Manifest) -> list[LeafInfo]:
    """Every logical leaf (packed ones included) with its kind, dtype, shape and bytes.

    Raises:
        Invalid: for a manifest (dict) that does not validate.
    """
    checked = manifest if isinstance(manifest, Manifest) else validate(manifest)
    manifest = checked.raw
    leaves = []
    for path, node in checked.leaves:
        kind = node["t"]
        if "s" not in node:
            value = complex(*node["v"]) if kind == "complex" else node.get("v")
            shape = () if kind != "none" else None
            leaves.append(LeafInfo(path, kind, kind, shape, 0, "manifest", value=value))
            continue
        slot = manifest["slots"][node["s"]]
        _, stored = _storage_of(manifest, node["s"])
        shape = tuple(slot["shape"])
        nbytes = math.prod(shape) * jnp.dtype(slot["dtype"]).itemsize
        if kind == "key":
            leaves.append(LeafInfo(path, kind, f"key<{node['impl']}>", shape[:-1], nbytes, stored))
        elif kind in ("str", "bytes"):
            leaves.append(LeafInfo(path, kind, kind, None, nbytes, stored))
        else:
            leaves.append(
                LeafInfo(path, kind, slot["dtype"], shape, nbytes, stored, lib=node.get("lib"))
            )
    return leaves


def stored_arrays(manifest: dict) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """``{storage key: (dtype, shape)}`` of the arrays Orbax holds for a manifest."""
    out = {p["key"]: (jnp.dtype(p["dtype"]), (p["size"],)) for p in manifest["packs"]}
    for entry in manifest["slots"]:
        if "key" in entry:
            out[entry["key"]] = (jnp.dtype(entry["dtype"]), tuple(entry["shape"]))
    return out


def slot_paths(manifest: dict) -> dict[int, str]:
    return {node["s"]: path for path, node in walk(manifest["tree"]) if "s" in node}


def leaves_by_key(manifest: dict | Manifest | None) -> dict[str, list[str]]:
    """``{storage key: [tree paths of the leaves stored in it]}`` (empty if unreadable)."""
    if manifest is None:
        return {}
    try:
        nodes = manifest.leaves if isinstance(manifest, Manifest) else walk(manifest["tree"])
        manifest = manifest.raw if isinstance(manifest, Manifest) else manifest
        out: dict[str, list[str]] = {}
        for path, node in nodes:
            if "s" in node:
                key, _ = _storage_of(manifest, node["s"])
                if key is not None:
                    out.setdefault(key, []).append(path)
        return out
    except (Invalid, KeyError, IndexError, TypeError, ValueError):
        return {}
