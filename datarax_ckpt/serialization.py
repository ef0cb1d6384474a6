"""Exact encoding of JAX training states into arrays Orbax stores well, plus a type manifest.

Orbax's ``StandardSave`` accepts only int, float, ``np.ndarray`` and ``jax.Array``
leaves. This module turns any supported state into

* a flat ``dict[str, array]`` that Orbax stores (small leaves packed into one buffer
  per dtype, large or sharded leaves individually), and
* a JSON *manifest* that records the tree (containers, exact dict keys, tuples vs
  lists, ``None``), every leaf's kind (jax/numpy array, typed PRNG key and its impl,
  ``str``, ``bytes``, Python scalar) and where each leaf's bytes are stored,

and back, bit-exactly. No magic keys are injected into the user's tree: structure
lives only in the manifest.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from datarax_ckpt import serialization
    >>> state = {"w": jnp.arange(3.0), "name": "run-1", "step": 7, "key": jax.random.key(0)}
    >>> arrays, manifest = serialization.serialize(state)
    >>> back = serialization.deserialize(arrays, manifest)
    >>> back["name"], back["step"], bool((back["w"] == state["w"]).all())
    ('run-1', 7, True)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from datarax_ckpt import _kinds, _manifest, _nnx, _snapshot, _validate
from datarax_ckpt._typing import Checkpointable, PyTree
from datarax_ckpt.options import DEFAULT_PACK_THRESHOLD_BYTES

logger = logging.getLogger("datarax_ckpt")

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MAX_DEPTH",
    "RestorePlan",
    "check_manifest",
    "deserialize",
    "plan_restore",
    "serialize",
]

FORMAT_NAME = _manifest.FORMAT_NAME
FORMAT_VERSION = _manifest.FORMAT_VERSION
MAX_DEPTH = _validate.MAX_DEPTH  # deepest nesting save() accepts and restore() reads

# Decoding lives in _planning; these are part of this public module.
from datarax_ckpt._planning import RestorePlan as RestorePlan  # noqa: E402
from datarax_ckpt._planning import check_manifest as check_manifest  # noqa: E402
from datarax_ckpt._planning import deserialize as deserialize  # noqa: E402
from datarax_ckpt._planning import plan_restore as plan_restore  # noqa: E402

# Exact types of jax arrays seen to be plain arrays (not tracers): their leaves take the
# short path in containers (:meth:`_Encoder._jax_leaf`). Filled as they are met, so no
# private jax type is named here.
_JAX_ARRAY_TYPES: set[type] = set()


class _Encoder:
    """Walks a state once: the manifest's tree, and the array-like leaves to store
    (``values``, with their tree paths in ``paths``; a slot is an index into both)."""

    def __init__(self) -> None:
        self.values: list[Any] = []
        self.paths: list[str] = []
        self.depth = 0
        self.plain_dtype: Any = None  # the last dtype seen not to be a PRNG key's

    def _slot(self, value: Any, path: str) -> int:
        self.values.append(value)
        self.paths.append(path)
        return len(self.values) - 1

    def _jax_leaf(self, x: Any, path: str) -> dict:
        """A leaf of a type in ``_JAX_ARRAY_TYPES``: what :meth:`_encode_array` does for
        it, without the type dispatch (2,000 leaves: the encoding's largest cost)."""
        dtype = x.dtype
        if x.is_deleted() or (dtype is not self.plain_dtype and _kinds.is_key_dtype(dtype)):
            return self._encode_array(x, path)  # its error, or a typed key
        self.plain_dtype = dtype  # leaves mostly share one: not asked again
        self.values.append(x)
        self.paths.append(path)
        return {"t": "array", "lib": "jax", "s": len(self.values) - 1}

    def _child(self, x: Any, path: str) -> dict:
        """A container's child: a known jax array type directly, anything else (or a leaf
        one level deeper than the limit, for its error) through :meth:`encode`."""
        if type(x) in _JAX_ARRAY_TYPES and self.depth < MAX_DEPTH:
            return self._jax_leaf(x, path)
        return self.encode(x, path)

    def encode(self, x: Any, path: str) -> dict:
        # Counting levels cost 0.5 ms on 8,000 nodes (fastest of 100 encodes of 2,000
        # leaves: 13.4 vs 12.9 ms). Not restored on error: an encoder that raised is
        # discarded.
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _validate.too_deep(path)
        # Protocol and graph-node checks cost ~50 us each: only objects need them.
        if type(x) not in _kinds.PLAIN and not isinstance(x, _kinds.ARRAYS):
            node = self._encode_object(x, path)
            if node is not None:
                self.depth -= 1
                return node
        node = self._encode_plain(x, path)
        self.depth -= 1
        return node

    def _encode_object(self, x: Any, path: str) -> dict | None:
        if _nnx.is_variable(x):  # a graph node too: checked first
            return _nnx.encode_variable(x, path, self.encode)
        if _nnx.is_state(x):
            return {**self._encode_plain(_nnx.state_mapping(x), path), "nnx": _nnx.STATE_MARK}
        if _kinds.is_graph_node(x):
            cls = type(x)
            return {
                "t": "nnx",
                "type": f"{cls.__module__}.{cls.__qualname__}",
                "c": self.encode(_nnx.module_state(x), path),
            }
        # After NNX: nnx.Rngs answers any attribute, get_state and set_state included.
        if isinstance(x, Checkpointable) and not isinstance(x, type):
            cls = type(x)
            return {
                "t": "obj",
                "type": f"{cls.__module__}.{cls.__qualname__}",
                "c": self.encode(x.get_state(), f"{path}.get_state()"),
            }
        return None

    def _encode_plain(self, x: Any, path: str) -> dict:
        if x is None:
            return {"t": "none"}
        if isinstance(x, jax.core.Tracer | jax.Array | np.ndarray | np.generic):
            return self._encode_array(x, path)
        if type(x) in _kinds.SCALARS:
            node = {"t": _kinds.SCALARS[type(x)], "v": x}
            if x != x:  # NaN: JSON keeps neither its sign nor its payload; "x" keeps both
                node["x"] = _kinds.float_bits(x)
            return node
        if type(x) is complex:
            node = {"t": "complex", "v": [x.real, x.imag]}
            if x != x:
                node["x"] = [_kinds.float_bits(x.real), _kinds.float_bits(x.imag)]
            return node
        if type(x) is str:
            data = np.frombuffer(x.encode("utf-8", "surrogatepass"), dtype=np.uint8)
            return {"t": "str", "s": self._slot(data, path)}
        if type(x) is bytes:
            return {"t": "bytes", "s": self._slot(np.frombuffer(x, dtype=np.uint8), path)}
        return self._encode_container(x, path)

    def _encode_array(self, x: Any, path: str) -> dict:
        """A tracer (refused), jax array, typed key, numpy array or numpy scalar."""
        if isinstance(x, jax.core.Tracer):
            raise TypeError(
                f"Leaf {_kinds.where(path)} is a JAX tracer ({type(x).__name__}): a state cannot "
                "be saved from inside jax.jit/vmap/grad. Call save() outside the transformed "
                "function."
            )
        if isinstance(x, jax.Array):
            if x.is_deleted():
                raise ValueError(
                    f"Leaf {_kinds.where(path)} is a deleted jax.Array (was it donated to a jitted "
                    "function?). Save the state before donating it, or save the new state."
                )
            if _kinds.is_key(x):
                impl = str(jax.random.key_impl(x))
                return {"t": "key", "impl": impl, "s": self._slot(jax.random.key_data(x), path)}
            _JAX_ARRAY_TYPES.add(type(x))  # not a tracer: later leaves of it take _jax_leaf
            return {"t": "array", "lib": "jax", "s": self._slot(x, path)}
        if isinstance(x, np.ndarray):
            if x.dtype.hasobject:
                raise TypeError(
                    f"Leaf {_kinds.where(path)} is a numpy array of dtype object, which cannot be "
                    "stored exactly. Convert it to a numeric dtype, or to a list of str."
                )
            return {"t": "array", "lib": "numpy", "s": self._slot(x, path)}
        return {"t": "array", "lib": "npscalar", "s": self._slot(np.asarray(x), path)}  # np.generic

    def _encode_container(self, x: Any, path: str) -> dict:
        """A dict, list, tuple or registered pytree node; a function leaf; or an error."""
        if type(x) is dict:
            # _child inlined: dicts of arrays are the common large container.
            fast = _JAX_ARRAY_TYPES if self.depth < MAX_DEPTH else ()
            keys, children = [], []
            for key, value in x.items():
                if type(key) is not str and type(key) is not int:
                    raise TypeError(
                        f"Dict at {_kinds.where(path)} has a key {key!r} of type "
                        f"{type(key).__name__}; only str and int keys can be stored exactly. "
                        "Convert the key to str."
                    )
                keys.append(key)
                child = f"{path}[{key!r}]"  # _kinds.join, inlined
                if type(value) in fast:
                    children.append(self._jax_leaf(value, child))
                else:
                    children.append(self.encode(value, child))
            return {"t": "dict", "k": keys, "c": children}
        if type(x) in (list, tuple):
            return {
                "t": type(x).__name__,
                "c": [self._child(v, f"{path}[{i}]") for i, v in enumerate(x)],
            }
        children, _ = _kinds.flatten_one_level(x)
        if len(children) == 1 and children[0][1] is x:  # not a registered pytree node
            if _kinds.is_function(x):
                # Equinox keeps activations as leaves: recorded, taken from the target.
                name = getattr(x, "__qualname__", type(x).__qualname__)
                return {"t": "fn", "name": f"{getattr(x, '__module__', None)}.{name}"}
            raise TypeError(
                f"Leaf {_kinds.where(path)} has unsupported type {type(x).__module__}."
                f"{type(x).__qualname__}. Supported leaves: jax.Array (typed PRNG keys "
                "included), np.ndarray, numpy scalars, bool, int, float, complex, str, bytes, "
                "None, functions (not stored: restored from the target); containers: dict, "
                "list, tuple, registered pytree nodes, Flax NNX objects and Checkpointable "
                "objects (get_state/set_state)."
            )
        cls = type(x)
        keys = [_kinds.key_name(entry[-1]) for entry, _ in children]
        return {
            "t": "node",
            "type": f"{cls.__module__}.{cls.__qualname__}",
            "k": keys,
            "c": [
                self._child(child, _kinds.join(path, k, attr=isinstance(k, str)))
                for k, (_, child) in zip(keys, children, strict=True)
            ],
        }


def serialize(
    tree: PyTree,
    *,
    pack_threshold_bytes: int = DEFAULT_PACK_THRESHOLD_BYTES,
    snapshot: str = "auto",
) -> tuple[dict[str, Any], dict]:
    """Encodes a state into arrays for Orbax and a JSON manifest.

    The returned arrays are private copies, packed buffers or (CPU jax arrays) views that
    pin the caller's buffers: the caller may donate, delete or mutate its own arrays as
    soon as this returns.

    Args:
        tree: The state: any nest of supported containers and leaves.
        pack_threshold_bytes: Single-device leaves of at most this many bytes are packed
            into one buffer per dtype; 0 disables packing.
        snapshot: ``"auto"``, ``"device"`` or ``"host"``; see
            :class:`~datarax_ckpt.CheckpointOptions`.

    Returns:
        ``(arrays, manifest)``: a flat ``dict`` of arrays for Orbax (possibly empty) and a
        JSON-serializable manifest.

    Raises:
        TypeError: for an unsupported leaf or dict key, naming its path and type.
        ValueError: for a deleted (donated) array.
    """
    arrays, manifest, _, fill = encode_and_capture(
        tree, pack_threshold_bytes=pack_threshold_bytes, snapshot=snapshot
    )
    if fill is not None:
        fill()
    return arrays, manifest


def encode_and_capture(
    tree: PyTree,
    *,
    pack_threshold_bytes: int,
    snapshot: str,
    pool: _snapshot.ArenaPool | None = None,
    reuse: Callable[[str, str, Any], bool] | None = None,
) -> tuple[dict[str, Any], dict, Any, Callable[[], None] | None]:
    """:func:`serialize`, also returning the host arena to give back to ``pool`` later,
    and the copies still due into the arrays, to call before they are read (``reuse``
    and ``fill``: see :func:`_snapshot.capture`)."""
    # The garbage collector stays as the user set it (issue 13: no process-wide switch
    # the user did not ask for). The manifest's per-leaf dicts hold only strings, ints
    # and the arrays' own shape tuples, so CPython leaves them untracked: a 2000-leaf
    # save no longer hands ~4,000 containers to the old generation, which every ~6 saves
    # set off a full collection inside save() (115 ms in this process; issue 19,
    # docs/performance.md #28).
    encoder = _Encoder()
    root = encoder.encode(tree, "")
    arrays, slots, packs, arena, fill = _snapshot.capture(
        encoder.values,
        encoder.paths,
        pack_threshold_bytes=pack_threshold_bytes,
        snapshot=snapshot,
        pool=pool,
        reuse=reuse,
    )
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "tree": root,
        "slots": slots,
        "packs": packs,
    }
    return arrays, manifest, arena, fill
