"""Rejection notes: Key Object Selection Documents whose title says that the instances
they name must be withdrawn (IHE Imaging Object Change Management).

The four titles are the rejection members of PS3.16 CID 7010 "Key Object Selection
Document Title" (CID 7011 holds the finer reasons a quality rejection may give).  The note
names its instances through Current Requested Procedure Evidence Sequence: study >
Referenced Series Sequence > Referenced SOP Sequence.  ``read_note`` reads one from a Part
10 file's bytes; ``build_note`` makes one for an admin's request.
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from kho.errors import DatasetMismatchError, QueryError

#: Key Object Selection Document Storage
KOS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"
_KOS_SOP_CLASS_BYTES = KOS_SOP_CLASS.encode("ascii")
#: where a Part 10 file names its SOP class: the File Meta Information, or (a file without
#: one) the dataset's first elements
_HEAD_BYTES = 1024
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


@dataclass(frozen=True, slots=True)
class RejectionReason:
    """A rejection note's title (DCM code) and what it means for the instances it names."""

    code: str
    meaning: str
    #: deleted at once (data retention expired) rather than after the configured delay
    immediate: bool
    #: the short name the HTTP route and the CLI also accept
    alias: str


REASONS: dict[str, RejectionReason] = {
    r.code: r
    for r in (
        RejectionReason("113001", "Rejected for Quality Reasons", False, "quality"),
        RejectionReason("113037", "Rejected for Patient Safety Reasons", False, "safety"),
        RejectionReason("113038", "Incorrect Modality Worklist Entry", False, "worklist"),
        RejectionReason("113039", "Data Retention Policy Expired", True, "retention"),
    )
}
DATA_RETENTION = REASONS["113039"]


def reason_for(text: str) -> RejectionReason:
    """The reason a request names by code (``113001``, ``DCM-113001``) or alias
    (``quality``); QueryError for anything else."""
    wanted = text.strip().removeprefix("DCM-").lower()
    for reason in REASONS.values():
        if wanted in (reason.code, reason.alias):
            return reason
    names = ", ".join(f"{r.code} ({r.alias})" for r in REASONS.values())
    raise QueryError(f"unknown rejection reason {text!r}: one of {names}")


@dataclass(frozen=True, slots=True)
class Reference:
    """One instance a note names."""

    study_uid: str
    series_uid: str
    sop_class_uid: str
    sop_uid: str


@dataclass(frozen=True, slots=True)
class RejectionNote:
    sop_uid: str
    study_uid: str
    series_uid: str
    reason: RejectionReason
    references: tuple[Reference, ...]


def may_be_note(data: bytes | bytearray | memoryview) -> bool:
    """A cheap first look (every ingest pays it): whether the file names the Key Object
    Selection SOP class near its start.  Only then is it parsed (read_note)."""
    return _KOS_SOP_CLASS_BYTES in bytes(data[:_HEAD_BYTES])


def _text(item: Dataset, keyword: str) -> str:
    value = item.get(keyword, "")
    return str(value).strip() if value is not None else ""


def _uid(item: Dataset, keyword: str, where: str) -> str:
    value = _text(item, keyword)
    if not value or len(value) > 64 or not _UID.match(value):
        raise DatasetMismatchError(f"rejection note: {where} has no valid {keyword}")
    return value


def _items(item: Dataset, keyword: str, where: str) -> list[Dataset]:
    value = item.get(keyword)
    if value is None or not isinstance(value, DicomSequence) or len(value) == 0:
        raise DatasetMismatchError(f"rejection note: {where} has no {keyword} items")
    return list(value)


def _title(ds: Dataset) -> RejectionReason | None:
    titles = ds.get("ConceptNameCodeSequence")
    if not isinstance(titles, DicomSequence) or len(titles) != 1:
        return None
    title = titles[0]
    if _text(title, "CodingSchemeDesignator") != "DCM":
        return None
    return REASONS.get(_text(title, "CodeValue"))


def read_note(data: bytes) -> RejectionNote | None:
    """The rejection note in a Part 10 file's bytes; None when it is none (not a Key
    Object Selection Document, another title, or bytes too broken to read: ingest then
    judges the file as any other).  A rejection title with unusable evidence (none,
    malformed items, invalid UIDs) raises DatasetMismatchError: such a note is refused,
    not stored as an ordinary instance."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)
        sop_class = _text(ds, "SOPClassUID") or _text(ds.file_meta, "MediaStorageSOPClassUID")
        if sop_class != KOS_SOP_CLASS:
            return None
        reason = _title(ds)
    except Exception:  # unreadable: the ingest's own parse answers for it
        return None
    if reason is None:
        return None
    try:
        return _note(ds, reason)
    except DatasetMismatchError:
        raise
    except Exception as exc:  # a malformed sequence pydicom trips on while reading it
        raise DatasetMismatchError(f"rejection note: unreadable evidence ({exc})") from exc


def _note(ds: Dataset, reason: RejectionReason) -> RejectionNote:
    references: list[Reference] = []
    for study in _items(ds, "CurrentRequestedProcedureEvidenceSequence", "the note"):
        study_uid = _uid(study, "StudyInstanceUID", "an evidence item")
        for series in _items(study, "ReferencedSeriesSequence", f"study {study_uid}"):
            series_uid = _uid(series, "SeriesInstanceUID", f"a series item of {study_uid}")
            for sop in _items(series, "ReferencedSOPSequence", f"series {series_uid}"):
                references.append(
                    Reference(
                        study_uid,
                        series_uid,
                        _uid(sop, "ReferencedSOPClassUID", f"an item of series {series_uid}"),
                        _uid(sop, "ReferencedSOPInstanceUID", f"an item of series {series_uid}"),
                    )
                )
    return RejectionNote(
        _uid(ds, "SOPInstanceUID", "the note"),
        _uid(ds, "StudyInstanceUID", "the note"),
        _uid(ds, "SeriesInstanceUID", "the note"),
        reason,
        tuple(dict.fromkeys(references)),
    )


def build_note(
    reason: RejectionReason,
    references: Sequence[Reference],
    *,
    patient: dict[str, Any],
    study: dict[str, Any],
    manufacturer: str = "kho",
    now: float | None = None,
) -> bytes:
    """A rejection note (Part 10, Explicit VR Little Endian) naming ``references``, all of
    one study; ``patient`` and ``study``: their catalogued attributes (keywords as keys),
    copied so the note files under the same patient and study."""
    if not references:
        raise DatasetMismatchError("a rejection note must name at least one instance")
    stamp = time.localtime(now if now is not None else time.time())
    ds = Dataset()
    for keyword, value in {**patient, **study}.items():
        setattr(ds, keyword, value)
    ds.SOPClassUID = KOS_SOP_CLASS
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = references[0].study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "KO"
    ds.SeriesNumber = 9999
    ds.SeriesDescription = reason.meaning
    ds.ReferencedPerformedProcedureStepSequence = DicomSequence()
    ds.Manufacturer = manufacturer
    ds.InstanceNumber = 1
    ds.ContentDate = time.strftime("%Y%m%d", stamp)
    ds.ContentTime = time.strftime("%H%M%S", stamp)
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator = reason.code, "DCM"
    title.CodeMeaning = reason.meaning
    ds.ConceptNameCodeSequence = DicomSequence([title])
    template = Dataset()
    template.MappingResource, template.TemplateIdentifier = "DCMR", "2010"
    ds.ContentTemplateSequence = DicomSequence([template])
    content = []
    by_series: dict[str, list[Reference]] = {}
    for ref in references:
        by_series.setdefault(ref.series_uid, []).append(ref)
        sop = Dataset()
        sop.ReferencedSOPClassUID, sop.ReferencedSOPInstanceUID = ref.sop_class_uid, ref.sop_uid
        item = Dataset()
        item.RelationshipType, item.ValueType = "CONTAINS", "COMPOSITE"
        item.ReferencedSOPSequence = DicomSequence([sop])
        content.append(item)
    ds.ContentSequence = DicomSequence(content)
    series_items = []
    for series_uid, refs in by_series.items():
        series = Dataset()
        series.SeriesInstanceUID = series_uid
        sops = []
        for ref in refs:
            sop = Dataset()
            sop.ReferencedSOPClassUID = ref.sop_class_uid
            sop.ReferencedSOPInstanceUID = ref.sop_uid
            sops.append(sop)
        series.ReferencedSOPSequence = DicomSequence(sops)
        series_items.append(series)
    evidence = Dataset()
    evidence.StudyInstanceUID = references[0].study_uid
    evidence.ReferencedSeriesSequence = DicomSequence(series_items)
    ds.CurrentRequestedProcedureEvidenceSequence = DicomSequence([evidence])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(KOS_SOP_CLASS)
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()
