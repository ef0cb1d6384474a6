"""Strict JAX for the whole test suite, as Equinox does; the shared ``handler`` fixture;
a local S3 server for test_s3."""

import itertools
import os

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")
# Four CPU devices so sharded arrays can be saved and restored without an accelerator.
jax.config.update("jax_num_cpu_devices", 4)


_buckets = itertools.count()


@pytest.fixture
def handler():
    """An ``OrbaxCheckpointHandler`` with default options, closed after the test (a test
    file that needs other options defines its own ``handler``)."""
    from datarax_ckpt import OrbaxCheckpointHandler

    with OrbaxCheckpointHandler() as h:
        yield h


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on a free loopback port, with the AWS environment pointing at it
    (restored after the module, so no other test file sees it)."""
    import _s3server

    server, env = _s3server.start()
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


@pytest.fixture
def s3_dir(s3_server):
    """``s3://<a new bucket>/run``: a checkpoint directory on the S3 server."""
    import _s3server

    bucket = f"bucket-{os.getpid()}-{next(_buckets)}"
    _s3server.create_bucket(bucket)
    return f"s3://{bucket}/run"
