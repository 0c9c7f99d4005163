"""What the read flow uses of the archive (kho.archive.archive.Archive is one): declared
here so that the flow depends on no one above it."""

from __future__ import annotations

from typing import Protocol

from kho.archive.catalog import Catalog, InstanceRecord
from kho.storage import ObjectStore


class StoredArchive(Protocol):
    """An archive's store and catalog, and its instances read back."""

    store: ObjectStore
    catalog: Catalog

    def read_part10(self, record: InstanceRecord) -> bytes: ...

    def read_dataset(self, record: InstanceRecord) -> bytes: ...

    def decode_native(self, record: InstanceRecord, payload: bytes) -> bytes: ...
