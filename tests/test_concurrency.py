"""Concurrency and load: threads sharing a handler, two handlers, hundreds of saves, no leak."""

from __future__ import annotations

import collections
import random
import threading

import jax.numpy as jnp
import numpy as np
import psutil
from _trees import assert_identical as assert_same

from datarax_ckpt import OrbaxCheckpointHandler

# A thread still alive after this long is deadlocked (a run takes seconds); not a timing test.
DEADLOCK_S = 240
MIB = 1 << 20


def _state(step: int) -> dict:
    """~1.4 MiB: one leaf stored alone (above the 1 MiB pack threshold), the rest packed."""
    rng = np.random.default_rng(step)
    return {
        "big": jnp.asarray(rng.standard_normal(300_000, dtype=np.float32)),
        "small": [jnp.asarray(rng.integers(0, 1 << 30, 1000, dtype=np.int32)) for _ in range(3)],
        "host": rng.standard_normal(2000),
        "step": step,
        "tag": f"s{step}",
    }


_TEST_THREADS: set[threading.Thread] = set()


def _run_threads(targets) -> None:
    """Runs ``targets`` in threads; re-raises the first error; fails on a deadlock."""
    errors: list[BaseException] = []

    def guarded(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - re-raised on the test's thread
                errors.append(e)

        return run

    threads = [threading.Thread(target=guarded(fn)) for fn in targets]
    _TEST_THREADS.update(threads)
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLOCK_S)
    assert not any(t.is_alive() for t in threads), "deadlock: a thread never finished"
    if errors:
        raise errors[0]


def test_threads_saving_and_restoring_through_one_handler(tmp_path):
    handler = OrbaxCheckpointHandler()
    restored = []

    first_saved = threading.Event()
    steps = iter(range(24))
    in_order = threading.Lock()  # a save below a newer step is refused: steps go up

    def writer():
        for _ in range(6):
            with in_order:
                step = next(steps)
                handler.save(tmp_path, _state(step), step=step, metadata={"s": step})
            first_saved.set()

    def reader(seed: int):
        rng = random.Random(seed)
        first_saved.wait()
        for _ in range(6):  # listing waits for the saves queued before it (read-your-writes)
            step = rng.choice(handler.get_checkpoint_steps(tmp_path))
            assert_same(handler.restore(tmp_path, step=step), _state(step))
            restored.append(step)

    _run_threads([writer, writer, writer, writer, lambda: reader(1), lambda: reader(2)])
    handler.close()

    expected = list(range(24))
    with OrbaxCheckpointHandler() as fresh:
        assert fresh.get_checkpoint_steps(tmp_path) == expected
        for step in expected:
            assert_same(fresh.restore(tmp_path, step=step), _state(step))
            assert fresh.restore(tmp_path, step=step, metadata_only=True) == {"s": step}
    assert len(restored) == 12


def test_two_handlers_and_200_saves_leak_no_memory_and_no_threads(tmp_path):
    """Two handlers, two directories, a writer and a reader thread each: 200 saves.

    Memory and threads are sampled when nothing runs (every save committed, every test
    thread done): after a warm-up of 40 saves, and after the other 160.
    """
    process = psutil.Process()
    existing = set(threading.enumerate())  # threads of earlier tests do not count
    handlers = [OrbaxCheckpointHandler(), OrbaxCheckpointHandler()]
    directories = [tmp_path / "a", tmp_path / "b"]

    def writer(i: int, steps: range):
        handler, directory = handlers[i], directories[i]
        for step in steps:
            handler.save(directory, _state(step), step=step, keep=3)
            if step % 10 == 9:
                assert_same(handler.restore(directory), _state(step))

    def reader(i: int, reads: int):
        for _ in range(reads):
            if handlers[i].latest_step(directories[i]) is not None:
                assert handlers[i].restore(directories[i], metadata_only=True) == {}

    def run(steps: range, reads: int) -> tuple[int, list[str]]:
        _run_threads(
            [lambda: writer(0, steps), lambda: writer(1, steps)]
            + [lambda: reader(0, reads), lambda: reader(1, reads)]
        )
        for handler in handlers:
            handler.wait_until_finished()
        threads = [t.name for t in threading.enumerate() if t not in existing | _TEST_THREADS]
        return process.memory_info().rss, sorted(threads)

    rss_warm, threads_warm = run(range(20), 8)  # first compilations, Orbax's thread pools
    rss_end, threads_end = run(range(20, 100), 32)
    for handler, directory in zip(handlers, directories, strict=True):
        assert handler.get_checkpoint_steps(directory) == [97, 98, 99]
        assert_same(handler.restore(directory), _state(99))
        handler.close()
    threads_closed = [t.name for t in threading.enumerate() if t not in existing | _TEST_THREADS]

    print(
        f"\n200 saves: RSS {rss_warm / MIB:.0f} MiB after 40 saves, {rss_end / MIB:.0f} MiB "
        f"after 200; threads {threads_warm} -> {threads_end}; after close: {threads_closed}"
    )
    # Pools start a thread when work finds none idle, so a directory's second hashing
    # thread may first be needed after the warm-up. No new kind of thread, then, and no
    # name more than once per directory: a pool or worker leaked per save repeats them.
    kinds = {name.rsplit("_", 1)[0] for name in threads_warm}
    assert {name.rsplit("_", 1)[0] for name in threads_end} == kinds
    assert max(collections.Counter(threads_end).values()) <= len(directories)
    assert threads_closed == []
    # 160 more saves of a 1.4 MiB state: a leaked snapshot per save would add >= 220 MiB.
    assert rss_end - rss_warm < 64 * MIB
