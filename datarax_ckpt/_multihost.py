"""Coordination of multi-process saves through the JAX distributed runtime.

When ``jax.distributed.initialize`` has been called, every process runs the same
``save``/``restore`` calls. Arrays sharded over a global mesh are written by the
processes that hold them (Orbax does this); everything else (the manifest, the
metadata, packed small leaves, strings, numpy arrays and host-local ``jax.Array``
leaves) is written once, by process 0. This module provides what the handler needs
beyond Orbax for that: barriers, a cheap check that every process passed the same
non-array data, and errors that say which leaves differ.

Barriers and exchanges go through the distributed runtime's key-value store
(``wait_at_barrier``, ``key_value_set``), not through XLA collectives, so they work
from background threads and on every backend. Their keys are
``datarax_ckpt/<directory hash>/<channel>/<counter>/<tag>``: every process makes the
same sequence of calls per directory, so the counters agree.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from datarax_ckpt import _manifest
from datarax_ckpt._errors import CheckpointError, ProcessMismatchError, StructureMismatchError

# As Orbax's default barrier timeout (orbax/checkpoint/_src/multihost/multihost.py).
TIMEOUT_S = 300

_lock = threading.Lock()
_counters: dict[tuple[str, str], int] = {}


def process_count() -> int:
    return jax.process_count()


def is_primary() -> bool:
    """True on the process that writes non-array data and changes folders (process 0)."""
    return jax.process_index() == 0


def _client() -> Any:
    from jax._src import distributed  # Orbax reaches the client the same way.

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError(
            f"jax.process_count() is {jax.process_count()} but the JAX distributed client "
            "is not initialized. Call jax.distributed.initialize(...) at program start."
        )
    return client


class Coordinator:
    """Barriers and exchanges for one checkpoint directory; no-ops in a single process.

    Args:
        scope: Identifies the directory; must be the same string on every process.
    """

    def __init__(self, scope: str):
        self.scope = hashlib.sha1(scope.encode()).hexdigest()[:16]
        self.where = scope

    def _key(self, channel: str, tag: str) -> str:
        with _lock:
            n = _counters.get((self.scope, channel), 0)
            _counters[(self.scope, channel)] = n + 1
        return f"datarax_ckpt/{self.scope}/{channel}/{n}/{tag}"

    def barrier(self, tag: str) -> None:
        """Waits until every process has reached this barrier (worker thread only)."""
        if process_count() == 1:
            return
        key = self._key("worker", tag)
        try:
            _client().wait_at_barrier(key, TIMEOUT_S * 1000)
        except Exception as e:
            e.add_note(
                f"datarax_ckpt: barrier {tag!r} for {self.where} failed; every process must "
                "make the same save/restore calls on the same directory path."
            )
            raise

    def exchange(self, tag: str, payload: dict, *, wait: bool = True) -> list[dict]:
        """Every process publishes ``payload``; returns all of them, by process index.

        With ``wait=False`` this process only publishes (and returns an empty list).
        """
        key = self._key("call", tag)
        client = _client()
        client.key_value_set(f"{key}/{jax.process_index()}", json.dumps(payload))
        if not wait:
            return []
        try:
            return [
                json.loads(client.blocking_key_value_get(f"{key}/{i}", TIMEOUT_S * 1000))
                for i in range(process_count())
            ]
        except Exception as e:
            e.add_note(
                f"datarax_ckpt: waited {TIMEOUT_S} s for every process to call save() on "
                f"{self.where}; in a multi-process run every process must call save() with "
                "the same arguments."
            )
            raise

    def report_failure(self, error: BaseException) -> None:
        """Tells the other processes that this process's save failed before writing."""
        if process_count() > 1:
            self.exchange("prepare", {"error": f"{type(error).__name__}: {error}"}, wait=False)

    def agree_to_save(
        self,
        arrays: Mapping[str, Any],
        manifest: dict,
        metadata: dict,
        call: list,
        proceed: bool,
    ) -> bool:
        """Checks that every process passed the same data; decides whether all save.

        Args:
            arrays: The captured arrays; the numpy ones are written by process 0 only.
            manifest: The manifest, written by process 0 only.
            metadata: The metadata, written by process 0 only.
            call: The other arguments (checkpoint name, keep, overwrite).
            proceed: False if this process would skip the save (backpressure).

        Returns:
            True if every process saves; False if any process skips (then all skip).

        Raises:
            CheckpointError: if another process failed to prepare its save.
            ProcessMismatchError: if the processes' non-array data differ.
        """
        if process_count() == 1:
            return proceed
        digest = _digest(arrays, manifest, metadata, call)
        payloads = self.exchange("prepare", {"digest": digest, "proceed": proceed})
        for i, p in enumerate(payloads):
            if "error" in p:
                raise CheckpointError(
                    f"Process {i} failed to prepare its save to {self.where}: "
                    f"{p['error'].rstrip('.')}. "
                    "No process saved. Every process must call save() with an equal, "
                    "valid state."
                )
        if any(p["digest"] != payloads[0]["digest"] for p in payloads):
            # Rare path: a second exchange names the differing leaves.
            leaves = {"call": _hash(json.dumps([call, metadata]).encode())}
            leaves.update(leaf_digests(arrays, manifest))
            raise _mismatch_error(self.where, self.exchange("diagnose", leaves))
        return all(p["proceed"] for p in payloads)


def _hash(*chunks: Any) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def _bytes(value: Any) -> memoryview:
    return memoryview(np.ascontiguousarray(np.asarray(value))).cast("B")


def _written_by_primary(value: Any) -> bool:
    """Whether process 0 writes ``value`` whole: numpy, or a jax.Array it holds whole.

    In a multi-process save, capture turns host-local jax.Arrays into numpy arrays, so
    only arrays sharded over processes are left out (each process writes its shards).
    """
    return isinstance(value, np.ndarray) or (
        isinstance(value, jax.Array) and value.is_fully_addressable
    )


def _digest(arrays: Mapping[str, Any], manifest: dict, metadata: dict, call: list) -> str:
    h = hashlib.sha256(json.dumps([manifest, metadata, call], sort_keys=True).encode())
    for key in sorted(arrays):
        value = arrays[key]
        if _written_by_primary(value):
            h.update(key.encode())
            h.update(_bytes(value))
    return h.hexdigest()


def leaf_digests(arrays: Mapping[str, Any], manifest: dict) -> dict[str, str]:
    """A digest per tree node: its kind, keys and, for leaves, the bytes process 0 writes."""
    table, packs = manifest["slots"], manifest["packs"]
    out: dict[str, str] = {}
    for where, node in _manifest.walk(manifest["tree"], containers=True):
        path = "" if where == "<root>" else where  # the root is above every other path
        shallow = {k: v for k, v in node.items() if k != "c"}
        chunks = [json.dumps(shallow, sort_keys=True).encode()]
        if "s" in node:
            entry = table[node["s"]]
            chunks.append(json.dumps({**entry, "offset": None}, sort_keys=True).encode())
            if "pack" in entry:
                buffer = arrays[packs[entry["pack"]]["key"]]
                size = int(np.prod(entry["shape"], dtype=np.int64))
                if _written_by_primary(buffer):
                    start = entry["offset"]
                    chunks.append(_bytes(np.asarray(buffer)[start : start + size]))
            elif "key" in entry and _written_by_primary(arrays[entry["key"]]):
                chunks.append(_bytes(arrays[entry["key"]]))
        out[path] = _hash(*chunks)
    return out


def _below(path: str, parent: str) -> bool:
    return path.startswith(parent) and path[len(parent) : len(parent) + 1] in ("[", ".")


def _mismatch_error(where: str, payloads: list[dict]) -> ProcessMismatchError:
    reference = payloads[0]
    lines = []
    for i, other in enumerate(payloads[1:], start=1):
        if other["call"] != reference["call"]:
            lines.append(f"process {i}: different arguments (step, keep, overwrite or metadata)")
        paths = sorted(
            p
            for p in set(reference) | set(other)
            if p != "call" and reference.get(p) != other.get(p)
        )
        # A container differs only in its own type or keys; then its added or removed
        # children differ too, and they are the informative paths to report.
        deepest = [p for p in paths if not any(_below(q, p) for q in paths)]
        if deepest:
            shown = ", ".join(p or "<root>" for p in deepest[:8])
            shown += " ..." if len(deepest) > 8 else ""
            lines.append(f"process {i}: differs from process 0 at {shown}")
    return ProcessMismatchError(
        f"save() to {where} got different data on different processes ("
        + "; ".join(lines)
        + "). Non-array leaves (str, bytes, Python and numpy scalars, numpy arrays), "
        "host-local jax.Arrays (e.g. a jax.random.key made on each process), the metadata "
        "and the arguments are written once, by process 0, so they must be equal on every "
        "process. Make them equal, or store per-process values as one global jax.Array "
        "(jax.make_array_from_process_local_data) sharded over the processes. No process "
        "saved."
    )


def missing_target_error(manifest: dict, slot: int) -> StructureMismatchError:
    """The error for restoring a cross-process array with no target in a multi-process run."""
    path = next((p for p, node in _manifest.walk(manifest["tree"]) if node.get("s") == slot), "?")
    return StructureMismatchError(
        f"Leaf {path or '<root>'} was saved as a jax.Array sharded across processes, and "
        f"this restore (process {jax.process_index()} of {jax.process_count()}) has no "
        "target for it. In a multi-process run, pass a target whose leaf is a jax.Array or "
        "jax.ShapeDtypeStruct with the NamedSharding to restore onto (it may differ from "
        "the saved one), or restore in a single process to get it on one device."
    )
