"""The ingest pipeline shared by C-STORE, STOW-RS and `kho import`.

parse and check -> early duplicate check -> journal the object prefix -> write objects
(durable) -> commit the catalog row (visible) -> clean up replaced or surplus objects.
Nothing is visible before the commit; everything acknowledged was durable before it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset

from kho.archive import keys, metrics
from kho.archive.catalog import HEADER_OBJECT, PIXELS_OBJECT, InstanceRecord, RowInsert
from kho.archive.config import MissingUidPolicy
from kho.archive.dataset.attributes import (
    CatalogValues,
    InstanceAttributes,
    extract_attributes,
    read_catalog_values,
    read_header,
)
from kho.archive.dataset.part10 import Part10Layout, build_file_meta, parse_part10
from kho.archive.finish.derived import allowance, arrived_compressed, fit_derived
from kho.archive.finish.pixels import encode_pixels
from kho.archive.read.objects import compress
from kho.errors import (
    CatalogUnavailableError,
    DatasetMismatchError,
    DuplicateInstanceError,
    InvalidDicomError,
    KhoError,
)
from kho.storage import put_objects
from kho.storage.spool import is_spool_key

if TYPE_CHECKING:
    from kho.archive.ingest.source import IngestingArchive

log = logging.getLogger(__name__)

#: a dataset's bytes, whole or as the fragments it arrived in
DatasetBytes = bytes | bytearray | memoryview | Sequence[bytes | bytearray | memoryview]
#: the rows a door commits with an instance, from its attributes (see ingest_part10)
RowsFor = Callable[[InstanceAttributes], Sequence[RowInsert]]


def combine_rows(*parts: RowsFor | None) -> RowsFor | None:
    """One RowsFor of several (an audit record and forwarding tasks, say); None if none."""
    present = [part for part in parts if part is not None]
    if len(present) <= 1:
        return present[0] if present else None

    def rows(attrs: InstanceAttributes) -> Sequence[RowInsert]:
        return [row for part in present for row in part(attrs)]

    return rows


class IngestOutcome(StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"  # same bytes were already stored: nothing written
    REPLACED = "replaced"  # policy replace: the newer instance is now the stored one
    KEPT = "kept"  # policy keep: the stored instance stays, the newcomer is dropped
    APPLIED = "applied"  # a data-retention rejection note: carried out, not kept


@dataclass(frozen=True, slots=True)
class IngestResult:
    outcome: IngestOutcome
    sop_uid: str
    study_uid: str
    series_uid: str
    sha256: str
    received_size: int
    stored_size: int
    #: UIDs the archive invented for the catalog (keyword -> UID): the instance lacked
    #: them (missing_uids = coerce); the answer must name them (DIMSE Warning 0xB000)
    coerced: tuple[tuple[str, str], ...] = ()


def ingest_dimse(
    archive: IngestingArchive,
    dataset: DatasetBytes,
    *,
    transfer_syntax_uid: str,
    sop_class_uid: str,
    sop_instance_uid: str,
    source_ae: str = "",
    with_rows: RowsFor | None = None,
) -> IngestResult:
    """Ingest a dataset received over DIMSE (its bytes, or its fragments in order): wrap it
    in a File Meta Information first."""
    parts = [dataset] if isinstance(dataset, (bytes, bytearray, memoryview)) else dataset
    if not any(len(part) for part in parts):
        raise InvalidDicomError("empty dataset")
    meta = build_file_meta(sop_class_uid, sop_instance_uid, transfer_syntax_uid, source_ae)
    return ingest_part10(
        archive,
        b"".join((meta, *parts)),
        expected_sop_class_uid=sop_class_uid,
        expected_sop_instance_uid=sop_instance_uid,
        source=f"dimse:{source_ae.strip()}",
        with_rows=with_rows,
    )


def ingest_part10(
    archive: IngestingArchive,
    data: bytes,
    *,
    expected_sop_class_uid: str | None = None,
    expected_sop_instance_uid: str | None = None,
    source: str = "",
    lenient_identity: bool = False,
    defer: bool | None = None,
    with_rows: RowsFor | None = None,
) -> IngestResult:
    """Ingest one DICOM file's bytes (see _ingest_part10), recording latency and outcome.

    ``with_rows``: given the instance's attributes, rows to commit in the same transaction
    as the instance when it is stored or replaced (a door's audit record).

    ``defer`` (default: the ``finish_in_background`` setting): store the instance as
    received and acknowledge it; the archive's finisher encodes the pixels and makes the
    derived objects afterwards.  Else all of that happens before this returns.
    """
    if defer is None:
        defer = archive.settings.finish_in_background
    channel = source.split(":", 1)[0] or "api"
    started = time.perf_counter()
    archive.note_ingest()
    try:
        result = _ingest_part10(
            archive,
            data,
            expected_sop_class_uid=expected_sop_class_uid,
            expected_sop_instance_uid=expected_sop_instance_uid,
            source=source,
            lenient_identity=lenient_identity,
            defer=defer,
            with_rows=with_rows,
        )
    except Exception as exc:
        metrics.INGEST_OUTCOMES.labels(channel, type(exc).__name__).inc()
        raise
    metrics.INGEST_SECONDS.labels(channel).observe(time.perf_counter() - started)
    metrics.INGEST_OUTCOMES.labels(channel, result.outcome.value).inc()
    archive.note_ingest()
    if defer and result.outcome in (IngestOutcome.STORED, IngestOutcome.REPLACED):
        archive.finisher.notify()
    return result


def _ingest_part10(
    archive: IngestingArchive,
    data: bytes,
    *,
    expected_sop_class_uid: str | None,
    expected_sop_instance_uid: str | None,
    source: str,
    lenient_identity: bool,
    defer: bool,
    with_rows: RowsFor | None = None,
) -> IngestResult:
    """Ingest one DICOM file's bytes; raise InvalidDicomError / DatasetMismatchError /
    DuplicateInstanceError / StorageError, having made nothing visible.

    ``lenient_identity`` (file import): a file with no SOP Instance UID anywhere is accepted
    under a surrogate derived from its SHA-256.  Network input must carry its own.
    """
    if not data:
        raise InvalidDicomError("empty input: 0 bytes")
    layout = parse_part10(data)
    split = layout.pixels.element_offset if layout.pixels else None
    # deferred: nothing but the catalog needs the header now (the finisher re-reads it)
    header_values = read_catalog_values(data, layout) if defer else None
    ds = header_values or read_header(data, split)
    sha = hashlib.sha256(data).hexdigest()
    attrs = extract_attributes(
        ds,
        sop_uid_fallback=expected_sop_instance_uid or layout.media_sop_instance_uid,
        sop_class_fallback=expected_sop_class_uid or layout.media_sop_class_uid,
        surrogate_sop_anchor=sha if lenient_identity else None,
        invent_missing_uids=lenient_identity
        or archive.settings.missing_uids is MissingUidPolicy.COERCE,
    )
    _check_identity(layout, attrs, expected_sop_class_uid, expected_sop_instance_uid)
    for warning in attrs.warnings:
        log.warning("instance %s: %s", attrs.sop_uid, warning)

    catalog = archive.catalog
    # a look for the instance before writing saves writing a re-sent one again; appended to
    # the spool, writing costs less than the look (a PostgreSQL round trip), and the commit
    # decides duplicates in any case
    existing = None if defer and archive.spool is not None else catalog.get_instance(attrs.sop_uid)
    if existing is not None and existing.sha256 == sha:
        return _result(IngestOutcome.DUPLICATE, attrs, existing)
    if existing is not None and archive.settings.duplicate_policy.value == "reject":
        raise DuplicateInstanceError(
            f"SOP Instance UID {attrs.sop_uid} is already stored with different content"
        )

    prefix = keys.instance_prefix(
        attrs.study_uid, attrs.series_uid, attrs.sop_uid, sha, tenant=catalog.tenant
    )
    record = None
    try:
        record = _write_objects(archive, data, layout, ds, attrs, sha, prefix, source, defer)
        outcome, previous = catalog.commit_instance(
            attrs,
            record,
            policy=archive.settings.duplicate_policy.value,
            unfinished=defer,
            journalled=not _spooled(archive, record),  # a spooled ingest wrote no object
            with_rows=with_rows(attrs) if with_rows is not None else (),
        )
    except BaseException as exc:
        _abandon(archive, prefix, exc)
        raise
    finally:
        if record is not None and archive.spool is not None and _spooled(archive, record):
            archive.spool.release(record.pixels_key)  # committed or not: never appended to
    if outcome in ("kept", "rejected"):
        archive.delete_prefix(record.object_prefix)
        catalog.end_pending(record.object_prefix)
        if outcome == "rejected":
            raise DuplicateInstanceError(
                f"SOP Instance UID {attrs.sop_uid} is already stored with different content"
            )
        assert previous is not None
        return _result(IngestOutcome.KEPT, attrs, previous)
    if outcome == "duplicate":
        assert previous is not None
        if previous.object_prefix != record.object_prefix:
            archive.delete_prefix(record.object_prefix)
            catalog.end_pending(record.object_prefix)
        return _result(IngestOutcome.DUPLICATE, attrs, previous)
    if outcome == "replaced":
        assert previous is not None
        log.info("replaced instance %s (sha256 %s -> %s)", attrs.sop_uid, previous.sha256, sha)
        if previous.object_prefix != record.object_prefix:
            archive.delete_prefix(previous.object_prefix)
            catalog.end_pending(previous.object_prefix)
        return _result(IngestOutcome.REPLACED, attrs, record)
    return _result(IngestOutcome.STORED, attrs, record)


def _spooled(archive: IngestingArchive, record: InstanceRecord) -> bool:
    return archive.spool is not None and is_spool_key(record.pixels_key)


def _check_identity(
    layout: Part10Layout,
    attrs: InstanceAttributes,
    expected_class: str | None,
    expected_instance: str | None,
) -> None:
    """The DIMSE command's UIDs must be the dataset's (PS3.4 B.2.3: else 0xA900).

    A File Meta that disagrees with its dataset is tolerated with a warning: the dataset is
    authoritative and such files exist in the wild.
    """
    if expected_instance is not None and not attrs.sop_uid_in_dataset:
        raise DatasetMismatchError("dataset has no SOP Instance UID (0008,0018)")
    if expected_instance is not None and attrs.sop_uid != expected_instance:
        raise DatasetMismatchError(
            f"dataset SOP Instance UID {attrs.sop_uid} differs from the request's "
            f"{expected_instance}"
        )
    if expected_class is not None and attrs.sop_class_uid != expected_class:
        raise DatasetMismatchError(
            f"dataset SOP Class UID {attrs.sop_class_uid} differs from the request's "
            f"{expected_class}"
        )
    if layout.media_sop_instance_uid and layout.media_sop_instance_uid != attrs.sop_uid:
        attrs.warnings.append(
            f"File Meta SOP Instance UID {layout.media_sop_instance_uid} differs from the "
            "dataset's; the dataset's is used"
        )


def _write_objects(
    archive: IngestingArchive,
    data: bytes,
    layout: Part10Layout,
    ds: Dataset | CatalogValues,
    attrs: InstanceAttributes,
    sha: str,
    prefix: str,
    source: str,
    defer: bool,
) -> InstanceRecord:
    """Journal the prefix, then write header, pixels and derived objects durably
    (``defer``: header and pixels as received, in the spool if the archive has one; the
    finisher does the rest)."""
    pixels = layout.pixels
    objects: dict[str, bytes | memoryview] = {}
    if pixels is None:
        header = data
        split = len(data)
        encoded = None
    else:
        header = pixels.header_of(data)
        split = pixels.value_offset
        encoded = encode_pixels(archive, data, layout, attrs, use_codec=not defer)
    frame_index: list[list[list[int]]] = []
    pixel_format = "none"
    derived: dict[str, object] = {}
    if defer and pixels is not None and encoded is not None:
        # one object, the bytes as received: one append to the spool (or one write, one
        # PUT on S3) before the acknowledgement; frames are found inside it, past the
        # pixel value's offset
        if archive.spool is not None:
            received = archive.spool.append(data)  # durable on return; released by caller
        else:
            received = keys.received_key(prefix)
            objects[received] = data
        derived = {HEADER_OBJECT: received, PIXELS_OBJECT: received}
        header = data
        pixel_format = encoded.pixel_format
        frame_index = [
            [[pixels.value_offset + off, length] for off, length in frame]
            for frame in encoded.frame_index
        ]
        encoded = None  # nothing else is written: the pixel value is inside ``received``
    elif not defer and len(packed := compress(header)) < len(header):
        # stored as the finisher stores it: zstd, under the key that says so
        header = packed
        derived[HEADER_OBJECT] = keys.compressed_header_key(prefix)
        objects[keys.compressed_header_key(prefix)] = header
    else:
        objects[keys.header_key(prefix)] = header
    if encoded is not None:
        objects[keys.pixels_key(prefix)] = encoded.payload
        pixel_format = encoded.pixel_format
        frame_index = encoded.frame_index
    made: dict[str, bytes] = {}
    if not defer:
        assert isinstance(ds, Dataset), "derivers read pydicom's dataset"
        made = archive.derive(data, layout, ds, attrs, encoded)
        # what the instance can afford beside its header and pixels (as the finisher keeps)
        essential = len(header) + (len(encoded.payload) if encoded is not None else 0)
        made = fit_derived(made, allowance(len(data), arrived_compressed(layout)) - essential)
    for name, blob in made.items():
        key = keys.derived_key(prefix, name)
        objects[key] = blob
        derived[name] = key
    if objects:
        archive.catalog.begin_pending(prefix)  # journalled: recovery deletes them if need be
        put_objects(archive.store, objects)
    stored_size = sum(len(blob) for blob in objects.values())
    pixel_size = len(encoded.payload) if encoded is not None else 0
    if (
        pixels is not None
        and PIXELS_OBJECT in derived
        and derived[PIXELS_OBJECT] == derived.get(HEADER_OBJECT)
    ):
        pixel_size = pixels.value_length  # stored as received, in one object
        if is_spool_key(str(derived[PIXELS_OBJECT])):
            stored_size = len(data)
    return InstanceRecord(
        sop_uid=attrs.sop_uid,
        series_uid=attrs.series_uid,
        study_uid=attrs.study_uid,
        sop_class_uid=attrs.sop_class_uid,
        instance_number=attrs.instance_number,
        rows_=attrs.rows,
        columns_=attrs.columns,
        number_of_frames=attrs.number_of_frames,
        bits_allocated=attrs.bits_allocated,
        bits_stored=attrs.bits_stored,
        pixel_representation=attrs.pixel_representation,
        samples_per_pixel=attrs.samples_per_pixel,
        photometric_interpretation=attrs.photometric_interpretation,
        planar_configuration=attrs.planar_configuration,
        content_date=attrs.content_date,
        content_time=attrs.content_time,
        transfer_syntax_uid=layout.transfer_syntax_uid,
        sha256=sha,
        received_size=len(data),
        stored_size=stored_size,
        object_prefix=prefix,
        header_size=len(header),
        pixel_split=split,
        pixel_format=pixel_format,
        pixel_size=pixel_size,
        frame_index=json.dumps(frame_index, separators=(",", ":")),
        derived=json.dumps(derived, separators=(",", ":")),
        received_at=time.time(),
        source=source[:64],
    )


def _abandon(archive: IngestingArchive, prefix: str, cause: BaseException) -> None:
    """A failed ingest: delete what it wrote (unless the commit went through after all);
    if the store cannot even delete now (an outage), leave the journal row to recovery.
    An unreachable catalog is not asked again (each statement would wait out a connect
    timeout before the sender hears of the failure): whether the commit went through
    is unknown, so nothing is deleted; the journal row goes to recovery once the
    catalog answers (the next recovery pass, within a minute under kho serve)."""
    if isinstance(cause, CatalogUnavailableError):
        archive.catalog.disown_pending_later(prefix)
        return
    try:
        if archive.catalog.prefix_in_use(prefix):
            return
        archive.delete_prefix(prefix)
        archive.catalog.end_pending(prefix)
    except KhoError:
        with contextlib.suppress(KhoError):
            archive.catalog.disown_pending(prefix)


def _result(outcome: IngestOutcome, attrs: InstanceAttributes, rec: InstanceRecord) -> IngestResult:
    """What the sender is told, of ``rec``: the stored instance (for KEPT, the earlier one:
    the newcomer's UIDs, invented or not, were never used)."""
    return IngestResult(
        outcome=outcome,
        sop_uid=attrs.sop_uid,
        study_uid=rec.study_uid,
        series_uid=rec.series_uid,
        sha256=rec.sha256,
        received_size=rec.received_size,
        stored_size=rec.stored_size,
        coerced=attrs.coerced if outcome is not IngestOutcome.KEPT else (),
    )
