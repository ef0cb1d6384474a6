"""Runs every reader of a checkpoint directory on it, in a child process (hangs time out).

Used by test_untrusted.py and test_fuzz_checkpoint.py:

    python tests/_untrusted_child.py make DIR          # a real two-step checkpoint
    python tests/_untrusted_child.py ops DIR [INTACT]  # every reader, one JSON line out
    python tests/_untrusted_child.py fuzz PRISTINE N   # N hypothesis mutations, JSON out

Each reader (restore, restore(metadata_only=True), verify, and the CLI's ls, show and
verify) must return exactly the saved data or raise a documented CheckpointError. A
watchdog ends the process (exit 3) if one reader takes longer than WATCHDOG_S.
"""

import contextlib
import faulthandler
import hashlib
import io
import json
import logging
import os
import pathlib
import sys
import threading
import time
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_num_cpu_devices", 4)

from typer.testing import CliRunner  # noqa: E402

from datarax_ckpt import CheckpointError, OrbaxCheckpointHandler, VerifyReport, cli  # noqa: E402

WATCHDOG_S = 60


def state(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {
        "w": jnp.asarray(rng.standard_normal(512), jnp.float32),  # packed
        "big": np.asarray(rng.standard_normal(2048), np.float32),  # its own array (8 KiB)
        "b": jnp.asarray(rng.standard_normal(4), jnp.bfloat16),
        "rng": jax.random.key(step),
        "name": f"run-{step}",
        "blob": b"\x00\xff" * step,
        "step": step,
        "lr": 0.5,
        "e": np.zeros((0, 3), np.float32),
        "none": None,
        "nested": [{"a": (1, 2.5)}, ()],
    }


def metadata(step: int) -> dict:
    return {"loss": 1.0 / step, "step": step}


# The declared state: what a reader may need to hold (read buffer plus its jax copy).
DECLARED_BYTES = 512 * 4 + 2048 * 4 + 4 * 2 + 8 + 16


def make(directory: str) -> None:
    with OrbaxCheckpointHandler(pack_threshold_bytes=4096) as handler:
        for step in (1, 2):
            handler.save(directory, state(step), step=step, metadata=metadata(step))


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return type(b) is dict and list(a) == list(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(_equal, a, b))
    if isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
        return (
            isinstance(b, jax.Array)
            and jax.dtypes.issubdtype(b.dtype, jax.dtypes.prng_key)
            and bool((jax.random.key_data(a) == jax.random.key_data(b)).all())
        )
    if isinstance(a, jax.Array | np.ndarray):
        return (
            type(a) is type(b)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and np.asarray(a).tobytes() == np.asarray(b).tobytes()
        )
    return type(a) is type(b) and (a == b or (a != a and b != b))


@contextlib.contextmanager
def watchdog(what: str):
    done = threading.Event()

    def bark():
        if not done.wait(WATCHDOG_S):
            sys.stderr.write(f"\nWATCHDOG: {what} ran over {WATCHDOG_S} s\n")
            faulthandler.dump_traceback(all_threads=True)
            os._exit(3)

    threading.Thread(target=bark, daemon=True).start()
    try:
        yield
    finally:
        done.set()


def _api(fn, check) -> str:
    """``"equal"``, ``"report:<ok>"``, ``"error:<type>"``; anything else is a failure."""
    try:
        value = fn()
    except CheckpointError as e:
        return f"error:{type(e).__name__}"
    except Exception as e:  # noqa: BLE001 - an undocumented error is the finding
        return f"UNDOCUMENTED:{type(e).__name__}: {str(e)[:300]}"
    return check(value)


def _restored(value) -> str:
    return "equal" if any(_equal(state(s), value) for s in (1, 2)) else "WRONG DATA"


def _meta(value) -> str:
    return "equal" if any(value == metadata(s) for s in (1, 2)) else "WRONG METADATA"


def _report(value) -> str:
    return f"report:{value.ok}" if isinstance(value, VerifyReport) else "WRONG REPORT"


def _cli(args: list[str]) -> str:
    result = CliRunner().invoke(cli.app, args)
    text = result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return f"UNDOCUMENTED CLI {type(result.exception).__name__}: {result.exception}"
    if "Traceback" in text:
        return "CLI TRACEBACK"
    return f"exit:{result.exit_code}"


def warm_up(directory: str) -> None:
    """Runs every reader once on an intact checkpoint (imports, caches, compilation), so
    that what :func:`ops` measures afterwards is the reading alone."""
    with contextlib.redirect_stdout(io.StringIO()):
        assert ops(directory)["restore"] == "equal"


def ops(directory: str) -> dict:
    """Every reader's outcome, and the largest allocation any of them made (bytes)."""
    out, peaks, seconds = {}, {}, {}
    with OrbaxCheckpointHandler() as handler:
        readers = {
            "restore": (lambda: handler.restore(directory), _restored),
            "restore_step2": (lambda: handler.restore(directory, step=2), _restored),
            "metadata_only": (lambda: handler.restore(directory, metadata_only=True), _meta),
            "verify": (lambda: handler.verify(directory), _report),
        }
        for name, (fn, check) in readers.items():
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            start = time.perf_counter()
            with watchdog(name):
                out[name] = _api(fn, check)
            seconds[name] = round(time.perf_counter() - start, 2)
            peaks[name] = tracemalloc.get_traced_memory()[1] - base
    for name, args in {
        "cli_ls": ["ls", directory],
        "cli_show": ["show", directory],
        "cli_verify": ["verify", directory, "--all"],
    }.items():
        start = time.perf_counter()
        with watchdog(name):
            out[name] = _cli(args)
        seconds[name] = round(time.perf_counter() - start, 2)
    out["peak_bytes"] = max(peaks.values())
    out["peaks"] = peaks
    out["seconds"] = seconds
    return out


def fingerprint(root: pathlib.Path) -> dict:
    """Content and metadata of every entry under ``root`` (not following symlinks)."""
    out = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        digest = ""
        if path.is_file() and not path.is_symlink():
            digest = hashlib.sha1(path.read_bytes()).hexdigest()
        out[str(path.relative_to(root))] = (info.st_mode, info.st_size, info.st_mtime_ns, digest)
    return out


def main() -> None:
    # In the child process only: importing this module (the tests do) must not change
    # the test process's loggers.
    logging.getLogger("datarax_ckpt").setLevel(logging.CRITICAL)  # fallbacks log warnings
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    mode = sys.argv[1]
    if mode == "make":
        make(sys.argv[2])
    elif mode == "ops":  # ops DIR [INTACT]: INTACT warms up first
        if len(sys.argv) > 3:
            warm_up(sys.argv[3])
        tracemalloc.start()
        print(json.dumps(ops(sys.argv[2])))
    elif mode == "fuzz":
        import _fuzz_cases

        warm_up(sys.argv[2])
        tracemalloc.start()
        print(json.dumps(_fuzz_cases.run(sys.argv[2], int(sys.argv[3]))))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
