"""Tree equality for tests: same types, containers, dict key order, dtypes, shapes, bits."""

import dataclasses

import jax
import numpy as np


def assert_identical(a, b, path="root"):
    """Same types, containers, dict key order, dtypes, shapes and bits."""
    assert type(a) is type(b), f"{path}: {type(a)} != {type(b)}"
    if isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_identical(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{path}[{i}]")
    elif isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
        assert jax.random.key_impl(a) == jax.random.key_impl(b), path
        assert_identical(jax.random.key_data(a), jax.random.key_data(b), path)
    elif isinstance(a, jax.Array | np.ndarray | np.generic):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{a.shape}"
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), path
    elif isinstance(a, float):
        assert repr(a) == repr(b), path  # -0.0, nan, inf exactly
    elif dataclasses.is_dataclass(a):
        for field in dataclasses.fields(a):
            assert_identical(getattr(a, field.name), getattr(b, field.name), f"{path}.{field.name}")
    else:
        assert a == b, path


def cpu_mesh(shape, names):
    """A mesh of the 4 CPU devices conftest creates, also where an accelerator is the default."""
    devices = jax.devices("cpu")[: int(np.prod(shape))]
    return jax.make_mesh(shape, names, devices=devices)
