"""docs/errors.md pins what every bad input raises: each row's call is run verbatim here.

The table's ``Call`` column is Python evaluated in a namespace with the names listed in
the page (``h``, ``d``, ``state``, ...); the exception type must match exactly and the
message must equal the ``Message`` column once its ``{d}``-style placeholders are
filled in (a message ending in `` …`` is pinned up to that point). Every rejected call
must leave the disk as it was.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import os
import re
import shutil
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import datarax_ckpt
from datarax_ckpt import OrbaxCheckpointHandler, serialization

DOC = Path(__file__).resolve().parent.parent / "docs" / "errors.md"
PLACES = ("newer", "raw", "empty", "missing", "other", "file", "d")  # longest match first
# Copies of d whose ckpt-1 was damaged as an untrusted checkpoint can be (made per row).
DAMAGED = ("unchecked", "linked", "huge", "deep", "fifo")
PLACES = DAMAGED + PLACES


@dataclasses.dataclass(frozen=True)
class Row:
    number: int
    what: str
    call: str
    exception: str
    message: str


def _code(cell: str) -> str:
    cell = cell.strip().replace("\\|", "|")
    if cell.startswith("``"):
        return cell[2:-2].strip()
    if cell.startswith("`"):
        return cell[1:-1]
    return cell


def parse_catalogue(text: str) -> list[Row]:
    """The numbered rows of the table in docs/errors.md."""
    rows = []
    for line in text.splitlines():
        if not re.match(r"^\| *\d+ *\|", line):
            continue
        cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
        assert len(cells) == 5, f"a catalogue row needs 5 cells: {line}"
        number, what, call, exception, message = cells
        rows.append(Row(int(number), what.strip(), _code(call), _code(exception), _code(message)))
    return rows


ROWS = parse_catalogue(DOC.read_text())
STATE = {"w": jnp.ones((2, 3)), "step": 0}


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    """Checkpoints every row starts from (copied per row, so no row can affect another)."""
    root = tmp_path_factory.mktemp("templates")
    with OrbaxCheckpointHandler() as handler:
        handler.save(root / "d", STATE, step=1, metadata={"lr": 0.1})
    with pytest.MonkeyPatch.context() as patch:  # as written by a future datarax_ckpt
        patch.setattr(serialization, "FORMAT_VERSION", serialization.FORMAT_VERSION + 1)
        with OrbaxCheckpointHandler() as handler:
            handler.save(root / "newer", STATE, step=1)
    checkpointer = ocp.StandardCheckpointer()  # a plain Orbax checkpoint, no manifest
    checkpointer.save(root / "raw" / "ckpt-1", {"w": np.ones(3)})
    checkpointer.wait_until_finished()
    checkpointer.close()
    return root


def _namespace(root: Path, templates: Path, call: str) -> dict:
    for name in ("d", "newer", "raw"):
        shutil.copytree(templates / name, root / name)
    (root / "empty").mkdir()
    (root / "other").mkdir()
    (root / "other" / "notes.txt").write_text("not a checkpoint")
    (root / "file").write_text("a file, not a folder")
    namespace = {"jax": jax, "jnp": jnp, "np": np, "signal": signal, "state": STATE}
    namespace.update({name: getattr(datarax_ckpt, name) for name in datarax_ckpt.__all__})
    namespace.update({place: str(root / place) for place in PLACES})
    namespace["h"] = OrbaxCheckpointHandler()
    if "donated" in call:
        donated = jnp.ones(3)
        donated.delete()  # what donating it to a jitted function does
        namespace["donated"] = donated
    for place in DAMAGED:
        if place in call:
            shutil.copytree(templates / "d", root / place)
            _damage(root / place / "ckpt-1", place)
    if "closed" in call:
        namespace["closed"] = OrbaxCheckpointHandler()
        namespace["closed"].close()
    return namespace


def _edit_json(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def _nest(manifest: dict) -> None:
    for _ in range(150):
        manifest["tree"] = {"t": "list", "c": [manifest["tree"]]}


def _damage(step: Path, how: str) -> None:
    if how == "fifo":  # the metadata item replaced by a named pipe
        (step / "metadata" / "metadata").unlink()
        os.mkfifo(step / "metadata" / "metadata")
    elif how == "linked":  # a symbolic link to a device inside the step
        os.symlink("/dev/zero", step / "state" / "x")
    elif how == "huge":  # the manifest declares a 2**40-element leaf
        _edit_json(step / "manifest" / "metadata", lambda m: m["slots"][0].update(shape=[1 << 40]))
    elif how == "deep":  # the manifest nests 150 levels deep
        _edit_json(step / "manifest" / "metadata", _nest)
    elif how == "unchecked":  # the checksum records of the arrays removed
        _edit_json(step / "checksums" / "metadata", lambda c: c["arrays"].clear())


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))}


def _exception_type(name: str) -> type:
    found = getattr(datarax_ckpt, name, None) or getattr(builtins, name, None)
    assert isinstance(found, type) and issubclass(found, BaseException), name
    return found


def test_catalogue_has_at_least_25_distinct_numbered_rows():
    assert len(ROWS) >= 25
    assert [r.number for r in ROWS] == list(range(1, len(ROWS) + 1))
    assert len({r.call for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize("row", ROWS, ids=lambda r: f"{r.number:02d}")
def test_bad_input_raises_what_the_catalogue_says(row, tmp_path, templates):
    namespace = _namespace(tmp_path, templates, row.call)
    before = _files(tmp_path)
    with pytest.raises(BaseException) as raised:
        eval(row.call, namespace)  # noqa: S307 - the documented call, verbatim
    namespace["h"].close()
    expected = row.message
    for place in PLACES:
        expected = expected.replace("{" + place + "}", namespace[place])
    message = str(raised.value)
    assert type(raised.value) is _exception_type(row.exception), (row, repr(raised.value))
    if expected.endswith(" …"):
        assert message.startswith(expected[:-2]), message
    else:
        assert message == expected
    assert _files(tmp_path) == before, "a rejected call changed the disk"


def test_format_version_is_recorded_newer_refused_older_read(tmp_path, monkeypatch):
    with OrbaxCheckpointHandler() as handler:
        handler.save(tmp_path / "now", STATE, step=1)
    manifest = json.loads((tmp_path / "now" / "ckpt-1" / "manifest" / "metadata").read_text())
    assert (manifest["format"], manifest["version"]) == ("datarax_ckpt", 1)

    for version in (0, 2):  # as written by an older and by a newer datarax_ckpt
        monkeypatch.setattr(serialization, "FORMAT_VERSION", version)
        with OrbaxCheckpointHandler() as handler:
            handler.save(tmp_path / f"v{version}", STATE, step=1)
    monkeypatch.setattr(serialization, "FORMAT_VERSION", 1)
    with OrbaxCheckpointHandler() as handler:
        restored = handler.restore(tmp_path / "v0")
        assert restored["step"] == 0 and bool((restored["w"] == STATE["w"]).all())
        with pytest.raises(datarax_ckpt.CheckpointFormatError, match="format version 2"):
            handler.restore(tmp_path / "v2")


def test_the_inputs_listed_as_not_errors_are_accepted(tmp_path):
    with OrbaxCheckpointHandler() as handler:
        handler.save(tmp_path, STATE, step=1)
        target = {"w": jnp.zeros((2, 3), jnp.bfloat16), "step": 0}
        restored = handler.restore(tmp_path, target)
        assert restored["w"].dtype == jnp.bfloat16 and bool((restored["w"] == 1).all())
        handler.save(tmp_path / "empty", {}, step=1)
        handler.save(tmp_path / "none", None, step=1)
        assert handler.restore(tmp_path / "empty") == {}
        assert handler.restore(tmp_path / "none") is None
        assert handler.get_checkpoint_steps(tmp_path / "missing") == []
        assert handler.latest_step(tmp_path / "missing") is None
