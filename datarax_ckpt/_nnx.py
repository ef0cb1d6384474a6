"""Flax NNX in the manifest: ``nnx.State`` and ``nnx.Variable`` encoded, matched and rebuilt.

The manifest stores a ``State`` as a ``dict`` node marked ``"nnx": "State"`` and a
``Variable`` as a one-child ``node`` (child ``value``) carrying its class and its
plain-data metadata under ``"var"``. Readers that predate these marks still read them,
as a dict and a ``{"value": ...}`` dict.

Flax is imported lazily: a state without NNX objects never pays for it.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable
from typing import Any

import jax

logger = logging.getLogger("datarax_ckpt")

STATE_MARK = "State"


def _nnx() -> Any:
    from flax import nnx

    return nnx


def _flax_loaded() -> bool:
    # A Variable or a State can exist only once flax.nnx has been imported.
    return "flax.nnx" in sys.modules


def is_variable(x: Any) -> bool:
    """Whether ``x`` is an ``nnx.Variable`` (``Param``, ``BatchStat``, ``RngKey``, ...)."""
    return _flax_loaded() and isinstance(x, _nnx().Variable)


def is_state(x: Any) -> bool:
    """Whether ``x`` is an ``nnx.State``."""
    return _flax_loaded() and isinstance(x, _nnx().State)


# --------------------------------------------------------------------- metadata


def _plain(value: Any) -> tuple[bool, Any]:
    """``(True, json)`` for plain data (tuples kept apart from lists), else ``(False, None)``."""
    if value is None or type(value) in (bool, int, str):
        return True, value
    if type(value) is float:
        return (True, value) if math.isfinite(value) else (False, None)
    if type(value) in (tuple, list):
        items = [_plain(v) for v in value]
        if all(ok for ok, _ in items):
            return True, {type(value).__name__: [v for _, v in items]}
        return False, None
    if type(value) is dict and all(type(k) is str for k in value):
        items = {k: _plain(v) for k, v in value.items()}
        if all(ok for ok, _ in items.values()):
            return True, {"dict": {k: v for k, (_, v) in items.items()}}
    if type(value) is jax.sharding.PartitionSpec:
        return _plain(tuple(value))
    return False, None


def _unplain(value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    ((kind, inner),) = value.items()
    if kind == "dict":
        return {k: _unplain(v) for k, v in inner.items()}
    items = [_unplain(v) for v in inner]
    return tuple(items) if kind == "tuple" else items


# --------------------------------------------------------------------- encoding


def encode_variable(x: Any, path: str, encode: Callable[[Any, str], dict]) -> dict:
    """The manifest node of a Variable: its class, plain metadata and encoded value.

    Metadata that is not plain data (a ``Mesh``, hooks) is not saved: restoring onto a
    target keeps the target's own metadata.
    """
    cls = type(x)
    value = x.get_raw_value()
    if x.get_metadata("ref", False):
        value = value[...]  # a jax Ref: store its array
    meta = {}
    for name, item in x.get_metadata().items():
        ok, plain = _plain(item)
        if ok:
            meta[name] = plain
    return {
        "t": "node",
        "type": f"{cls.__module__}.{cls.__qualname__}",
        "var": {"module": cls.__module__, "qualname": cls.__qualname__, "meta": meta},
        "k": ["value"],
        "c": [encode(value, f"{path}.value")],
    }


def state_mapping(x: Any) -> dict:
    """The ``dict`` a State holds (nested levels are plain dicts, as in Flax)."""
    return x.raw_mapping


# --------------------------------------------------------------------- decoding


def _resolve(var: dict) -> type:
    """The saved Variable class if it is already imported (nothing is imported from a
    checkpoint), else ``nnx.Variable`` with a warning."""
    nnx = _nnx()
    obj: Any = sys.modules.get(var.get("module", ""))
    for part in str(var.get("qualname", "")).split("."):
        obj = getattr(obj, part, None)
    if isinstance(obj, type) and issubclass(obj, nnx.Variable):
        return obj
    logger.warning(
        "Variable type %s.%s is not imported; restoring it as nnx.Variable. Import the "
        "module that defines it, or restore onto a target.",
        var.get("module"),
        var.get("qualname"),
    )
    return nnx.Variable


def build_variable(var: dict) -> Callable[[Any], Any]:
    """Turns a restored value into the saved Variable (class and plain metadata).

    Raises:
        CheckpointFormatError: if the manifest's Variable entry is malformed.
    """
    try:
        cls = _resolve(var)
        meta = {str(k): _unplain(v) for k, v in var.get("meta", {}).items()}
    except (AttributeError, TypeError, ValueError) as e:
        from datarax_ckpt._errors import CheckpointFormatError

        raise CheckpointFormatError(
            f"Malformed nnx.Variable entry in manifest: {var!r:.200}"
        ) from e
    meta.setdefault("hijax", False)
    meta.setdefault("ref", False)
    meta.setdefault("eager_sharding", False)

    def build(value: Any) -> Any:
        if meta["ref"]:
            value = jax.new_ref(value)
        # from_metadata, as Flax's own pytree unflattening: no hooks, no re-sharding.
        return cls.from_metadata(value, meta)

    return build


def variable_matches(var: dict, target: Any) -> bool:
    """Whether a saved Variable may restore onto ``target`` (same class name)."""
    return type(target).__qualname__ == var.get("qualname")


def target_value(target: Any) -> Any:
    """The value a Variable target holds (an array or a ``ShapeDtypeStruct``)."""
    value = target.get_raw_value()
    if target.get_metadata("ref", False):
        value = value[...]
    return value


def rebuild_on(target: Any, value: Any) -> Any:
    """A copy of the Variable ``target`` holding ``value`` (the target is not changed)."""
    return target.copy(value)


def new_state(like: Any, mapping: dict) -> Any:
    """A State of ``like``'s type (or ``nnx.State``) holding ``mapping``."""
    cls = type(like) if like is not None else _nnx().State
    return cls(mapping, _copy=False)


def module_state(target: Any) -> Any:
    """The State of an NNX graph node (module, optimizer, Rngs)."""
    return _nnx().state(target)


def update_module(target: Any, state: Any) -> Any:
    """Writes a restored State into the NNX graph node ``target``; returns ``target``."""
    _nnx().update(target, state)
    return target


def concrete_sharding(sharding: Any, path: str) -> Any:
    """A sharding over real devices for a target from ``nnx.eval_shape`` (an AbstractMesh).

    The abstract mesh is replaced by the mesh set with ``jax.set_mesh`` (as Flax's own
    sharded-restore guide does), which must have the same axes.
    """
    mesh = getattr(sharding, "mesh", None)
    if not isinstance(mesh, jax.sharding.AbstractMesh):
        return sharding
    from datarax_ckpt._errors import StructureMismatchError

    concrete = jax.sharding.get_mesh()
    if concrete is None or concrete.empty or concrete.abstract_mesh != mesh:
        raise StructureMismatchError(
            f"Target leaf {path or '<root>'} is sharded over an abstract mesh "
            f"({dict(mesh.shape)}), as nnx.eval_shape makes, and no matching concrete mesh "
            "is set. Restore inside `with jax.set_mesh(mesh):` with a mesh of the same "
            "axes, or give the leaf a jax.ShapeDtypeStruct with a concrete NamedSharding."
        )
    return jax.sharding.NamedSharding(concrete, sharding.spec, memory_kind=sharding.memory_kind)
