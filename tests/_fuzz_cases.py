"""Hypothesis mutations of a real checkpoint, run by ``_untrusted_child.py fuzz``.

Each case copies the pristine two-step checkpoint, changes ONE thing (a byte of any
file, a field of any JSON file, a file replaced by a symlink, a FIFO, an empty file or
a huge sparse file, or a file removed) and runs every reader on it
(:func:`_untrusted_child.ops`). Each must return exactly the saved data or raise a
documented CheckpointError, allocate at most twice the declared state (plus fixed
buffers), and leave everything outside the checkpoint directory as it was.
"""

import collections
import json
import os
import pathlib
import shutil
import tempfile

from _untrusted_child import DECLARED_BYTES, fingerprint, ops
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

MEMORY_BOUND = 2 * DECLARED_BYTES + (4 << 20)
REPLACEMENTS = [
    None,
    -1,
    0,
    1 << 40,
    -(1 << 40),
    "x",
    "",
    [],
    {},
    1.5,
    True,
    "object",
    "float64",
    [1 << 20, 1 << 20],
    {"t": "pickle"},
]
ENTRIES = ["dev_zero", "outside_file", "outside_dir", "parent", "fifo", "empty", "sparse"]


def _files(root: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _json_files(root: pathlib.Path) -> list[str]:
    out = []
    for rel in _files(root):
        try:
            json.loads((root / rel).read_text())
        except ValueError:
            continue
        out.append(rel)
    return out


def mutations(files: list[str], json_files: list[str]):
    byte = st.tuples(
        st.just("flip"),
        st.sampled_from(files),
        st.integers(0, 1 << 20),
        st.integers(1, 255),
    )
    field = st.tuples(
        st.just("json"),
        st.sampled_from(json_files),
        st.lists(st.integers(0, 50), max_size=8),
        st.integers(0, len(REPLACEMENTS) - 1),
    )
    entry = st.tuples(st.just("replace"), st.sampled_from(files), st.sampled_from(ENTRIES))
    removal = st.tuples(st.just("remove"), st.sampled_from(files))
    return st.one_of(byte, field, entry, removal)


def _set_field(doc, choices: list[int], value):
    if not choices or not isinstance(doc, dict | list) or not doc:
        return value
    key = sorted(doc)[choices[0] % len(doc)] if isinstance(doc, dict) else choices[0] % len(doc)
    doc[key] = _set_field(doc[key], choices[1:], value)
    return doc


def apply(mutation: tuple, root: pathlib.Path, outside: pathlib.Path) -> None:
    kind, rel = mutation[0], mutation[1]
    path = root / rel
    if kind == "flip":
        raw = bytearray(path.read_bytes())
        if raw:
            raw[mutation[2] % len(raw)] ^= mutation[3]
            path.write_bytes(bytes(raw))
    elif kind == "json":
        doc = json.loads(path.read_text())
        path.write_text(json.dumps(_set_field(doc, mutation[2], REPLACEMENTS[mutation[3]])))
    elif kind == "remove":
        path.unlink()
    else:
        what = mutation[2]
        path.unlink()
        if what == "dev_zero":
            os.symlink("/dev/zero", path)
        elif what == "outside_file":
            os.symlink(outside / "secret", path)
        elif what == "outside_dir":
            os.symlink(outside, path)
        elif what == "parent":
            os.symlink("..", path)
        elif what == "fifo":
            os.mkfifo(path)
        elif what == "empty":
            path.write_bytes(b"")
        else:
            path.write_bytes(b"")
            os.truncate(path, 1 << 40)


def _outcome(value: str) -> str:
    return value.split(":", 1)[0] if value.startswith(("report", "exit")) else value


def run(pristine: str, examples: int) -> dict:
    pristine = pathlib.Path(pristine)
    files, json_files = _files(pristine), _json_files(pristine)
    outcomes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    kinds: collections.Counter = collections.Counter()
    slowest = {"seconds": 0.0}
    peak = {"bytes": 0}
    notable: list = []  # cases where restore() returned no data (none should)

    with tempfile.TemporaryDirectory() as scratch:
        scratch = pathlib.Path(scratch)
        outside = scratch / "outside"
        outside.mkdir()
        (outside / "secret").write_bytes(b"not part of any checkpoint\n" * 100)
        os.mkfifo(outside / "pipe")  # a reader following a link here would block
        protected = fingerprint(outside)

        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],  # a failure is reported unshrunk:
            # shrinking re-runs seven readers per step and took over five minutes
            suppress_health_check=list(HealthCheck),
        )
        @given(mutation=mutations(files, json_files))
        # Found by this test: Orbax's listing raised ValueError for every step.
        @example(mutation=("json", "ckpt-1/_CHECKPOINT_METADATA", [], 1))
        # Orbax's record of the items lost: still our checkpoint, damaged, not foreign.
        @example(mutation=("json", "ckpt-2/_CHECKPOINT_METADATA", [3], 14))
        # The manifest replaced by JSON null: damage, not a foreign checkpoint.
        @example(mutation=("json", "ckpt-2/manifest/metadata", [], 0))
        def case(mutation):
            work = scratch / "work"
            root = work / "run"
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(pristine, root, symlinks=True)
            (work / "sibling").write_text("beside the checkpoint directory\n")
            before = sorted(os.listdir(work)), (work / "sibling").read_text()
            apply(mutation, root, outside)
            out = ops(str(root))
            kinds[mutation[0] if mutation[0] != "replace" else f"replace:{mutation[2]}"] += 1
            slowest["seconds"] = max(slowest["seconds"], *out["seconds"].values())
            peak["bytes"] = max(peak["bytes"], out["peak_bytes"])
            if out["restore"] != "equal":
                notable.append([repr(mutation), out["restore"]])
            for reader in ("restore", "restore_step2", "metadata_only", "verify"):
                outcomes[reader][out[reader]] += 1
            for reader in ("cli_ls", "cli_show", "cli_verify"):
                outcomes[reader][out[reader]] += 1
            bad = {
                k: v
                for k, v in out.items()
                if isinstance(v, str) and not v.startswith(("equal", "error:", "report:", "exit:"))
            }
            assert not bad, (mutation, bad)
            assert out["cli_show"] in ("exit:0", "exit:1") and out["cli_ls"] == "exit:0", out
            assert out["peak_bytes"] <= MEMORY_BOUND, (mutation, out["peaks"])
            assert fingerprint(outside) == protected, mutation
            assert (sorted(os.listdir(work)), (work / "sibling").read_text()) == before

        case()
    return {
        "cases": sum(kinds.values()),
        "mutations": dict(kinds),
        "outcomes": {k: dict(v) for k, v in outcomes.items()},
        "slowest_reader_seconds": slowest["seconds"],
        "peak_bytes": peak["bytes"],
        "restore_refused": notable,
    }
