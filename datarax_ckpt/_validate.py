"""Argument checks run before anything touches the disk."""

from __future__ import annotations

import json
import operator
from typing import Any

import numpy as np
from etils import epath


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


def _scalar(value: Any) -> Any:
    """A numpy or JAX scalar as the Python number it holds (exactly), else ``value``."""
    if isinstance(value, np.generic) or (
        type(value).__module__.startswith("jax") and getattr(value, "shape", None) == ()
    ):
        kind = np.dtype(value.dtype).kind
        if kind in "biuf" or value.dtype.name == "bfloat16":
            return value.item()  # float32 -> float is exact; bool_ -> bool, int64 -> int
    return value


def _to_json(value: Any, path: str) -> Any:
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
            out[key] = _to_json(item, f"{path}[{key!r}]")
        return out
    if type(value) is list:
        return [_to_json(item, f"{path}[{i}]") for i, item in enumerate(value)]
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
    path = epath.Path(value)
    if "://" not in str(value):
        path = path.absolute()  # Orbax requires absolute local paths
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(
            f"Checkpoint directory {path} is a file. Pass a directory path (it is created "
            "if missing)."
        )
    return path
