"""The ``datarax-ckpt export`` and ``import`` commands: to and from plain Orbax."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from datarax_ckpt import _incremental, _integrity, _interop
from datarax_ckpt._cli_common import (
    EXIT_DAMAGED,
    DirArg,
    StepOpt,
    app,
    fail,
    list_folders,
    out,
    pick,
)
from datarax_ckpt._errors import CheckpointCorruptedError, CheckpointError


@app.command("export")
def export(
    directory: DirArg,
    out_dir: Annotated[
        Path, typer.Argument(metavar="OUT", help="The folder to create for the export.")
    ],
    step: StepOpt = None,
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="orbax (default) or safetensors.")
    ] = "orbax",
) -> None:
    """Write one step as plain Orbax or safetensors, for any reader.

    With --format orbax, `ocp.StandardCheckpointer().restore(OUT)` returns the arrays at
    their tree paths; with --format safetensors, OUT/model.safetensors holds them under
    dotted names (params.w). OUT/datarax_export.json records the other leaves (strings,
    numbers, None), the impl of each PRNG key and the metadata.
    """
    if fmt not in _interop.FORMATS:
        raise fail(f"--format must be one of {', '.join(_interop.FORMATS)}, not {fmt!r}.")
    if step is not None:
        pick(directory, step)  # explains a missing step or a raw Orbax directory
    else:
        list_folders(directory)
    try:
        path = _interop.export_orbax(directory, out_dir, step=step, format=fmt)
    except CheckpointCorruptedError as e:
        raise fail(str(e), EXIT_DAMAGED) from e
    except (OSError, ValueError) as e:
        raise fail(str(e)) from e
    doc = json.loads((path / _interop.EXPORT_FILE).read_text())
    arrays = "model.safetensors" if fmt == "safetensors" else "plain Orbax"
    out.print(
        f"Exported step {doc['step']} of {escape(str(directory))} to {escape(str(out_dir))} "
        f"({arrays}; {len(doc['leaves'])} leaves described in {_interop.EXPORT_FILE}).",
        soft_wrap=True,
    )
    if fmt == "orbax":
        out.print(
            # Orbax wants an absolute path.
            f"Read it with: ocp.StandardCheckpointer().restore({str(path)!r})",
            soft_wrap=True,
        )


@app.command("copy")
def copy(
    directory: DirArg,
    out_dir: Annotated[
        Path, typer.Argument(metavar="OUT", help="The checkpoint directory to copy into.")
    ],
    step: StepOpt = None,
) -> None:
    """Copy one step into OUT as a standalone step, and verify the copy.

    Every file is copied, including the arrays an incremental save linked from earlier
    steps, so OUT/ckpt-N shares nothing with DIR and restores on any machine.
    """
    label, _, folder = pick(directory, step)
    try:
        copied = _incremental.copy_step(folder, out_dir)
    except (OSError, CheckpointError) as e:
        raise fail(str(e)) from e
    report = _integrity.verify(copied)
    if not report.ok:
        raise fail(f"The copy {copied} does not verify: {report}", EXIT_DAMAGED)
    out.print(
        f"Copied {escape(label)} of {escape(str(directory))} to {escape(str(copied))} "
        f"(standalone, verified: {report.arrays_checked} arrays).",
        soft_wrap=True,
    )


@app.command("import")
def import_(
    orbax_dir: Annotated[
        Path,
        typer.Argument(
            metavar="ORBAX_DIR", help="A raw Orbax CheckpointManager directory or checkpoint."
        ),
    ],
    directory: Annotated[
        Path, typer.Argument(metavar="DIR", help="The datarax_ckpt directory to create.")
    ],
) -> None:
    """Bring the steps of a raw Orbax directory into DIR.

    Each step (any naming: 0/, step_10/, ckpt_5/; items such as default/ or state/)
    keeps its number and is saved with checksums; JSON items go into its metadata.
    """
    try:
        steps = _interop.import_orbax(orbax_dir, directory)
    except (OSError, ValueError) as e:
        raise fail(str(e)) from e
    shown = ", ".join("checkpoint/" if s is None else str(s) for s in steps)
    out.print(
        f"Imported {len(steps)} checkpoint(s) ({shown}) from {escape(str(orbax_dir))} into "
        f"{escape(str(directory))}, checksums recorded. See them with "
        f"`datarax-ckpt ls {escape(str(directory))}`.",
        soft_wrap=True,
    )
