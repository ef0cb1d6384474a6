"""Reading a checkpoint folder as untrusted input: regular files only, sizes bounded.

A checkpoint folder may have been copied, downloaded or damaged. Everything datarax_ckpt
itself opens in one goes through here:

* :func:`scan` lists a folder with ``lstat`` and never follows a symbolic link: every
  entry that is not a regular file or a folder (a symlink, a FIFO, a socket, a device)
  is reported and nothing below or behind it is opened. Neither Orbax nor datarax_ckpt
  writes such entries, so refusing them costs nothing (policy: refuse, not resolve).
* :func:`open_regular` opens with ``O_NOFOLLOW | O_NONBLOCK`` and checks ``fstat`` is a
  regular file before reading, so a FIFO or device swapped in after the scan still
  cannot block or stream forever.
* :func:`read_json` reads at most :data:`MAX_JSON_BYTES`.

Remote paths (``gs://``) have no symlinks or FIFOs; they are read with the size limit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from typing import Any

from etils import epath

from datarax_ckpt._errors import CheckpointPathError

# The manifest takes ~150 bytes per leaf: 256 MiB holds well over a million leaves,
# and a file claiming more (e.g. /dev/zero or a huge sparse file) is refused unread.
MAX_JSON_BYTES = 256 << 20
_CHUNK = 16 << 20


class UnsafeEntryError(OSError):
    """An entry of a checkpoint folder is not a regular file (a symlink, FIFO, device)."""


class TooLargeError(OSError):
    """A file is larger than the library reads for its role."""


@dataclasses.dataclass(frozen=True)
class Scan:
    """What :func:`scan` found under a folder.

    Attributes:
        files: ``{relative path: size in bytes}`` of the regular files.
        dirs: Relative paths of the folders (the root is ``"."``).
        unsafe: ``{relative path: what it is}`` of everything else (not followed).
    """

    files: dict[str, int]
    dirs: frozenset[str]
    unsafe: dict[str, str]

    def is_safe_under(self, prefix: str) -> bool:
        """True when no unsafe entry lies at or below ``prefix`` (``"."``: anywhere)."""
        if prefix == ".":
            return not self.unsafe
        return not any(p == prefix or p.startswith(prefix + "/") for p in self.unsafe)


def is_local(path: epath.PathLike) -> bool:
    return "://" not in str(path)


def check_utf8(path: epath.PathLike) -> None:
    """Raises CheckpointPathError for a local path TensorStore cannot open (not UTF-8)."""
    text = os.fspath(path) if is_local(path) else ""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise CheckpointPathError(
            f"Checkpoint directory {text!r} is not valid UTF-8 (it holds bytes decoded with "
            "surrogateescape). TensorStore, which reads and writes the arrays under Orbax, "
            "takes only UTF-8 paths: rename the folder (e.g. `mv` it) to a UTF-8 name."
        ) from None


# Files Orbax's CheckpointManager reads from every step folder it lists (step metadata,
# metrics), before datarax_ckpt's own checks can run; and the most it may read of each.
_LISTED_FILES = ("_CHECKPOINT_METADATA", "metrics/metrics")
LISTED_BYTES = 16 << 20  # ~500 bytes are written


def safe_to_list(step: epath.PathLike) -> bool:
    """False if Orbax listing the step folder would open a symlink, FIFO, device or a
    file too large (it would block, stream or exhaust memory): such a step is left out
    of Orbax's view, and reported by :func:`scan` when read."""
    if not is_local(step):
        return True
    try:
        if not stat.S_ISDIR(os.lstat(os.fspath(step)).st_mode):
            return False
        for name in _LISTED_FILES:
            try:
                info = os.lstat(os.path.join(os.fspath(step), name))
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(info.st_mode) or info.st_size > LISTED_BYTES:
                return False
        metrics = os.path.join(os.fspath(step), "metrics")
        return not os.path.lexists(metrics) or stat.S_ISDIR(os.lstat(metrics).st_mode)
    except OSError:
        return False


def describe(mode: int) -> str | None:
    """None for a regular file or folder, else what the entry is, in words."""
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    if stat.S_ISLNK(mode):
        return "symbolic link"
    if stat.S_ISFIFO(mode):
        return "FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device file"
    return "special file"


def scan(root: epath.PathLike) -> Scan:
    """Lists every entry under ``root`` without following symlinks or opening files."""
    files: dict[str, int] = {}
    dirs: set[str] = set()
    unsafe: dict[str, str] = {}
    if not is_local(root):
        base = epath.Path(root)
        pending = [base]
        while pending:
            folder = pending.pop()
            dirs.add(os.path.relpath(str(folder), str(base)) if folder != base else ".")
            for child in folder.iterdir():
                rel = str(child)[len(str(base)) + 1 :]
                if child.is_dir():
                    pending.append(child)
                else:
                    files[rel] = child.stat().length
        return Scan(files, frozenset(dirs), unsafe)
    root = os.fspath(root)
    what = describe(os.lstat(root).st_mode)
    if what is not None:
        return Scan(files, frozenset(), {".": what})
    pending = ["."]
    while pending:
        rel_dir = pending.pop()
        dirs.add(rel_dir)
        with os.scandir(os.path.join(root, rel_dir)) as entries:
            for entry in entries:
                rel = entry.name if rel_dir == "." else f"{rel_dir}/{entry.name}"
                info = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(info.st_mode):
                    pending.append(rel)
                elif stat.S_ISREG(info.st_mode):
                    files[rel] = info.st_size
                else:
                    unsafe[rel] = describe(info.st_mode) or "special file"
    return Scan(files, frozenset(dirs), unsafe)


def open_regular(path: epath.PathLike) -> Any:
    """Opens a regular file for binary reading; refuses anything else without blocking.

    Raises:
        UnsafeEntryError: for a symlink, FIFO, socket or device.
        FileNotFoundError: if it does not exist.
    """
    if not is_local(path):
        return epath.Path(path).open("rb")
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(os.fspath(path), flags)
    except OSError as e:
        if os.path.islink(os.fspath(path)):  # ELOOP from O_NOFOLLOW
            raise UnsafeEntryError(f"{path} is a symbolic link: not followed") from e
        raise
    try:
        what = describe(os.fstat(fd).st_mode)
        if what is not None or stat.S_ISDIR(os.fstat(fd).st_mode):
            raise UnsafeEntryError(f"{path} is a {what or 'folder'}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: epath.PathLike, limit: int) -> bytes:
    """The whole content of a regular file of at most ``limit`` bytes.

    Reads in chunks (``f.read(n)`` would allocate ``n`` bytes up front), so a file that
    is larger than it claims, or grows, costs at most ``limit`` bytes of memory.
    """
    chunks, total, chunk_size = [], 0, _CHUNK
    with open_regular(path) as f:
        if is_local(path):
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                raise TooLargeError(f"{path} holds {size} bytes, more than the {limit} read for it")
            chunk_size = min(_CHUNK, size + 1)
        while chunk := f.read(min(chunk_size, limit + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise TooLargeError(f"{path} holds more than the {limit} bytes read for it")
    return b"".join(chunks)


def read_json(path: epath.PathLike, limit: int = MAX_JSON_BYTES) -> Any:
    """Parses a JSON file of at most ``limit`` bytes.

    Raises:
        OSError: unreadable, too large, or not a regular file.
        ValueError: not JSON, not UTF-8, or nested too deeply for the parser.
    """
    data = read_bytes(path, limit)
    try:
        return json.loads(data)
    except RecursionError as e:
        raise ValueError(f"{path}: JSON nested too deeply to parse") from e


def read_to_end(path: epath.PathLike, limit: int) -> int:
    """Reads a regular file to its end, or ``limit`` bytes, through one 1 MiB buffer;
    returns the bytes read."""
    n, buffer = 0, memoryview(bytearray(1 << 20))
    with open_regular(path) as f:
        while n < limit and (count := f.readinto(buffer[: min(len(buffer), limit - n)])):
            n += count
    return n
