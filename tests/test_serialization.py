"""Exactness of datarax_ckpt.serialization: every supported leaf comes back as it went in."""

import collections
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _trees import assert_identical, cpu_mesh
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datarax_ckpt import StructureMismatchError, serialization
from datarax_ckpt._errors import CheckpointFormatError

Pair = collections.namedtuple("Pair", "first second")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Params:
    w: jax.Array
    b: jax.Array


def roundtrip(tree, target=None, **kwargs):
    arrays, manifest = serialization.serialize(tree, **kwargs)
    manifest = json.loads(json.dumps(manifest))  # exactly what goes to disk
    return serialization.deserialize(arrays, manifest, target)


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        -(2**80),
        1.5,
        -0.0,
        float("inf"),
        float("nan"),
        1 + 2j,
        "",
        "plain",
        "Unicode: é 漢字 🚀 \x00 and a lone surrogate \ud800",
        b"",
        b"\x00\xffbytes",
        (),
        [],
        {},
        (1, [2, (3,)], {"a": None}),
        {"0": "str key", 0: "int key", "__string__": 1, "__metadata__": 2, "__state__": 3},
        np.float32(1.25),
        np.int8(-3),
        np.bool_(True),
    ],
    ids=repr,
)
def test_python_values_round_trip_with_exact_types(value):
    assert_identical(roundtrip({"v": value}), {"v": value})


@pytest.mark.parametrize(
    "dtype", ["float32", "float16", "bfloat16", "float64", "int8", "int32", "uint32", "bool"]
)
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 0, 4), (5, 7)])
@pytest.mark.parametrize("lib", ["jax", "numpy"])
def test_arrays_round_trip_bit_exactly(dtype, shape, lib):
    rng = np.random.default_rng(0)
    raw = rng.standard_normal(shape) * 100
    value = np.asarray(raw).astype(jnp.dtype(dtype))
    if lib == "jax":
        value = jnp.asarray(value)
    assert_identical(roundtrip({"x": value}), {"x": value})


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg", "unsafe_rbg"])
@pytest.mark.parametrize("batch", [(), (3,), (2, 2)])
def test_typed_prng_keys_keep_their_impl_and_batch_shape(impl, batch):
    key = jax.random.key(7, impl=impl)
    keys = jax.random.split(key, batch) if batch else key
    restored = roundtrip({"k": keys})["k"]
    assert_identical(restored, keys)
    # The restored key draws the same numbers.
    flat_restored = restored.reshape(-1)[0] if batch else restored
    flat_keys = keys.reshape(-1)[0] if batch else keys
    assert jax.random.normal(flat_restored) == jax.random.normal(flat_keys)


def test_long_string_is_one_buffer():
    text = "αβγ-" * 1250  # 5,000 characters
    arrays, manifest = serialization.serialize({"s": text})
    restored = serialization.deserialize(arrays, manifest)
    assert restored["s"] == text
    assert len(arrays) == 1  # one uint8 buffer, not a leaf per character
    assert list(manifest["slots"][0]["shape"]) == [len(text.encode())]


def test_packing_on_and_off_read_each_other():
    tree = {"a": jnp.arange(10.0), "c": jnp.ones(2), "b": np.arange(4), "big": jnp.ones(300_000)}
    tree["s"], tree["t"] = "x", "yz"
    packed_arrays, packed_manifest = serialization.serialize(tree)
    plain_arrays, plain_manifest = serialization.serialize(tree, pack_threshold_bytes=0)
    assert len(packed_arrays) < len(plain_arrays)
    assert_identical(serialization.deserialize(packed_arrays, packed_manifest), tree)
    assert_identical(serialization.deserialize(plain_arrays, plain_manifest), tree)


def test_namedtuples_and_dataclasses_come_back_with_a_target():
    tree = {"opt": Pair(jnp.ones(2), (jnp.zeros(1), None)), "p": Params(jnp.ones(3), jnp.ones(1))}
    assert_identical(roundtrip(tree, target=tree), tree)
    # Without a target, custom nodes come back as dicts of their fields.
    plain = roundtrip(tree)
    assert set(plain["opt"]) == {"first", "second"}
    assert set(plain["p"]) == {"w", "b"}


def test_target_gives_dtype_and_sharding():
    mesh = cpu_mesh((4,), ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    tree = {"w": jnp.arange(8.0)}
    target = {"w": jax.ShapeDtypeStruct((8,), jnp.bfloat16, sharding=sharding)}
    restored = roundtrip(tree, target=target)["w"]
    assert restored.dtype == jnp.bfloat16
    assert restored.sharding == sharding
    np.testing.assert_array_equal(np.asarray(restored, np.float32), np.arange(8.0))


def test_leaves_on_one_cpu_device_are_packed_in_host_memory_whatever_lies_between():
    # Arrays out of jax.jit each have their own sharding object. Leaves on one CPU device
    # are packed in host memory (pinned, not copied on the device), also after a leaf
    # sharded over four devices (stored alone) or on another device.
    cpu = jax.devices("cpu")
    sharded = jax.sharding.NamedSharding(cpu_mesh((4,), ("x",)), jax.sharding.PartitionSpec("x"))
    step = jax.jit(lambda t: jax.tree.map(lambda x: x + 1, t))

    def jitted(n, device):
        return step([jax.device_put(np.full(4, i, np.float32), device) for i in range(n)])

    tree = {
        "a": jitted(3, cpu[0]),
        "mesh": jax.device_put(np.arange(16.0, dtype=np.float32), sharded),
        "key": jax.random.key(0),
        "b": jitted(2, cpu[0]),
        "c": jitted(1, cpu[1]),
    }
    arrays, manifest = serialization.serialize(tree)
    packs = manifest["packs"]
    where = [packs[s["pack"]]["lib"] if "pack" in s else "alone" for s in manifest["slots"]]
    assert where == ["host"] * 3 + ["alone"] + ["host"] * 4
    assert_identical(serialization.deserialize(arrays, manifest, tree), tree)


def test_numpy_target_restores_numpy():
    restored = roundtrip({"w": jnp.arange(3)}, target={"w": np.zeros(3, np.int32)})["w"]
    assert isinstance(restored, np.ndarray)


@pytest.mark.parametrize(
    "target, match",
    [
        ({"w": jnp.zeros(4)}, r"at \['w'\]: the target has shape \(4,\)"),
        ({"w": jnp.zeros(3), "extra": 1}, r"missing from checkpoint: \['extra'\]"),
        ({"w": "text"}, r"at \['w'\]: the target has str"),
        ([jnp.zeros(3)], r"at <root>: the target has list, the checkpoint has a dict"),
    ],
)
def test_mismatched_target_names_path_expected_and_found(target, match):
    arrays, manifest = serialization.serialize({"w": jnp.zeros(3)})
    with pytest.raises(StructureMismatchError, match=match):
        serialization.deserialize(arrays, manifest, target)


@pytest.mark.parametrize(
    "leaf, kind",
    [(object(), "builtins.object"), (frozenset(), "builtins.frozenset"), ({1, 2}, "builtins.set")],
)
def test_unsupported_leaf_names_path_and_type(leaf, kind):
    with pytest.raises(TypeError, match=rf"Leaf \['a'\]\[0\] has unsupported type .*{kind}"):
        serialization.serialize({"a": [leaf]})


def test_unsupported_dict_key_is_named():
    with pytest.raises(TypeError, match=r"Dict at \['a'\] has a key \(1, 2\) of type tuple"):
        serialization.serialize({"a": {(1, 2): 0}})


def test_tracer_is_refused_with_advice():
    def f(x):
        serialization.serialize({"x": x})
        return x

    with pytest.raises(TypeError, match="inside jax.jit"):
        jax.jit(f)(jnp.ones(2))


def test_newer_format_version_is_refused():
    arrays, manifest = serialization.serialize({"a": 1})
    manifest["version"] = serialization.FORMAT_VERSION + 1
    with pytest.raises(CheckpointFormatError, match="Upgrade datarax_ckpt"):
        serialization.deserialize(arrays, manifest)


def test_captured_arrays_are_independent_of_the_callers_buffers():
    x = np.arange(5.0)
    big = np.ones(400_000)
    arrays, manifest = serialization.serialize({"x": x, "big": big})
    x[:] = -1
    big[:] = -1
    restored = serialization.deserialize(arrays, manifest)
    np.testing.assert_array_equal(restored["x"], np.arange(5.0))
    assert (restored["big"] == 1).all()


# ----------------------------------------------------------------- property-based

# Narrow dtypes too, those TensorStore stores (it refuses uint4, uint2 and some float6/8:
# docs/errors.md row 52); the round trip compares the bits of whatever the cast gives.
_dtypes = st.sampled_from(
    ["float32", "bfloat16", "int32", "uint8", "bool", "float16"]
    + ["int4", "int2", "float8_e4m3fn", "float8_e5m2", "float4_e2m1fn"]
)
_shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)


@st.composite
def _arrays(draw):
    dtype, shape = draw(_dtypes), draw(_shapes)
    seed = draw(st.integers(0, 2**16))
    data = np.random.default_rng(seed).standard_normal(shape) * 50
    value = data.astype(jnp.dtype(dtype))
    return jnp.asarray(value) if draw(st.booleans()) else value


_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(),
    st.binary(),
    _arrays(),
    st.integers(0, 2**16).map(jax.random.key),
)
_keys = st.one_of(st.text(max_size=8), st.integers(-5, 5))
_trees = st.recursive(
    _leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(_keys, children, max_size=4),
    ),
    max_leaves=20,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=_trees, threshold=st.sampled_from([0, 64, 1 << 20]))
def test_random_trees_round_trip_exactly(tree, threshold):
    assert_identical(roundtrip(tree, pack_threshold_bytes=threshold), tree)
    assert_identical(roundtrip(tree, target=tree, pack_threshold_bytes=threshold), tree)


def test_packed_leaves_are_split_into_bins(monkeypatch):
    from datarax_ckpt import _snapshot

    monkeypatch.setattr(_snapshot, "PACK_BIN_BYTES", 1024)
    tree = {f"l{i}": np.full(100, i, np.float32) for i in range(12)}  # 400 bytes each
    arrays, manifest = serialization.serialize(tree)
    assert [p["size"] for p in manifest["packs"]] == [200] * 6  # two leaves per 1 KiB bin
    assert_identical(serialization.deserialize(arrays, manifest), tree)


def test_function_leaves_need_a_target_and_other_callables_are_refused(caplog):
    # Equinox keeps activations as leaves: functions are recorded by name, not stored.
    arrays, manifest = serialization.serialize({"act": jax.nn.relu, "w": jnp.ones(2)})
    with caplog.at_level("WARNING", logger="datarax_ckpt"):
        restored = serialization.deserialize(arrays, manifest)
    assert restored["act"] is None
    assert "function leaves (['act'])" in caplog.text
    onto = serialization.deserialize(arrays, manifest, {"act": jnp.tanh, "w": jnp.zeros(2)})
    assert onto["act"] is jnp.tanh

    class Model:  # a callable object is not a function: it would be lost, so refuse it
        def __call__(self, x):
            return x

    with pytest.raises(TypeError, match=r"Leaf \['m'\] has unsupported type .*Model"):
        serialization.serialize({"m": Model()})
