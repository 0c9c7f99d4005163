"""Object storage: the ObjectStore protocol, its filesystem and S3 backends, the ingest
spool.  A foundation: imports nothing of kho but errors."""

from typing import Any

from kho.storage.base import ObjectStore, is_full, put_objects, validate_key
from kho.storage.filesystem import FilesystemStore


def open_store(url: str, *, fsync: bool = True, **s3_options: Any) -> ObjectStore:
    """An object store from a URL.

    - ``s3://ACCESS:SECRET@host:port/bucket[/prefix]?secure=false`` -> ``S3Store`` (see
      ``kho.storage.s3`` for the query parameters); ``s3_options`` go to its constructor.
    - ``file:///path`` or a plain path -> ``FilesystemStore`` (``fsync=False`` only for
      throw-away stores).

    The S3 backend is imported only when asked for, so the embedded default never loads
    the minio SDK.
    """
    if url.startswith("s3://"):
        from kho.storage.s3 import S3Store

        return S3Store.from_url(url, **s3_options)
    if s3_options:
        raise TypeError(f"options {sorted(s3_options)} apply to s3:// stores only")
    return FilesystemStore(url.removeprefix("file://"), fsync=fsync)


__all__ = ["FilesystemStore", "ObjectStore", "is_full", "open_store", "put_objects", "validate_key"]
