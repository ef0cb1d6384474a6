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
    """The whole content of a regular file of at most ``limit`` bytes."""
    with open_regular(path) as f:
        if is_local(path) and os.fstat(f.fileno()).st_size > limit:
            raise TooLargeError(
                f"{path} holds {os.fstat(f.fileno()).st_size} bytes, more than the "
                f"{limit} read for it"
            )
        data = f.read(limit + 1)
    if len(data) > limit:
        raise TooLargeError(f"{path} holds more than the {limit} bytes read for it")
    return data


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


def read_to_end(path: epath.PathLike) -> int:
    """Reads a regular file to its end in bounded chunks; returns its size."""
    n = 0
    with open_regular(path) as f:
        while chunk := f.read(_CHUNK):
            n += len(chunk)
    return n
