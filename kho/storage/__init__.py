"""Object storage: the ObjectStore protocol and its backends."""

from kho.storage.base import ObjectStore, validate_key
from kho.storage.filesystem import FilesystemStore

__all__ = ["FilesystemStore", "ObjectStore", "validate_key"]
