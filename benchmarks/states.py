"""States to checkpoint, always filled with random values (Orbax compresses constants)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.config import MIB, CaseConfig

# GPT-2 small (Radford et al., 2019): 12 blocks, width 768, vocabulary 50257, context 1024.
GPT2_WIDTH = 768
GPT2_VOCAB = 50257
GPT2_CONTEXT = 1024
RUN_NAME = "bench-gpt2-small"

ORBAX_VARIANT_NOTE = (
    "raw Orbax (StandardSave) rejects str leaves, and this suite gives it typed PRNG keys as "
    "raw key data: it saves the identical state minus the run-name string, with the key as "
    "jax.random.key_data(key)"
)


@dataclasses.dataclass
class BenchState:
    """A state built for one case.

    Attributes:
        tree: The full state, as this project's handler saves it.
        orbax_tree: The same arrays for raw Orbax: no ``str`` leaves, typed keys as key data.
        nbytes: Bytes of the array leaves of ``tree``.
        num_leaves: Leaves of ``tree`` (arrays, keys, ints and strings).
        description: One line describing the state.
        notes: Differences between the variants, for the report.
    """

    tree: Any
    orbax_tree: Any
    nbytes: int
    num_leaves: int
    description: str
    notes: list[str]
    # The state saved at each step, for states that change between saves: ``(tree,
    # orbax_tree)`` of ``step``. None saves ``tree`` every time.
    at_step: Any = None

    def trees(self, step: int) -> tuple[Any, Any]:
        """``(tree, orbax_tree)`` saved at ``step``."""
        return self.at_step(step) if self.at_step is not None else (self.tree, self.orbax_tree)


class _Filler:
    """Makes random arrays on the default device.

    On CPU, numpy's generator is about twice as fast as ``jax.random``; on an accelerator the
    values are drawn on the device so nothing large crosses the host link.
    """

    def __init__(self, seed: int) -> None:
        self._np = np.random.default_rng(seed)
        self._key = jax.random.key(seed)
        self._on_cpu = jax.default_backend() == "cpu"

    def __call__(self, shape: tuple[int, ...], dtype: str) -> jax.Array:
        dt = jnp.dtype(dtype)
        if self._on_cpu:
            if jnp.issubdtype(dt, jnp.integer):
                info = np.iinfo(dt)
                host = self._np.integers(info.min, info.max, size=shape, dtype=dt, endpoint=True)
            else:
                host = self._np.random(size=shape, dtype=np.float32) - np.float32(0.5)
                host = host.astype(dt) if dt != np.float32 else host
            return jax.block_until_ready(jax.device_put(host))
        self._key, sub = jax.random.split(self._key)
        if jnp.issubdtype(dt, jnp.integer):
            info = jnp.iinfo(dt)
            return jax.random.randint(sub, shape, info.min, info.max, dtype=dt)
        return jax.random.uniform(sub, shape, dt, minval=-0.5, maxval=0.5)


def _gpt2_params(fill: _Filler, width: int, vocab: int, layers: int, dtype: str) -> dict:
    """A GPT-2 parameter tree shaped like Flax's GPT-2 (kernels stored input-major)."""

    def dense(n_in: int, n_out: int) -> dict:
        return {"kernel": fill((n_in, n_out), dtype), "bias": fill((n_out,), dtype)}

    def norm() -> dict:
        return {"scale": fill((width,), dtype), "bias": fill((width,), dtype)}

    params: dict[str, Any] = {
        "wte": {"embedding": fill((vocab, width), dtype)},
        "wpe": {"embedding": fill((GPT2_CONTEXT, width), dtype)},
    }
    for i in range(layers):
        params[f"h_{i}"] = {
            "ln_1": norm(),
            "attn": {"c_attn": dense(width, 3 * width), "c_proj": dense(width, width)},
            "ln_2": norm(),
            "mlp": {"c_fc": dense(width, 4 * width), "c_proj": dense(4 * width, width)},
        }
    params["ln_f"] = norm()
    return params


def _gpt2_state(case: CaseConfig, fill: _Filler, seed: int) -> tuple[dict, str]:
    width = max(1, round(GPT2_WIDTH * case.width_scale))
    vocab = max(1, round(GPT2_VOCAB * case.width_scale))
    params = _gpt2_params(fill, width, vocab, case.layers, case.param_dtype)
    mu = _gpt2_params(fill, width, vocab, case.layers, case.moment_dtype)
    nu = _gpt2_params(fill, width, vocab, case.layers, case.moment_dtype)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    state = {
        "params": params,
        "opt_state": {"count": jnp.asarray(1000, jnp.int32), "mu": mu, "nu": nu},
        "step": 1000,
        "rng": jax.random.key(seed),
        "run_name": RUN_NAME,
    }
    desc = (
        f"GPT-2-shaped training state: {case.layers} blocks, width {width}, vocab {vocab}, "
        f"context {GPT2_CONTEXT} ({n_params / 1e6:.1f}M params, {case.param_dtype}) with Adam "
        f"mu/nu ({case.moment_dtype}), an int32 count, a python-int step, a typed PRNG key and "
        f"a run-name string"
    )
    return state, desc


def orbax_variant(tree: Any) -> Any:
    """Returns ``tree`` without ``str`` leaves and with typed PRNG keys as raw key data."""
    if isinstance(tree, dict):
        return {k: orbax_variant(v) for k, v in tree.items() if not isinstance(v, str)}
    if isinstance(tree, list | tuple):
        return type(tree)(orbax_variant(v) for v in tree if not isinstance(v, str))
    if isinstance(tree, jax.Array) and jnp.issubdtype(tree.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(tree)
    return tree


def array_bytes(tree: Any) -> int:
    """Bytes held by the array leaves of ``tree`` (typed keys counted as their key data)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        if isinstance(leaf, jax.Array | np.ndarray):
            total += leaf.nbytes
    return total


def build_state(case: CaseConfig, seed: int) -> BenchState:
    """Builds the random state described by ``case``.

    Args:
        case: The case to build.
        seed: Seed for the random fill.

    Returns:
        The state, its Orbax variant and their sizes.
    """
    fill = _Filler(seed)
    itemsize = jnp.dtype(case.dtype).itemsize
    notes: list[str] = []
    at_step = None
    if case.kind == "finetune":
        tree, desc, at_step = _finetune_state(case, fill)
    elif case.kind == "equal":
        per_leaf = max(1, int(case.size_mb * MIB) // itemsize // case.num_leaves)
        tree = {f"leaf_{i:03d}": fill((per_leaf,), case.dtype) for i in range(case.num_leaves)}
        desc = f"{case.num_leaves} equal {case.dtype} leaves of {per_leaf * itemsize / MIB:g} MiB"
    elif case.kind == "many_small":
        per_leaf = max(1, int(case.leaf_kib * 1024) // itemsize)
        tree = {f"leaf_{i:05d}": fill((per_leaf,), case.dtype) for i in range(case.num_leaves)}
        desc = f"{case.num_leaves} {case.dtype} leaves of {per_leaf * itemsize / 1024:g} KiB"
    else:
        tree, desc = _gpt2_state(case, fill, seed)
        notes.append(ORBAX_VARIANT_NOTE)
    if case.changing and at_step is None:
        at_step = _alternating(tree)
        desc += "; every array changes at every save (two variants, alternating)"
    return BenchState(
        tree=tree,
        orbax_tree=orbax_variant(tree),
        nbytes=array_bytes(tree),
        num_leaves=len(jax.tree.leaves(tree)),
        description=desc,
        notes=notes,
        at_step=at_step,
    )


def _alternating(tree: Any) -> Any:
    """``at_step`` giving ``tree`` at even steps and ``tree`` + 1 at odd steps."""

    def bump(x: Any) -> Any:
        if isinstance(x, jax.Array) and not jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.block_until_ready(x + jnp.ones((), x.dtype))
        return x

    variants = [(t, orbax_variant(t)) for t in (tree, jax.tree.map(bump, tree))]
    return lambda step: variants[step % 2]


def _finetune_state(case: CaseConfig, fill: _Filler) -> tuple[dict, str, Any]:
    """A frozen bf16 base of ``size_mb`` in 64 MiB kernels, and f32 trainable arrays of
    ``trainable_mb`` (4 MiB each) with Adam moments; at each step only the trainable part
    and its moments change (two variants, alternating: consecutive steps always differ)."""
    base_leaves = max(1, round(case.size_mb / 64))
    per_base = int(case.size_mb * MIB) // 2 // base_leaves
    base = {f"layer_{i:02d}": {"kernel": fill((per_base,), "bfloat16")} for i in range(base_leaves)}
    n_train = max(1, round(case.trainable_mb / 4))
    per_train = int(case.trainable_mb * MIB) // 4 // n_train

    def trainable() -> dict:
        return {f"lora_{i}": fill((per_train,), "float32") for i in range(n_train)}

    variants = []
    for _ in range(2):
        tree = {
            "base": base,
            "trainable": trainable(),
            "opt_state": {"count": 1000, "mu": trainable(), "nu": trainable()},
        }
        variants.append((tree, orbax_variant(tree)))
    desc = (
        f"fine-tuning: a frozen bf16 base of {case.size_mb:g} MiB ({base_leaves} kernels) and "
        f"{case.trainable_mb:g} MiB of f32 trainable arrays ({n_train}) with Adam mu/nu "
        f"({3 * case.trainable_mb:g} MiB change at every save; the base is the same arrays)"
    )
    return variants[0][0], desc, lambda step: variants[step % 2]
