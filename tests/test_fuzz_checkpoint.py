"""Fuzzing every reader with one-thing-at-a-time damage to a real checkpoint.

Hypothesis draws mutations of a real two-step checkpoint (a byte of any file, a field
of any JSON file, a file replaced by a symlink, FIFO, empty or huge sparse file, a file
removed; see ``_fuzz_cases.py``). For each, ``restore()``, ``restore(step=2)``,
``restore(metadata_only=True)``, ``verify()`` and the CLI's ``ls``, ``show`` and
``verify`` must return exactly the saved data or raise a documented CheckpointError,
allocate at most twice the declared state plus fixed buffers, and change nothing
outside the checkpoint directory. It all runs in a child process with a timeout (and a
watchdog per reader), so a reader that hangs fails the test instead of hanging CI.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from _untrusted_child import make

CHILD = pathlib.Path(__file__).with_name("_untrusted_child.py")
# About a minute on the 2-core CI machine (each case runs seven readers).
EXAMPLES = int(os.environ.get("DATARAX_FUZZ_EXAMPLES", "30"))


@pytest.mark.timeout(960)  # the child's own timeout (900 s) ends a hang first
def test_every_reader_survives_one_mutation_of_a_real_checkpoint(tmp_path):
    pristine = tmp_path / "run"
    make(str(pristine))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(CHILD.parent), *sys.path])}
    result = subprocess.run(
        [sys.executable, str(CHILD), "fuzz", str(pristine), str(EXAMPLES)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    print(json.dumps(summary, indent=1))  # the counts quoted in docs/trust.md
    assert summary["cases"] >= EXAMPLES // 2  # hypothesis may draw a few duplicates
    assert "Event loop is closed" not in result.stderr
