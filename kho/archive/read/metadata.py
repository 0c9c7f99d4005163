"""DICOM JSON (PS3.18 F) of an instance: made from its header, stored at
finishing, read back (compressed) for WADO-RS metadata.

Patient updates from the hospital information system (kho.archive.patients) reach the
metadata: when the instance's patient is one the HIS manages, the Patient module
attributes of the document (Patient's Name, Patient ID, Issuer of Patient ID, Birth Date,
Sex, Other Patient IDs Sequence with the citizen ID) are the HIS's current values, as in
C-FIND and QIDO-RS.  The instance's bytes are not touched: WADO-RS and C-GET/C-MOVE send
them as received (same SHA-256), unless the retrieval path asks ``coerce_patient`` for a
copy with the Patient module rewritten (dcm4chee's behaviour on the way out).  The
documents' cache keys (documents_key, series_version) include the patient's revision, so
an update is seen at once."""

from __future__ import annotations

import hashlib
import json
import struct
import threading
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from io import BytesIO
from typing import TYPE_CHECKING, Any

import pydicom
from pydicom.dataset import Dataset

from kho.archive.dataset.part10 import PIXEL_DATA, Part10Layout
from kho.archive.read import objects
from kho.errors import InvalidDicomError

if TYPE_CHECKING:
    from kho.archive.catalog import InstanceRecord
    from kho.archive.read.source import StoredArchive

#: the derived object's name (its key is ``<instance prefix>.metadata``; no dot in object names)
METADATA_OBJECT = "metadata"


#: stored BulkDataURI values start with this; the HTTP layer prefixes the instance URL
BULKDATA_PLACEHOLDER = "bulkdata/"


#: binary values longer than this go out as BulkDataURI (PS3.18 leaves the size to us)
BULK_THRESHOLD = 1024


_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})


_parsed = threading.local()


def full_header(data: bytes, layout: Part10Layout) -> Dataset:
    """Every attribute before the pixel data (the catalog's parse keeps only its tags).

    The last parse per thread is remembered, so the derivers of one ingest parse once.
    """
    cached = getattr(_parsed, "entry", None)
    if cached is not None and cached[0] is data:
        ds: Dataset = cached[1]
        return ds
    stop = layout.pixels.element_offset if layout.pixels else len(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(BytesIO(data[:stop]), stop_before_pixels=True, force=True)
    except Exception as exc:  # pydicom raises many types on odd input
        raise InvalidDicomError(f"cannot parse dataset: {exc}") from exc
    _parsed.entry = (data, ds)
    return ds


def dataset_json(ds: Dataset, pixels_vr: str | None, pixel_tag: int = PIXEL_DATA) -> dict[str, Any]:
    """DICOM JSON of a header; top-level large binary values and the pixel data become
    relative BulkDataURIs (nested small binaries such as icon images stay inline)."""
    bulk: dict[str, str] = {}
    for elem in ds:
        value = elem.value
        if elem.VR in _BINARY_VRS and isinstance(value, bytes) and len(value) > BULK_THRESHOLD:
            bulk[f"{elem.tag:08X}"] = elem.VR
    # element by element: Dataset.to_json_dict(suppress_invalid_tags=True) would switch
    # pydicom's process-wide reading mode to strict meanwhile, and every other thread
    # (receiving over DIMSE) would then fail on values kho tolerates
    out: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for key in ds.keys():  # noqa: SIM118 (iterating a Dataset yields elements)
            try:
                out[f"{key:08X}"] = ds[key].to_json_dict(None, 1 << 62)
            except Exception:  # a value pydicom cannot express in JSON: left out
                continue
    for tag, vr in bulk.items():
        out[tag] = {"vr": vr, "BulkDataURI": BULKDATA_PLACEHOLDER + tag}
    if pixels_vr is not None:
        tag = f"{pixel_tag:08X}"
        out[tag] = {"vr": pixels_vr, "BulkDataURI": BULKDATA_PLACEHOLDER + tag}
    return dict(sorted(out.items()))


def pixel_vr(layout: Part10Layout, bits_allocated: int | None) -> str | None:
    pixels = layout.pixels
    if pixels is None:
        return None
    return _vr_of(pixels.tag, pixels.encapsulated, bits_allocated)


def _vr_of(tag: int, encapsulated: bool, bits_allocated: int | None) -> str:
    if tag != PIXEL_DATA:
        return "OD" if tag == 0x7FE00009 else "OF"
    if encapsulated or (bits_allocated or 8) <= 8:
        return "OB"
    return "OW"


def encode(document: dict[str, Any]) -> bytes:
    """Compact JSON; the HTTP layer relies on the exact ``"BulkDataURI":"bulkdata/`` form."""
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def stored_document(blob: bytes) -> bytes:
    """The JSON text of a stored metadata object: a zstd frame, or (written by older
    versions) the JSON itself, which always starts with "{"."""
    if blob[:4] == objects.ZSTD_MAGIC:
        return objects.decompress(blob)
    return blob


_STORED_URI = b'"BulkDataURI":"' + BULKDATA_PLACEHOLDER.encode()


def instance_document(archive: StoredArchive, record: InstanceRecord) -> bytes:
    """The instance's stored DICOM JSON (relative BulkDataURIs); made from its stored
    header when it has none (not finished yet, stored by an older version, or too small
    to afford one: kho.archive.finish.derived.fit_derived), never from its pixels.  With
    the HIS's current patient (patient_overlay), if it manages the patient."""
    key = record.derived_keys.get(METADATA_OBJECT)
    if key:
        document = stored_document(archive.store.get(key))
    else:
        document = document_from_header(archive, record)
    overlay = patient_overlay(archive, record.study_uid)
    return document if overlay is None else overlay.applied(document)


# --- the HIS's patient ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PatientOverlay:
    """The Patient module as the hospital information system knows it now."""

    patient_id: str
    issuer: str
    name: str
    birth_date: str
    sex: str
    #: (identifier, issuer): the citizen ID and other identifiers
    other_ids: tuple[tuple[str, str], ...]
    #: changes with every update of the patient (cache keys)
    version: str

    def attributes(self) -> dict[str, Any]:
        """The DICOM JSON of the Patient module attributes it sets."""

        def text(vr: str, value: str) -> dict[str, Any]:
            return {"vr": vr, "Value": [value]} if value else {"vr": vr}

        name: dict[str, Any] = {"vr": "PN"}
        if self.name:
            name["Value"] = [{"Alphabetic": self.name}]
        return {
            "00100010": name,
            "00100020": text("LO", self.patient_id),
            "00100021": text("LO", self.issuer),
            "00100030": text("DA", self.birth_date),
            "00100040": text("CS", self.sex),
        }

    def applied(self, document: bytes) -> bytes:
        """A DICOM JSON document with this Patient module (its Other Patient IDs items
        kept, the HIS's identifiers added)."""
        data = json.loads(document)
        data.update(self.attributes())
        items = list(data.get("00101002", {}).get("Value", []))
        known = {(_first(item.get("00100020")), _first(item.get("00100021"))) for item in items}
        for identifier, issuer in self.other_ids:
            if (identifier, issuer) not in known:
                items.append(
                    {
                        "00100020": {"vr": "LO", "Value": [identifier]},
                        "00100021": {"vr": "LO", "Value": [issuer]} if issuer else {"vr": "LO"},
                        "00100022": {"vr": "CS", "Value": ["TEXT"]},
                    }
                )
        if items:
            data["00101002"] = {"vr": "SQ", "Value": items}
        texts = [self.name, self.patient_id, self.issuer]
        if not all(t.isascii() for t in texts):
            data["00080005"] = {"vr": "CS", "Value": ["ISO_IR 192"]}
        return encode(dict(sorted(data.items())))


def _first(element: Any) -> str:
    values = (element or {}).get("Value") or [""]
    return str(values[0])


def patient_overlay(archive: StoredArchive, study_uid: str) -> PatientOverlay | None:
    """The HIS's current patient of a study (None: the HIS does not manage it)."""
    catalog = archive.catalog
    row = catalog.fetchone(
        "SELECT h.patient_key, h.patient_id, h.issuer_of_patient_id, h.patient_name, "
        "h.patient_birth_date, h.patient_sex, h.revision FROM studies s "
        "JOIN his_patients h ON h.patient_key = s.patient_key AND h.merged_into = '' "
        "WHERE s.study_uid = ?",
        (study_uid,),
    )
    if row is None:
        return None
    key, patient_id, issuer, name, birth_date, sex, revision = row
    identifiers = catalog.fetchall(
        "SELECT identifier, issuer FROM patient_identifiers WHERE patient_key = ? "
        "ORDER BY origin, identifier",
        (key,),
    )
    return PatientOverlay(
        str(patient_id),
        str(issuer),
        str(name),
        str(birth_date),
        str(sex),
        tuple((str(i), str(s)) for i, s in identifiers),
        f"{key}:{revision}",
    )


def coerce_patient(data: bytes, overlay: PatientOverlay) -> bytes:
    """A copy of Part 10 bytes with the Patient module set to the HIS's values (for a
    retrieval that asks for coerced instances; the stored bytes stay as received).  The
    dataset is written in its own transfer syntax, UTF-8 when a value needs it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(BytesIO(data), force=True)
    texts = [overlay.name, overlay.patient_id, overlay.issuer]
    if not all(t.isascii() for t in texts):
        ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = overlay.name
    ds.PatientID = overlay.patient_id
    ds.IssuerOfPatientID = overlay.issuer
    ds.PatientBirthDate = overlay.birth_date
    ds.PatientSex = overlay.sex
    if overlay.other_ids:
        items = []
        for identifier, issuer in overlay.other_ids:
            item = Dataset()
            item.PatientID = identifier
            item.IssuerOfPatientID = issuer
            item.TypeOfPatientID = "TEXT"
            items.append(item)
        ds.OtherPatientIDsSequence = items
    out = BytesIO()
    ds.save_as(out, enforce_file_format=False)
    return out.getvalue()


def document_from_header(archive: StoredArchive, record: InstanceRecord) -> bytes:
    """What kho.archive.finish.derived.metadata_deriver made for the instance, from its
    stored header alone."""
    head = _stored_head(archive, record)
    header = _parse_head(head)
    if record.pixel_format == "none":
        return encode(dataset_json(header, None))
    tag = _pixel_tag(head, record.transfer_syntax_uid)
    encapsulated = record.pixel_format == "encapsulated"
    return encode(dataset_json(header, _vr_of(tag, encapsulated, record.bits_allocated), tag))


def stored_header(archive: StoredArchive, record: InstanceRecord) -> Dataset:
    """The instance's full header, parsed from its stored header object (no pixel read)."""
    return _parse_head(_stored_head(archive, record))


def _stored_head(archive: StoredArchive, record: InstanceRecord) -> bytes:
    """The instance's bytes up to its pixel value (all of them when it has none)."""
    if record.pixel_format == "none":
        return objects.read_header_object(archive.store, record.header_key)
    # kept whole, the instance's object is read up to its pixel value only
    return objects.read_header_range(archive.store, record.header_key, 0, record.pixel_split)


def _parse_head(head: bytes) -> Dataset:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(BytesIO(head), stop_before_pixels=True, force=True)
    except Exception as exc:
        raise InvalidDicomError(f"cannot parse the stored header: {exc}") from exc


_PIXEL_TAGS = frozenset({PIXEL_DATA, 0x7FE00008, 0x7FE00009})


def _pixel_tag(head: bytes, transfer_syntax_uid: str) -> int:
    """The pixel element's tag, from its element header, the last bytes before the value
    (8 of them in Implicit VR, 12 in Explicit VR for OB/OW/OF/OD)."""
    implicit = transfer_syntax_uid == "1.2.840.10008.1.2"
    order = ">HH" if transfer_syntax_uid == "1.2.840.10008.1.2.2" else "<HH"
    at = len(head) - (8 if implicit else 12)
    if at < 0:
        return PIXEL_DATA
    group, element = struct.unpack_from(order, head, at)
    tag = (group << 16) | element
    return tag if tag in _PIXEL_TAGS else PIXEL_DATA


def with_absolute_uris(document: bytes, instance_url: str) -> bytes:
    """Make the stored relative BulkDataURIs absolute under ``instance_url``."""
    if _STORED_URI not in document:
        return document
    return document.replace(_STORED_URI, b'"BulkDataURI":"' + instance_url.encode() + b"/bulkdata/")


def documents_key(records: list[InstanceRecord], archive: StoredArchive | None = None) -> str:
    """Changes whenever an instance of the list is added, removed or replaced, and (given
    the archive) whenever the HIS updates the patient of its studies."""
    patients = (
        [_patient_version(archive, uid) for uid in sorted({r.study_uid for r in records})]
        if archive is not None
        else []
    )
    return _version([*(record.object_prefix for record in records), *filter(None, patients)])


def series_version(archive: StoredArchive, study_uid: str, series_uid: str) -> str | None:
    """documents_key(records, archive) of a series from one indexed single-column query
    (a cache check that costs far less than loading the instance records) and the
    patient's revision; None if there is no series."""
    rows = archive.catalog.fetchall(
        "SELECT object_prefix FROM instances WHERE series_uid = ? AND study_uid = ?",
        (series_uid, study_uid),
    )
    if not rows:
        return None
    patient = _patient_version(archive, study_uid)
    return _version([*(r[0] for r in rows), *([patient] if patient else [])])


def _patient_version(archive: StoredArchive, study_uid: str) -> str:
    """The HIS's revision of a study's patient ("" when the HIS does not manage it)."""
    row = archive.catalog.fetchone(
        "SELECT h.patient_key, h.revision FROM studies s JOIN his_patients h "
        "ON h.patient_key = s.patient_key AND h.merged_into = '' WHERE s.study_uid = ?",
        (study_uid,),
    )
    return f"patient {row[0]}:{row[1]}" if row is not None else ""


def _version(prefixes: Iterable[str]) -> str:
    # each stored version of an instance has its own prefix (it ends with its SHA-256)
    return hashlib.sha256("\n".join(sorted(prefixes)).encode()).hexdigest()
