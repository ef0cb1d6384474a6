"""Checks and timings that only an accelerator can give, in one short run.

A session lent a GPU or TPU runs this once, beside the benchmark suite (``gpu.toml``)::

    python -m benchmarks.device_check --out DIR

It writes ``DIR/device_check.json`` and prints a summary. Four parts (``--parts`` picks
some), run in this order:

1. ``round_trips``: a mixed state (packed and unpacked leaves, bf16, bool, int8, 0-d,
   zero-size, a typed PRNG key, str, bytes, None, tuples) saved with every ``snapshot``
   mode and with packing on and off, restored onto the device and compared bit for bit;
   also a save followed at once by a donating update of the saved arrays.
2. ``restore_split``: restoring packed leaves (2000 x 64 KiB float32) by host slicing then
   one batched ``device_put`` (what the handler does), against one transfer of the packed
   buffer then eager slicing on the device. (A jitted split is not a candidate: XLA takes
   22-29 s to compile a 2000-output split on the 2-core CI machine, paid again by every new
   process.)
3. ``restore_phases``: where a restore of the GPT-2-small training state spends its time
   (read, hashing, placing), and host-to-device copies from pageable and pinned memory.
4. ``save_blocking``: where ``save()`` blocks for that state: the pinned device-to-host
   copy of every leaf (the floor the issue compares against), the fused on-device packing
   alone, and ``save()``'s blocking time, first and steady.

On CPU it runs too (the device-only timings are then host copies), which is how it is tested.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.config import CaseConfig
from benchmarks.floors import measure_floors
from benchmarks.states import build_state


def _median_s(fn, repeats: int = 5) -> float:
    fn()  # warm-up: compilation, first allocations
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _mixed_state(rng: np.random.Generator) -> dict:
    def arr(shape, dtype):
        return jnp.asarray(rng.standard_normal(shape).astype(np.float32)).astype(dtype)

    return {
        "small": {f"b{i}": arr((64 + i,), jnp.float32) for i in range(20)},
        "bf16": arr((33, 7), jnp.bfloat16),
        "large": arr((1024, 1024), jnp.float32),  # 4 MiB: stored alone
        "mask": jnp.asarray(rng.random(100) > 0.5),
        "int8": jnp.asarray(rng.integers(-128, 127, (3, 5), dtype=np.int8)),
        "scalar": jnp.asarray(3.5, jnp.float32),
        "empty": jnp.zeros((0, 4), jnp.float32),
        "key": jax.random.key(7),
        "name": "ruñ-✓",
        "blob": b"\x00\xff",
        "none": None,
        "pair": (1, 2.5),
    }


def _same(a: Any, b: Any) -> bool:
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    if ta != tb or len(la) != len(lb):
        return False
    for x, y in zip(la, lb, strict=True):
        if _is_key(x):
            if not (
                isinstance(y, jax.Array)
                and jax.random.key_impl(x) == jax.random.key_impl(y)
                and np.array_equal(jax.random.key_data(x), jax.random.key_data(y))
            ):
                return False
        elif isinstance(x, jax.Array):
            if not (
                isinstance(y, jax.Array)
                and x.dtype == y.dtype
                and x.shape == y.shape
                and x.sharding.device_set == y.sharding.device_set
                and np.asarray(x).tobytes() == np.asarray(y).tobytes()
            ):
                return False
        elif type(x) is not type(y) or x != y:
            return False
    return True


def round_trips(workdir: Path) -> list[dict]:
    """Saves and restores a mixed state on the default device in every mode."""
    from datarax_ckpt import CheckpointOptions, OrbaxCheckpointHandler

    results = []
    state = _mixed_state(np.random.default_rng(0))
    for snapshot in ("auto", "device", "host"):
        for threshold in (1 << 20, 0):
            name = f"snapshot={snapshot} pack_threshold_bytes={threshold}"
            directory = workdir / f"rt-{snapshot}-{threshold}"
            try:
                options = CheckpointOptions(snapshot=snapshot, pack_threshold_bytes=threshold)
                with OrbaxCheckpointHandler(options) as handler:
                    handler.save(directory, state, step=1)
                    handler.wait_until_finished()
                    with_target = handler.restore(directory, state)
                    without = handler.restore(directory)
                    meta = handler.restore(directory, metadata_only=True)
                ok = _same(state, with_target) and _same(state, without) and meta is not None
                results.append({"check": name, "ok": ok})
            except Exception:  # noqa: BLE001 - reported, so every check runs
                results.append({"check": name, "ok": False, "error": traceback.format_exc()})
    # Donation right after save() returns must not reach the checkpoint.
    try:
        params = {f"w{i}": jnp.full((256, 256), float(i)) for i in range(4)}
        params["big"] = jnp.asarray(np.random.default_rng(1).random((2048, 1024), np.float32))
        expected = jax.tree.map(np.asarray, params)
        update = jax.jit(lambda p: jax.tree.map(lambda x: x * 2 + 1, p), donate_argnums=0)
        directory = workdir / "donation"
        with OrbaxCheckpointHandler() as handler:
            handler.save(directory, params, step=1)
            params = update(params)
            jax.block_until_ready(params)
            handler.wait_until_finished()
            back = handler.restore(directory)
        ok = all(np.array_equal(expected[k], np.asarray(back[k])) for k in expected)
        results.append({"check": "donating update right after save()", "ok": ok})
    except Exception:  # noqa: BLE001
        results.append({"check": "donation", "ok": False, "error": traceback.format_exc()})
    return results


def save_blocking(workdir: Path) -> dict:
    """Where ``save()`` spends its blocking time for the GPT-2-small training state."""
    from datarax_ckpt import CheckpointOptions, OrbaxCheckpointHandler
    from datarax_ckpt._snapshot import _device_snapshot

    state = build_state(CaseConfig(kind="gpt2", width_scale=1.0), seed=0)
    leaves = [x for x in jax.tree.leaves(state.orbax_tree) if isinstance(x, jax.Array)]
    out: dict[str, Any] = {"bytes": state.nbytes, "leaves": state.num_leaves}

    threshold = CheckpointOptions().pack_threshold_bytes
    small = [x for x in leaves if x.nbytes <= threshold]
    large = [x for x in leaves if x.nbytes > threshold]

    def pack_only() -> None:
        packed, copies = _device_snapshot([small], large, copy_large=False)
        jax.block_until_ready(packed)

    # The suite's own pinned_d2h floor (skipped on a CPU backend, where it means nothing).
    floor = measure_floors(("pinned_d2h",), state.orbax_tree, state.nbytes, workdir, 5, 0)
    out["pinned_d2h_per_leaf_s"] = floor["pinned_d2h"].get("median_s")
    if "skipped" in floor["pinned_d2h"]:
        out["pinned_d2h_skipped"] = floor["pinned_d2h"]["skipped"]
    out["small_leaves"] = len(small)
    out["fused_pack_on_device_s"] = _median_s(pack_only)
    directory = workdir / "blocking"
    steps = iter(range(1, 1000))
    with OrbaxCheckpointHandler() as handler:

        def save() -> None:
            handler.wait_until_finished()
            t0 = time.perf_counter()
            handler.save(directory, state.tree, step=next(steps), keep=1)
            out.setdefault("save_blocking_samples_s", []).append(time.perf_counter() - t0)

        save()  # warm-up (compiles the packing)
        out["first_save_blocking_s"] = out["save_blocking_samples_s"][0]
        out["save_blocking_samples_s"] = []
        for _ in range(5):
            save()
        handler.wait_until_finished()
    out["save_blocking_s"] = statistics.median(out["save_blocking_samples_s"])
    if out["pinned_d2h_per_leaf_s"] is not None:
        out["save_over_pinned_d2h"] = out["save_blocking_s"] / out["pinned_d2h_per_leaf_s"]
    return out


def restore_phases(workdir: Path) -> dict:
    """Where a restore of the GPT-2-small training state onto the device spends its time."""
    import datarax_ckpt._integrity as integrity
    import datarax_ckpt._orbax as reading
    from datarax_ckpt import OrbaxCheckpointHandler

    state = build_state(CaseConfig(kind="gpt2", width_scale=1.0), seed=0)
    directory = workdir / "restore"
    phases: dict[str, float] = {}

    def timed(module: Any, name: str) -> None:
        fn = getattr(module, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0

        setattr(module, name, wrapper)

    out: dict[str, Any] = {}
    with OrbaxCheckpointHandler() as handler:
        handler.save(directory, state.tree, step=1)
        handler.wait_until_finished()
        host_target = jax.tree.map(
            lambda x: np.asarray(x) if isinstance(x, jax.Array) and not _is_key(x) else x,
            state.tree,
        )
        out["restore_s"] = _median_s(
            lambda: jax.block_until_ready(handler.restore(directory, state.tree)), 3
        )
        out["restore_no_verify_s"] = _median_s(
            lambda: jax.block_until_ready(handler.restore(directory, state.tree, verify=False)), 3
        )
        out["restore_to_numpy_s"] = _median_s(
            lambda: handler.restore(directory, host_target, verify=False), 3
        )
        # read includes the hashing that overlaps it; _compare sums both hashing threads.
        for module, name in ((reading, "read"), (reading, "place"), (integrity, "_compare")):
            timed(module, name)
        t0 = time.perf_counter()
        jax.block_until_ready(handler.restore(directory, state.tree))
        out["one_restore_s"] = time.perf_counter() - t0
        out["one_restore_phases_s"] = dict(phases)
    leaves = [x for x in jax.tree.leaves(state.orbax_tree) if isinstance(x, jax.Array)]
    host = [np.asarray(x) for x in leaves]
    devices = [x.sharding for x in leaves]
    out["h2d_batched_s"] = _median_s(lambda: jax.block_until_ready(jax.device_put(host, devices)))
    as_bits = [h.view(np.uint16) if h.dtype.itemsize == 2 else h for h in host]
    out["h2d_batched_bf16_as_uint16_s"] = _median_s(
        lambda: jax.block_until_ready(jax.device_put(as_bits, devices))
    )
    from concurrent.futures import ThreadPoolExecutor

    def h2d_threads(n: int) -> None:
        chunks = [list(range(i, len(host), n)) for i in range(n)]
        with ThreadPoolExecutor(n) as pool:
            placed = pool.map(
                lambda idx: jax.device_put([host[i] for i in idx], [devices[i] for i in idx]),
                chunks,
            )
            jax.block_until_ready(list(placed))

    out["h2d_4_threads_s"] = _median_s(lambda: h2d_threads(4))
    try:
        pinned = jax.device_put(leaves, [s.with_memory_kind("pinned_host") for s in devices])
        out["h2d_from_pinned_s"] = _median_s(
            lambda: jax.block_until_ready(jax.device_put(pinned, devices))
        )
    except (ValueError, NotImplementedError, jax.errors.JaxRuntimeError) as e:
        out["h2d_from_pinned_s"] = f"{type(e).__name__}: {e}"
    out["bytes"] = sum(h.nbytes for h in host)
    return out


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def restore_split(workdir: Path, num_leaves: int = 2000, leaf_kib: int = 64) -> dict:
    """Host slicing + one batched device_put against one transfer then device-side slices."""
    n = leaf_kib * 1024 // 4
    buffer = np.random.default_rng(0).random(num_leaves * n, dtype=np.float32)
    shape = (n // 16, 16)
    device = jax.local_devices()[0]
    offsets = [i * n for i in range(num_leaves)]

    def host_split() -> None:
        parts = [buffer[o : o + n].reshape(shape) for o in offsets]
        jax.block_until_ready(jax.device_put(parts, [device] * len(parts)))

    def device_eager() -> None:
        flat = jax.device_put(buffer, device)
        jax.block_until_ready([flat[o : o + n].reshape(shape) for o in offsets])

    one_transfer = _median_s(lambda: jax.block_until_ready(jax.device_put(buffer, device)))
    return {
        "bytes": buffer.nbytes,
        "leaves": num_leaves,
        "one_transfer_s": one_transfer,
        "host_split_batched_device_put_s": _median_s(host_split),
        "one_transfer_eager_device_split_s": _median_s(device_eager),
    }


PARTS = {
    "round_trips": round_trips,
    "restore_split": restore_split,
    "restore_phases": restore_phases,
    "save_blocking": save_blocking,
}


def main(argv: list[str] | None = None) -> int:
    """Runs the three parts; returns 1 if a round trip failed."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.device_check")
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated subset of {','.join(PARTS)} (default: all)",
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.local_devices()],
        "jax": jax.__version__,
    }
    parts = args.parts.split(",")
    if unknown := set(parts) - set(PARTS):
        parser.error(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        work = Path(tmp).resolve()
        for part in PARTS:
            if part not in parts:
                continue
            t0 = time.perf_counter()
            report[part] = PARTS[part](work)
            print(f"--- {part} ({time.perf_counter() - t0:.1f} s)", flush=True)
            if part == "round_trips":
                for entry in report[part]:
                    print(("ok   " if entry["ok"] else "FAIL ") + entry["check"], flush=True)
                    if "error" in entry:
                        print(entry["error"], flush=True)
            else:
                summary = {k: v for k, v in report[part].items() if "samples" not in k}
                print(json.dumps(summary, indent=1), flush=True)
    (out / "device_check.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0 if all(e["ok"] for e in report.get("round_trips", [])) else 1


if __name__ == "__main__":
    raise SystemExit(main())
