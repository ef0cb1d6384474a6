"""The checkpointing systems compared, behind one small adapter interface."""

from __future__ import annotations

import abc
import importlib.util
import inspect
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.states import BenchState


class Unavailable(RuntimeError):
    """A system cannot run here (e.g. its package is not installed); reported as skipped."""


class Adapter(abc.ABC):
    """One checkpointing system, driven step by step by ``benchmarks.measure``.

    An adapter owns one manager/handler for one directory; the first save it makes is warm-up.
    """

    name: str
    #: Whether the system restores metadata without reading the arrays.
    has_metadata_restore = False
    #: A note on what this system saves, for the report.
    state_note = "the full state"

    @abc.abstractmethod
    def save(self, step: int) -> None:
        """Starts an asynchronous save of ``step``; returns when the caller may go on."""

    @abc.abstractmethod
    def wait(self) -> None:
        """Blocks until every save started so far is durable."""

    @abc.abstractmethod
    def restore(self, step: int) -> Any:
        """Restores ``step`` onto the device; the caller blocks on the result."""

    def restore_metadata(self, step: int) -> Any:
        """Restores only the metadata of ``step``."""
        raise NotImplementedError(self.name)

    @abc.abstractmethod
    def step_path(self, step: int) -> Path:
        """The folder (or file) that holds ``step``."""

    @abc.abstractmethod
    def reference(self) -> Any:
        """The state this system saves, to check restores against."""

    @abc.abstractmethod
    def close(self) -> None:
        """Waits for pending work and releases resources."""


class OursAdapter(Adapter):
    """``datarax_ckpt.OrbaxCheckpointHandler`` with its default options (async)."""

    name = "datarax_ckpt"
    has_metadata_restore = True
    options: dict[str, Any] = {}

    def __init__(self, state: BenchState, directory: Path) -> None:
        try:
            from datarax_ckpt import OrbaxCheckpointHandler
        except ImportError as e:
            raise Unavailable(f"datarax_ckpt is not importable: {e}") from e
        self._state = state
        self._tree = state.tree
        self._dir = directory
        self._handler = OrbaxCheckpointHandler(**self.options)
        self._paths: dict[int, Path] = {}

    def save(self, step: int) -> None:
        self._tree = self._state.trees(step)[0]
        path = self._handler.save(self._dir, self._tree, step=step, metadata={"step": step})
        self._paths[step] = Path(path)

    def wait(self) -> None:
        self._handler.wait_until_finished()

    def restore(self, step: int) -> Any:
        return self._handler.restore(self._dir, self._tree, step=step)

    def restore_metadata(self, step: int) -> Any:
        return self._handler.restore(self._dir, step=step, metadata_only=True)

    def step_path(self, step: int) -> Path:
        return self._paths[step]

    def reference(self) -> Any:
        return self._tree

    def close(self) -> None:
        self._handler.close()


class OursIncrementalAdapter(OursAdapter):
    """``datarax_ckpt.OrbaxCheckpointHandler(incremental=True)``."""

    name = "datarax_ckpt_incremental"
    options = {"incremental": True}
    state_note = "the full state; unchanged arrays hard-linked from the previous step"


class OrbaxAdapter(Adapter):
    """Raw ``ocp.CheckpointManager`` with default options: StandardSave/StandardRestore, async."""

    name = "orbax"

    def __init__(self, state: BenchState, directory: Path) -> None:
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self._state = state
        self._tree = state.orbax_tree
        self._abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, self._tree)
        self._dir = directory
        self._manager = ocp.CheckpointManager(directory)
        if state.notes:
            self.state_note = "the state minus str leaves, typed keys as key data"

    def save(self, step: int) -> None:
        self._tree = self._state.trees(step)[1]
        if not self._manager.save(step, args=self._ocp.args.StandardSave(self._tree)):
            raise RuntimeError(f"orbax declined to save step {step}")

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def restore(self, step: int) -> Any:
        return self._manager.restore(step, args=self._ocp.args.StandardRestore(self._abstract))

    def step_path(self, step: int) -> Path:
        return self._dir / str(step)

    def reference(self) -> Any:
        return self._tree

    def close(self) -> None:
        self._manager.close()


def _torch_leaf(torch: Any, leaf: Any) -> Any:
    if isinstance(leaf, jax.Array) and leaf.dtype == jnp.uint32:
        # Key data: torch's uint32 support is partial; the same bits as int32 are equal-size.
        leaf = jax.lax.bitcast_convert_type(leaf, jnp.int32)
    if isinstance(leaf, jax.Array):
        if jax.default_backend() == "cpu":
            host = np.asarray(leaf)
            if host.dtype == jnp.bfloat16:  # numpy has no bf16: go through the bits.
                return torch.from_numpy(host.view(np.uint16).copy()).view(torch.bfloat16)
            return torch.from_numpy(host.copy())
        return torch.from_dlpack(leaf)
    return torch.tensor(leaf)


class TorchDCPAdapter(Adapter):
    """PyTorch DCP ``async_save`` (default thread executor) on an equal-size state dict.

    The state dict holds one tensor per array leaf of the Orbax variant (same shapes, dtypes and
    values; on an accelerator the tensors share the JAX buffers through DLPack) and the step as a
    0-d tensor. Each step goes to its own ``checkpoint_id`` folder.
    """

    name = "torch_dcp"
    state_note = "an equal-size state dict of torch tensors (Orbax variant's arrays)"

    def __init__(self, state: BenchState, directory: Path) -> None:
        if importlib.util.find_spec("torch") is None:
            raise Unavailable("torch is not installed (pip install torch to compare with DCP)")
        import torch
        import torch.distributed.checkpoint as dcp

        self._torch = torch
        self._dcp = dcp
        flat, _ = jax.tree_util.tree_flatten_with_path(state.orbax_tree)
        # Torch-style names: "params.h_0.attn.c_attn.kernel".
        names = [jax.tree_util.keystr(p, simple=True, separator=".") for p, _ in flat]
        self._state = {n: _torch_leaf(torch, x) for n, (_, x) in zip(names, flat, strict=True)}
        self._dir = directory
        self._pending: list[Any] = []
        self._cuda = any(t.is_cuda for t in self._state.values())
        # Without a process group DCP must be told it is not distributed, where it can be.
        self._kw = {}
        if "no_dist" in inspect.signature(dcp.async_save).parameters:
            self._kw = {"no_dist": True}

    def save(self, step: int) -> None:
        result = self._dcp.async_save(
            self._state, checkpoint_id=str(self.step_path(step)), **self._kw
        )
        self._pending.append(getattr(result, "upload_completion", result))

    def wait(self) -> None:
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def restore(self, step: int) -> Any:
        target = {k: self._torch.empty_like(v) for k, v in self._state.items()}
        kw = {"no_dist": True} if "no_dist" in inspect.signature(self._dcp.load).parameters else {}
        self._dcp.load(target, checkpoint_id=str(self.step_path(step)), **kw)
        if self._cuda:
            self._torch.cuda.synchronize()
        return target

    def step_path(self, step: int) -> Path:
        return self._dir / f"step_{step}"

    def reference(self) -> Any:
        return self._state

    def close(self) -> None:
        self.wait()


ADAPTERS: dict[str, type[Adapter]] = {
    "datarax_ckpt": OursAdapter,
    "orbax": OrbaxAdapter,
    "torch_dcp": TorchDCPAdapter,
    "datarax_ckpt_incremental": OursIncrementalAdapter,
}


def make_adapter(name: str, state: BenchState, directory: Path) -> Adapter:
    """Creates the adapter for system ``name`` writing under ``directory``.

    Raises:
        Unavailable: The system cannot run here.
    """
    directory.mkdir(parents=True, exist_ok=True)
    return ADAPTERS[name](state, directory)


def remove_path(path: Path) -> None:
    """Deletes a step folder or file, if present, then lets the filesystem settle.

    ``os.sync()`` makes the kernel finish freeing the deleted blocks now, outside the timed
    regions: left to run in the background it slowed the next sample (a 2000-leaf ``save()``
    took ~47 ms right after deleting the previous step, ~32 ms with the sync).
    """
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    os.sync()
