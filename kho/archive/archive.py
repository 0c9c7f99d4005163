"""The archive: settings, object store and catalog, and the operations on them.

Adapters (dicom_scp, viewer_api) and the CLI hold one Archive and call its methods; nothing
outside kho/archive touches the catalog or the store directly.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset

from kho.archive import corrections, keys, metrics
from kho.archive.catalog import Catalog, InstanceRecord, open_catalog
from kho.archive.config import Settings
from kho.archive.dataset.attributes import InstanceAttributes
from kho.archive.dataset.part10 import Part10Layout, build_file_meta
from kho.archive.finish.derived import Deriver
from kho.archive.finish.finisher import Finisher, collect_garbage, spool_segments_in_use
from kho.archive.finish.pixels import EncodedPixels
from kho.archive.ingest.pipeline import (
    DatasetBytes,
    IngestOutcome,
    IngestResult,
    RowsFor,
    ingest_dimse,
    ingest_part10,
)
from kho.archive.read import instances, pixels
from kho.errors import IntegrityError, KhoError, NotFoundError
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
    """One archive: what every adapter and command works through.  One object per tenant
    (hospital), each with its own catalog: ``for_tenant``; the one built is the platform's
    root, the default tenant's."""

    _derivers: list[Deriver]

    def __init__(
        self,
        settings: Settings,
        *,
        store: ObjectStore | None = None,
        catalog: Catalog | None = None,
    ) -> None:
        self.settings = settings
        #: the platform's archive: the default tenant's, which opens the others and holds
        #: what they share (itself, for the root)
        self._root = self
        #: the other tenants' archives, opened on first use (for_tenant)
        self._tenants: dict[str, Archive] = {}
        #: the archives of tenants no longer declared whose catalogs are still there
        self._dormant: dict[str, Archive] = {}
        self._tenants_lock = threading.Lock()
        self._closed = False
        #: given a tenant, the rows each rejection there commits with what it withdrew
        #: (the audit trail's records: kho.audit.auditor.Auditor.rejection_rows)
        self.rejection_records: list[Callable[[str], corrections.RejectionRows | None]] = []
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
        if hasattr(self.catalog, "group_commit"):  # SQLite (kho.archive.catalog.sqlite)
            self.catalog.group_commit = settings.catalog_group_commit
        if settings.peer_reads:  # spool keys of other hosts: read from them
            spooled.peers = PeerSpoolClient(
                self.catalog.spool_url,
                settings.peer_token.get_secret_value(),
                settings.peer_url,
                on_read=lambda outcome: metrics.PEER_READS.labels(outcome).inc(),
            )
        from kho.archive.finish.derived import default_derivers

        #: encode native pixel data with the at-rest codec (JPEG-LS) when it can
        self.at_rest_codec = settings.at_rest_codec

        self.derivers = default_derivers(settings)
        #: encodes and derives what ingest acknowledged as received (finish_in_background),
        #: in every tenant: one pool of threads for the host, not one per hospital
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
        children = set(settings.tenant_names[1:])
        #: tenants whose catalog is there but who are no longer declared: not served, but
        #: still finished and collected, and their spool references honoured (else the
        #: spool would lose what they hold there)
        self._undeclared = [t for t in self.catalog.tenants_present() if t not in children]
        if self._undeclared:
            log.warning(
                "catalogs of tenants not declared in the settings: %s (not served; their "
                "queued instances are still finished)",
                ", ".join(self._undeclared),
            )
        if settings.peer_reads and self.spool is not None and settings.peer_url:
            # with the segments earlier processes left here: served from here now (in
            # the platform's catalog; what is still in use: in any tenant's)
            self.catalog.register_spool(
                sorted(self.spool.stems()), settings.peer_url, in_use=spool_segments_in_use(self)
            )

    # --- tenants (hospitals) ----------------------------------------------------------

    @property
    def tenant(self) -> str:
        """The hospital this archive object holds (the root archive: the default one)."""
        return self.catalog.tenant or self.settings.default_tenant

    def for_tenant(self, name: str) -> Archive:
        """The archive of one tenant: the root itself for the default tenant; for another
        declared one (settings.tenants), an archive opened on first use and kept, with
        its own catalog (open_catalog's ``tenant``) and object keys, and the root's object
        store, spool, finisher, derivers, settings and ingest clock.  NotFoundError for a
        name the settings do not declare.  Closed with the root."""
        root = self._root
        if name == root.settings.default_tenant:
            return root
        child = root._tenants.get(name)
        if child is not None:
            return child
        if name not in root.settings.tenant_names:
            raise NotFoundError(f"no tenant {name!r} is declared on this archive")
        return root._open_tenant(name, root._tenants)

    def _open_tenant(self, name: str, opened: dict[str, Archive]) -> Archive:
        """The (root's) archive of tenant ``name`` in ``opened``, opened if need be."""
        with self._tenants_lock:
            child = opened.get(name)
            if child is None:
                if self._closed:
                    raise KhoError("the archive is closed")
                catalog = open_catalog(
                    self.catalog.url, synchronous_full=self.catalog.synchronous_full, tenant=name
                )
                child = opened[name] = self._tenant_archive(catalog)
        return child

    def tenant_archives(self) -> list[Archive]:
        """Every declared tenant's archive, the default one (the root) first, each opened,
        whichever tenant's archive is asked: the platform (platform_stats)."""
        return [self.for_tenant(name) for name in self.settings.tenant_names]

    def housekept_archives(self) -> list[Archive]:
        """tenant_archives, and those of tenants no longer declared whose catalogs are
        still there: what the finisher, recovery and the spool's reclaim work on (a tenant
        taken out of the settings keeps its instances)."""
        root = self._root
        dormant = [root._open_tenant(name, root._dormant) for name in root._undeclared]
        return self.tenant_archives() + dormant

    def _tenant_archive(self, catalog: Catalog) -> Archive:
        """An archive on ``catalog`` sharing everything else with this (root) one."""
        child = object.__new__(type(self))
        child.settings = self.settings
        child._root = self
        child._tenants = {}
        child._tenants_lock = self._tenants_lock
        child.spool = self.spool  # never two Spool objects on one folder
        child.spool_reader = self.spool_reader
        child.store = self.store  # the SpooledStore, its peer client with it
        child.catalog = catalog
        child.at_rest_codec = self.at_rest_codec
        child.finisher = self.finisher
        return child

    @property
    def derivers(self) -> list[Deriver]:
        """What finishing makes of an instance (thumbnail, DICOM JSON...): one list for
        every tenant, the root's."""
        return self._root._derivers

    @derivers.setter
    def derivers(self, value: list[Deriver]) -> None:
        self._root._derivers = value

    def note_ingest(self) -> None:
        """An instance is being taken in, in any tenant (stamped for the host at most
        every 0.1 s)."""
        root = self._root
        now = time.monotonic()
        root.last_ingest_at = now
        if now - root._stamped_at > 0.1:
            root._stamped_at = now
            with contextlib.suppress(OSError):
                os.utime(root._ingest_stamp)

    def seconds_since_ingest(self) -> float:
        """Since this host (any of its processes) last took an instance in.  One worker's
        finisher must not take the CPU another worker is receiving with: with an S3 store,
        the bucket's server does the work of each upload at its own, normal priority."""
        root = self._root
        own = time.monotonic() - root.last_ingest_at
        try:
            host = time.time() - os.stat(root._ingest_stamp).st_mtime
        except OSError:
            return own
        return min(own, max(host, 0.0))

    def close(self) -> None:
        """Close the archive; the root closes every tenant's archive with it (a tenant's
        own close does nothing: it is shared, and kept by the root)."""
        if self._root is not self:
            return
        self.finisher.stop()
        # the decoded-frame cache's read-ahead threads may be reading this catalog: a
        # SQLite connection closed under a running statement crashes the process
        pixels.FRAME_CACHE.wait_idle(timeout=10)
        with self._tenants_lock:
            self._closed = True
            children = [*self._tenants.values(), *self._dormant.values()]
            self._tenants, self._dormant = {}, {}
        for child in children:
            child.catalog.close()
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
        with_rows: RowsFor | None = None,
    ) -> IngestResult:
        def store() -> IngestResult:
            return ingest_part10(
                self,
                data,
                source=source,
                lenient_identity=lenient_identity,
                defer=defer,
                with_rows=with_rows,
            )

        note = corrections.read_note(data) if corrections.may_be_note(data) else None
        if note is None:
            return store()
        kind, _, who = source.partition(":")
        via = {"stow": "STOW-RS", "dimse": "C-STORE"}.get(kind, kind)
        return self._take_note(
            note, data, store, requested_by=who or kind, requester_kind=kind, via=via
        )[0]

    def ingest_dimse(
        self,
        dataset: DatasetBytes,
        *,
        transfer_syntax_uid: str,
        sop_class_uid: str,
        sop_instance_uid: str,
        source_ae: str = "",
        with_rows: RowsFor | None = None,
    ) -> IngestResult:
        def store() -> IngestResult:
            return ingest_dimse(
                self,
                dataset,
                transfer_syntax_uid=transfer_syntax_uid,
                sop_class_uid=sop_class_uid,
                sop_instance_uid=sop_instance_uid,
                source_ae=source_ae,
                with_rows=with_rows,
            )

        if sop_class_uid.strip("\x00 ") != corrections.KOS_SOP_CLASS:
            return store()
        parts = [dataset] if isinstance(dataset, (bytes, bytearray, memoryview)) else dataset
        data = b"".join(
            (build_file_meta(sop_class_uid, sop_instance_uid, transfer_syntax_uid), *parts)
        )
        note = corrections.read_note(data)
        if note is None:
            return store()
        return self._take_note(
            note,
            data,
            store,
            requested_by=source_ae.strip(),
            requester_kind="dicom",
            via="C-STORE",
        )[0]

    # --- corrections: rejection notes (kho.archive.corrections) ---------------------------

    def _take_note(
        self,
        note: corrections.RejectionNote,
        data: bytes,
        store: Callable[[], IngestResult],
        *,
        requested_by: str,
        requester_kind: str,
        address: str = "",
        via: str = "",
    ) -> tuple[IngestResult, corrections.Rejection]:
        """Carry out a rejection note: refused (DatasetMismatchError) if it names nothing
        this tenant holds; else stored like any instance (``store``), then its instances
        withdrawn.  A data-retention note is not kept: its instances are deleted at once
        and nothing of them, or of their patient, stays (outcome APPLIED)."""
        corrections.check_note(self.catalog, note)
        if note.reason.immediate:
            result = IngestResult(
                IngestOutcome.APPLIED,
                note.sop_uid,
                note.study_uid,
                note.series_uid,
                hashlib.sha256(data).hexdigest(),
                len(data),
                0,
            )
        else:
            result = store()  # first: a note refused (identity...) withdraws nothing
        records = [made(self.tenant) for made in self._root.rejection_records]
        rejection = corrections.reject(
            self,
            note,
            tenant=self.tenant,
            requested_by=requested_by,
            requester_kind=requester_kind,
            address=address,
            via=via,
            with_rows=[rows for rows in records if rows is not None],
        )
        if note.reason.immediate:
            rejection.purged = corrections.purge_due(self)
        return result, rejection

    def reject_instances(
        self,
        reason: corrections.RejectionReason,
        study_uid: str,
        series_uid: str | None = None,
        sop_uid: str | None = None,
        *,
        requested_by: str,
        requester_kind: str,
        address: str = "",
        via: str = "HTTP",
    ) -> tuple[IngestResult, corrections.Rejection]:
        """An admin's rejection of a study, series or instance: kho makes the rejection
        note (Key Object Selection) and takes it like a received one (_take_note).
        NotFoundError if nothing matches."""
        where, params = "study_uid = ?", [study_uid]
        if series_uid is not None:
            where, params = where + " AND series_uid = ?", [*params, series_uid]
        if sop_uid is not None:
            where, params = where + " AND sop_uid = ?", [*params, sop_uid]
        records = self.catalog.instances_where(where, params)
        if not records:
            raise NotFoundError("no such instances in this archive")
        row = self.catalog.fetchone(
            "SELECT p.patient_id, p.issuer_of_patient_id, p.patient_name, "
            "p.patient_birth_date, p.patient_sex, s.study_date, s.study_time, "
            "s.accession_number, s.study_id, s.referring_physician_name, "
            "s.study_description FROM studies s JOIN patients p "
            "ON p.patient_key = s.patient_key WHERE s.study_uid = ?",
            (study_uid,),
        )
        if row is None:
            raise NotFoundError(f"no study {study_uid}")
        names = ("PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate")
        patient = {k: v for k, v in zip((*names, "PatientSex"), row[:5], strict=True) if v}
        study_names = (
            *("StudyDate", "StudyTime", "AccessionNumber", "StudyID"),
            *("ReferringPhysicianName", "StudyDescription"),
        )
        study = {k: v for k, v in zip(study_names, row[5:], strict=True) if v}
        data = corrections.build_note(
            reason,
            [
                corrections.Reference(r.study_uid, r.series_uid, r.sop_class_uid, r.sop_uid)
                for r in records
            ],
            patient=patient,
            study=study,
            manufacturer=self.settings.ae_title,
        )
        note = corrections.read_note(data)
        assert note is not None  # what build_note makes, read_note reads
        return self._take_note(
            note,
            data,
            lambda: ingest_part10(self, data, source=f"reject:{requested_by}"),
            requested_by=requested_by,
            requester_kind=requester_kind,
            address=address,
            via=via,
        )

    def purge_rejected(self) -> int:
        """Delete the rejected instances of every tenant whose delay has passed; how
        many (the finisher's housekeeping calls this too)."""
        return sum(corrections.purge_due(a) for a in self.housekept_archives())

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
        were cleaned.
        Every tenant's catalog is recovered, whichever tenant's archive is asked."""
        cleaned = 0
        released = 0
        for archive in self.housekept_archives():
            catalog = archive.catalog
            catalog.disown_deferred()  # ingests an outage failed: now recovery's
            for prefix in catalog.abandoned_prefixes(grace_s):
                if not catalog.prefix_in_use(prefix):
                    archive.delete_prefix(prefix)
                    cleaned += 1
                catalog.end_pending(prefix)
            # finishing work a gone process had claimed goes back on the queue
            released += catalog.release_claims_of_gone_processes()
        if released:
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
        """Re-read every instance of this archive's tenant; yield (record, problem or
        None)."""
        return instances.verify(self)

    def spool_stats(self) -> dict[str, int]:
        """Segments and bytes in this host's ingest spool (instances awaiting the finisher,
        and finished ones until their segment is deleted)."""
        return self.spool_reader.stats()

    def stats(self) -> dict[str, Any]:
        """What this archive's tenant holds (its catalog); ``spool`` is the host's, which
        every tenant shares."""
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
            "rejected": corrections.rejected_counts(self.catalog),
            "unfinished": self.catalog.unfinished_count(),
            "spool": self.spool_stats(),
            "received_bytes": received,
            "stored_bytes": stored,
            "ratio": (received / stored) if stored else None,
            "by_modality": per_modality,
        }

    def platform_stats(self, tenants: Iterable[str] | None = None) -> dict[str, Any]:
        """Each tenant's stats (``tenants``: these, else every declared one) and their
        totals, in the shape of stats: ``{"tenants": {name: stats}, "totals": stats}``.
        The host's spool, which they share, is counted once."""
        names = self.settings.tenant_names if tenants is None else list(dict.fromkeys(tenants))
        per_tenant = {name: self.for_tenant(name).stats() for name in names}
        summed = ("patients", "studies", "series", "instances", "unfinished")
        totals: dict[str, Any] = {
            key: sum(one[key] for one in per_tenant.values()) for key in summed
        }
        totals["rejected"] = {
            key: sum(one["rejected"][key] for one in per_tenant.values())
            for key in ("pending_purge", "purged")
        }
        by_modality: dict[str, list[int]] = {}
        for one in per_tenant.values():
            for row in one["by_modality"]:
                total = by_modality.setdefault(row["modality"], [0, 0, 0])
                total[0] += row["instances"]
                total[1] += row["received_bytes"]
                total[2] += row["stored_bytes"]
        totals["by_modality"] = [
            {
                "modality": modality,
                "instances": n,
                "received_bytes": received,
                "stored_bytes": stored,
                "ratio": (received / stored) if stored else None,
            }
            for modality, (n, received, stored) in sorted(by_modality.items())
        ]
        received = sum(r["received_bytes"] for r in totals["by_modality"])
        stored = sum(r["stored_bytes"] for r in totals["by_modality"])
        totals.update(
            spool=self.spool_stats(),
            received_bytes=received,
            stored_bytes=stored,
            ratio=(received / stored) if stored else None,
        )
        return {"tenants": per_tenant, "totals": totals}
