"""The ``datarax-ckpt`` application: its typer app, consoles, exit codes, the DIR
argument, and picking checkpoint folders (shared by ``cli`` and ``_cli_interop``)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from etils import epath
from rich.console import Console
from rich.markup import escape

from datarax_ckpt import (
    _layout,
    _s3,
    _safeio,
    _structure,
)
from datarax_ckpt._errors import CheckpointPathError

EXIT_DAMAGED = 1  # verify found a corrupt or incomplete checkpoint
EXIT_USAGE = 2  # bad arguments, or not a checkpoint directory
EXIT_CANCELLED = 3  # the user answered no (or nothing) to a question
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT

app = typer.Typer(
    name="datarax-ckpt",
    help=(
        "Look after datarax_ckpt checkpoint directories from the shell.\n\n"
        "A checkpoint directory (the DIR you pass to handler.save) holds one ckpt-<step>/ "
        "folder per step and possibly an unversioned checkpoint/ folder.\n\n"
        "Start with `datarax-ckpt ls DIR`, then `datarax-ckpt show DIR` to see what a step "
        "holds and `datarax-ckpt verify DIR --all` to check every file against the "
        "checksums recorded at save time. `export` and `import` move checkpoints to and "
        "from plain Orbax.\n\n"
        "Exit status: 0 success, 1 damage found, 2 bad arguments or not a checkpoint "
        "directory, 3 cancelled at a prompt, 130 interrupted (Ctrl-C)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

out = Console(highlight=False, soft_wrap=False)
err = Console(stderr=True, highlight=False)


def _directory_arg(value: str) -> Path:
    """A local path, or an ``s3://``/``gs://`` URL kept whole (pathlib would merge ``//``)."""
    if _s3.is_s3(value):
        _s3.check_path(value)  # also teaches Orbax's TensorStore specs s3://
    return epath.Path(value) if "://" in value else Path(value)


DirArg = Annotated[
    Path,
    typer.Argument(
        metavar="DIR",
        parser=_directory_arg,
        help="The checkpoint directory (holding ckpt-<step>/ folders).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for machines instead.")]
StepOpt = Annotated[
    int | None, typer.Option("--step", "-s", help="The step (default: the latest).")
]


class _Interrupted(BaseException):
    """Ctrl-C, raised past click, which would report KeyboardInterrupt as status 1."""


def _on_sigint(signum: int, frame: Any) -> None:
    raise _Interrupted


def main() -> None:
    """Entry point of the ``datarax-ckpt`` console script."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)
    try:
        app()
    except _Interrupted:
        err.print("Interrupted.")
        sys.exit(EXIT_INTERRUPTED)


def _version(value: bool) -> None:
    if value:
        from datarax_ckpt import __version__

        out.print(f"datarax-ckpt {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    pass


# --------------------------------------------------------------------------- helpers


def fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    return typer.Exit(code)


def list_folders(directory: Path) -> list[tuple[str, int | None, Path]]:
    """``(label, step, folder)`` of every checkpoint folder, steps ascending, then others."""
    if not directory.exists():
        raise fail(f"{directory} does not exist.")
    if not directory.is_dir():
        raise fail(f"{directory} is a file, not a checkpoint directory.")
    try:
        _safeio.check_utf8(directory.absolute())
    except CheckpointPathError as e:
        raise fail(str(e)) from None
    steps, others = [], []
    for child in directory.iterdir():
        name = child.name
        if not child.is_dir():
            continue
        match = _layout.STEP_RE.match(name)
        if match:
            steps.append((name, int(match.group(1)), child))
        elif name == _layout.UNVERSIONED:
            others.append((name, None, child))
        elif ".orbax-checkpoint-tmp" in name and (
            name.startswith(_layout.STEP_PREFIX) or name.startswith(_layout.UNVERSIONED)
        ):
            others.append((name, None, child))
    if not steps and not others:
        from datarax_ckpt import _interop

        raw = _interop.orbax_checkpoints(directory)
        if raw:
            what = "checkpoint folder" if raw[0][0] is None else "checkpoint directory"
            steps = ", ".join(str(s) for s, _ in raw[:8] if s is not None)
            raise fail(
                f"{directory} is a raw Orbax {what}{f' (steps {steps})' if steps else ''}, "
                f"not a datarax_ckpt one. Bring it in with "
                f"`datarax-ckpt import {directory} NEW_DIR`."
            )
        hint = ""
        inner = [
            child
            for child in sorted(directory.iterdir())
            if child.is_dir()
            and any(
                _layout.STEP_RE.match(c.name) or c.name == _layout.UNVERSIONED
                for c in child.iterdir()
                if c.is_dir()
            )
        ]
        if (directory / _structure.CHECKPOINT_METADATA).exists():
            hint = (
                f" It looks like one checkpoint folder: pass its parent instead, e.g. "
                f"`datarax-ckpt show {directory.parent} --step N`."
            )
        elif inner:
            names = ", ".join(str(c) for c in inner[:5])
            hint = f" These subfolders hold checkpoints: {names}."
        raise fail(
            f"{directory} is not a datarax_ckpt checkpoint directory: it holds no "
            f"ckpt-<step>/ folder and no {_layout.UNVERSIONED}/ folder.{hint}"
        )
    return sorted(steps, key=lambda e: e[1]) + sorted(others, key=lambda e: e[0])


def pick(directory: Path, step: int | None) -> tuple[str, int | None, Path]:
    """The folder ``show``/``verify`` work on: ``--step N``, else the latest step."""
    folders = list_folders(directory)
    steps = [e for e in folders if e[1] is not None]
    if step is not None:
        for entry in steps:
            if entry[1] == step:
                return entry
        raise fail(
            f"{directory} has no step {step}. Steps: {[e[1] for e in steps] or 'none'} "
            "(see `datarax-ckpt ls`)."
        )
    if steps:
        return steps[-1]
    unversioned = [e for e in folders if e[0] == _layout.UNVERSIONED]
    if unversioned:
        return unversioned[0]
    raise fail(f"{directory} holds only unfinished saves; see `datarax-ckpt ls {directory}`.")
