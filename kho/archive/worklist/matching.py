"""Modality Worklist matching (PS3.4 K.6.1): which scheduled steps a query's keys select,
and the worklist item (a DICOM dataset) each one answers.

Matching keys, with C-FIND's value semantics (the query engine's: single value, wildcard,
list, date and time ranges):

- in the Scheduled Procedure Step Sequence item: Scheduled Station AE Title, Scheduled
  Station Name, Modality, Scheduled Procedure Step Start Date and Start Time (ranges,
  matched independently), Scheduled Performing Physician's Name, Scheduled Procedure Step
  ID and Status;
- at the top: Patient's Name (case-insensitive with fuzzy matching), Patient ID (with
  Issuer of Patient ID; like C-FIND of images, an exact ID matches every identifier of the
  patient: the citizen ID finds the person's steps), Patient's Birth Date, Patient's Sex,
  Accession Number, Requested Procedure ID, Study Instance UID.

The patient of a step is the HIS's current word (his_patients): an update of the patient
shows in the worklist at once.  Without a Scheduled Procedure Step Status key only steps
SCHEDULED or STARTED match: what is done, discontinued or cancelled is no longer work.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from kho.archive.catalog import Catalog
from kho.archive.query import engine
from kho.archive.worklist.items import OPEN_STATUSES, SELECTED, ScheduledStep, step_from_row

#: the top-level keys matched: keyword -> (column, kind, folded column for names)
TOP_KEYS: dict[str, tuple[str, str, str]] = {
    "PatientName": ("COALESCE(h.patient_name, '')", "pn", "COALESCE(h.patient_name_folded, '')"),
    "PatientBirthDate": ("COALESCE(h.patient_birth_date, '')", "date", ""),
    "PatientSex": ("COALESCE(h.patient_sex, '')", "text", ""),
    "AccessionNumber": ("w.accession_number", "text", ""),
    "RequestedProcedureID": ("w.requested_procedure_id", "text", ""),
    "StudyInstanceUID": ("w.study_uid", "uid", ""),
}
#: the keys of the Scheduled Procedure Step Sequence item matched
STEP_KEYS: dict[str, tuple[str, str, str]] = {
    "ScheduledStationAETitle": ("w.station_ae", "text", ""),
    "ScheduledStationName": ("w.station_name", "text", ""),
    "Modality": ("w.modality", "text", ""),
    "ScheduledProcedureStepStartDate": ("w.start_date", "date", ""),
    "ScheduledProcedureStepStartTime": ("w.start_time", "time", ""),
    "ScheduledPerformingPhysicianName": (
        "w.performing_physician",
        "pn",
        "UPPER(w.performing_physician)",
    ),
    "ScheduledProcedureStepID": ("w.sps_id", "text", ""),
    "ScheduledProcedureStepStatus": ("w.status", "text", ""),
}
SEQUENCE = "ScheduledProcedureStepSequence"
STATUS_KEY = "ScheduledProcedureStepStatus"


@dataclass(frozen=True, slots=True)
class WorklistEntry:
    """One matching step with its patient as the HIS knows them now."""

    step: ScheduledStep
    patient_id: str
    issuer_of_patient_id: str
    patient_name: str
    patient_birth_date: str
    patient_sex: str
    #: (identifier, issuer) of the patient's other identifiers (citizen ID first)
    other_ids: tuple[tuple[str, str], ...]


def find(
    catalog: Catalog,
    keys: Mapping[str, Any],
    step_keys: Mapping[str, Any],
    *,
    fuzzy_names: bool = False,
    limit: int | None = None,
) -> list[WorklistEntry]:
    """The steps matching the top-level ``keys`` and the Scheduled Procedure Step item's
    ``step_keys`` (keyword -> value; keys not listed above are not matched), in start
    order.  QueryError for a malformed value."""
    clauses: list[str] = []
    params: list[Any] = []
    for given, known in ((keys, TOP_KEYS), (step_keys, STEP_KEYS)):
        for keyword, value in given.items():
            if keyword not in known:
                continue
            column, kind, folded = known[keyword]
            found = engine.key_condition(
                keyword, column, kind, value, folded=folded, fuzzy_names=fuzzy_names
            )
            if found is not None:
                clauses.append(f"({found[0]})")
                params += found[1]
    patient = engine.patient_condition(
        "w.patient_key",
        "COALESCE(h.patient_id, '')",
        keys.get("PatientID"),
        keys.get("IssuerOfPatientID"),
    )
    if patient is not None:
        clauses.append(f"({patient[0]})")
        params += patient[1]
    elif keys.get("IssuerOfPatientID"):
        found = engine.key_condition(
            "IssuerOfPatientID",
            "COALESCE(h.issuer_of_patient_id, '')",
            "text",
            keys["IssuerOfPatientID"],
        )
        if found is not None:
            clauses.append(f"({found[0]})")
            params += found[1]
    # the status key itself was matched above when it has a value
    if engine.key_condition(STATUS_KEY, "w.status", "text", step_keys.get(STATUS_KEY)) is None:
        clauses.append(f"w.status IN ({', '.join('?' for _ in OPEN_STATUSES)})")
        params += OPEN_STATUSES
    sql = (
        f"SELECT {', '.join(SELECTED)}, w.attributes, w.updated_at, "
        "h.patient_id, h.issuer_of_patient_id, h.patient_name, h.patient_birth_date, "
        "h.patient_sex, w.patient_key FROM worklist_items w "
        "LEFT JOIN his_patients h ON h.patient_key = w.patient_key "
        f"WHERE {' AND '.join(clauses) or '1 = 1'} "
        "ORDER BY w.start_date, w.start_time, w.item_key"
    )
    if limit is not None:
        sql += " LIMIT ?"
        params.append(int(limit))
    entries = []
    width = len(SELECTED) + 2
    for row in catalog.fetchall(sql, params):
        step = step_from_row(row[:width])
        patient_id, issuer, name, birth, sex, key = row[width:]
        identifiers = catalog.fetchall(
            "SELECT identifier, issuer FROM patient_identifiers WHERE patient_key = ? "
            "ORDER BY origin, identifier",
            (key,),
        )
        entries.append(
            WorklistEntry(
                step,
                patient_id if patient_id is not None else step.patient_id,
                issuer if issuer is not None else step.issuer_of_patient_id,
                name or "",
                birth or "",
                sex or "",
                tuple((str(i), str(s)) for i, s in identifiers),
            )
        )
    return entries


def _codes(codes: tuple[Any, ...]) -> list[dict[str, Any]]:
    return [
        {"CodeValue": c.value, "CodingSchemeDesignator": c.scheme, "CodeMeaning": c.meaning}
        for c in codes
    ]


def item_values(entry: WorklistEntry) -> dict[str, Any]:
    """The worklist item of a step (Modality Worklist attributes, PS3.4 K.6.1.2.2) as
    keyword -> value (sequences: lists of such dicts); SpecificCharacterSet ISO_IR 192
    (UTF-8) when any text is not ASCII."""
    step = entry.step
    values: dict[str, Any] = {
        "PatientName": entry.patient_name,
        "PatientID": entry.patient_id,
        "IssuerOfPatientID": entry.issuer_of_patient_id,
        "PatientBirthDate": entry.patient_birth_date,
        "PatientSex": entry.patient_sex,
        "OtherPatientIDsSequence": [
            {"PatientID": identifier, "IssuerOfPatientID": issuer, "TypeOfPatientID": "TEXT"}
            for identifier, issuer in entry.other_ids
        ],
        "AccessionNumber": step.accession_number,
        "ReferringPhysicianName": step.referring_physician,
        "RequestingPhysician": step.requesting_physician,
        "AdmissionID": step.admission_id,
        "StudyInstanceUID": step.study_uid,
        "RequestedProcedureID": step.requested_procedure_id,
        "RequestedProcedureDescription": step.requested_procedure_description,
        "RequestedProcedureCodeSequence": _codes(step.requested_procedure_codes),
        "RequestedProcedurePriority": step.priority,
        "ReasonForTheRequestedProcedure": step.reason,
        "PlacerOrderNumberImagingServiceRequest": step.order_number,
        "FillerOrderNumberImagingServiceRequest": step.filler_order_number,
        SEQUENCE: [
            {
                "ScheduledStationAETitle": step.station_ae,
                "ScheduledStationName": step.station_name,
                "ScheduledProcedureStepLocation": step.location,
                "ScheduledProcedureStepStartDate": step.start_date,
                "ScheduledProcedureStepStartTime": step.start_time,
                "Modality": step.modality,
                "ScheduledPerformingPhysicianName": step.performing_physician,
                "ScheduledProcedureStepDescription": step.sps_description,
                "ScheduledProtocolCodeSequence": _codes(step.protocol_codes),
                "ScheduledProcedureStepID": step.sps_id,
                "ScheduledProcedureStepStatus": step.status,
            }
        ],
    }
    if not _ascii(values):
        values["SpecificCharacterSet"] = "ISO_IR 192"
    return values


def as_dataset(values: dict[str, Any]) -> Dataset:
    """A dataset of item_values (or a part of them)."""
    ds = Dataset()
    for keyword, value in values.items():
        if isinstance(value, list):
            ds.add(DataElement(TAGS[keyword], "SQ", Sequence([as_dataset(v) for v in value])))
        else:
            ds.add(DataElement(TAGS[keyword], dictionary_VR(keyword), value))
    return ds


def item_dataset(entry: WorklistEntry) -> Dataset:
    """The whole worklist item of a step as a dataset."""
    return as_dataset(item_values(entry))


def _ascii(value: Any) -> bool:
    if isinstance(value, str):
        return value.isascii()
    if isinstance(value, list):
        return all(_ascii(v) for v in value)
    if isinstance(value, dict):
        return all(_ascii(v) for v in value.values())
    return True


def _tags() -> dict[str, int]:
    keywords: set[str] = set()

    def walk(values: dict[str, Any]) -> None:
        for keyword, value in values.items():
            keywords.add(keyword)
            for item in value if isinstance(value, list) else []:
                walk(item)

    sample = WorklistEntry(ScheduledStep("", ""), "", "", "", "", "", (("", ""),))
    values = item_values(sample)
    values["RequestedProcedureCodeSequence"] = [
        {"CodeValue": "", "CodingSchemeDesignator": "", "CodeMeaning": ""}
    ]
    walk(values)
    keywords.add("SpecificCharacterSet")
    return {keyword: int(tag_for_keyword(keyword) or 0) for keyword in keywords}


#: keyword -> tag of every attribute a worklist item holds
TAGS = _tags()
