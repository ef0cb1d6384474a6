"""Argument checks run before anything touches the disk."""

from __future__ import annotations

import json
import operator
import os
from typing import Any

import numpy as np
from etils import epath

from datarax_ckpt._errors import (
    CheckpointNotADirectoryError,
    CheckpointPathError,
    NestingTooDeepError,
)


def step(value: Any) -> int | None:
    """Returns the step as a Python int; integer numpy/JAX scalars are accepted."""
    if value is None:
        return None
    is_bool = isinstance(value, bool | np.bool_) or getattr(value, "dtype", None) == np.bool_
    try:
        index = None if is_bool else operator.index(value)
    except TypeError:
        index = None
    if index is None:
        raise TypeError(
            f"step must be None or an int >= 0, got {value!r} ({type(value).__name__}). "
            "Pass e.g. step=int(step)."
        )
    if index < 0:
        raise ValueError(f"step must be >= 0, got {index}.")
    return index


def target(value: Any) -> None:
    """Refuses an integer restore target: the Orbax habit ``restore(directory, step)``."""
    if isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_):
        raise TypeError(
            f"restore() got target={value!r}, an int: did you mean `step={value}`? The "
            "second argument is the tree to restore onto; pass the step by keyword, "
            f"restore(directory, step={value}). (A saved int comes back with target=None.)"
        )


def keep(value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"keep must be None or an int >= 1, got {value!r} ({type(value).__name__})."
        )
    if value < 1:
        raise ValueError(
            f"keep must be >= 1 (the number of newest steps to keep) or None to keep all, "
            f"got {value}."
        )


def flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__}).")


# How deep a state (or metadata) may nest: the root is level 1, each container's children
# one level below it. Real states nest far less (an optax state over a Flax NNX
# transformer: about 12 levels); restoring walks the tree recursively, about 3 Python
# frames per level, and failed with RecursionError from ~330 levels, so save() refuses
# more than this, and a manifest nested deeper is not one this library wrote.
MAX_DEPTH = 100


def too_deep(path: str, what: str = "The state") -> NestingTooDeepError:
    return NestingTooDeepError(
        f"{what} nests deeper than {MAX_DEPTH} levels (datarax_ckpt.serialization.MAX_DEPTH)"
        f" at {path or '<root>'}. A checkpoint that deep could not be restored reliably. "
        "Flatten it, e.g. store a chain of nested containers as a list."
    )


def _scalar(value: Any) -> Any:
    """A numpy or JAX scalar as the Python number it holds (exactly), else ``value``."""
    if isinstance(value, np.generic) or (
        type(value).__module__.startswith("jax") and getattr(value, "shape", None) == ()
    ):
        kind = np.dtype(value.dtype).kind
        if kind in "biuf" or value.dtype.name == "bfloat16":
            return value.item()  # float32 -> float is exact; bool_ -> bool, int64 -> int
    return value


def _to_json(value: Any, path: str, depth: int = 1) -> Any:
    if depth > MAX_DEPTH:
        raise too_deep(f"metadata{path}", "The metadata")
    value = _scalar(value)
    if value is None or type(value) in (bool, int, str, float):
        return value  # NaN and +-inf are written as JSON's NaN / Infinity tokens
    if type(value) is dict:
        out = {}
        for key, item in value.items():
            if type(key) is not str:
                raise TypeError(
                    f"metadata{path} has key {key!r} of type {type(key).__name__}; JSON object "
                    "keys must be str (an int key would come back as a str). Use str keys."
                )
            out[key] = _to_json(item, f"{path}[{key!r}]", depth + 1)
        return out
    if type(value) is list:
        return [_to_json(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value)]
    hint = " (a tuple would come back as a list: use a list)" if type(value) is tuple else ""
    raise TypeError(
        f"metadata{path} is a {type(value).__name__}, which is not JSON-serializable exactly"
        f"{hint}. Metadata holds dicts with str keys, lists, str, int, float (NaN and "
        "infinities included), bool, None and numpy/JAX scalars (stored as Python numbers); "
        "put arrays and other objects in the state."
    )


def metadata(value: Any) -> dict:
    """Checks that metadata round-trips through JSON; returns a private copy (``{}`` for None).

    numpy and JAX scalars become the Python numbers they hold; NaN and infinities are
    kept (JSON's ``NaN``/``Infinity`` tokens, read back as Python floats).
    """
    if value is None:
        return {}
    if type(value) is not dict:
        raise TypeError(f"metadata must be a dict or None, got {type(value).__name__}.")
    # A private copy: later mutation cannot reach it.
    return json.loads(json.dumps(_to_json(value, "")))


def directory(value: Any) -> epath.Path:
    if not isinstance(value, str | epath.PathLike):
        raise TypeError(f"directory must be a str or path, got {type(value).__name__}.")
    if isinstance(value, str) and not value:  # "" would mean the current directory
        raise CheckpointPathError(
            "directory is the empty string. Pass the checkpoint directory's path (use "
            "'.' to mean the current directory)."
        )
    if "\0" in str(value):
        raise CheckpointPathError(
            f"directory {str(value)!r} contains a NUL byte, which no file system accepts."
        )
    path = epath.Path(value)
    if "://" not in str(value):
        path = path.absolute()  # Orbax requires absolute local paths
    if path.exists() and not path.is_dir():
        raise CheckpointNotADirectoryError(
            f"Checkpoint directory {path} is a file. Pass a directory path (it is created "
            "if missing)."
        )
    return path


# Room left below the directory for the longest path written there: the longest file of
# a saved ckpt-1/ was 65 bytes (state/ocdbt.process_0/d/<32 hex>); a 20-digit step in its
# .orbax-checkpoint-tmp-<timestamp> folder, or moved into .datarax-trash/ with a 32-hex
# suffix, adds about 70 more.
_ROOM_BELOW = 256


def save_directory(value: Any) -> epath.Path:
    """:func:`directory`, plus the checks a save needs before it is queued.

    The background write would otherwise fail later (or TensorStore refuse the path):
    a path that is not UTF-8, a folder above it that is a file, a name too long.
    """
    path = directory(value)
    text = str(path)
    if "://" in text:
        return path
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise CheckpointPathError(
            f"Checkpoint directory {text!r} is not valid UTF-8 (it holds bytes decoded "
            "with surrogateescape). TensorStore, which writes the arrays, takes only UTF-8 "
            "paths: save under a UTF-8 name, or rename the folder."
        ) from None
    existing = path
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CheckpointNotADirectoryError(
            f"Checkpoint directory {path} cannot be created: {existing} is a file, not a "
            "folder. Pass a path whose existing part is a directory."
        )
    name_max = _pathconf(existing, "PC_NAME_MAX", 255)
    for name in path.parts:
        if len(os.fsencode(name)) > name_max:
            raise CheckpointPathError(
                f"A folder name in the checkpoint directory, {name[:20] + '...'!r}, is "
                f"{len(os.fsencode(name))} bytes long; this file system allows at most "
                f"{name_max}. Use a shorter name."
            )
    size, path_max = len(os.fsencode(text)), _pathconf(existing, "PC_PATH_MAX", 4096)
    if size + _ROOM_BELOW > path_max:
        raise CheckpointPathError(
            f"The checkpoint directory's path is {size} bytes long ({text[:30] + '...'!r}); "
            f"the files below it need it to be at most {path_max - _ROOM_BELOW} bytes (this "
            f"file system allows {path_max}). Use a shorter path."
        )
    return path


def _pathconf(path: epath.Path, name: str, default: int) -> int:
    try:
        return os.pathconf(path, name)
    except (OSError, ValueError):
        return default
