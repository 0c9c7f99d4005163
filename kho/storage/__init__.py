"""Object storage: the ObjectStore protocol and its backends."""

from kho.storage.base import ObjectStore, validate_key
from kho.storage.filesystem import FilesystemStore


def open_store(url: str, *, fsync: bool = True) -> ObjectStore:
    """An object store from a URL: ``s3://ACCESS:SECRET@host:port/bucket[/prefix]``, or
    ``file:///path`` / a plain path for the filesystem store."""
    if url.startswith("s3://"):
        from kho.storage.s3 import S3Store

        return S3Store.from_url(url)
    return FilesystemStore(url.removeprefix("file://"), fsync=fsync)


__all__ = ["FilesystemStore", "ObjectStore", "open_store", "validate_key"]
