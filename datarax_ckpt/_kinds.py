"""Leaf kinds of a state: what each Python/JAX value is, and how its path and scalars
are written (shared by encoding, ``serialization``, and restore planning, ``_planning``)."""

from __future__ import annotations

import functools
import inspect
import struct
from typing import Any

import jax
import numpy as np

from datarax_ckpt._errors import CheckpointFormatError

SCALARS = {bool: "bool", int: "int", float: "float"}
PLAIN = frozenset({dict, list, tuple, str, bytes, bool, int, float, complex, type(None)})
ARRAYS = (jax.Array, np.ndarray, np.generic)


def is_graph_node(x: Any) -> bool:
    try:
        from flax.nnx import graph
    except ImportError:  # pragma: no cover - flax is a dependency
        return False
    return graph.is_graph_node(x)


def is_function(x: Any) -> bool:
    """A function leaf (Equinox keeps activations as leaves): stored by name only.

    Only functions: any other callable object (a model class instance with ``__call__``)
    keeps the "unsupported type" error instead of being dropped silently.
    """
    return inspect.isroutine(x) or isinstance(
        x, functools.partial | np.ufunc | jax.custom_jvp | jax.custom_vjp
    )


def is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and is_key_dtype(x.dtype)


def is_key_target(x: Any) -> bool:
    """A typed PRNG key, or an abstract one (``ShapeDtypeStruct`` of a key dtype)."""
    return isinstance(x, jax.Array | jax.ShapeDtypeStruct) and is_key_dtype(x.dtype)


@functools.lru_cache(maxsize=256)
def is_key_dtype(dtype: Any) -> bool:
    return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


@functools.lru_cache(maxsize=64)
def key_impl_name(dtype: Any) -> str:
    """The PRNG impl name of a key dtype (abstract targets have no key to ask)."""
    names: list[str] = []
    abstract = jax.ShapeDtypeStruct((), dtype)
    jax.eval_shape(lambda k: names.append(str(jax.random.key_impl(k))), abstract)
    return names[0]


def paths(path: str, keys: list) -> str:
    return ", ".join(join(path, k) for k in keys) or "none"


def is_scalar_array(x: Any) -> bool:
    return (
        isinstance(x, jax.Array | jax.ShapeDtypeStruct | np.ndarray | np.generic)
        and x.shape == ()
        and not is_key_dtype(x.dtype)
    )


def where(path: str) -> str:
    return path or "<root>"


def flatten_one_level(node: Any) -> tuple[list[tuple[Any, Any]], Any]:
    """Children of a registered pytree node with their key entries, and its treedef."""
    return jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda y: y is not node)


def key_name(entry: Any) -> str | int:
    for attr in ("name", "key", "idx"):
        if hasattr(entry, attr):
            value = getattr(entry, attr)
            return value if isinstance(value, str | int) else str(value)
    return str(entry)


def join(path: str, key: str | int, attr: bool = False) -> str:
    return f"{path}.{key}" if attr else f"{path}[{key!r}]"


def float_bits(x: float) -> str:
    """The 8 bytes of a float as hex: exact for every float, NaN sign and payload included."""
    return struct.pack(">d", x).hex()


def scalar_value(node: dict, path: str) -> Any:
    """A Python scalar leaf; NaNs from their exact bytes (``"x"``) where recorded."""
    exact, kind = node.get("x"), node["t"]
    if exact is None:  # numbers JSON keeps exactly (and manifests before "x" existed)
        return complex(*node["v"]) if kind == "complex" else node["v"]
    hexes = exact if kind == "complex" else [exact]
    try:
        parts = [struct.unpack(">d", bytes.fromhex(h))[0] for h in hexes]
        complex(*parts) if kind == "complex" else float(*parts)  # two parts, or one
    except (TypeError, ValueError, struct.error):
        raise CheckpointFormatError(
            f"Manifest leaf {where(path)}: {exact!r} is not the 16 hex digits of a float."
        ) from None
    return complex(*parts) if kind == "complex" else parts[0]


# --------------------------------------------------------------------------- encoding
