"""Import cost of ``datarax_ckpt`` against ``orbax.checkpoint``, in fresh interpreters.

Run ``python -m benchmarks.import_time [--repeats N]``; prints the medians and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys


def import_seconds(module: str, repeats: int) -> float:
    """Median wall time of ``import module`` in ``repeats`` fresh interpreters."""
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    samples = []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        samples.append(float(out.stdout.strip().splitlines()[-1]))
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.import_time")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    orbax = import_seconds("orbax.checkpoint", args.repeats)
    ours = import_seconds("datarax_ckpt", args.repeats)
    print(f"import orbax.checkpoint: {orbax:.3f} s (median of {args.repeats})")
    print(f"import datarax_ckpt:     {ours:.3f} s (median of {args.repeats})")
    print(f"ratio: {ours / orbax:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
