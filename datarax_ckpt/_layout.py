"""On-disk layout: ``ckpt-<step>/`` step folders, the unversioned ``checkpoint/``, backups."""

from __future__ import annotations

import logging
import os
import re
import stat
import uuid

import orbax.checkpoint as ocp
from etils import epath

from datarax_ckpt import _s3
from datarax_ckpt._errors import CheckpointError

logger = logging.getLogger("datarax_ckpt")

STEP_PREFIX = "ckpt-"
UNVERSIONED = "checkpoint"
BACKUP_SUFFIX = ".datarax-backup"
# Retention moves a step here with one atomic rename before deleting it, so a process
# killed mid-deletion never leaves a half-deleted ckpt-<step>/ that would be listed.
TRASH = ".datarax-trash"
STEP_RE = re.compile(r"^ckpt-(0|[1-9]\d*)$")
_TMP = ".orbax-checkpoint-tmp"  # in the names of Orbax's temporary folders
_BACKUP_RE = re.compile(rf"^(ckpt-(?:0|[1-9]\d*)|{UNVERSIONED}){re.escape(BACKUP_SUFFIX)}$")

# The Orbax items of a step (_orbax builds their handlers).
ITEM_STATE = "state"
ITEM_MANIFEST = "manifest"
ITEM_METADATA = "metadata"
ITEM_CHECKSUMS = "checksums"  # content checksums, see _integrity.py


def step_name(step: int | None) -> str:
    return UNVERSIONED if step is None else f"{STEP_PREFIX}{step}"


def is_committed(path: epath.Path) -> bool:
    """True when ``path`` is a finalized Orbax checkpoint folder."""
    if _s3.is_s3(path):  # Orbax's commit-file protocol: the marker alone says so
        return _s3.is_committed(path)
    if "://" not in str(path):  # a local path
        # Orbax's rule for local paths (``AtomicRenameTemporaryPath.validate_final``): a
        # folder whose name lacks the temporary suffix. ``is_path_finalized`` checks it
        # on a new event loop and two new threads: 0.7 ms a call, and a restore made
        # five or more (performance.md #20).
        return _TMP not in path.name and os.path.isdir(path)
    return path.is_dir() and ocp.step.is_path_finalized(path)


def exists(path: epath.Path) -> bool:
    """True when a checkpoint is at ``path``. On ``s3://`` a step is written in place, so
    a prefix without the commit marker is a killed save (Orbax replaces it), not one."""
    return is_committed(path) if _s3.is_s3(path) else path.exists()


def step_folders(directory: epath.Path) -> dict[int, epath.Path]:
    """``{step: folder}`` of the committed steps, ascending; reads only (for readers).

    A step whose overwrite is in progress, or was interrupted by a crash, is read from
    its committed backup: that is what :func:`recover` puts back, and readers never
    recover (only the directory's writer changes it, see ``_writer_lock``).

    The directory is listed again when a step listed in it is gone by the time it is
    checked (the writer's retention moved it): otherwise, with ``keep=1``, a listing
    racing a commit could see the old step listed then gone and the new one not yet
    there, and report no step at all.
    """
    directory = epath.Path(directory)
    for _ in range(8):
        if not directory.is_dir():
            return {}
        steps: dict[int, epath.Path] = {}
        backups: dict[int, epath.Path] = {}
        moved = False
        for child in directory.iterdir():
            if match := STEP_RE.match(child.name):
                found, step = steps, int(match.group(1))
            elif (match := _BACKUP_RE.match(child.name)) and match.group(1) != UNVERSIONED:
                # A link named like a backup is not ours (clear_impostor): never read it.
                if os.path.islink(child):
                    continue
                found, step = backups, int(match.group(1)[len(STEP_PREFIX) :])
            else:
                continue
            if is_committed(child):
                found[step] = child
            elif not child.exists():
                moved = True
        if not moved:
            break
    return dict(sorted({**backups, **steps}.items()))


def committed_steps(directory: epath.Path) -> list[int]:
    """Sorted committed steps (see :func:`step_folders`)."""
    return list(step_folders(directory))


def clear_impostor(path: epath.Path) -> bool:
    """Removes ``path`` if it exists but is not a real directory; True if it did.

    The library's own folders (:data:`TRASH`, backups, Orbax's temporary folders) are
    only ever real directories inside the checkpoint directory. A symlink (or a file, a
    FIFO) in their place, whoever put it there, would make a rename move steps out of
    the directory or an ``rmtree`` fail on every save: the entry itself is removed
    (``lstat``/``unlink``: a link is never followed), never what it points to.
    """
    if "://" in str(path):  # object stores have no symlinks
        return False
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(mode):
        return False
    logger.warning(
        "Removing %s: datarax_ckpt keeps a folder of its own under that name, and this is "
        "a %s, not a directory (what a link points to is not touched).",
        path,
        "symlink" if stat.S_ISLNK(mode) else "file",
    )
    os.unlink(path)
    return True


def clear_impostors(directory: epath.Path) -> None:
    """:func:`clear_impostor` for every entry of ``directory`` named like the library's
    own folders (trash, backups, Orbax temporary folders); run before Orbax moves or
    deletes anything there (its retention renames steps into :data:`TRASH`)."""
    if "://" in str(directory) or not directory.is_dir():
        return
    with os.scandir(directory) as entries:
        own = [
            e.name
            for e in entries
            if (e.name == TRASH or _BACKUP_RE.match(e.name) or _TMP in e.name)
            and not e.is_dir(follow_symlinks=False)
        ]
    for name in own:
        clear_impostor(directory / name)


def backup_path(path: epath.Path) -> epath.Path:
    return path.parent / f"{path.name}{BACKUP_SUFFIX}"


def move_aside(path: epath.Path) -> epath.Path:
    """Renames a committed checkpoint to its backup name (atomic on local disks)."""
    backup = backup_path(path)
    if _s3.is_s3(path):  # no rename on object stores: copy, marker last
        _s3.delete_step(backup)
        _s3.move_step(path, backup)
        return backup
    clear_impostor(backup)
    if backup.exists():
        backup.rmtree()
    path.rename(backup)
    return backup


def put_back(path: epath.Path, backup: epath.Path) -> None:
    """Undoes :func:`move_aside` after a failed overwrite."""
    if _s3.is_s3(path):
        _s3.delete_step(path)
        _s3.move_step(backup, path)
        return
    clear_impostor(path)
    if clear_impostor(backup):
        raise CheckpointError(
            f"The backup {backup} of {path} was replaced by a link or file while the "
            "overwrite ran; it was removed, and the old checkpoint cannot be put back."
        )
    if path.exists():
        path.rmtree()
    backup.rename(path)


def remove_partial(directory: epath.Path, name: str) -> None:
    """Removes Orbax temporary folders of ``name`` left by a failed save."""
    if not directory.is_dir():
        return
    for child in directory.iterdir():
        if child.name.startswith(f"{name}{_TMP}"):
            discard(child)


def discard(path: epath.Path) -> None:
    """Deletes a folder of ``path.parent`` after renaming it into :data:`TRASH` (atomic)."""
    if _s3.is_s3(path):
        _s3.delete_step(path)
        return
    if clear_impostor(path):  # a link in place of a temporary folder: gone, nothing moved
        return
    trash = path.parent / TRASH
    clear_impostor(trash)
    trash.mkdir(exist_ok=True)
    moved = trash / f"{path.name}.{uuid.uuid4().hex}"
    path.rename(moved)
    _delete(moved)
    try:
        trash.rmdir()  # only if nothing else is in it
    except OSError:
        pass


def empty_trash(directory: epath.Path) -> None:
    """Deletes the steps that retention (or a failed save) moved to :data:`TRASH`."""
    if not clear_impostor(directory / TRASH):
        _delete(directory / TRASH)


def _delete(path: epath.Path) -> None:
    try:
        path.rmtree(missing_ok=True)
    except OSError as e:  # a writer of a failed save still adding files: next time
        logger.debug("Could not delete %s yet: %s", path, e)


def remove_unmarked(directory: epath.Path) -> None:
    """``s3://``: deletes ``ckpt-<step>/`` and ``checkpoint/`` prefixes without a commit
    marker (killed saves or deletions), and nothing else. Orbax's own cleanup would
    delete every unmarked folder under the directory, a user's ``logs/`` included."""
    if not directory.is_dir():
        return
    for child in directory.iterdir():
        name = child.name
        if (STEP_RE.match(name) or name == UNVERSIONED) and not is_committed(child):
            logger.info("Removing %s: a save or deletion that did not finish.", child)
            _s3.delete_step(child)


def recover(directory: epath.Path) -> None:
    """Finishes or undoes overwrites interrupted by a crash, and finishes deletions.

    A backup whose checkpoint was not committed again is put back; a backup whose
    replacement was committed is deleted; steps left in :data:`TRASH` are deleted.
    """
    if not directory.is_dir():
        return
    clear_impostors(directory)
    empty_trash(directory)
    for child in directory.iterdir():
        match = _BACKUP_RE.match(child.name)
        if match is None:
            continue
        original = directory / match.group(1)
        remove_partial(directory, original.name)
        if is_committed(original):
            discard(child)  # renamed away first: a reader may be reading it
        else:
            logger.warning("Restoring %s from its backup after an interrupted overwrite.", original)
            put_back(original, child)
