"""S3-compatible object storage (AWS S3, MinIO, Cloudflare R2, CoreWeave): all S3-specific code.

Orbax drives the steps on ``s3://`` as it does on ``gs://``, with three additions
(see ``docs/storage.md``):

* **Arrays** go through TensorStore's ``s3`` kvstore driver. Orbax builds TensorStore
  specs only for local paths and ``gs://`` (``tensorstore_utils.build_kvstore_tspec``
  raises "Checkpoint path should be absolute" for ``s3://``). ``_orbax.teach_s3_specs`` wraps that
  one function: an ``s3://`` directory is given to Orbax's own ``gs://`` builder (so the
  OCDBT options, read coalescing and per-process layout stay Orbax's) and every ``gcs``
  driver in the result becomes an ``s3`` driver with the endpoint and region below.
  Every other path is passed through untouched.
* **The commit protocol** is Orbax's own ``AtomicityMode.COMMIT_FILE`` (the one it uses
  on GCS): a step is written in place under ``ckpt-<step>/`` and ``commit_success.txt``
  is written last. Object stores have no atomic rename, so nothing is renamed.
* **Retention** removes the commit marker first (``_orbax.MarkerFirstDeleter``), then
  the rest of the step: a kill in between leaves an uncommitted step, never a listed
  step with missing objects.

Directories, JSON items and the commit marker go through ``etils.epath``, which uses
``s3fs`` (fsspec) for ``s3://``. Both clients take credentials from the standard AWS
chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``,
``AWS_PROFILE`` and ``~/.aws``, instance roles). The endpoint comes from
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (botocore reads them; TensorStore does
not, so it is passed explicitly), the region from ``AWS_REGION`` or
``AWS_DEFAULT_REGION``. No secret is ever logged or stored in a spec.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from etils import epath

from datarax_ckpt._errors import CheckpointPathError

logger = logging.getLogger("datarax_ckpt")

SCHEME = "s3://"
COMMIT_MARKER = "commit_success.txt"  # Orbax's atomicity.COMMIT_SUCCESS_FILE
_GCS_DRIVERS = ("gcs", "gcs_grpc")


def is_s3(path: Any) -> bool:
    """True for an ``s3://bucket/...`` path."""
    return str(path).startswith(SCHEME)


def split(path: Any) -> tuple[str, str]:
    """``("bucket", "key/prefix")`` of an ``s3://`` path (no leading or trailing ``/``)."""
    bucket, _, key = str(path)[len(SCHEME) :].partition("/")
    return bucket, key.strip("/")


def endpoint() -> str | None:
    """The S3 endpoint URL from the environment (None: AWS's own endpoints)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


def kvstore_spec(bucket: str, key: str) -> dict[str, Any]:
    """TensorStore ``s3`` kvstore spec for ``s3://bucket/key`` with the configured endpoint.

    Credentials are not in the spec: TensorStore reads the standard AWS chain itself.
    """
    spec: dict[str, Any] = {"driver": "s3", "bucket": bucket, "path": key}
    if (url := endpoint()) is not None:
        spec["endpoint"] = url
    if (name := region()) is not None:
        spec["aws_region"] = name
    return spec


def kvstore_url_spec(path: epath.Path) -> dict[str, Any]:
    """The kvstore spec of a folder (``path`` with a trailing ``/``), for direct opens."""
    bucket, key = split(path)
    return kvstore_spec(bucket, key + "/")


def to_s3(spec: Any) -> Any:
    """``spec`` with every GCS kvstore driver replaced by the S3 driver (same bucket/key;
    for ``_orbax.teach_s3_specs``)."""
    if isinstance(spec, list):
        return [to_s3(s) for s in spec]
    if not isinstance(spec, dict):
        return spec
    if spec.get("driver") in _GCS_DRIVERS:
        rest = {k: v for k, v in spec.items() if k not in ("driver", "bucket", "path")}
        return {**kvstore_spec(spec["bucket"], spec.get("path", "")), **rest}
    return {k: to_s3(v) for k, v in spec.items()}


def install() -> None:
    """Readies this process for ``s3://`` (idempotent; other paths unchanged).

    Makes sure the shared S3 filesystem talks to the endpoint configured now. Called when
    a handler first opens an ``s3://`` directory; never at import. (Orbax's TensorStore
    spec builder is taught ``s3://`` by ``_orbax.teach_s3_specs``, before Orbax touches
    an ``s3://`` path.)
    """
    _filesystem_for(endpoint())


_configured_endpoint: list[str | None] = []  # the endpoint the shared filesystem was made for


def _filesystem_for(url: str | None) -> None:
    # etils.epath and this module share fsspec's one cached S3 filesystem (no options),
    # which reads the endpoint when it is created: if AWS_ENDPOINT_URL changed since (a
    # second S3 server, another test module), drop the cached one so the next is made anew.
    import fsspec

    try:
        fs = fsspec.filesystem("s3")
    except ImportError as e:
        raise ImportError(
            "s3:// checkpoint directories need s3fs: pip install 'datarax_ckpt[s3]'."
        ) from e
    if _configured_endpoint and _configured_endpoint[0] != url:
        type(fs).clear_instance_cache()
        # etils.epath keeps its own reference (an lru_cache over fsspec.filesystem).
        from etils.epath import backend

        getattr(type(backend.fsspec_backend)._get_filesystem, "cache_clear", lambda: None)()
        fs = fsspec.filesystem("s3")
    _configured_endpoint[:] = [url]
    # s3fs caches directory listings. With the cache on, the kill test's reader found a
    # committed step whose marker was there but whose other objects had been deleted (a
    # decision taken from a listing older than the objects); with it off, it passes.
    # Every existence check and listing must ask the server.
    fs.dircache.use_listings_cache = False
    fs.dircache.clear()


def is_committed(path: epath.Path) -> bool:
    return (path / COMMIT_MARKER).exists()


def marker_identity(path: epath.Path) -> tuple | None:
    """What tells a committed step from a later one of the same name (its commit
    marker's ETag and time); None when the step is not committed."""
    import fsspec

    try:
        info = fsspec.filesystem("s3").info(f"{str(path)[len(SCHEME) :]}/{COMMIT_MARKER}")
    except FileNotFoundError:
        return None
    return (info.get("ETag"), str(info.get("LastModified")))


def delete_step(path: epath.Path) -> None:
    """Removes a step: its commit marker first (it is no longer listed), then the rest."""
    (path / COMMIT_MARKER).unlink(missing_ok=True)
    path.rmtree(missing_ok=True)


def copy_step(src: epath.Path, dst: epath.Path) -> None:
    """Server-side copy of a step folder, its commit marker last (object stores cannot
    rename: a backup made this way is committed only once it is complete)."""
    import fsspec

    fs = fsspec.filesystem("s3")
    source, target = str(src)[len(SCHEME) :].rstrip("/"), str(dst)[len(SCHEME) :].rstrip("/")
    marker = f"{source}/{COMMIT_MARKER}"
    files = [f for f in fs.find(source) if f != marker]
    if files:
        fs.copy(files, [target + f[len(source) :] for f in files])
    if fs.exists(marker):
        fs.copy(marker, f"{target}/{COMMIT_MARKER}")
    fs.invalidate_cache()


def size(path: epath.Path) -> int:
    """Total bytes of the objects under a folder."""
    import fsspec

    return int(fsspec.filesystem("s3").du(str(path)[len(SCHEME) :].rstrip("/")))


def move_step(src: epath.Path, dst: epath.Path) -> None:
    """:func:`copy_step`, then :func:`delete_step` of the source (marker first)."""
    copy_step(src, dst)
    delete_step(src)


def check_path(path: epath.Path) -> None:
    """Raises a clear error for an ``s3://`` path without a bucket or a step prefix."""
    install()
    bucket, _ = split(path)
    if not bucket:
        raise CheckpointPathError(
            f"{path} names no bucket. Pass s3://<bucket>/<prefix>, e.g. s3://my-bucket/run1."
        )
