"""No lock-in: export a checkpoint to plain Orbax or safetensors, import raw Orbax runs."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from datarax_ckpt import _layout, _nnx, _orbax
from datarax_ckpt._errors import (
    CheckpointExistsError,
    CheckpointFormatError,
    CheckpointNotFoundError,
)
from datarax_ckpt._typing import PathLike
from datarax_ckpt.options import CheckpointOptions

EXPORT_FILE = "datarax_export.json"  # beside the arrays: what is not an array, and key impls
SAFETENSORS_FILE = "model.safetensors"
FORMATS = ("orbax", "safetensors")
_EXPORT_FORMAT = "datarax_ckpt-export"
# Orbax's own step names: "0", "step_10", "ckpt_5", "ckpt-5", "checkpoint_3" ...
_ORBAX_STEP_RE = re.compile(r"^(?:[A-Za-z][\w.]*?[_-])?(0|[1-9]\d*)$")
_TMP = ".orbax-checkpoint-tmp"


# --------------------------------------------------------------------------- export


def export_orbax(
    directory: PathLike,
    out: PathLike,
    *,
    step: int | None = None,
    format: str = "orbax",  # noqa: A002 - the CLI's --format
) -> Path:
    """Writes one checkpoint as a standalone folder that needs no datarax_ckpt to read.

    The checkpoint is restored (checksums verified), then written with plain Orbax
    (``format="orbax"``: ``ocp.StandardCheckpointer().restore(out)`` returns the arrays
    at their tree paths) or as ``out/model.safetensors`` (``format="safetensors"``: one
    tensor per array, named by its tree path joined with dots, e.g. ``params.w``).
    Packed leaves come out one by one; typed PRNG keys as their ``uint32`` key data.
    ``out/datarax_export.json`` records what is not an array (strings, bytes, Python
    scalars, None, zero-size arrays), the impl of each key and the user metadata, by
    the same dotted names. Tuples come back as lists, dict keys as strings, Flax NNX
    models, States and Variables as nested dicts of their values, and a function leaf
    (not stored) as None; a state that is a single leaf is exported under ``value``.

    Args:
        directory: The datarax_ckpt checkpoint directory.
        out: The folder to create; it must not exist. Written aside and renamed into
            place, so a failed export leaves nothing behind.
        step: The step to export; None exports the latest step (or the unversioned
            checkpoint when there are no steps).
        format: ``"orbax"`` or ``"safetensors"`` (needs ``pip install safetensors``).

    Returns:
        The path of the exported folder.

    Raises:
        FileNotFoundError: if there is no such checkpoint or step.
        FileExistsError: (a ``CheckpointExistsError``) if ``out`` exists.
        ValueError: for an unknown ``format``, a state without arrays, or two leaves
            whose dotted names collide (e.g. keys ``"a.b"`` and ``"a"/"b"``).

    Example:
        >>> import tempfile, jax.numpy as jnp
        >>> import orbax.checkpoint as ocp
        >>> from datarax_ckpt import OrbaxCheckpointHandler, export_orbax
        >>> src, out = tempfile.mkdtemp(), tempfile.mkdtemp() + "/exported"
        >>> with OrbaxCheckpointHandler() as handler:
        ...     _ = handler.save(src, {"w": jnp.ones(3), "run": "a"}, step=1)
        >>> _ = export_orbax(src, out)
        >>> ocp.StandardCheckpointer().restore(out)["w"].tolist()
        [1.0, 1.0, 1.0]
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}.")
    out = Path(os.path.abspath(out))
    if out.exists():
        raise CheckpointExistsError(f"{out} exists; pass a new folder to export into.")
    from datarax_ckpt._handler import OrbaxCheckpointHandler

    with OrbaxCheckpointHandler() as handler:
        if step is None:
            step = handler.latest_step(directory)
        state = handler.restore(directory, step=step, verify=True, fallback=False)
        metadata = handler.restore(directory, step=step, metadata_only=True)
    if not isinstance(state, dict | list | tuple):
        state = {"value": state}  # Orbax saves containers: a lone leaf gets a name
    arrays: dict[str, np.ndarray] = {}
    leaves: dict[str, dict] = {}
    tree = _split(state, [], arrays, leaves)
    if not arrays:
        raise ValueError(f"The checkpoint in {directory} holds no non-empty array to export.")
    doc = {
        "format": _EXPORT_FORMAT,
        "version": 1,
        "arrays": format,
        "source": os.path.abspath(directory),
        "step": step,
        "metadata": metadata,
        "leaves": leaves,
    }
    partial = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        if format == "orbax":
            _orbax.save_standard(partial, tree)
        else:
            safetensors_numpy = _safetensors()
            partial.mkdir(parents=True)
            safetensors_numpy.save_file(
                {k: np.require(v, requirements="C") for k, v in arrays.items()},  # 0-d stays 0-d
                partial / SAFETENSORS_FILE,
                metadata={"format": _EXPORT_FORMAT, "leaves_file": EXPORT_FILE},
            )
        (partial / EXPORT_FILE).write_text(json.dumps(doc, indent=1, default=repr))
        partial.rename(out)
    finally:
        if partial.exists():
            shutil.rmtree(partial)
    return out


def _safetensors() -> Any:
    try:
        import safetensors.numpy
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "format='safetensors' needs the safetensors package: "
            "pip install 'datarax_ckpt[export]' (or pip install safetensors)."
        ) from e
    return safetensors.numpy


def _split(x: Any, keys: list[str], arrays: dict, leaves: dict) -> Any:
    """The tree with arrays as numpy and every other leaf None (recorded in ``leaves``)."""
    if _nnx.is_variable(x):  # an NNX Variable (restored as saved): its value, at its path
        return _split(_nnx.target_value(x), keys, arrays, leaves)
    if isinstance(x, Mapping):  # dicts and nnx.State
        return {str(k): _split(v, [*keys, str(k)], arrays, leaves) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_split(v, [*keys, str(i)], arrays, leaves) for i, v in enumerate(x)]
    name = ".".join(keys)
    if name in arrays or name in leaves:
        raise ValueError(
            f"Two leaves export under the same name {name!r} (a key holding '.' or an int "
            "and a str key alike). Rename one of the keys and save again."
        )
    record: dict[str, Any] = {}
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        record = {"kind": "key", "impl": str(jax.random.key_impl(x))}
        x = jax.random.key_data(x)
    if isinstance(x, jax.Array | np.ndarray | np.generic):
        value = np.asarray(x)
        if value.size:
            arrays[name] = value
            if record:
                leaves[name] = record
            return value
        # Orbax refuses zero-size arrays ("Cannot save arrays with zero size").
        record = {"kind": "array", **record, "dtype": value.dtype.name, "shape": list(value.shape)}
    elif x is None or type(x) in (bool, int, float):
        record = {"kind": "none" if x is None else type(x).__name__, "value": x}
    elif isinstance(x, complex):
        record = {"kind": "complex", "value": [x.real, x.imag]}
    elif isinstance(x, str):
        record = {"kind": "str", "value": x}
    elif isinstance(x, bytes):
        record = {"kind": "bytes", "base64": base64.b64encode(x).decode()}
    else:  # pragma: no cover - restore(target=None) returns only the types above
        raise TypeError(f"Cannot export a {type(x).__name__} at {name!r}.")
    leaves[name] = record
    return None


# --------------------------------------------------------------------------- import


def orbax_checkpoints(path: PathLike) -> list[tuple[int | None, Path]]:
    """``(step, folder)`` of the raw Orbax checkpoints in ``path``, steps ascending.

    ``path`` is either one PyTree checkpoint (step None) or a ``CheckpointManager``
    directory with step folders of any naming (``0``, ``step_10``, ``ckpt_5``), each
    holding the tree itself or named items (``default/``, ``state/``).
    """
    path = Path(path)
    if (path / "_METADATA").is_file():
        return [(None, path)]
    if not path.is_dir():
        return []
    found = []
    for child in path.iterdir():
        match = _ORBAX_STEP_RE.match(child.name)
        if match and child.is_dir() and _TMP not in child.name and _items(child)[0]:
            found.append((int(match.group(1)), child))
    return sorted(found, key=lambda e: e[0])


def _items(folder: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """``({tree item: path}, {json item: path})`` of one Orbax step folder."""
    if (folder / "_METADATA").is_file():
        return {"": folder}, {}
    trees, jsons = {}, {}
    for child in sorted(folder.iterdir()):
        if child.is_dir() and (child / "_METADATA").is_file():
            trees[child.name] = child
        elif child.is_dir() and (child / "metadata").is_file():
            jsons[child.name] = child / "metadata"
    return trees, jsons


def import_orbax(
    orbax_dir: PathLike, directory: PathLike, *, options: CheckpointOptions | None = None
) -> list[int | None]:
    """Copies the checkpoints of a raw Orbax directory into a datarax_ckpt directory.

    Each step keeps its number and is saved through
    :meth:`~datarax_ckpt.OrbaxCheckpointHandler.save`, so checksums are recorded. A
    step holding one tree item (``default/``, ``state/`` or the tree itself) becomes
    the state; several tree items become ``{item: tree}``. JSON items go into the
    metadata, beside ``imported_from`` (the source folder). A folder written by
    :func:`export_orbax` comes back with its strings, scalars, keys and metadata.
    Arrays restore as ``jax.Array`` on the default device (numpy where Orbax stored
    numpy); typed PRNG keys stay keys.

    Args:
        orbax_dir: A ``CheckpointManager`` directory or one PyTree checkpoint folder.
        directory: The datarax_ckpt directory to write; it must hold no checkpoint.
        options: Options of the handler that writes (e.g. ``checksums``).

    Returns:
        The imported steps (None for a single checkpoint without a step, written as
        the unversioned ``checkpoint/``).

    Raises:
        FileNotFoundError: if ``orbax_dir`` holds no Orbax checkpoint.
        FileExistsError: (a ``CheckpointExistsError``) if ``directory`` holds checkpoints.
        ValueError: (a ``CheckpointFormatError``) if ``orbax_dir`` is a datarax_ckpt one.

    Example:
        >>> import tempfile, jax.numpy as jnp, orbax.checkpoint as ocp
        >>> from datarax_ckpt import OrbaxCheckpointHandler, import_orbax
        >>> raw, ours = tempfile.mkdtemp(), tempfile.mkdtemp()
        >>> with ocp.CheckpointManager(raw) as manager:
        ...     _ = manager.save(3, args=ocp.args.StandardSave({"w": jnp.ones(2)}))
        >>> import_orbax(raw, ours)
        [3]
        >>> with OrbaxCheckpointHandler() as handler:
        ...     handler.restore(ours)["w"].tolist()
        [1.0, 1.0]
    """
    from datarax_ckpt._handler import OrbaxCheckpointHandler

    source = Path(os.path.abspath(orbax_dir))
    found = orbax_checkpoints(source)
    if not found:
        raise CheckpointNotFoundError(
            f"{source} holds no Orbax checkpoint: no _METADATA file and no step folder "
            "(0/, step_10/, ...) with a PyTree item. Pass the directory given to "
            "ocp.CheckpointManager, or one checkpoint folder."
        )
    for _, folder in found:
        if any((folder / item / "metadata").is_file() for item in ("manifest", "checksums")):
            raise CheckpointFormatError(
                f"{source} is already a datarax_ckpt directory ({folder.name} has a "
                "manifest): use it directly, or copy it."
            )
    target = Path(directory)
    taken = _layout.committed_steps(target) if target.is_dir() else []
    if taken or (target / _layout.UNVERSIONED).exists():
        raise CheckpointExistsError(
            f"{target} already holds checkpoints ({taken or _layout.UNVERSIONED}); import "
            "into a new or empty directory."
        )
    steps = []
    with OrbaxCheckpointHandler(options) as handler:
        for step, folder in found:
            state, metadata, saved_step = _read_step(folder)
            step = saved_step if step is None else step
            handler.save(target, state, step=step, metadata=metadata)
            steps.append(step)
    return steps


def _read_step(folder: Path) -> tuple[Any, dict, int | None]:
    export = folder / EXPORT_FILE
    if export.is_file():
        doc = json.loads(export.read_text())
        if doc.get("format") == _EXPORT_FORMAT:
            return (
                _rebuild(_orbax.read_pytree(folder), doc["leaves"], []),
                doc["metadata"],
                doc["step"],
            )
    trees, jsons = _items(folder)
    metadata: dict[str, Any] = {"imported_from": str(folder)}
    for name, file in jsons.items():
        metadata[name] = json.loads(file.read_text())
    read = {name: _orbax.read_pytree(path) for name, path in trees.items()}
    state = next(iter(read.values())) if len(read) == 1 else read
    return state, metadata, None


def _rebuild(x: Any, leaves: dict, keys: list[str]) -> Any:
    """Puts an export's non-array leaves (and key impls) back into its restored arrays."""
    if isinstance(x, dict):
        return {k: _rebuild(v, leaves, [*keys, k]) for k, v in x.items()}
    if isinstance(x, list):
        return [_rebuild(v, leaves, [*keys, str(i)]) for i, v in enumerate(x)]
    record = leaves.get(".".join(keys))
    if record is None:
        return x
    kind = record["kind"]
    if "shape" in record:  # a zero-size array (or key)
        x = np.zeros(record["shape"], record["dtype"])
    if "impl" in record:
        return jax.random.wrap_key_data(x, impl=record["impl"])
    if kind == "array":
        return x
    if kind == "complex":
        return complex(*record["value"])
    if kind == "bytes":
        return base64.b64decode(record["base64"])
    return record.get("value")
