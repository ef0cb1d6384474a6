"""Domain types shared across datarax_ckpt."""

from __future__ import annotations

import os
from typing import Any, Protocol, TypeAlias, runtime_checkable

PyTree: TypeAlias = Any
"""Any nest of dicts, lists, tuples, registered pytree nodes and supported leaves."""

PathLike: TypeAlias = str | os.PathLike
"""A local path or a ``gs://`` URL (anything :class:`etils.epath.Path` accepts)."""


@runtime_checkable
class Checkpointable(Protocol):
    """An object that can hand out its state and take it back.

    Data-pipeline iterators, samplers and other stateful Python objects implement
    this two-method protocol to be saved and restored by
    :class:`~datarax_ckpt.OrbaxCheckpointHandler`.

    Example:
        >>> class Counter:
        ...     def __init__(self):
        ...         self.position = 0
        ...     def get_state(self):
        ...         return {"position": self.position}
        ...     def set_state(self, state):
        ...         self.position = state["position"]
        >>> isinstance(Counter(), Checkpointable)
        True
    """

    def get_state(self) -> PyTree:
        """Returns the object's state as a pytree of supported leaves."""
        ...

    def set_state(self, state: PyTree) -> None:
        """Restores the object from a state returned by :meth:`get_state`."""
        ...
