"""What the ingest flow uses of the archive (kho.archive.archive.Archive is one)."""

from __future__ import annotations

from typing import Protocol

from kho.archive.finish.finisher import Finisher
from kho.archive.finish.source import FinishingArchive
from kho.storage.spool import Spool


class IngestingArchive(FinishingArchive, Protocol):
    """The finish side, plus the ingest spool, the finisher to wake, and clean-up."""

    spool: Spool | None
    finisher: Finisher

    def note_ingest(self) -> None: ...

    def delete_prefix(self, prefix: str) -> None: ...
