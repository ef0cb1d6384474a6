"""Command line: ``python -m benchmarks --config configs/bench/cpu-smoke.toml --out DIR``."""

from __future__ import annotations

import argparse
import logging
import sys

from benchmarks.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark; returns 0, 1 if a system failed, or 2 for a bad config."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark datarax_ckpt against raw Orbax, PyTorch DCP and physical floors.",
    )
    parser.add_argument("--config", required=True, help="TOML config, e.g. configs/bench/cpu.toml")
    parser.add_argument("--out", required=True, help="output folder for results.json/.md/plot.png")
    parser.add_argument(
        "--workdir", default=None, help="where checkpoints are written (default: inside --out)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)

    from benchmarks.runner import run  # Imports jax: keep --help fast.

    # Orbax logs "Waiting for previous save to complete took N seconds" through absl on every
    # back-to-back save; the results already hold those times, so keep stderr for progress.
    logging.getLogger("absl").setLevel(logging.ERROR)

    try:
        results = run(args.config, args.out, workdir=args.workdir, progress=not args.quiet)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}/results.md")
    failed = [
        f"{case['name']}/{name}"
        for case in results["cases"]
        for name, entry in case["systems"].items()
        if entry["status"] == "error"
    ]
    if failed:
        print(f"failed: {', '.join(failed)} (see results.md)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
