"""Argument checks run before anything touches the disk."""

from __future__ import annotations

import json
import math
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


def _check_json(value: Any, path: str) -> None:
    if value is None or type(value) in (bool, int, str):
        return
    if type(value) is float:
        if not math.isfinite(value):
            raise ValueError(
                f"metadata{path} is {value!r}; JSON has no NaN or infinity. Store it as a "
                "string, or in the state."
            )
        return
    if type(value) is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise TypeError(
                    f"metadata{path} has key {key!r} of type {type(key).__name__}; JSON object "
                    "keys must be str (an int key would come back as a str). Use str keys."
                )
            _check_json(item, f"{path}[{key!r}]")
        return
    if type(value) is list:
        for i, item in enumerate(value):
            _check_json(item, f"{path}[{i}]")
        return
    hint = " (a tuple would come back as a list: use a list)" if type(value) is tuple else ""
    raise TypeError(
        f"metadata{path} is a {type(value).__name__}, which is not JSON-serializable exactly"
        f"{hint}. Metadata holds dicts with str keys, lists, str, int, float, bool and None; "
        "put arrays and other objects in the state."
    )


def metadata(value: Any) -> dict:
    """Checks that metadata round-trips through JSON exactly; returns it (``{}`` for None)."""
    if value is None:
        return {}
    if type(value) is not dict:
        raise TypeError(f"metadata must be a dict or None, got {type(value).__name__}.")
    _check_json(value, "")
    return json.loads(json.dumps(value))  # a private copy: later mutation cannot reach it


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
