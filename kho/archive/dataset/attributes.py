"""The catalog attributes of one instance, read from its header.

Only the bytes before the pixel data are parsed (``stop_before_pixels``), so this costs the
same for a 1 KB and a 1 GB instance.  Two readers give the same values: pydicom's
(``read_header``), and ``read_catalog_values``, which picks the ~35 values straight from the
top-level elements that the Part 10 walk found (kho.archive.dataset.part10), about ten times
cheaper.  The second one answers only where it reads exactly what pydicom would (a
single-byte or UTF-8 character set, dictionary VRs, no catalogued sequence, no repeated
tag, plain integers); anything else is read with pydicom.
"""

from __future__ import annotations

import hashlib
import re
import struct
from io import BytesIO
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError as PydicomInvalidDicomError

from kho.archive.catalog.records import InstanceAttributes
from kho.archive.catalog.sequences import SEQUENCES, extract_sequences
from kho.archive.dataset.part10 import Part10Layout
from kho.errors import DatasetMismatchError, InvalidDicomError

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
# what is tolerated from real-world writers (letters, hex hashes); anything else is refused
_LENIENT_UID = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]*$")


def check_uid(value: str, name: str, warnings: list[str] | None = None) -> str:
    """A UID as PS3.5 9.1 defines it, or a harmless non-conformant one (with a warning).

    Refused (DatasetMismatchError): empty, longer than 64 characters, an empty component,
    or holding anything but letters, digits, '.', '-' and '_' (path separators, spaces,
    control characters).
    """
    if not value:
        raise DatasetMismatchError(f"missing {name}")
    shown = value if len(value) <= 80 else value[:77] + "..."
    if len(value) > 64 or not _LENIENT_UID.match(value):
        raise DatasetMismatchError(f"invalid {name} {shown!r}: not a DICOM UID")
    if "" in value.split("."):
        # DICOMweb paths refuse it too: an instance catalogued under it could not be reached
        raise DatasetMismatchError(f"invalid {name} {shown!r}: empty UID component")
    if not _UID.match(value) and warnings is not None:
        warnings.append(f"non-conformant {name} {value!r} accepted as is")
    return value


def surrogate_uid(kind: str, anchor: str) -> str:
    """A deterministic UID (2.25 form) for the catalog when a dataset lacks one; the
    instance's bytes are never changed."""
    digest = hashlib.sha256(f"kho-{kind}\x00{anchor}".encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:15], "big"))


def _text(ds: Dataset | CatalogValues, keyword: str, limit: int = 256) -> str:
    """A top-level attribute as text ('' if absent or empty); multi-values joined by '\\'."""
    try:
        elem = ds.get(keyword)
    except Exception:  # a malformed value must not fail ingest of a well-formed file
        return ""
    if elem is None:
        return ""
    value: Any = elem
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        text = "\\".join(str(v) for v in value)
    else:
        text = str(value)
    return text.strip().replace("\x00", "")[:limit]


def _int(ds: Dataset | CatalogValues, keyword: str) -> int | None:
    try:
        value: Any = ds.get(keyword)
        if value is None or value == "":
            return None
        if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
            value = value[0]
        return int(value)
    except Exception:
        return None


CATALOG_KEYWORDS = (
    "SpecificCharacterSet",
    "PatientID",
    "IssuerOfPatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "StudyDescription",
    "ReferringPhysicianName",
    "SeriesInstanceUID",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "BodyPartExamined",
    "SeriesDate",
    "SeriesTime",
    "SOPInstanceUID",
    "SOPClassUID",
    "InstanceNumber",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "ContentDate",
    "ContentTime",
    # the catalogued sequences (kho.archive.catalog.sequences)
    "OtherPatientIDsSequence",
    "ProcedureCodeSequence",
    "RequestAttributesSequence",
)
assert set(SEQUENCES) <= set(CATALOG_KEYWORDS), "catalogued sequences must be parsed"
#: only these top-level tags are parsed at ingest (derivers that need more re-read)
CATALOG_TAGS = [int(pydicom.datadict.tag_for_keyword(k) or 0) for k in CATALOG_KEYWORDS]


def read_header(data: bytes | memoryview, stop: int | None = None) -> Dataset:
    """Parse ``data[:stop]`` (a Part 10 file or a bare dataset) without the pixel data."""
    raw = bytes(data[:stop]) if stop is not None else bytes(data)
    try:
        return pydicom.dcmread(
            BytesIO(raw), stop_before_pixels=True, force=True, specific_tags=CATALOG_TAGS
        )
    except (PydicomInvalidDicomError, ValueError, EOFError, KeyError, OSError) as exc:
        raise InvalidDicomError(f"cannot parse dataset: {exc}") from exc
    except Exception as exc:  # pydicom raises a zoo of types on hostile input
        raise InvalidDicomError(f"cannot parse dataset: {type(exc).__name__}: {exc}") from exc


#: keyword -> (tag, dictionary VR) of what the catalog reads
_CATALOG_ELEMENTS = {
    keyword: (tag, str(pydicom.datadict.dictionary_VR(tag)))
    for keyword, tag in zip(CATALOG_KEYWORDS, CATALOG_TAGS, strict=True)
}
_SEQUENCE_TAGS = frozenset(_CATALOG_ELEMENTS[k][0] for k in SEQUENCES)
_SPECIFIC_CHARACTER_SET = 0x00080005
# character sets whose text reads the same byte by byte (pydicom's codec for each)
_SINGLE_CODEC_CHARSETS = {"": "latin_1", "ISO_IR 6": "latin_1", "ISO_IR 100": "latin_1"}
_UTF8_CHARSET = "ISO_IR 192"
_CHARSET_VRS = frozenset({"SH", "LO", "UC", "PN", "ST", "LT", "UT"})  # decoded per charset
_PER_VALUE_STRIPPED_VRS = frozenset({"SH", "LO", "UC"})  # pydicom strips each value
_BINARY_US = {True: struct.Struct("<H"), False: struct.Struct(">H")}


class CatalogValues:
    """The catalog's values as pydicom would give them (``get(keyword)``), read without it."""

    __slots__ = ("_values",)

    def __init__(self, values: dict[str, str | int]) -> None:
        self._values = values

    def get(self, keyword: str, default: object = None) -> object:
        return self._values.get(keyword, default)


def read_catalog_values(data: bytes | memoryview, layout: Part10Layout) -> CatalogValues | None:
    """The catalog values from the walked top-level elements, or None where only pydicom's
    reading is to be trusted (see the module docstring)."""
    top = layout.top_level
    if top is None or top.duplicated:
        return None
    elements = top.elements
    if not _SEQUENCE_TAGS.isdisjoint(elements):
        return None
    charset = ""
    if _SPECIFIC_CHARACTER_SET in elements:
        _vr, offset, length = elements[_SPECIFIC_CHARACTER_SET]
        charset = bytes(data[offset : offset + length]).decode("latin_1").strip(" \x00")
    if charset in _SINGLE_CODEC_CHARSETS:
        text_codec = "latin_1"
    elif charset == _UTF8_CHARSET:
        text_codec = "utf_8"
    else:  # other character sets and code extensions: pydicom's decoding
        return None
    values: dict[str, str | int] = {}
    # pydicom reads the header only, up to the pixel data
    header_end = layout.pixels.element_offset if layout.pixels is not None else len(data)
    for keyword, (tag, vr) in _CATALOG_ELEMENTS.items():
        span = elements.get(tag)
        if span is None:
            continue
        encoded_vr, offset, length = span
        if offset > header_end:
            return None  # out of order, after the pixel data: left to pydicom's reading
        if not length:
            continue
        if encoded_vr is not None and encoded_vr.decode("latin_1") != vr:
            return None  # pydicom would read it by the VR as encoded
        raw = bytes(data[offset : offset + length])
        if vr == "US":
            if length % 2:
                return None
            values[keyword] = _BINARY_US[top.little].unpack_from(raw)[0]
            continue
        try:
            text = raw.decode(text_codec if vr in _CHARSET_VRS else "latin_1")
        except UnicodeDecodeError:
            return None
        if vr == "IS":
            try:
                values[keyword] = int(text.split("\\")[0])
            except ValueError:
                return None  # pydicom accepts '5.0', '1e1'...: let it
            continue
        if vr in _PER_VALUE_STRIPPED_VRS:
            text = "\\".join(value.rstrip("\x00 ") for value in text.split("\\"))
        values[keyword] = text
    return CatalogValues(values) if values else None


def extract_attributes(
    ds: Dataset | CatalogValues,
    *,
    sop_uid_fallback: str = "",
    sop_class_fallback: str = "",
    surrogate_sop_anchor: str | None = None,
    invent_missing_uids: bool = True,
) -> InstanceAttributes:
    """Catalog attributes of a parsed header; DatasetMismatchError for unusable identity.

    SOP Instance / Class UID come from the dataset, else from the File Meta or the DIMSE
    command (``*_fallback``).  A missing Study or Series Instance UID is catalogued under a
    surrogate UID (derived from the series, or the study, series number and modality, else
    the SOP Instance UID), so the instance is still accepted and found; ``coerced`` names
    them, for the answer to the sender.  ``invent_missing_uids=False``: such an instance is
    refused (DatasetMismatchError).  With ``surrogate_sop_anchor`` (file import only), an
    instance with no SOP Instance UID anywhere gets one derived from that anchor.
    """
    warnings: list[str] = []
    sop_text = _text(ds, "SOPInstanceUID", 200) or sop_uid_fallback
    if not sop_text and surrogate_sop_anchor is not None:
        sop_text = surrogate_uid("instance", surrogate_sop_anchor)
        warnings.append(f"no SOP Instance UID: catalogued under {sop_text}")
    sop_uid = check_uid(sop_text, "SOP Instance UID (0008,0018)", warnings)
    sop_class_uid = check_uid(
        _text(ds, "SOPClassUID", 200) or sop_class_fallback, "SOP Class UID (0008,0016)", warnings
    )
    coerced: list[tuple[str, str]] = []
    study_text = _text(ds, "StudyInstanceUID", 200)
    series_text = _text(ds, "SeriesInstanceUID", 200)
    if not (study_text and series_text) and not invent_missing_uids:
        missing = "Study" if not study_text else "Series"
        raise DatasetMismatchError(f"missing {missing} Instance UID (Type 1)")
    if study_text:
        study_uid = check_uid(study_text, "Study Instance UID (0020,000D)", warnings)
    else:
        # instances of one series share the invented study
        study_uid = surrogate_uid("study", series_text or sop_uid)
        coerced.append(("StudyInstanceUID", study_uid))
    if series_text:
        series_uid = check_uid(series_text, "Series Instance UID (0020,000E)", warnings)
    else:
        # instances of one study with one series number and modality share the invented
        # series; without a study, one series per instance
        anchor = (
            f"{study_uid}\x00{_text(ds, 'SeriesNumber')}\x00{_text(ds, 'Modality')}"
            if study_text
            else sop_uid
        )
        series_uid = surrogate_uid("series", anchor)
        coerced.append(("SeriesInstanceUID", series_uid))
    warnings += [f"no {keyword}: catalogued under {uid}" for keyword, uid in coerced]
    frames = _int(ds, "NumberOfFrames")
    return InstanceAttributes(
        patient_id=_text(ds, "PatientID", 64),
        issuer_of_patient_id=_text(ds, "IssuerOfPatientID", 64),
        patient_name=_text(ds, "PatientName", 324),
        # dates keep 10 characters: the ACR-NEMA "YYYY.MM.DD" of old files, which queries match
        patient_birth_date=_text(ds, "PatientBirthDate", 10),
        patient_sex=_text(ds, "PatientSex", 16),
        study_uid=study_uid,
        study_date=_text(ds, "StudyDate", 10),
        study_time=_text(ds, "StudyTime", 16),
        accession_number=_text(ds, "AccessionNumber", 16),
        study_id=_text(ds, "StudyID", 16),
        study_description=_text(ds, "StudyDescription", 64),
        referring_physician_name=_text(ds, "ReferringPhysicianName", 324),
        series_uid=series_uid,
        modality=_text(ds, "Modality", 16),
        series_number=_int(ds, "SeriesNumber"),
        series_description=_text(ds, "SeriesDescription", 64),
        body_part_examined=_text(ds, "BodyPartExamined", 16),
        series_date=_text(ds, "SeriesDate", 10),
        series_time=_text(ds, "SeriesTime", 16),
        sop_uid=sop_uid,
        sop_class_uid=sop_class_uid,
        instance_number=_int(ds, "InstanceNumber"),
        rows=_int(ds, "Rows"),
        columns=_int(ds, "Columns"),
        number_of_frames=frames if frames and frames > 0 else 1,
        bits_allocated=_int(ds, "BitsAllocated"),
        bits_stored=_int(ds, "BitsStored"),
        pixel_representation=_int(ds, "PixelRepresentation"),
        samples_per_pixel=_int(ds, "SamplesPerPixel"),
        photometric_interpretation=_text(ds, "PhotometricInterpretation", 16),
        planar_configuration=_int(ds, "PlanarConfiguration"),
        content_date=_text(ds, "ContentDate", 10),
        content_time=_text(ds, "ContentTime", 16),
        sop_uid_in_dataset=bool(_text(ds, "SOPInstanceUID", 200)),
        warnings=warnings,
        coerced=tuple(coerced),
        sequences=extract_sequences(ds) if isinstance(ds, Dataset) else {},
    )
