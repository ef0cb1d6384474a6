"""How the pack threshold changes save and restore times: the data behind the 1 MiB default.

Usage: ``python -m benchmarks.pack_threshold [--repeats 3] [--thresholds-kib 0,64,1024,...]``.

Saves the GPT-2-small training state and the 2000 x 64 KiB state of the benchmark suite with
``CheckpointOptions(pack_threshold_bytes=T)`` for each threshold T, one handler per
threshold, taking turns round-robin (the order rotates every round) so that the disk's drift
spreads over all of them. Each save is waited on until committed, then restored (onto the
device, verified); ``os.sync()`` runs between samples. The first round warms up and is
dropped. Prints a Markdown table of medians and the JSON of every sample.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile

import jax

from benchmarks.config import CaseConfig
from benchmarks.measure import handler_round_trip
from benchmarks.states import build_state
from datarax_ckpt import OrbaxCheckpointHandler

CASES = {
    "gpt2-small": CaseConfig(kind="gpt2", width_scale=1.0),
    "many-2000x64KiB": CaseConfig(kind="many_small", num_leaves=2000, leaf_kib=64),
    "many-50x16KiB": CaseConfig(kind="many_small", num_leaves=50, leaf_kib=16),  # for tests
}
DEFAULT_CASES = ("gpt2-small", "many-2000x64KiB")
THRESHOLDS_KIB = (0, 64, 256, 1024, 4096, 16384, 65536)


def main(argv: list[str] | None = None) -> dict:
    """Runs the sweep; returns (and prints) the medians and samples."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pack_threshold")
    parser.add_argument("--repeats", type=int, default=3, help="samples per threshold and case")
    parser.add_argument(
        "--thresholds-kib",
        default=",".join(map(str, THRESHOLDS_KIB)),
        help="comma-separated thresholds in KiB (0 disables packing)",
    )
    parser.add_argument(
        "--cases", default=",".join(DEFAULT_CASES), help=f"subset of {','.join(CASES)}"
    )
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args(argv)
    thresholds = [int(t) for t in args.thresholds_kib.split(",")]
    root = tempfile.mkdtemp(prefix="pack-threshold-", dir=args.dir)
    samples: dict[str, dict[int, dict[str, list[float]]]] = {}
    try:
        for ci, case_name in enumerate(args.cases.split(",")):
            state = build_state(CASES[case_name], seed=ci)
            handlers = {
                t: OrbaxCheckpointHandler(pack_threshold_bytes=t * 1024) for t in thresholds
            }
            runs = samples.setdefault(case_name, {})
            try:
                for r in range(args.repeats + 1):  # round 0 warms up and is dropped
                    order = thresholds[r % len(thresholds) :] + thresholds[: r % len(thresholds)]
                    for t in order:
                        directory = f"{root}/{case_name}-{t}"
                        sample = handler_round_trip(
                            handlers[t], directory, state.tree, r, state.tree
                        )
                        if r:
                            for metric, value in sample.items():
                                runs.setdefault(t, {}).setdefault(metric, []).append(value)
            finally:
                for handler in handlers.values():
                    handler.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    medians = {
        case: {
            t: {m: statistics.median(v) for m, v in by_metric.items()}
            for t, by_metric in runs.items()
        }
        for case, runs in samples.items()
    }
    print(f"{args.repeats} samples per threshold, backend {jax.default_backend()}.\n")
    print("| case | threshold | save() blocks | durable | restore |")
    print("|---|---|---|---|---|")
    for case, by_threshold in medians.items():
        for t, m in by_threshold.items():
            label = "off" if t == 0 else (f"{t // 1024} MiB" if t >= 1024 else f"{t} KiB")
            blocking, durable, restore = m["save_blocking_s"], m["durable_s"], m["restore_s"]
            times = f"{blocking * 1e3:.1f} ms | {durable:.2f} s | {restore:.2f} s"
            print(f"| {case} | {label} | {times} |")
    result = {"backend": jax.default_backend(), "medians": medians, "samples": samples}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
