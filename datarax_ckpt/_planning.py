"""Restore planning: matching a manifest against a restore target, and rebuilding the
tree from the stored arrays read (``serialization.plan_restore``)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from datarax_ckpt import _kinds, _manifest, _nnx, _snapshot
from datarax_ckpt._errors import (
    CheckpointCorruptedError,
    CheckpointFormatError,
    StructureMismatchError,
)
from datarax_ckpt._typing import Checkpointable, PyTree

logger = logging.getLogger("datarax_ckpt")


@dataclasses.dataclass
class LeafRequest:
    """How one stored slot must be materialized."""

    lib: str  # "jax", "numpy" or "npscalar"
    dtype: Any
    shape: tuple[int, ...]
    sharding: Any = None


@dataclasses.dataclass
class RestorePlan:
    """What to read from storage, and how to rebuild the tree from it.

    Attributes:
        storage: ``{stored key: restore spec}`` for :func:`_snapshot.read_specs`.
        build: Turns ``{stored key: loaded array}`` into the restored tree.
    """

    storage: dict[str, _snapshot.StoredSpec]
    build: Callable[[Mapping[str, Any]], PyTree]


def check_manifest(manifest: Any, where: str = "checkpoint") -> None:
    """Raises CheckpointFormatError unless ``manifest`` is one this version can read."""
    _manifest.check_format(manifest, where)


def plan_restore(manifest: dict, target: PyTree = None, *, partial: bool = False) -> RestorePlan:
    """Matches a manifest against an optional target and plans the restore.

    Args:
        manifest: A manifest written by :func:`serialize`.
        target: None to restore the original types; otherwise a tree whose structure
            must match the checkpoint, whose array leaves (arrays or
            ``jax.ShapeDtypeStruct``) give the dtype and sharding to restore onto, and
            whose NNX / Checkpointable objects are updated in place.
        partial: Allow the target's dicts (and NNX States) to leave out keys the
            checkpoint has: only the target's leaves are planned, so only they are read.

    Returns:
        A :class:`RestorePlan`.

    Raises:
        CheckpointFormatError: if the manifest is not readable by this version.
        StructureMismatchError: if ``target`` does not match, naming the path, the
            expected and the found.
    """
    if isinstance(manifest, _manifest.Manifest):
        manifest = manifest.raw  # validated once by the restore that planned it
    else:
        _manifest.check_format(manifest)
        try:
            _manifest.validate(manifest)
        except _manifest.Invalid as e:
            raise CheckpointCorruptedError(f"The manifest cannot be restored: {e}") from None
    planner = _Planner(manifest, partial=partial)
    builder = planner.plan(manifest["tree"], target, "", use_target=target is not None)
    if planner.functions:
        logger.warning(
            "The checkpoint holds %d function leaves (%s), which are not stored: they are "
            "restored as None. Restore onto a target (e.g. a freshly built model) to get "
            "its functions in their place.",
            len(planner.functions),
            ", ".join(_kinds.where(p) for p in planner.functions[:5]),
        )
    storage, materialize = _snapshot.read_specs(manifest, planner.requests)

    def build(loaded: Mapping[str, Any]) -> PyTree:
        return builder(materialize(loaded))

    return RestorePlan(storage=storage, build=build)


def deserialize(arrays: Mapping[str, Any], manifest: dict, target: PyTree = None) -> PyTree:
    """Inverse of :func:`serialize` for arrays already in memory.

    Args:
        arrays: The arrays returned by :func:`serialize` (or read back from storage).
        manifest: The manifest returned by :func:`serialize`.
        target: Optional target; see :func:`plan_restore`.

    Returns:
        The restored tree.
    """
    return plan_restore(manifest, target).build(arrays)


_Builder = Callable[[list], Any]


class _Planner:
    def __init__(self, manifest: dict, *, partial: bool = False) -> None:
        self.slots = manifest["slots"]
        self.partial = partial
        self.requests: dict[int, LeafRequest] = {}
        self.functions: list[str] = []  # function leaves restored as None (no target)

    def _mismatch(self, path: str, expected: str, found: str) -> StructureMismatchError:
        return StructureMismatchError(
            f"Restore target does not match the checkpoint at {_kinds.where(path)}: the target "
            f"has {expected}, the checkpoint has {found}. Pass a target with the saved "
            "structure, or target=None to get the saved tree back."
        )

    def plan(self, node: dict, target: Any, path: str, *, use_target: bool) -> _Builder:
        kind = node["t"]
        # As in encoding, only objects need the slow protocol and graph-node checks.
        is_object = (
            use_target
            and type(target) not in _kinds.PLAIN
            and not isinstance(target, _kinds.ARRAYS)
        )
        if is_object and _nnx.is_variable(target):  # a graph node too: checked first
            return self._plan_variable(node, target, path)
        if is_object and _nnx.is_state(target):
            if kind == "nnx":  # a saved module restores onto its State
                node, kind = node["c"], node["c"]["t"]
            if kind != "dict":
                raise self._mismatch(path, "an nnx.State", self._describe(node))
            inner = self._plan_dict(node, _nnx.state_mapping(target), path, True)
            return lambda values: _nnx.new_state(target, inner(values))
        if is_object and _kinds.is_graph_node(target):
            # A saved module holds its State; a saved State restores onto a module too.
            if kind != "nnx" and node.get("nnx") != _nnx.STATE_MARK:
                raise self._mismatch(
                    path, f"a Flax NNX {type(target).__name__}", self._describe(node)
                )
            state = _nnx.module_state(target)
            inner = self.plan(node["c"] if kind == "nnx" else node, state, path, use_target=True)
            return lambda values: _nnx.update_module(target, inner(values))
        if is_object and isinstance(target, Checkpointable) and not isinstance(target, type):
            if kind != "obj":
                raise self._mismatch(path, f"a Checkpointable {type(target).__name__}", kind)
            inner = self.plan(node["c"], None, path, use_target=False)

            def build_obj(values: list) -> Any:
                target.set_state(inner(values))
                return target

            return build_obj
        if "var" in node:  # a saved Variable: rebuilt, or its value onto a plain target
            value_path = _kinds.join(path, "value", attr=True)
            inner = self.plan(node["c"][0], target, value_path, use_target=use_target)
            if use_target:
                return inner
            build_variable = _nnx.build_variable(node["var"])
            return lambda values: build_variable(inner(values))
        if kind in ("obj", "nnx"):
            if use_target:
                raise self._mismatch(path, type(target).__name__, f"a saved {node['type']}")
            return self.plan(node["c"], None, path, use_target=False)
        if kind == "dict":
            return self._plan_dict(node, target, path, use_target)
        if kind in ("list", "tuple"):
            return self._plan_sequence(node, target, path, use_target)
        if kind == "node":
            return self._plan_node(node, target, path, use_target)
        return self._plan_leaf(node, target, path, use_target)

    @staticmethod
    def _describe(node: dict) -> str:
        if "var" in node:
            return f"an nnx.{node['var'].get('qualname')}"
        if node.get("nnx") == _nnx.STATE_MARK:
            return "an nnx.State"
        return f"a saved {node['type']}" if "type" in node else f"a {node['t']}"

    def _plan_variable(self, node: dict, target: Any, path: str) -> _Builder:
        """A Variable target: a copy of it holding the restored value (its metadata kept)."""
        value = _nnx.target_value(target)
        if "var" in node:
            if not _nnx.variable_matches(node["var"], target):
                found = self._describe(node)
                raise self._mismatch(path, f"an nnx.{type(target).__qualname__}", found)
            node, path = node["c"][0], _kinds.join(path, "value", attr=True)
        inner = self.plan(node, value, path, use_target=True)
        return lambda values: _nnx.rebuild_on(target, inner(values))

    def _plan_dict(self, node: dict, target: Any, path: str, use_target: bool) -> _Builder:
        keys = node["k"]
        if use_target:
            if type(target) is not dict:
                raise self._mismatch(path, type(target).__name__, "a dict")
            stored = set(keys)  # a set: thousands of keys must not cost a quadratic scan
            missing = [k for k in target if k not in stored]
            extra = [] if self.partial else [k for k in keys if k not in target]
            if missing or extra:
                raise self._dict_mismatch(path, list(target), keys, missing, extra)
            order = list(target)
        else:
            order = keys
        by_key = dict(zip(keys, node["c"], strict=True))
        children = [
            (
                k,
                self.plan(
                    by_key[k],
                    target[k] if use_target else None,
                    _kinds.join(path, k),
                    use_target=use_target,
                ),
            )
            for k in order
        ]
        if not use_target and node.get("nnx") == _nnx.STATE_MARK:
            return lambda values: _nnx.new_state(None, {k: child(values) for k, child in children})
        return lambda values: {k: child(values) for k, child in children}

    def _dict_mismatch(self, path, target_keys, keys, missing, extra) -> StructureMismatchError:
        hints = []
        if extra:
            hints.append("To restore only the target's part of the checkpoint, pass partial=True.")
        if missing:
            hints.append(
                f"Keys {missing} are not in the checkpoint and cannot be restored, "
                "partial or not: remove them from the target."
            )
        return StructureMismatchError(
            f"Restore target does not match the checkpoint at {_kinds.where(path)}: the target has "
            f"dict keys {target_keys}, the checkpoint has keys {keys} (missing from "
            f"checkpoint: {_kinds.paths(path, missing)}, "
            f"not in target: {_kinds.paths(path, extra)}). "
            + " ".join(hints)
            + " Or pass target=None to get the saved tree back."
        )

    def _plan_sequence(self, node: dict, target: Any, path: str, use_target: bool) -> _Builder:
        kind, saved = node["t"], node["c"]
        if use_target and (type(target).__name__ != kind or type(target) not in (list, tuple)):
            raise self._mismatch(path, type(target).__name__, f"a {kind}")
        if use_target and len(target) != len(saved):
            raise self._mismatch(
                path, f"a {kind} of length {len(target)}", f"a {kind} of length {len(saved)}"
            )
        children = [
            self.plan(c, target[i] if use_target else None, f"{path}[{i}]", use_target=use_target)
            for i, c in enumerate(saved)
        ]
        container = tuple if kind == "tuple" else list
        return lambda values: container(child(values) for child in children)

    def _plan_node(self, node: dict, target: Any, path: str, use_target: bool) -> _Builder:
        keys = node["k"]
        if not use_target:
            children = [
                (
                    k,
                    self.plan(
                        c, None, _kinds.join(path, k, attr=isinstance(k, str)), use_target=False
                    ),
                )
                for k, c in zip(keys, node["c"], strict=True)
            ]
            return lambda values: {k: child(values) for k, child in children}
        flat, treedef = _kinds.flatten_one_level(target)
        target_keys = [_kinds.key_name(entry[-1]) for entry, _ in flat]
        if (len(flat) == 1 and flat[0][1] is target) or target_keys != keys:
            raise self._mismatch(
                path,
                f"{type(target).__name__} with children {target_keys}",
                f"a {node['type']} with children {keys}",
            )
        children = [
            self.plan(c, child, _kinds.join(path, k, attr=isinstance(k, str)), use_target=True)
            for k, c, (_, child) in zip(keys, node["c"], flat, strict=True)
        ]
        return lambda values: jax.tree_util.tree_unflatten(
            treedef, [child(values) for child in children]
        )

    def _plan_leaf(self, node: dict, target: Any, path: str, use_target: bool) -> _Builder:
        kind = node["t"]
        if kind == "none":
            if use_target and target is not None:
                raise self._mismatch(path, type(target).__name__, "None")
            return lambda values: None
        if kind in ("bool", "int", "float", "complex"):
            value = _kinds.scalar_value(node, path)
            if use_target and _kinds.is_scalar_array(target):
                # A step saved as a Python int, restored onto a 0-d (abstract) array.
                return self._scalar_onto_array(value, target, path)
            if (
                use_target
                and type(target)
                is not {"bool": bool, "int": int, "float": float, "complex": complex}[kind]
            ):
                raise self._mismatch(path, type(target).__name__, f"a Python {kind}")
            return lambda values: value
        if kind in ("str", "bytes"):
            if use_target and type(target).__name__ != kind:
                raise self._mismatch(path, type(target).__name__, f"a {kind}")
            slot = node["s"]
            self.requests[slot] = LeafRequest("numpy", np.dtype(np.uint8), self._shape(slot))
            if kind == "str":
                return lambda values: values[slot].tobytes().decode("utf-8", "surrogatepass")
            return lambda values: values[slot].tobytes()
        if kind == "fn":
            if use_target and not callable(target):
                raise self._mismatch(path, type(target).__name__, f"a function {node['name']}")
            # Functions are not stored: the target's, or None without a target.
            if not use_target:
                self.functions.append(path)
            return lambda values: target if use_target else None
        if kind == "key":
            return self._plan_key(node, target, path, use_target)
        if kind == "array":
            return self._plan_array(node, target, path, use_target)
        raise CheckpointFormatError(
            f"Unknown leaf kind {kind!r} at {_kinds.where(path)} in manifest."
        )

    def _scalar_onto_array(self, value: Any, target: Any, path: str) -> _Builder:
        array = np.asarray(value, dtype=target.dtype)
        if isinstance(target, np.ndarray | np.generic):
            return lambda values: array if isinstance(target, np.ndarray) else array[()]
        sharding = _nnx.concrete_sharding(getattr(target, "sharding", None), path)
        return lambda values: jax.device_put(
            array, sharding or jax.sharding.SingleDeviceSharding(_snapshot.default_device())
        )

    def _shape(self, slot: int) -> tuple[int, ...]:
        return tuple(self.slots[slot]["shape"])

    def _plan_key(self, node: dict, target: Any, path: str, use_target: bool) -> _Builder:
        slot, impl = node["s"], node["impl"]
        data_shape = self._shape(slot)
        sharding = None
        # ocp.utils.to_shape_dtype_struct turns a key into its key data's shape and
        # dtype: as Orbax does, such a target restores the typed key.
        as_data = (
            use_target
            and isinstance(target, jax.ShapeDtypeStruct)
            and target.dtype == np.uint32
            and tuple(target.shape) == data_shape
        )
        if use_target:
            if not (as_data or _kinds.is_key_target(target)):
                raise self._mismatch(path, type(target).__name__, f"a PRNG key ({impl})")
            target_impl = impl if as_data else _kinds.key_impl_name(target.dtype)
            if not as_data and (target_impl != impl or target.shape != data_shape[:-1]):
                raise self._mismatch(
                    path,
                    f"a {target_impl} key of shape {target.shape}",
                    f"a {impl} key of shape {data_shape[:-1]}",
                )
            sharding = getattr(target, "sharding", None)
            if isinstance(target, jax.Array):
                sharding = jax.random.key_data(target).sharding
            sharding = _nnx.concrete_sharding(sharding, path)
        self.requests[slot] = LeafRequest("jax", np.dtype(np.uint32), data_shape, sharding)
        return lambda values: jax.random.wrap_key_data(values[slot], impl=impl)

    def _plan_array(self, node: dict, target: Any, path: str, use_target: bool) -> _Builder:
        slot = node["s"]
        saved_dtype = jnp.dtype(self.slots[slot]["dtype"])
        shape = self._shape(slot)
        lib, dtype, sharding = node["lib"], saved_dtype, None
        if use_target and type(target) in (bool, int, float) and shape == ():
            use_target = False  # a fresh TrainState's step=0 onto a trained state's array
        if use_target:
            if _kinds.is_key_target(target) or not isinstance(
                target, jax.Array | jax.ShapeDtypeStruct | np.ndarray | np.generic
            ):
                raise self._mismatch(
                    path, type(target).__name__, f"an array {saved_dtype.name}{list(shape)}"
                )
            if tuple(target.shape) != shape:
                raise self._mismatch(
                    path, f"shape {tuple(target.shape)}", f"shape {shape} ({saved_dtype.name})"
                )
            dtype = jnp.dtype(target.dtype)
            if isinstance(target, np.generic):
                lib = "npscalar"
            elif isinstance(target, np.ndarray):
                lib = "numpy"
            else:
                lib, sharding = (
                    "jax",
                    _nnx.concrete_sharding(getattr(target, "sharding", None), path),
                )
        self.requests[slot] = LeafRequest(lib, dtype, shape, sharding)
        return lambda values: values[slot]
