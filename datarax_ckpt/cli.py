"""The ``datarax-ckpt`` command line: list, show, verify and delete checkpoints."""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
import uuid
from pathlib import Path
from typing import Annotated, Any

import typer
from etils import epath
from rich.markup import escape
from rich.table import Table

from datarax_ckpt import (
    _incremental,
    _integrity,
    _layout,
    _manifest,
    _report,
    _s3,
    _structure,
    _writer_lock,
)
from datarax_ckpt._cli_common import EXIT_CANCELLED as EXIT_CANCELLED
from datarax_ckpt._cli_common import EXIT_DAMAGED as EXIT_DAMAGED
from datarax_ckpt._cli_common import EXIT_INTERRUPTED as EXIT_INTERRUPTED
from datarax_ckpt._cli_common import EXIT_USAGE as EXIT_USAGE
from datarax_ckpt._cli_common import (
    DirArg,
    JsonOpt,
    StepOpt,
    err,
    fail,
    list_folders,
    out,
    pick,
)
from datarax_ckpt._cli_common import app as app
from datarax_ckpt._cli_common import main as main
from datarax_ckpt._errors import CheckpointError


def _size(folder: Path) -> int:
    """Bytes of the files under ``folder``; files a writer removes meanwhile count 0."""
    if _s3.is_s3(folder):
        return _s3.size(folder)
    total = 0
    for parent, _, files in os.walk(folder):  # os.walk skips folders that vanish
        for name in files:
            try:
                total += os.stat(os.path.join(parent, name), follow_symlinks=False).st_size
            except FileNotFoundError:
                pass
    return total


def _human(nbytes: int) -> str:
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError  # pragma: no cover


def _written(folder: Path, structure: _structure.Structure) -> str:
    meta = structure.checkpoint_metadata
    meta = meta if isinstance(meta, dict) else {}
    nsecs = meta.get("commit_timestamp_nsecs") or meta.get("init_timestamp_nsecs")
    seconds = nsecs / 1e9 if isinstance(nsecs, int) else folder.stat().st_mtime
    return datetime.datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S")


def _summary(metadata: Any, width: int = 48) -> str:
    if not isinstance(metadata, dict) or not metadata:
        return "-"
    parts = []
    for key, value in metadata.items():
        shown = json.dumps(value) if isinstance(value, str | int | float | bool) else "{…}"
        if isinstance(value, list):
            shown = f"[{len(value)} items]"
        parts.append(f"{key}={shown}")
    text = ", ".join(parts)
    return text if len(text) <= width else text[: width - 1] + "…"


def _status(
    structure: _structure.Structure, label: str, writer: dict | None = None
) -> tuple[str, str]:
    """``(plain status, rich status)`` of a quick check; ``writer``: the live writer."""
    if ".orbax-checkpoint-tmp" in label:
        if writer is not None:
            who = escape(_writer_lock.describe(writer))
            return "pending", f"[cyan]pending[/] (writer: {who})"
        return "incomplete", "[yellow]incomplete (unfinished save)[/]"
    if structure.problems:
        first = structure.problems[0]
        extra = f" (+{len(structure.problems) - 1})" if len(structure.problems) > 1 else ""
        text = f"{first.kind.replace('_', ' ')}{extra}"
        return f"corrupt: {text}", f"[bold red]CORRUPT[/] {escape(text)}"
    return "intact", "[green]intact[/]"


# --------------------------------------------------------------------------- commands


def _ls_row(label, step, folder: Path, writer: dict | None, quick: bool = True) -> dict:
    """One row of ``ls``; ``quick=False`` for a temporary folder that keeps changing."""
    structure = _structure.inspect(folder) if quick else _structure.Structure(folder, [], set())
    plain, rich = _status(structure, label, writer)
    size = _size(folder)
    return {
        "name": label,
        "step": step,
        "path": str(folder),
        "written": _written(folder, structure) if quick else "-",
        "bytes": size,
        # Incremental saves: what this step wrote (the rest is linked from earlier steps).
        "new_bytes": _incremental.new_bytes(folder, structure.checksums, size),
        "status": plain,
        "problems": [str(p) for p in structure.problems],
        "metadata": structure.metadata,
        "_rich": rich,
    }


@app.command("ls")
def ls(directory: DirArg, as_json: JsonOpt = False) -> None:
    """List checkpoints: step, time, size, quick check, metadata.

    One row per checkpoint folder in DIR: its step, when it was committed, its size on
    disk, the quick check and a summary of its metadata. For incremental saves, whose
    unchanged arrays are hard links to an earlier step's files, a `new` column shows
    the bytes each step added.
    The quick check looks at Orbax's commit marker and at every file the data needs
    (present, long enough) without reading the arrays; `verify` reads everything.
    A save still being written by a live writer is shown as pending; one left by a
    killed writer as incomplete. Safe beside a running training job: it only reads.
    """
    writer = _writer_lock.holder(directory)
    writer = writer if _writer_lock.is_alive(writer) else None
    rows = []
    for label, step, folder in list_folders(directory):
        try:
            row = _ls_row(label, step, folder, writer)
        except OSError:
            pending = ".orbax-checkpoint-tmp" in label and folder.exists()
            if not pending and folder.exists():
                raise
            # A save in progress changes its folder under us: report it as such.
            row = _ls_row(label, step, folder, writer, quick=False) if pending else None
        # Committed (renamed) or deleted by a writer since the listing: not damage, and
        # the next `ls` shows where it went.
        if row is not None and folder.exists():
            rows.append(row)
    if as_json:
        print(json.dumps([{k: v for k, v in r.items() if k != "_rich"} for r in rows], indent=2))
        return
    table = Table(title=f"{directory}", title_justify="left")
    # The new bytes only where a step holds less than its size (incremental saves).
    new = any(r["new_bytes"] != r["bytes"] for r in rows)
    for name, justify in (
        ("step", "right"),
        ("written", "left"),
        *([("new", "right")] if new else []),
        ("size", "right"),
        ("quick check", "left"),
        ("metadata", "left"),
    ):
        table.add_column(name, justify=justify, no_wrap=name != "metadata")
    for r in rows:
        step = str(r["step"]) if r["step"] is not None else r["name"]
        step = step.split(".orbax-checkpoint-tmp")[0].removeprefix(_layout.STEP_PREFIX)
        table.add_row(
            step,
            r["written"],
            *([_human(r["new_bytes"])] if new else []),
            _human(r["bytes"]),
            r["_rich"],
            escape(_summary(r["metadata"])),
        )
    out.print(table)


@app.command("show")
def show(
    directory: DirArg,
    step: StepOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one checkpoint's leaves and metadata.

    Lists every leaf of the saved tree (path, kind, dtype, shape, bytes) and the
    metadata of the latest step, or of --step N.
    Small leaves that were packed into one buffer on disk are still listed one by one;
    the `stored` column says where each leaf's bytes live, and "linked from ckpt-N"
    marks an array an incremental save did not write again (a hard link to that step's
    files: the step folder still holds it).
    """
    label, step, folder = pick(directory, step)
    structure = _structure.inspect(folder)
    if structure.checked is None:  # missing, not ours, newer, or failed validation
        problems = "; ".join(str(p) for p in structure.problems)
        if not problems:
            try:
                _manifest.check_format(structure.manifest, str(folder))
            except CheckpointError as e:
                problems = str(e).rstrip(".")
        raise fail(f"Cannot read the tree of {folder}: {problems}.", EXIT_DAMAGED)
    leaves = _structure.leaf_table(structure.checked)
    linked = _incremental.linked_arrays(structure.checksums)
    plain, rich = _status(structure, label)
    if as_json:
        doc = {
            "path": str(folder),
            "step": step,
            "written": _written(folder, structure),
            "bytes": _size(folder),
            "status": plain,
            "problems": [str(p) for p in structure.problems],
            "leaves": [
                leaf.to_dict() | {"linked": linked.get(leaf.stored.split("[")[0])}
                for leaf in leaves
            ],
            "metadata": structure.metadata,
        }
        print(json.dumps(doc, indent=2, default=repr))
        return
    total = sum(leaf.nbytes for leaf in leaves)
    out.print(f"[bold]{escape(str(folder))}[/]")
    out.print(
        f"written {_written(folder, structure)}, {_human(_size(folder))} on disk, "
        f"quick check: {rich}",
        soft_wrap=True,
    )
    out.print(f"{len(leaves)} leaves, {_human(total)} of data:")
    for line in _leaf_lines(leaves, out.width, linked):
        out.print(escape(line), soft_wrap=True)
    text = json.dumps(structure.metadata)
    if len(text) + 10 > out.width:
        text = json.dumps(structure.metadata, indent=2)
    out.print("metadata:", escape(text), soft_wrap=True)


def _leaf_lines(
    leaves: list[_structure.LeafInfo], width: int, linked: dict[str, str] | None = None
) -> list[str]:
    """One line per leaf, path first; a path too long for ``width`` gets its own line.

    The details (type, size, where the bytes are stored) stay in one column, so the
    output reads the same at 80 columns, wider, and piped into another program.
    """
    rows = []
    for leaf in leaves:
        if leaf.value is not None or leaf.stored == "manifest":
            kind, stored = f"{leaf.kind} = {leaf.value!r}", "manifest"
        elif leaf.kind in ("str", "bytes"):
            kind, stored = leaf.kind, leaf.stored
        else:
            shape = ",".join(map(str, leaf.shape or ()))
            lib = f" ({leaf.lib})" if leaf.lib not in (None, "jax") else ""
            kind, stored = f"{leaf.dtype}[{shape}]{lib}", leaf.stored
        size = "-" if stored == "manifest" else _human(leaf.nbytes)
        if (linked or {}).get(stored.split("[")[0]):
            stored = f"{stored} (linked from {linked[stored.split('[')[0]]})"
        rows.append((leaf.path, kind, size, stored))
    kind_w = max([len(r[1]) for r in rows] + [4])
    size_w = max([len(r[2]) for r in rows] + [4])
    # Two spaces of indent, then path, type, size and stored, two spaces apart.
    details_w = 6 + kind_w + size_w + max([len(r[3]) for r in rows] + [6])
    path_w = max([len(r[0]) for r in rows] + [4])
    path_w = min(path_w, max(width - details_w - 2, 20))

    def line(path: str, kind: str, size: str, stored: str) -> str:
        return f"  {path:<{path_w}}  {kind:<{kind_w}}  {size:>{size_w}}  {stored}".rstrip()

    lines = [line("path", "type", "size", "stored")]
    for path, kind, size, stored in rows:
        if len(path) <= path_w:
            lines.append(line(path, kind, size, stored))
        else:
            lines += [f"  {path}", line("", kind, size, stored)]
    return lines


@app.command("verify")
def verify(
    directory: DirArg,
    step: Annotated[
        int | None, typer.Option("--step", "-s", help="The step to check (default: latest).")
    ] = None,
    all_: Annotated[
        bool, typer.Option("--all", "-a", help="Check every checkpoint in DIR.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Check every file and checksum; exit status 1 on damage.

    Checks the commit marker and every file, then re-reads every stored array through
    Orbax and compares it with the checksum recorded when it was saved. Exit status 0
    only when everything checked is intact.
    """
    if all_ and step is not None:
        raise fail("Pass either --step N or --all, not both.")
    if all_:
        targets = [e for e in list_folders(directory) if ".orbax-checkpoint-tmp" not in e[0]]
    else:
        targets = [pick(directory, step)]
    reports = [_integrity.verify(folder) for _, _, folder in targets]
    if as_json:
        print(json.dumps([r.to_dict() for r in reports], indent=2))
    else:
        for (label, _, _), report in zip(targets, reports, strict=True):
            _print_report(label, report)
        intact = sum(r.ok for r in reports)
        colour = "green" if intact == len(reports) else "bold red"
        out.print(f"[{colour}]{intact} of {len(reports)} checkpoint(s) intact.[/]")
    if not all(r.ok for r in reports):
        raise typer.Exit(EXIT_DAMAGED)


def _print_report(label: str, report: _report.VerifyReport) -> None:
    if report.ok:
        detail = (
            f"{report.arrays_checked} arrays ({_human(report.bytes_checked)}) match their "
            f"checksums, {report.files_checked} files read"
        )
        if not report.checksums_recorded:
            detail = (
                f"[yellow]no checksums recorded[/] (saved without them): "
                f"{report.files_checked} files read, data not compared"
            )
        out.print(f"[green]intact[/]   {escape(label)}: {detail}")
        return
    out.print(f"[bold red]CORRUPT[/]  {escape(label)}: {len(report.problems)} problem(s)")
    for problem in report.problems:
        out.print(f"  - {escape(str(problem))}", soft_wrap=True)


@app.command("rm")
def rm(
    directory: DirArg,
    step: Annotated[int | None, typer.Option("--step", "-s", help="The step to delete.")] = None,
    unversioned: Annotated[
        bool, typer.Option("--unversioned", help="Delete the unversioned checkpoint/ folder.")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete one step, or checkpoint/ (asks first unless --yes).

    The folder is first moved out of the directory in one rename, so a crash never
    leaves a half-deleted step that would look like a corrupt checkpoint. Answering
    no exits with status 3 and deletes nothing.
    """
    if (step is None) == (not unversioned):
        raise fail("Pass either --step N or --unversioned (for checkpoint/).")
    if unversioned:
        label, folder = _layout.UNVERSIONED, directory / _layout.UNVERSIONED
        if not folder.is_dir():
            list_folders(directory)  # explains a directory that is not a checkpoint directory
            raise fail(f"{directory} has no {_layout.UNVERSIONED}/ folder.")
    else:
        label, _, folder = pick(directory, step)
    if not yes and not _confirm(f"Delete {folder} ({_human(_size(folder))})?"):
        err.print("Cancelled; nothing deleted.")
        raise typer.Exit(EXIT_CANCELLED)
    if _s3.is_s3(directory):  # no rename: the commit marker goes first, then the rest
        _layout.discard(folder)
        out.print(f"Deleted {escape(str(folder))}.")
        return
    trash = directory / _layout.TRASH
    trash.mkdir(exist_ok=True)
    moved = trash / f"{label}.{uuid.uuid4().hex[:8]}"
    folder.rename(moved)
    _layout.empty_trash(epath.Path(directory))
    out.print(f"Deleted {escape(str(folder))}.")


def _confirm(question: str) -> bool:
    try:
        return typer.confirm(question, err=True)
    except typer.Abort:  # end of input: no answer is no
        err.print()
        return False


@app.command(
    "demo",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def demo(ctx: typer.Context) -> None:
    """Run the crash-and-resume demo.

    The same as `python -m datarax_ckpt.demo`. Extra options are passed on, e.g.
    `datarax-ckpt demo --steps 50`; see `datarax-ckpt demo --help-demo`.
    """
    try:
        from datarax_ckpt import demo as demo_module
    except ModuleNotFoundError as e:
        if e.name != "datarax_ckpt.demo":
            raise
        raise fail("This installation has no datarax_ckpt.demo module.") from e
    args = ["--help" if a == "--help-demo" else a for a in ctx.args]
    code = demo_module.main(args)
    raise typer.Exit(code if isinstance(code, int) else 0)


@app.command("bench")
def bench(
    config: Annotated[
        Path,
        typer.Argument(metavar="CONFIG", help="A config (default: the seconds-long smoke test)."),
    ] = Path("configs/bench/cpu-smoke.toml"),
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="Where results.json/.md and plot.png go.")
    ] = Path("bench-results"),
) -> None:
    """Run the benchmarks of a config file.

    Needs the source checkout's benchmarks/ package (run it from the repository root).
    Without CONFIG it runs configs/bench/cpu-smoke.toml (a few seconds, ~0.3 GiB of
    memory), which proves the pipeline and measures nothing; configs/bench/cpu.toml
    measures (about 5 minutes, a peak of ~12 GB of RAM; see docs/benchmarks.md).
    """
    try:
        import benchmarks
    except ModuleNotFoundError as e:
        if e.name != "benchmarks":
            raise
        sys.path.insert(0, str(Path.cwd()))
        try:
            import benchmarks
        except ModuleNotFoundError:
            raise fail(
                "The benchmarks package is not importable: it lives in the source checkout "
                "(benchmarks/ beside pyproject.toml), not in the installed package. Run this "
                "from the repository root after `pip install -e .`."
            ) from e
    if not hasattr(benchmarks, "run"):
        raise fail("benchmarks.run is missing: this checkout's benchmarks/ is incomplete.")
    checkout = Path(benchmarks.__file__).resolve().parent.parent
    if not config.is_file() and not config.is_absolute() and (checkout / config).is_file():
        config = checkout / config  # a relative config of the checkout, run from elsewhere
    if not config.is_file():
        raise fail(
            f"Benchmark config {config} does not exist. The configs live in configs/bench/ of "
            "the source checkout, e.g. `datarax-ckpt bench configs/bench/cpu-smoke.toml`."
        )
    # Orbax logs "Waiting for previous save to complete took N seconds" through absl on
    # every back-to-back save of the raw-Orbax comparison; the results hold those times.
    logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        benchmarks.run(config, out_dir)
    except FileNotFoundError as e:
        raise fail(str(e)) from e
    except Exception as e:
        if type(e).__name__ == "ConfigError":
            raise fail(str(e)) from e
        raise
    out.print(f"Results in {escape(str(out_dir))}/results.md")


# export and import live in their own module; importing it registers them on ``app``.
from datarax_ckpt import _cli_interop as _cli_interop  # noqa: E402

if __name__ == "__main__":  # pragma: no cover
    # Run the imported module's app: the one _cli_interop registered its commands on.
    from datarax_ckpt.cli import main as _main

    _main()
