"""Incremental saves on disk: a stored array hard-linked from an earlier step.

An unchanged array of an incremental save reaches Orbax as a :class:`Linked` leaf of the
state item. Its ``TypeHandler`` (``_orbax.LinkHandler``, registered in the state item's
private registry beside Orbax's own) writes nothing: in the item's commit future it
hard-links every file of the array's folder in the earlier step (Orbax's per-array
zarr layout, ``state/<key>/.zarray`` and its chunks) into the new step's folder, which
at that point is still Orbax's temporary folder. Orbax then writes the item's tree
metadata and commits the step with its usual rename, so the links are covered by the
same atomic commit as the written arrays: a save killed before the rename leaves only a
temporary folder (removed by the next writer), never a listed step with a missing array.

Once committed, a step folder is self-contained: every file it names is a directory
entry of its own. Deleting an older step (retention, rollback, ``rm -r``) only drops
one name of each shared file; the data lives while any step names it, ``du`` counts it
once, and copying one step folder (``cp -r``, ``datarax-ckpt export``) gives a
standalone copy.
"""

from __future__ import annotations

import dataclasses
import os
import stat

import numpy as np
from etils import epath

from datarax_ckpt._errors import CheckpointError


@dataclasses.dataclass(frozen=True)
class Linked:
    """A stored array whose bytes are those of ``source`` (an array folder of an earlier
    committed step, e.g. ``<dir>/ckpt-4/state/a7``), linked instead of written."""

    source: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return 0  # nothing is written: Orbax's I/O accounting counts no bytes for it


class SourceChangedError(CheckpointError, FileNotFoundError):
    """The earlier step an incremental save links from lost the array's files."""


def link_folder(source: epath.PathLike, destination: epath.PathLike) -> int:
    """Hard-links every regular file under ``source`` into ``destination`` (created);
    returns the number of files linked.

    ``source`` belongs to a checkpoint folder, which is untrusted: nothing that is not a
    directory or a regular file is followed or linked (``lstat``, ``os.link`` with
    ``follow_symlinks=False``).

    Raises:
        SourceChangedError: if ``source`` is missing or holds a link, FIFO or device.
    """
    count = 0
    source, destination = os.fspath(source), os.fspath(destination)
    try:
        top = os.lstat(source)
    except FileNotFoundError as e:
        raise SourceChangedError(f"{source} is gone: an incremental save links from it") from e
    if not stat.S_ISDIR(top.st_mode):
        raise SourceChangedError(f"{source} is not a directory: nothing is linked from it")
    for root, dirs, files in os.walk(source):
        target = os.path.join(destination, os.path.relpath(root, source))
        os.makedirs(target, exist_ok=True)
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = os.path.join(root, name)
            if not stat.S_ISREG(os.lstat(path).st_mode):
                raise SourceChangedError(f"{path} is not a regular file: it is not linked")
            os.link(path, os.path.join(target, name), follow_symlinks=False)
            count += 1
    return count
