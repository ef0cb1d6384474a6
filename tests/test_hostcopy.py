"""_hostcopy.gather: the capture's copy, shared between threads, must be exact."""

import threading
import time

import ml_dtypes
import numpy as np
import pytest

from datarax_ckpt import _hostcopy


def _expected(sources, dtype):
    if not sources:
        return np.empty(0, dtype)
    return np.concatenate([np.asarray(s).reshape(-1) for s in sources])


@pytest.mark.parametrize("seed", range(40))
def test_gather_equals_concatenation(seed):
    rng = np.random.default_rng(seed)
    dtype = [np.float32, np.int8, ml_dtypes.bfloat16, np.bool_][seed % 4]
    jobs = []
    for _ in range(rng.integers(1, 4)):
        sources = []
        for _ in range(rng.integers(0, 30)):
            kind = rng.random()
            if kind < 0.15:  # large enough to be cut between threads
                shape = (int(rng.integers(1_000_000, 3_000_000)),)
            elif kind < 0.3:
                shape = (0, int(rng.integers(0, 4)))
            else:
                shape = tuple(int(d) for d in rng.integers(1, 40, rng.integers(0, 3)))
            source = (rng.standard_normal(shape) * 50).astype(dtype)
            if source.ndim == 2 and rng.random() < 0.5:
                source = source.T  # not C-contiguous: copied in its own shape
            sources.append(source)
        size = sum(s.size for s in sources)
        destination = np.zeros(size, dtype)
        jobs.append((destination, sources))
    _hostcopy.gather(jobs)
    for destination, sources in jobs:
        expected = _expected(sources, dtype)
        assert destination.tobytes() == expected.tobytes()


def test_gather_of_one_large_source_fills_every_byte():
    # Larger than the serial threshold: split between every thread available.
    source = np.random.default_rng(0).integers(0, 2**31, 9_000_000, dtype=np.int32)
    destination = np.full(source.size, -1, np.int32)
    _hostcopy.gather([(destination, [source])])
    np.testing.assert_array_equal(destination, source)


def test_gather_skips_empty_destinations_beside_real_ones():
    # Zero-size leaves and empty packs reach gather as empty jobs next to real ones.
    _hostcopy.gather([])
    source = np.arange(1000, dtype=np.float32)
    filled = np.full(1000, -1, np.float32)
    _hostcopy.gather([(np.empty(0, np.float32), []), (filled, [source])])
    np.testing.assert_array_equal(filled, source)


def test_threads_is_between_one_and_four():
    assert 1 <= _hostcopy.threads() <= 4


def test_background_work_waits_for_a_capture_in_progress():
    # What lets a back-to-back save() run its capture without an earlier save's
    # background work (Orbax's save path, hashing) taking the cores and the GIL from it.
    done = threading.Event()
    waited = []

    def background():
        _hostcopy.yield_to_captures(timeout=30)
        waited.append(capture_over.is_set())
        done.set()

    capture_over = threading.Event()
    with _hostcopy.capturing() as capture:
        worker = threading.Thread(target=background)
        worker.start()
        assert not done.wait(0.2)  # held back while the capture runs
        capture_over.set()
        capture.end()
        assert done.wait(10)
        capture.end()  # idempotent
    worker.join()
    assert waited == [True]


def test_background_work_waits_a_bounded_time():
    with _hostcopy.capturing():
        start = time.monotonic()
        _hostcopy.yield_to_captures(timeout=0.1)
        assert 0.1 <= time.monotonic() - start < 5
        start = time.monotonic()
        budget = _hostcopy.YieldBudget(0.2)
        for _ in range(50):  # a hashing loop: 0.2 s in all, not 0.2 s per call
            budget()
        assert 0.2 <= time.monotonic() - start < 5
    start = time.monotonic()
    _hostcopy.yield_to_captures(timeout=30)  # nothing capturing: returns at once
    assert time.monotonic() - start < 1
