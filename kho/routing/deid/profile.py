"""De-identification: PS3.15 Annex E's Basic Application Level Confidentiality Profile and
its Options, as Table E.1-1 says attribute by attribute (kho.routing.deid.table, generated
from the standard's text).

What each action becomes here:

- X: removed; Z: emptied; D: a dummy of the right VR (``ANONYMIZED``, 19000101, 0); U: the
  UID's project mapping (below); K: kept; C: cleaned (dates shifted by the patient's
  offset with the Modified Dates Option; text with the instance's own identifiers taken
  out with the Clean Descriptors Option; sequences processed item by item).
- Where the table leaves the choice to the IOD's type (X/Z, X/D, Z/D, X/Z/D) kho keeps the
  attribute, empty (Z) or with a dummy (D): the instance stays valid whatever its IOD,
  and neither form identifies anyone.  X/Z/U* sequences (Referenced Image, Source Image)
  are kept with their UIDs mapped.  A sequence to be replaced by a dummy (D: Content
  Sequence without the Clean Structured Content Option, Verifying Observer) is emptied.
- Private attributes are removed (the Retain Safe Private Option is not offered), curves
  (50xx) too, and an overlay (60xx) whose data the profile removes goes with its whole
  group.  The Clean Graphics, Clean Pixel Data and Clean Recognizable Visual Features
  Options are not offered: an instance whose Burned In Annotation or Recognizable Visual
  Features is YES is withheld unless its route allows it.
- Attributes the table does not list are kept, except person names (emptied), dates and
  date-times (as the project treats dates), and UIDs that are not registered DICOM UIDs
  (mapped): PS3.15 E.1.1 suggests handling dates and times by their VR, since the table
  cannot list attributes added after its edition.
- Pixel Data and every other bulk value are written back byte for byte.

Project mapping: a UID becomes ``2.25.<the first 128 bits of HMAC-SHA-256(secret, UID)>``,
the same in every instance sent under the project (references stay intact, the same study
sent twice is the same study), and unrelated to it without the secret.  Patient ID and
Patient's Name become ``ANON-`` and 12 hex digits of the same HMAC of the patient's
identifier; dates shift by a whole number of days per patient (or the project's fixed
offset).  The instance then says what was done: Patient Identity Removed YES, the
De-identification Method and its codes (CID 7050), Longitudinal Temporal Information
Modified; its File Meta Information is kho's own, as for any instance kho writes.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, timedelta

from pydicom import dcmread
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError as PydicomInvalidDicomError
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import UID, UID_dictionary

from kho.archive.dataset.part10 import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    syntax_for_encoding,
)
from kho.errors import InvalidDicomError, KhoError
from kho.routing.config import DeidProject
from kho.routing.deid.table import EDITION, ROWS

_STRING_VRS = frozenset({"AE", "CS", "LO", "LT", "SH", "ST", "UC", "UT", "UR"})
_NUMBER_VRS = frozenset({"US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"})
_BYTES_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})
_DATE_VRS = frozenset({"DA", "DT", "TM"})
_DUMMY_TEXT = "ANONYMIZED"
_DUMMY = {"DA": "19000101", "TM": "000000", "DT": "19000101000000", "IS": "0", "DS": "0"}
_DUMMY["AS"] = "000D"
#: person-identifying attributes that carry the project's pseudonym (Z/D and Z)
_PATIENT_ID = 0x00100020
_PATIENT_NAME = 0x00100010
_BURNED_IN = 0x00280301
_RECOGNIZABLE = 0x00280302
_CONTENT_SEQUENCE = 0x0040A730
_TEXT_VALUE = 0x0040A160
_MAX_DEPTH = 32
#: what says an instance's pixels may identify its patient
_IDENTIFYING_PIXELS = (
    (_BURNED_IN, "burned-in annotation"),
    (_RECOGNIZABLE, "recognizable visual features"),
)
_NAME_KEYWORDS = ("PatientName", "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName")

#: CID 7050 (De-identification Method), PS3.16: the Profile and each Option kho applies
_METHOD_CODES = {
    "basic": ("113100", "Basic Application Confidentiality Profile"),
    "clean_structured_content": ("113104", "Clean Structured Content Option"),
    "clean_descriptors": ("113105", "Clean Descriptors Option"),
    "full_dates": ("113106", "Retain Longitudinal Temporal Information Full Dates Option"),
    "modified_dates": (
        "113107",
        "Retain Longitudinal Temporal Information Modified Dates Option",
    ),
    "patient_characteristics": ("113108", "Retain Patient Characteristics Option"),
    "device": ("113109", "Retain Device Identity Option"),
    "uids": ("113110", "Retain UIDs Option"),
    "institution": ("113112", "Retain Institution Identity Option"),
}
#: where the table leaves the choice to the IOD's type: the choice that keeps any IOD valid
_COMPOUND = {"X/Z": "Z", "X/D": "D", "Z/D": "D", "X/Z/D": "D", "X/Z/U*": "U*"}


class WithheldError(KhoError):
    """An instance that may not leave de-identified: its pixels may show who it is."""


@dataclass(frozen=True, slots=True)
class Deidentified:
    """A de-identified instance: Part 10 bytes and its new UIDs."""

    data: bytes
    sop_uid: str
    series_uid: str
    study_uid: str


def _table() -> tuple[dict[int, tuple[str, dict[str, str]]], dict[str, tuple[str, dict[str, str]]]]:
    """Table E.1-1 by tag; the wildcard rows (curves, overlays, private) by pattern."""
    exact: dict[int, tuple[str, dict[str, str]]] = {}
    patterns: dict[str, tuple[str, dict[str, str]]] = {}
    for tag, _name, basic, options in ROWS:
        if "x" in tag or tag == "private":
            patterns[tag] = (basic, options)
        else:
            exact[int(tag, 16)] = (basic, options)
    return exact, patterns


_EXACT, _PATTERNS = _table()


def profile_rows() -> Iterable[tuple[str, str, str, dict[str, str]]]:
    """Table E.1-1's rows (tag, name, Basic Profile action, {option: action})."""
    return ROWS


def resolve(basic: str, options: dict[str, str], enabled: frozenset[str]) -> str:
    """The one action for an attribute: an Option's requirement overrides the Profile's
    (PS3.15 E.3); of two Options, cleaning wins over keeping (a retained device's
    calibration date is still shifted when dates are modified)."""
    chosen = [options[name] for name in enabled if name in options]
    if "C" in chosen:
        return "C"
    if "K" in chosen:
        return "K"
    return _COMPOUND.get(basic, basic)


def _row_for(tag: BaseTag) -> tuple[str, dict[str, str]] | None:
    row = _EXACT.get(int(tag))
    if row is not None:
        return row
    group = tag.group
    if 0x5000 <= group <= 0x50FF and group % 2 == 0:
        return _PATTERNS.get("50xxxxxx")
    if 0x6000 <= group <= 0x60FF and group % 2 == 0:
        return _PATTERNS.get(f"60xx{tag.element:04x}")
    return None


def _shift_date(text: str, days: int) -> str:
    """A DA (YYYYMMDD) or the date part of a DT moved by ``days``; anything unreadable
    becomes the dummy date (it cannot be shifted, so it cannot stay)."""
    head, tail = text[:8], text[8:]
    try:
        moved = date(int(head[:4]), int(head[4:6]), int(head[6:8])) + timedelta(days=days)
    except ValueError:
        return _DUMMY["DA"] + tail if len(head) == 8 else ""
    return f"{moved.year:04d}{moved.month:02d}{moved.day:02d}{tail}"


class Deidentifier:
    """One project's de-identification (see the module docstring).  Thread-safe."""

    def __init__(self, project: DeidProject, *, name: str = "") -> None:
        self.project = project
        self.name = name
        self._key = project.secret.get_secret_value().encode("utf-8")
        enabled = {"basic"}
        if project.retain_uids:
            enabled.add("uids")
        if project.retain_device_identity:
            enabled.add("device")
        if project.retain_institution_identity:
            enabled.add("institution")
        if project.retain_patient_characteristics:
            enabled.add("patient_characteristics")
        if project.dates == "keep":
            enabled.add("full_dates")
        elif project.dates == "shift":
            enabled.add("modified_dates")
        if project.clean_descriptors:
            enabled.add("clean_descriptors")
        if project.clean_structured_content:
            enabled.add("clean_structured_content")
        self.options = frozenset(enabled)

    # --- the project's mappings ---------------------------------------------------------

    def _mac(self, purpose: str, value: str) -> bytes:
        return hmac.new(self._key, f"{purpose}:{value}".encode(), hashlib.sha256).digest()

    def uid(self, original: str) -> str:
        """The project's UID for ``original`` (2.25 form, PS3.5 B.2)."""
        original = original.strip().rstrip("\x00")
        if not original or "uids" in self.options:
            return original
        return "2.25." + str(int.from_bytes(self._mac("uid", original)[:16], "big"))

    def pseudonym(self, patient_id: str, issuer: str = "") -> str:
        return "ANON-" + self._mac("patient", f"{issuer}\\{patient_id}").hex()[:12].upper()

    def date_offset(self, patient_id: str, issuer: str = "") -> int:
        """Days every date of this patient moves (negative: earlier)."""
        if self.project.date_shift_days is not None:
            return self.project.date_shift_days
        value = int.from_bytes(self._mac("dates", f"{issuer}\\{patient_id}")[:4], "big")
        return -(365 + value % (3650 - 365 + 1))

    # --- one instance -------------------------------------------------------------------

    def apply(
        self,
        data: bytes,
        *,
        allow_burned_in: bool = False,
        sop_class_uid: str = "",
        sop_instance_uid: str = "",
    ) -> Deidentified:
        """De-identify one Part 10 instance (or a dataset without File Meta
        Information).  ``sop_class_uid``, ``sop_instance_uid``: the catalog's, for an
        instance that lacks them (kho files such instances under a surrogate UID).
        WithheldError for an instance whose pixels may identify its patient (unless
        ``allow_burned_in``); InvalidDicomError for bytes pydicom cannot read."""
        try:
            ds = dcmread(io.BytesIO(data), force=True)
        except (PydicomInvalidDicomError, ValueError, EOFError, OSError) as exc:
            raise InvalidDicomError(f"cannot de-identify: {exc}") from exc
        meta = ds.file_meta if ds.file_meta is not None else FileMetaDataset()
        syntax = str(meta.get("TransferSyntaxUID", "") or "")
        if not syntax:  # no File Meta: the syntax the dataset was read in
            implicit, little = ds.original_encoding
            syntax = syntax_for_encoding(bool(implicit), little is not False)
        for keyword, media, given in (
            ("SOPClassUID", "MediaStorageSOPClassUID", sop_class_uid),
            ("SOPInstanceUID", "MediaStorageSOPInstanceUID", sop_instance_uid),
        ):
            if not ds.get(keyword):
                value = given or str(meta.get(media, "") or "")
                if not value:
                    raise InvalidDicomError(f"cannot de-identify: no {keyword}")
                setattr(ds, keyword, value)
        self.apply_dataset(ds, allow_burned_in=allow_burned_in)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", "")
        meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", "")
        meta.TransferSyntaxUID = UID(str(syntax))
        meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
        ds.file_meta = meta
        ds.preamble = b"\x00" * 128
        out = io.BytesIO()
        try:
            ds.save_as(out, enforce_file_format=True)
        except (ValueError, TypeError, AttributeError, OverflowError) as exc:
            raise InvalidDicomError(f"cannot write the de-identified instance: {exc}") from exc
        return Deidentified(
            data=out.getvalue(),
            sop_uid=str(ds.get("SOPInstanceUID", "")),
            series_uid=str(ds.get("SeriesInstanceUID", "")),
            study_uid=str(ds.get("StudyInstanceUID", "")),
        )

    def apply_dataset(self, ds: Dataset, *, allow_burned_in: bool = False) -> None:
        """De-identify ``ds`` in place (its File Meta Information is left to the caller)."""
        if not allow_burned_in:
            for tag, what in _IDENTIFYING_PIXELS:
                element = ds.get(tag)
                if element is not None and str(element.value or "").strip().upper() == "YES":
                    raise WithheldError(f"withheld: the instance has {what}")
        patient_id = str(ds.get("PatientID", "") or "")
        issuer = str(ds.get("IssuerOfPatientID", "") or "")
        context = _Context(
            pseudonym=self.pseudonym(patient_id, issuer) if self.project.patient_pseudonym else "",
            offset=self.date_offset(patient_id, issuer),
            identifiers=_identifiers(ds),
        )
        self._walk(ds, context, 0)
        self._declare(ds)

    def _walk(self, ds: Dataset, context: _Context, depth: int) -> None:
        if depth > _MAX_DEPTH:
            raise InvalidDicomError("cannot de-identify: sequences nested too deep")
        overlays: set[int] = set()
        for tag in list(ds.keys()):
            if tag.is_private:
                del ds[tag]
                continue
            element = ds[tag]
            row = _row_for(tag)
            if row is None:
                self._unlisted(ds, element, context, depth)
                continue
            action = resolve(row[0], row[1], self.options)
            if action == "X" and 0x6000 <= tag.group <= 0x60FF:
                overlays.add(tag.group)
            self._act(ds, element, action, context, depth)
        if overlays:  # an overlay without its data is no overlay: the whole plane goes
            for tag in [element.tag for element in ds if element.tag.group in overlays]:
                del ds[tag]

    def _act(
        self, ds: Dataset, element: DataElement, action: str, context: _Context, depth: int
    ) -> None:
        tag, vr = element.tag, element.VR
        if action == "X":
            del ds[tag]
        elif vr == "SQ" and action in ("K", "U", "U*"):
            self._items(element, context, depth)  # kept: the profile applies to its items
        elif action in ("U", "U*"):
            self._map_uids(element)
        elif action == "K":
            pass
        elif action == "C":
            self._clean(element, context, depth)
        elif action == "Z":
            if tag in (_PATIENT_ID, _PATIENT_NAME) and context.pseudonym:
                element.value = context.pseudonym
            else:
                element.value = element.empty_value
        elif action == "D":
            self._dummy(element, context)
        else:  # an action code this version of kho does not know: nothing is risked
            del ds[tag]

    def _unlisted(self, ds: Dataset, element: DataElement, context: _Context, depth: int) -> None:
        """An attribute Table E.1-1 does not name (see the module docstring)."""
        vr = element.VR
        if vr == "SQ":
            self._items(element, context, depth)
        elif vr == "PN":
            element.value = element.empty_value
        elif vr in ("DA", "DT"):
            if "modified_dates" in self.options:
                self._shift(element, context)
            elif "full_dates" not in self.options:
                element.value = element.empty_value
        elif vr == "UI" and self._is_instance_uid(element):
            self._map_uids(element)
        elif element.tag == _TEXT_VALUE and element.value:
            # SR text: reached with Clean Structured Content (else the tree is gone)
            element.value = context.scrub(str(element.value))

    @staticmethod
    def _is_instance_uid(element: DataElement) -> bool:
        keyword = keyword_for_tag(element.tag)
        if keyword.endswith(("ClassUID", "SyntaxUID", "SchemeUID", "CreatorUID")):
            return False
        values = element.value if isinstance(element.value, list) else [element.value]
        return any(v and str(v) not in UID_dictionary for v in values)

    def _items(self, element: DataElement, context: _Context, depth: int) -> None:
        for item in element.value or []:
            self._walk(item, context, depth + 1)

    def _map_uids(self, element: DataElement) -> None:
        if element.VR != "UI" or element.value in (None, ""):
            return
        if isinstance(element.value, list) or element.VM > 1:
            element.value = [self.uid(str(v)) for v in element.value]
        else:
            element.value = self.uid(str(element.value))

    def _clean(self, element: DataElement, context: _Context, depth: int) -> None:
        vr = element.VR
        if vr == "SQ":
            self._items(element, context, depth)
        elif vr in ("DA", "DT"):
            if "modified_dates" in self.options:
                self._shift(element, context)
        elif vr == "UI":
            self._map_uids(element)
        elif vr in _STRING_VRS or vr == "PN":
            if element.VM > 1:
                element.value = [context.scrub(str(v)) for v in element.value]
            elif element.value:
                element.value = context.scrub(str(element.value))
        # TM with shifted dates: whole days keep the time of day; numbers carry no names

    def _shift(self, element: DataElement, context: _Context) -> None:
        if element.value in (None, ""):
            return
        values = element.value if element.VM > 1 else [element.value]
        shifted = [_shift_date(str(v), context.offset) for v in values]
        element.value = shifted if element.VM > 1 else shifted[0]

    def _dummy(self, element: DataElement, context: _Context) -> None:
        vr, tag = element.VR, element.tag
        if vr == "SQ":
            element.value = Sequence([])
        elif vr == "UI":
            if element.value:
                self._map_uids(element)
            else:
                element.value = self.uid(f"dummy:{tag:08x}")
        elif tag in (_PATIENT_ID, _PATIENT_NAME) and context.pseudonym:
            element.value = context.pseudonym
        elif vr in _DUMMY:
            element.value = _DUMMY[vr]
        elif vr in _NUMBER_VRS:
            element.value = 0
        elif vr in _BYTES_VRS:
            element.value = b"\x00\x00"
        else:  # PN and text
            element.value = _DUMMY_TEXT[: _max_length(vr)]

    def _declare(self, ds: Dataset) -> None:
        """What was done, in the instance (PS3.15 E.1.1, E.2)."""
        ds.PatientIdentityRemoved = "YES"
        names = ["basic", *sorted(self.options - {"basic"})]
        ds.DeidentificationMethod = [
            f"kho: PS3.15 {EDITION} Table E.1-1",
            *(_METHOD_CODES[name][1][:64] for name in names),
        ]
        codes = []
        for name in names:
            value, meaning = _METHOD_CODES[name]
            item = Dataset()
            item.CodeValue = value
            item.CodingSchemeDesignator = "DCM"
            item.CodeMeaning = meaning
            codes.append(item)
        ds.DeidentificationMethodCodeSequence = Sequence(codes)
        if "full_dates" in self.options:
            ds.LongitudinalTemporalInformationModified = "UNMODIFIED"
        elif "modified_dates" in self.options:
            ds.LongitudinalTemporalInformationModified = "MODIFIED"
        else:
            ds.LongitudinalTemporalInformationModified = "REMOVED"


def _max_length(vr: str) -> int:
    return {"AE": 16, "CS": 16, "SH": 16, "DS": 16, "IS": 12}.get(vr, 64)


@dataclass
class _Context:
    """One instance's values while it is being de-identified."""

    pseudonym: str
    offset: int
    identifiers: list[str]

    def scrub(self, text: str) -> str:
        """Text with this instance's own identifiers taken out (Clean Descriptors)."""
        for token in self.identifiers:  # whole words: "Li" is not taken out of "Liver"
            text = re.sub(
                rf"(?<![A-Za-z0-9]){re.escape(token)}(?![A-Za-z0-9])", "*", text, flags=re.I
            )
        return text


def _identifiers(ds: Dataset) -> list[str]:
    """The patient's names, IDs, accession number and birth date (in the forms dates are
    written in free text), longest first, as found in ``ds``."""
    found: set[str] = set()
    for keyword in ("PatientID", "AccessionNumber", "IssuerOfPatientID", "StudyID"):
        value = str(ds.get(keyword, "") or "").strip()
        if len(value) >= 2:
            found.add(value)
    for item in ds.get("OtherPatientIDsSequence", None) or []:
        value = str(item.get("PatientID", "") or "").strip()
        if len(value) >= 2:
            found.add(value)
    for keyword in _NAME_KEYWORDS:
        tag = tag_for_keyword(keyword)
        element = ds.get(tag) if tag is not None else None
        if element is None or not element.value:
            continue
        values = element.value if element.VM > 1 else [element.value]
        for name in values:
            for part in re.split(r"[\^=\s,]+", str(name)):
                if len(part) >= 2:
                    found.add(part)
    birth = str(ds.get("PatientBirthDate", "") or "")
    if re.fullmatch(r"\d{8}", birth):
        y, m, d = birth[:4], birth[4:6], birth[6:]
        found |= {birth, f"{y}-{m}-{d}", f"{d}.{m}.{y}", f"{m}/{d}/{y}", f"{d}/{m}/{y}"}
    return sorted(found, key=len, reverse=True)


__all__ = [
    "Deidentified",
    "Deidentifier",
    "WithheldError",
    "profile_rows",
    "resolve",
]
