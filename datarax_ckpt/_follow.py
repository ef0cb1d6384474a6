"""``OrbaxCheckpointHandler.follow``: the steps of a directory as another process commits them."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator

from etils import epath

from datarax_ckpt import _layout

# While nothing new appears, the wait between two looks doubles, up to this many times
# ``poll_interval`` (16 s with the default 1 s): an idle follower costs one directory
# listing every 16 s, and a new step is seen at most 16 s after it was committed.
MAX_BACKOFF = 16


def check_args(after: object, timeout: object, poll_interval: object) -> None:
    if after is not None and (isinstance(after, bool) or not isinstance(after, int)):
        raise TypeError(f"after must be None or an int step, got {after!r}.")
    for name, value in (("timeout", timeout), ("poll_interval", poll_interval)):
        if value is None and name == "timeout":
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{name} must be a number of seconds, got {value!r}.")
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}.")
    if poll_interval == 0:
        raise ValueError("poll_interval must be > 0 seconds, got 0.")


def follow(
    path: epath.Path,
    after: int | None,
    timeout: float | None,
    poll_interval: float,
    check_open: Callable[[], None],
) -> Iterator[int]:
    """Yields the committed steps of ``path`` above ``after``, in increasing order, as
    they appear; see :meth:`OrbaxCheckpointHandler.follow`.

    Each look lists the directory (nothing is opened between looks, no thread is
    started), so a follower left running for days holds no resources.
    """
    last = -1 if after is None else after
    wait = poll_interval
    quiet_since = time.monotonic()
    while True:
        check_open()
        new = [s for s in _layout.committed_steps(path) if s > last]
        for step in new:
            yield step
            last = step
        if new:  # look again at once: more may have come while the caller worked
            wait, quiet_since = poll_interval, time.monotonic()
            continue
        now = time.monotonic()
        if timeout is not None and now - quiet_since >= timeout:
            return
        time.sleep(wait if timeout is None else min(wait, quiet_since + timeout - now))
        wait = min(wait * 2, poll_interval * MAX_BACKOFF)
