"""What the finish flow uses of the archive (kho.archive.archive.Archive is one)."""

from __future__ import annotations

from typing import Protocol

from pydicom.dataset import Dataset

from kho.archive.catalog import InstanceAttributes
from kho.archive.config import Settings
from kho.archive.dataset.part10 import Part10Layout
from kho.archive.finish.pixels import EncodedPixels, NativeEncoder
from kho.archive.read.source import StoredArchive
from kho.storage.spool import Spool


class FinishingArchive(StoredArchive, NativeEncoder, Protocol):
    """The read side, plus the settings, the spool, the derivers and the ingest clock."""

    settings: Settings
    spool_reader: Spool

    def seconds_since_ingest(self) -> float: ...

    def derive(
        self,
        data: bytes,
        layout: Part10Layout,
        ds: Dataset,
        attrs: InstanceAttributes,
        encoded: EncodedPixels | None,
    ) -> dict[str, bytes]: ...
