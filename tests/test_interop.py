"""export_orbax / import_orbax: out to plain Orbax and safetensors, in from raw Orbax runs."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from _trees import assert_identical

from datarax_ckpt import (
    CheckpointExistsError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    OrbaxCheckpointHandler,
    export_orbax,
    import_orbax,
)


def gpt2_state(seed=0, layers=2, d=64, vocab=512):
    """A GPT-2-shaped state (small): embeddings, blocks, final norm, Adam moments, keys."""
    rng = np.random.default_rng(seed)

    def w(*shape, dtype=jnp.float32):
        return jnp.asarray(rng.standard_normal(shape), dtype)

    def block():
        return {
            "ln_1": {"scale": w(d), "bias": w(d)},
            "attn": {
                "c_attn": {"kernel": w(d, 3 * d), "bias": w(3 * d)},
                "c_proj": {"kernel": w(d, d), "bias": w(d)},
            },
            "ln_2": {"scale": w(d), "bias": w(d)},
            "mlp": {
                "c_fc": {"kernel": w(d, 4 * d, dtype=jnp.bfloat16), "bias": w(4 * d)},
                "c_proj": {"kernel": w(4 * d, d), "bias": w(d)},
            },
        }

    params = {
        "wte": w(vocab, d),
        "wpe": w(128, d),
        "h": [block() for _ in range(layers)],
        "ln_f": {"scale": w(d), "bias": w(d)},
    }
    return {
        "params": params,
        "opt_state": {
            "count": jnp.asarray(7, jnp.int32),
            "mu": jax.tree.map(jnp.zeros_like, params),
        },
        "rng": jax.random.key(seed),
        "dropout_rng": jax.random.key(seed + 1, impl="rbg"),
        "data": {"position": np.int64(12345), "shard": np.arange(4, dtype=np.uint16)},
        "run": "gpt2-small ünïcode",
        "tokenizer": b"\x00\xffmerges",
        "step": 100,
        "lr": 3e-4,
        "done": False,
        "note": None,
        "mask": jnp.zeros((0, 3), jnp.bool_),
        "shape": (1, 2),
    }


def digests(flat):
    return {
        k: [
            np.asarray(v).dtype.name,
            list(np.shape(v)),
            hashlib.sha256(np.asarray(v).tobytes()).hexdigest(),
        ]
        for k, v in flat.items()
    }


def expected_arrays(state):
    flat = {}

    def walk(x, keys):
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, [*keys, str(k)])
        elif isinstance(x, list | tuple):
            for i, v in enumerate(x):
                walk(v, [*keys, str(i)])
        elif isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            flat[".".join(keys)] = jax.random.key_data(x)
        elif isinstance(x, jax.Array | np.ndarray | np.generic) and np.size(x):
            flat[".".join(keys)] = x

    walk(state, [])
    return digests(flat)


# Runs with datarax_ckpt blocked: what a team that dropped the library, or a serving stack, has.
READER = textwrap.dedent("""
    import hashlib, json, sys
    sys.modules["datarax_ckpt"] = None
    try:
        import datarax_ckpt
    except ImportError:
        pass
    else:
        raise SystemExit("datarax_ckpt is importable")
    import numpy as np
    out, fmt = sys.argv[1], sys.argv[2]
    flat = {}
    if fmt == "orbax":
        import orbax.checkpoint as ocp
        def walk(x, keys):
            if isinstance(x, dict):
                for k, v in x.items():
                    walk(v, [*keys, k])
            elif isinstance(x, list):
                for i, v in enumerate(x):
                    walk(v, [*keys, str(i)])
            elif x is not None:
                flat[".".join(keys)] = np.asarray(x)
        walk(ocp.StandardCheckpointer().restore(out), [])
    else:
        import ml_dtypes  # noqa: F401 - numpy learns "bfloat16" (torch and flax know it)
        from safetensors.numpy import load_file
        flat = load_file(out + "/model.safetensors")
    print(json.dumps({k: [v.dtype.name, list(v.shape), hashlib.sha256(v.tobytes()).hexdigest()]
                      for k, v in flat.items()}))
    print(open(out + "/datarax_export.json").read())
""")


@pytest.mark.parametrize("fmt", ["orbax", "safetensors"])
def test_an_export_restores_bit_exactly_without_datarax_ckpt(tmp_path, fmt):
    state = gpt2_state()
    with OrbaxCheckpointHandler(pack_threshold_bytes=4096) as handler:  # packed and single arrays
        handler.save(tmp_path / "run", gpt2_state(1), step=50)
        handler.save(tmp_path / "run", state, step=100, metadata={"loss": 2.5})
    out = export_orbax(tmp_path / "run", tmp_path / "exported", format=fmt)
    assert out == tmp_path / "exported" and sorted(os.listdir(tmp_path)) == ["exported", "run"]
    result = subprocess.run(
        [sys.executable, "-c", READER, str(out), fmt], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    arrays_line, doc = result.stdout.split("\n", 1)
    assert json.loads(arrays_line) == expected_arrays(state)
    doc = json.loads(doc)
    assert (doc["step"], doc["metadata"], doc["arrays"]) == (100, {"loss": 2.5}, fmt)
    assert doc["leaves"]["rng"] == {"kind": "key", "impl": "threefry2x32"}
    assert doc["leaves"]["dropout_rng"] == {"kind": "key", "impl": "rbg"}
    assert doc["leaves"]["run"] == {"kind": "str", "value": "gpt2-small ünïcode"}
    assert doc["leaves"]["tokenizer"] == {"kind": "bytes", "base64": "AP9tZXJnZXM="}
    assert doc["leaves"]["step"] == {"kind": "int", "value": 100}
    assert doc["leaves"]["note"] == {"kind": "none", "value": None}
    assert doc["leaves"]["mask"] == {"kind": "array", "dtype": "bool", "shape": [0, 3]}


def test_export_picks_a_step_and_refuses_an_existing_folder(tmp_path):
    with OrbaxCheckpointHandler() as handler:
        for step in (1, 2):
            handler.save(tmp_path / "run", {"w": jnp.full(3, step, jnp.float32)}, step=step)
    out = export_orbax(tmp_path / "run", tmp_path / "one", step=1)
    assert ocp.StandardCheckpointer().restore(out)["w"].tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(CheckpointExistsError, match="exists; pass a new folder"):
        export_orbax(tmp_path / "run", out)
    with pytest.raises(CheckpointNotFoundError, match="Available steps: \\[1, 2\\]"):
        export_orbax(tmp_path / "run", tmp_path / "three", step=3)
    with pytest.raises(ValueError, match="format must be one of"):
        export_orbax(tmp_path / "run", tmp_path / "x", format="npz")
    assert not (tmp_path / "three").exists() and not (tmp_path / "x").exists()


def test_an_export_imports_back_with_its_strings_keys_and_metadata(tmp_path):
    state = gpt2_state()
    with OrbaxCheckpointHandler() as handler:
        handler.save(tmp_path / "run", state, step=100, metadata={"loss": 2.5})
    export_orbax(tmp_path / "run", tmp_path / "exported")
    assert import_orbax(tmp_path / "exported", tmp_path / "back") == [100]
    with OrbaxCheckpointHandler() as handler:
        back = handler.restore(tmp_path / "back")
        assert handler.restore(tmp_path / "back", metadata_only=True) == {"loss": 2.5}
    assert_identical(plain(back), plain(state))


def plain(x):
    """What an export keeps: numpy arrays, lists for tuples, keys as keys, other leaves as is.

    Orbax restores dict keys sorted.
    """
    if isinstance(x, dict):
        return {k: plain(x[k]) for k in sorted(x)}
    if isinstance(x, list | tuple):
        return [plain(v) for v in x]
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return x
    if isinstance(x, jax.Array | np.ndarray | np.generic):
        return np.asarray(x)
    return x


RAW = {
    "default-item": dict(prefix=None, item=None),  # 0/default/
    "step_-named": dict(prefix="step", item="state"),  # step_10/state/ + extra/
    "ckpt_-named": dict(prefix="ckpt", item="default"),  # ckpt_5/default/
}


@pytest.mark.parametrize("layout", sorted(RAW))
def test_a_raw_orbax_run_imports_and_restores_bit_exactly(tmp_path, layout):
    prefix, item = RAW[layout]["prefix"], RAW[layout]["item"]
    raw = tmp_path / "raw"
    states = {
        step: {
            "params": {
                "b": jnp.arange(32, dtype=jnp.bfloat16),  # keys sorted, as Orbax restores
                "w": jnp.asarray(
                    np.random.default_rng(step).standard_normal((64, 32)), jnp.float32
                ),
            },
            "host": np.arange(6, dtype=np.int16).reshape(2, 3) * step,
            "rng": jax.random.key(step),
            "step": step,
        }
        for step in (0, 5, 10)
    }
    options = ocp.CheckpointManagerOptions(step_prefix=prefix)
    with ocp.CheckpointManager(raw, options=options) as manager:
        for step, state in states.items():
            if item == "state":
                args = ocp.args.Composite(
                    state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave({"loss": step / 10})
                )
            else:
                args = ocp.args.StandardSave(state)
            manager.save(step, args=args)
    assert import_orbax(raw, tmp_path / "ours") == [0, 5, 10]
    with OrbaxCheckpointHandler() as handler:
        assert handler.get_checkpoint_steps(tmp_path / "ours") == [0, 5, 10]
        for step, state in states.items():
            assert handler.verify(tmp_path / "ours", step=step).ok
            restored = handler.restore(tmp_path / "ours", step=step)
            assert_identical(restored, {k: state[k] for k in sorted(state)})  # Orbax sorts keys
            meta = handler.restore(tmp_path / "ours", step=step, metadata_only=True)
            assert meta["imported_from"].endswith(
                os.sep + f"{prefix}_{step}" if prefix else str(step)
            )
            if item == "state":
                assert meta["extra"] == {"loss": step / 10}


def test_import_refuses_what_it_cannot_bring(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="holds no Orbax checkpoint"):
        import_orbax(tmp_path / "empty", tmp_path / "ours")
    with OrbaxCheckpointHandler() as handler:
        handler.save(tmp_path / "ours", {"w": jnp.ones(2)}, step=1)
    with pytest.raises(CheckpointFormatError, match="already a datarax_ckpt directory"):
        import_orbax(tmp_path / "ours", tmp_path / "again")
    with ocp.CheckpointManager(tmp_path / "raw") as manager:
        manager.save(1, args=ocp.args.StandardSave({"w": jnp.ones(2)}))
    with pytest.raises(CheckpointExistsError, match="already holds checkpoints"):
        import_orbax(tmp_path / "raw", tmp_path / "ours")


def test_a_state_that_is_one_array_exports_under_value(tmp_path):
    with OrbaxCheckpointHandler() as handler:
        handler.save(tmp_path / "run", jnp.arange(3.0), step=1)
    out = export_orbax(tmp_path / "run", tmp_path / "exported")
    assert ocp.StandardCheckpointer().restore(out)["value"].tolist() == [0.0, 1.0, 2.0]


def test_a_flax_nnx_model_and_optimizer_export_as_nested_arrays(tmp_path):
    from datarax_ckpt import demo

    model, optimizer, data = demo.fresh(8, 0)
    state = {"model": model, "optimizer": optimizer, "data": data}
    with OrbaxCheckpointHandler() as handler:
        handler.save(tmp_path / "run", state, step=1)
    out = export_orbax(tmp_path / "run", tmp_path / "exported")
    arrays = ocp.StandardCheckpointer().restore(out)
    kernel = arrays["model"]["hidden"]["kernel"]
    assert kernel.tobytes() == np.asarray(model.hidden.kernel[...]).tobytes()
    opt_state = arrays["optimizer"]["opt_state"]["0"]  # NNX holds optax's tuple as {0: ...}
    mu = opt_state["mu"]["hidden"]["kernel"]
    assert mu.shape == (8, 8) and arrays["data"]["position"] is None  # an int: in the JSON
