"""The archive: settings, object store and catalog, and the operations on them.

Adapters (dicom_scp, viewer_api) and the CLI hold one Archive and call its methods; nothing
outside kho/archive touches the catalog or the store directly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset

from kho.archive import keys, metrics
from kho.archive.catalog import Catalog, InstanceRecord, open_catalog
from kho.archive.config import Settings
from kho.archive.dataset.attributes import InstanceAttributes
from kho.archive.dataset.part10 import Part10Layout
from kho.archive.finish.derived import Deriver
from kho.archive.finish.finisher import Finisher, collect_garbage
from kho.archive.finish.pixels import EncodedPixels
from kho.archive.ingest.pipeline import DatasetBytes, IngestResult, ingest_dimse, ingest_part10
from kho.archive.read import instances
from kho.errors import IntegrityError
from kho.storage import FilesystemStore, ObjectStore, open_store
from kho.storage.peer import PeerSpoolClient
from kho.storage.spool import Spool, SpooledStore

log = logging.getLogger(__name__)


def open_object_store(settings: Settings) -> ObjectStore:
    url = settings.storage_url
    if not url:
        return FilesystemStore(settings.objects_dir, fsync=settings.fsync)
    return open_store(url, fsync=settings.fsync)


@dataclass(frozen=True, slots=True)
class VerifyProblem:
    sop_uid: str
    problem: str


class Archive:
    """One archive: what every adapter and command works through."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: ObjectStore | None = None,
        catalog: Catalog | None = None,
    ) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        store = store if store is not None else open_object_store(settings)
        #: where received instances wait for the finisher (None: in the object store)
        self.spool: Spool | None = None
        if settings.uses_spool and settings.finish_in_background:
            self.spool = Spool(settings.spool_dir, fsync=settings.fsync)
        # spool keys stay readable even when this process does not spool (set off since)
        self.spool_reader = self.spool or Spool(settings.spool_dir, fsync=settings.fsync)
        spooled = SpooledStore(store, self.spool_reader)
        self.store: ObjectStore = spooled
        self.catalog = (
            catalog
            if catalog is not None
            else open_catalog(
                settings.catalog_url or settings.sqlite_path, synchronous_full=settings.fsync
            )
        )
        if settings.peer_reads:  # spool keys of other hosts: read from them
            spooled.peers = PeerSpoolClient(
                self.catalog.spool_url,
                settings.peer_token.get_secret_value(),
                settings.peer_url,
                on_read=lambda outcome: metrics.PEER_READS.labels(outcome).inc(),
            )
            if self.spool is not None and settings.peer_url:
                # with the segments earlier processes left here: served from here now
                self.catalog.register_spool(sorted(self.spool.stems()), settings.peer_url)
        from kho.archive.finish.derived import default_derivers

        #: encode native pixel data with the at-rest codec (JPEG-LS) when it can
        self.at_rest_codec = settings.at_rest_codec

        self.derivers: list[Deriver] = default_derivers(settings)
        #: encodes and derives what ingest acknowledged as received (finish_in_background)
        self.finisher = Finisher(self, settings.finish_threads)
        #: time.monotonic() of the latest ingest (the finisher waits while they come in)
        self.last_ingest_at = 0.0
        # the same for every process of this host (kho serve --workers): its mtime
        self._ingest_stamp = settings.data_dir / "ingest.stamp"
        self._stamped_at = 0.0
        with contextlib.suppress(OSError):
            if not self._ingest_stamp.exists():  # made as "long ago"
                self._ingest_stamp.touch()
                os.utime(self._ingest_stamp, (0, 0))

    def note_ingest(self) -> None:
        """An instance is being taken in (stamped for the host at most every 0.1 s)."""
        now = time.monotonic()
        self.last_ingest_at = now
        if now - self._stamped_at > 0.1:
            self._stamped_at = now
            with contextlib.suppress(OSError):
                os.utime(self._ingest_stamp)

    def seconds_since_ingest(self) -> float:
        """Since this host (any of its processes) last took an instance in.  One worker's
        finisher must not take the CPU another worker is receiving with: with an S3 store,
        the bucket's server does the work of each upload at its own, normal priority."""
        own = time.monotonic() - self.last_ingest_at
        try:
            host = time.time() - os.stat(self._ingest_stamp).st_mtime
        except OSError:
            return own
        return min(own, max(host, 0.0))

    def close(self) -> None:
        self.finisher.stop()
        self.catalog.close()
        self.store.close()

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- ingest ----------------------------------------------------------------------

    def ingest_part10(
        self,
        data: bytes,
        *,
        source: str = "",
        lenient_identity: bool = False,
        defer: bool | None = None,
    ) -> IngestResult:
        return ingest_part10(
            self, data, source=source, lenient_identity=lenient_identity, defer=defer
        )

    def ingest_dimse(
        self,
        dataset: DatasetBytes,
        *,
        transfer_syntax_uid: str,
        sop_class_uid: str,
        sop_instance_uid: str,
        source_ae: str = "",
    ) -> IngestResult:
        return ingest_dimse(
            self,
            dataset,
            transfer_syntax_uid=transfer_syntax_uid,
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            source_ae=source_ae,
        )

    def encode_native(
        self, value: bytes, layout: Part10Layout, attrs: InstanceAttributes
    ) -> EncodedPixels | None:
        """The at-rest encoding of a native pixel value, or None to keep it raw."""
        return None

    def decode_native(self, record: InstanceRecord, payload: bytes) -> bytes:
        """Inverse of encode_native: the native pixel value exactly as received."""
        raise IntegrityError(f"unknown pixel format {record.pixel_format!r} for {record.sop_uid}")

    def derive(
        self,
        data: bytes,
        layout: Part10Layout,
        ds: Dataset,
        attrs: InstanceAttributes,
        encoded: EncodedPixels | None,
    ) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for deriver in self.derivers:
            out.update(deriver(data, layout, ds, attrs, encoded))
        return out

    def delete_prefix(self, prefix: str) -> None:
        for key in list(self.store.list(keys.objects_under(prefix))):
            self.store.delete(key)

    def recover(self, grace_s: float = 3600.0) -> int:
        """Roll back ingests a crash interrupted: delete objects under journalled prefixes
        that no instance references, when the process that wrote them is gone (same host)
        or the entry is older than ``grace_s``.  Other processes' ingests in flight are left
        alone, so any number of processes may share the catalog.  Returns how many prefixes
        were cleaned."""
        cleaned = 0
        for prefix in self.catalog.abandoned_prefixes(grace_s):
            if not self.catalog.prefix_in_use(prefix):
                self.delete_prefix(prefix)
                cleaned += 1
            self.catalog.end_pending(prefix)
        # finishing work a gone process had claimed goes back on the queue
        if self.catalog.release_claims_of_gone_processes():
            self.finisher.notify()
        collect_garbage(self)
        return cleaned

    # --- retrieval: kho.archive.read.instances ----------------------------------------

    def read_part10(self, record: InstanceRecord) -> bytes:
        """The instance's bytes exactly as received (see instances.read_part10)."""
        return instances.read_part10(self, record)

    def read_instance(self, sop_uid: str) -> tuple[InstanceRecord, bytes]:
        return instances.read_instance(self, sop_uid)

    def read_dataset(self, record: InstanceRecord) -> bytes:
        """The dataset bytes (no File Meta Information) in the transfer syntax received."""
        return instances.read_dataset(self, record)

    def verify(self) -> Iterator[tuple[InstanceRecord, str | None]]:
        """Re-read every instance; yield (record, problem or None)."""
        return instances.verify(self)

    def spool_stats(self) -> dict[str, int]:
        """Segments and bytes in this host's ingest spool (instances awaiting the finisher,
        and finished ones until their segment is deleted)."""
        return self.spool_reader.stats()

    def stats(self) -> dict[str, Any]:
        counts = self.catalog.counts()
        per_modality: list[dict[str, Any]] = [
            {
                "modality": m or "(none)",
                "instances": n,
                "received_bytes": received,
                "stored_bytes": stored,
                "ratio": (received / stored) if stored else None,
            }
            for m, n, received, stored in self.catalog.bytes_by_modality()
        ]
        received = sum(r["received_bytes"] for r in per_modality)
        stored = sum(r["stored_bytes"] for r in per_modality)
        return {
            **counts,
            "unfinished": self.catalog.unfinished_count(),
            "spool": self.spool_stats(),
            "received_bytes": received,
            "stored_bytes": stored,
            "ratio": (received / stored) if stored else None,
            "by_modality": per_modality,
        }
