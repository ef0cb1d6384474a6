"""Problem reports: what is wrong with a checkpoint (:class:`Problem`), the result of a
check (:class:`VerifyReport`), the error that carries them, and storage-error detection."""

from __future__ import annotations

import dataclasses
import json
import re

from etils import epath

from datarax_ckpt import _layout
from datarax_ckpt._errors import CheckpointCorruptedError, CheckpointError

_STORAGE_ERROR = re.compile(
    r"(DATA_LOSS|OUT_OF_RANGE|NOT_FOUND|FAILED_PRECONDITION|INVALID_ARGUMENT|UNAVAILABLE)"
    r"[^\n]*(Error reading|Error opening|does not exist|Not enough data|Requested byte range"
    r"|checksum|corrupt|Failed to decode|Error decoding|is missing)",
    re.IGNORECASE,
)


def first_line(error: BaseException) -> str:
    """The most specific message in an exception chain (TensorStore's own, if any)."""
    chain, seen = [], set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or current.__context__
    for exc in reversed(chain):
        text = str(exc).strip()
        if text:
            return text.splitlines()[0][:400]
    return type(error).__name__


def is_storage_error(error: BaseException) -> bool:
    """True if ``error`` (or its cause) says a file is damaged, missing or unreadable."""
    current: BaseException | None = error
    seen = set()
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, CheckpointError):
            return False
        if isinstance(current, OSError | json.JSONDecodeError | UnicodeDecodeError):
            return True
        if _STORAGE_ERROR.search(str(current)):
            return True
        current = current.__cause__ or current.__context__
    return False


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong with a checkpoint.

    Attributes:
        kind: ``"not_committed"``, ``"missing_file"``, ``"truncated_file"``,
            ``"unreadable_file"``, ``"missing_item"``, ``"checksum_mismatch"``,
            ``"missing_checksum"``, ``"unreadable_array"``, ``"unsafe_entry"`` (a
            symlink, FIFO, socket or device, never opened) or ``"invalid_manifest"``
            (a manifest that cannot describe the stored data).
        message: What is wrong, in words.
        file: The file concerned, relative to the checkpoint folder, if known.
        key: The stored array concerned (Orbax key such as ``"p0"`` or ``"a3"``).
        leaves: Tree paths of the logical leaves whose data is affected.
    """

    kind: str
    message: str
    file: str | None = None
    key: str | None = None
    leaves: tuple[str, ...] = ()

    def __str__(self) -> str:
        where = f"{self.file}: " if self.file else ""
        text = f"{where}{self.message}"
        if self.key is not None:
            shown = ", ".join(self.leaves[:5]) + (" ..." if len(self.leaves) > 5 else "")
            text += f" [stored array {self.key!r}; leaves: {shown or 'none'}]"
        return text


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    """The result of checking one checkpoint folder.

    Attributes:
        path: The checkpoint folder (``.../ckpt-<step>`` or ``.../checkpoint``).
        step: Its step, or None for the unversioned checkpoint.
        problems: Everything found wrong; empty when the checkpoint is intact.
        checksums_recorded: False for checkpoints written without checksums (then
            the data could be re-read but not compared).
        arrays_checked: Stored arrays re-read and compared with their checksum.
        bytes_checked: Their bytes.
        files_checked: Files under the folder read from start to end.
        full: False for the quick check (commit marker and files present, no reading).
        notes: Remarks that are not damage, e.g. ``"no checksums recorded"``.

    Example:
        >>> report = VerifyReport(path="run/ckpt-1", step=1, problems=())
        >>> report.ok
        True
    """

    path: str
    step: int | None
    problems: tuple[Problem, ...]
    checksums_recorded: bool = True
    arrays_checked: int = 0
    bytes_checked: int = 0
    files_checked: int = 0
    full: bool = True
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when nothing is wrong."""
        return not self.problems

    def raise_if_corrupted(self) -> None:
        """Raises :class:`~datarax_ckpt.CheckpointCorruptedError` unless ``ok``."""
        if self.problems:
            raise CheckpointCorruptedError(_describe(self.path, self.problems), report=self)

    def to_dict(self) -> dict:
        """A JSON-serializable form (``datarax-ckpt verify --json``)."""
        out = dataclasses.asdict(self)
        out["ok"] = self.ok
        return out

    def __str__(self) -> str:
        if self.ok:
            n = self.arrays_checked
            done = (
                f"{n} array{'' if n == 1 else 's'} ({self.bytes_checked / 2**20:.2f} MiB) "
                "compared with their checksums"
                if self.full
                else "quick check"
            )
            notes = "".join(f"; {n}" for n in self.notes)
            return f"{self.path}: intact ({done}){notes}"
        return _describe(self.path, self.problems)


def _describe(path: str, problems: tuple[Problem, ...] | list[Problem]) -> str:
    lines = [f"Checkpoint {path} is corrupted or incomplete ({len(problems)} problem(s)):"]
    lines += [f"  - {p}" for p in problems[:20]]
    if len(problems) > 20:
        lines.append(f"  - ... and {len(problems) - 20} more")
    return "\n".join(lines)


def corrupted(path: epath.Path, problems: list[Problem]) -> CheckpointCorruptedError:
    """The error for ``problems`` found in the checkpoint folder ``path``."""
    report = VerifyReport(path=str(path), step=step_of(path), problems=tuple(problems), full=False)
    return CheckpointCorruptedError(_describe(str(path), problems), report=report)


def step_of(path: epath.Path) -> int | None:
    name = path.name
    return int(name[len(_layout.STEP_PREFIX) :]) if _layout.STEP_RE.match(name) else None
