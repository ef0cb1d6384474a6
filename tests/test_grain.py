"""Grain iterators are Checkpointable: a restored iterator yields the exact next batch."""

import json
import subprocess
import sys
import textwrap

import grain
import numpy as np

PIPELINE = """
import grain
import numpy as np


def pipeline():
    # Grain's dataset API: shuffle, a per-element random transform, batch.
    return (
        grain.MapDataset.source(np.arange(1000))
        .shuffle(seed=42)
        .random_map(lambda x, rng: x * 1000 + rng.integers(1000), seed=7)
        .batch(8)
        .to_iter_dataset()
    )
"""

CHILD = (
    PIPELINE
    + """
import sys

from datarax_ckpt import OrbaxCheckpointHandler

mode, directory = sys.argv[1], sys.argv[2]
with OrbaxCheckpointHandler() as handler:
    if mode == "train":  # a few steps, a save, then the process ends
        iterator = iter(pipeline())
        for step in range(1, 6):
            next(iterator)
        handler.save(directory, {"step": step, "data": iterator}, step=step)
    else:  # a new process resumes
        iterator = iter(pipeline())
        state = handler.restore(directory, {"step": 0, "data": iterator})
        print([next(iterator).tolist() for _ in range(3)], state["step"])
"""
)


def test_iterator_resumes_the_exact_next_batch_in_a_new_process(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD))
    run = [sys.executable, str(script)]
    subprocess.run([*run, "train", str(tmp_path / "ckpt")], check=True, timeout=300)
    out = subprocess.run(
        [*run, "resume", str(tmp_path / "ckpt")],
        check=True,
        timeout=300,
        capture_output=True,
        text=True,
    ).stdout
    batches, step = out.strip().splitlines()[-1].rsplit(" ", 1)
    namespace = {}
    exec(PIPELINE, namespace)
    uninterrupted = list(namespace["pipeline"]())
    assert int(step) == 5
    assert json.loads(batches) == [b.tolist() for b in uninterrupted[5:8]]


def test_data_loader_iterator_resumes(handler, tmp_path):
    def loader():
        return grain.DataLoader(
            data_source=grain.sources.RangeDataSource(0, 100, 1),
            sampler=grain.samplers.IndexSampler(100, shuffle=True, seed=0, num_epochs=1),
            operations=[grain.transforms.Batch(4)],
            worker_count=0,
        )

    iterator = iter(loader())
    for _ in range(3):
        next(iterator)
    handler.save(tmp_path, {"data": iterator}, step=3)
    expected = [next(iterator) for _ in range(2)]
    resumed = iter(loader())
    handler.restore(tmp_path, {"data": resumed})
    for batch in expected:
        np.testing.assert_array_equal(next(resumed), batch)
