"""Step order: a save never goes below a newer step, and rollback deletes steps explicitly.

Orbax's ``CheckpointManager`` quietly skips a save at or below its latest step, and its
``LatestN`` counts saves in save order: saving step 1 into ``[2, 3]`` with ``keep=2``
deleted step 2 and left step 3 as the latest. The handler therefore refuses such a save
(:func:`check_order`) before anything is written, and resuming from an earlier step
deletes the newer steps explicitly first (:func:`rollback`).
"""

from __future__ import annotations

from etils import epath

from datarax_ckpt import _layout, _multihost
from datarax_ckpt._errors import StepOrderError


def step_of(name: str) -> int | None:
    """The step of a checkpoint folder name; None for the unversioned checkpoint."""
    return None if name == _layout.UNVERSIONED else int(name[len(_layout.STEP_PREFIX) :])


def committed_above(path: epath.Path, step: int) -> list[int]:
    """Sorted committed steps above ``step``: one listing, then a commit check of those.

    Cheaper than :func:`datarax_ckpt._layout.committed_steps` on the caller's thread:
    that one checks every step on a new thread pool (6 ms a call measured on the 2-core
    CI machine); a training run saves at increasing steps, so usually none is checked.
    """
    if not path.is_dir():
        return []
    above = []
    for child in path.iterdir():
        digits = child.name[len(_layout.STEP_PREFIX) :]
        if child.name.startswith(_layout.STEP_PREFIX) and digits.isdigit():
            if str(int(digits)) == digits and int(digits) > step and _layout.is_committed(child):
                above.append(int(digits))
    return sorted(above)


def check_order(path: epath.Path, step: int | None, pending: list[int]) -> None:
    """Raises :class:`StepOrderError` if ``path`` holds (or ``pending`` will write) a
    step newer than ``step``.

    Raises:
        StepOrderError: naming the newer steps and how to delete them.
    """
    if step is None:
        return
    committed = committed_above(path, step)
    newer = sorted({*committed, *(s for s in pending if s > step)})
    if not newer:
        return
    still = sorted(set(newer) - set(committed))
    being = f" ({still} still being written by this handler)" if still else ""
    exists = step in pending or _layout.is_committed(path / _layout.step_name(step))
    then = " then save with overwrite=True to replace it" if exists else " then save"
    raise StepOrderError(
        f"Cannot save step {step} to {path}: it holds newer steps {newer}{being}. Saved "
        f"below them, step {step} would not be the latest and retention could delete it. "
        f"To resume from step {step}, delete the newer steps first with "
        f"handler.rollback({str(path)!r}, {step}),{then}; or save under a step above "
        f"{newer[-1]}.",
        newer,
    )


def rollback(handle, step: int) -> list[int]:
    """Worker job: deletes every committed step above ``step``, newest first; returns them.

    Each step leaves the listing with one atomic rename into the trash
    (:func:`datarax_ckpt._layout.discard`) before its files are deleted, newest first:
    a process killed at any point leaves the steps up to some ``k >= step``, each intact,
    and the trash, which the next writer empties. Calling rollback again finishes it.
    """
    manager = handle.manager()  # first use: finishes interrupted overwrites and deletions
    newer = [s for s in _layout.committed_steps(handle.path) if s > step]
    handle.coordinator.barrier("rollback-listed")  # every process looked before deleting
    if _multihost.is_primary():
        for s in reversed(newer):
            _layout.discard(handle.path / _layout.step_name(s))
    handle.coordinator.barrier("rolled-back")
    manager.reload()  # Orbax's list of steps now matches the disk
    return newer
