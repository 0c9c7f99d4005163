"""Patient management from the hospital information system: register and update (HL7 ADT
A01/A04/A08...), merge (A40), change identifier (A47), applied to one tenant's catalog.

The HIS is the master of a patient's identity and demographics.  What it says is kept in
``his_patients`` and written into the catalog's patient row, and it wins over what
instances carry: an ingest of a patient the HIS manages files the instance under the HIS's
name, birth date and sex (Catalog._read_hierarchy), and DICOM JSON metadata shows them
(kho.archive.read.metadata).  The instances' bytes stay exactly as received.

A merge moves every study of the merged patient under the surviving one (the catalog's
counters counted again) and keeps the merged Patient ID as an identifier of the survivor,
so a query by the old ID still finds the studies.  A change of identifier does the same
into a patient that must not exist yet.  Images that arrive later under a merged-away ID
are filed under it first and moved by ``follow_merges`` (run periodically).

Every function here runs inside a write transaction the caller holds
(``catalog.transaction()``): a message's changes are committed together with its journal
row (kho.archive.patients.journal), or not at all.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from kho.archive.catalog import Catalog, fold_name, patient_key
from kho.archive.patients.records import PatientRecord, RecordError, check_patient_id

log = logging.getLogger(__name__)

#: where an identifier of patient_identifiers came from
CITIZEN, MERGED, CHANGED, OTHER = "citizen", "merged", "changed", "other"
#: how many merges a chain may hold (A into B, B into C...) before it is taken as a loop
_MAX_CHAIN = 32


@dataclass(frozen=True, slots=True)
class PatientChange:
    """What a patient operation did (for the audit record and the log)."""

    #: created, updated, merged, changed
    action: str
    patient_id: str
    issuer: str
    name: str
    #: merged, changed: the Patient ID replaced
    previous_id: str = ""
    #: merged, changed: how many studies moved to the patient
    studies_moved: int = 0


def register(
    catalog: Catalog, record: PatientRecord, *, citizen_issuer: str, seed_key: str = ""
) -> PatientChange:
    """Create or update a patient as the HIS knows it.  Values the record leaves out
    (None) keep what is known (the HIS's earlier word, else what the images said, else the
    patient ``seed_key``'s).  RecordError for malformed values, or a Patient ID merged into
    another patient."""
    record.checked()
    key = record.key
    known = catalog.fetchone(
        "SELECT patient_name, patient_birth_date, patient_sex, merged_into, revision "
        "FROM his_patients WHERE patient_key = ?",
        (key,),
    )
    if known is not None and known[3]:
        raise RecordError(
            "the patient was merged into another patient: send the surviving ID", "patient_id"
        )
    current = tuple(known[:3]) if known is not None else _known_demographics(catalog, key)
    if current is None and seed_key:
        current = _known_demographics(catalog, seed_key, his_first=True)
    name, birth_date, sex = current or ("", "", "")
    name = record.name if record.name is not None else name
    birth_date = record.birth_date if record.birth_date is not None else birth_date
    sex = record.sex if record.sex is not None else sex
    values = (name, fold_name(name), birth_date, sex)
    now = time.time()
    catalog.execute(
        "INSERT INTO his_patients (patient_key, patient_id, issuer_of_patient_id, "
        "patient_name, patient_name_folded, patient_birth_date, patient_sex, revision, "
        "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, 1, ?) ON CONFLICT (patient_key) DO UPDATE "
        "SET patient_name = excluded.patient_name, "
        "patient_name_folded = excluded.patient_name_folded, "
        "patient_birth_date = excluded.patient_birth_date, "
        "patient_sex = excluded.patient_sex, revision = his_patients.revision + 1, "
        "updated_at = excluded.updated_at",
        (key, record.patient_id, record.issuer, *values, now),
    )
    catalog.execute(
        "UPDATE patients SET patient_name = ?, patient_name_folded = ?, "
        "patient_birth_date = ?, patient_sex = ? WHERE patient_key = ?",
        (*values, key),
    )
    _set_identifiers(catalog, key, record, citizen_issuer)
    return PatientChange(
        "updated" if known is not None else "created", record.patient_id, record.issuer, name
    )


def merge(
    catalog: Catalog,
    survivor: PatientRecord,
    merged_id: str,
    merged_issuer: str = "",
    *,
    citizen_issuer: str,
) -> PatientChange:
    """A40: the patient ``merged_id`` is the same person as ``survivor``: its studies,
    identifiers and worklist items move to the survivor (registered or updated from the
    record); the merged ID stays findable as an identifier of the survivor."""
    check_patient_id(merged_id, "merged_id")
    old_key = patient_key(merged_id, merged_issuer)
    if old_key == survivor.key:
        raise RecordError("a patient cannot be merged into itself", "merged_id")
    change = register(catalog, survivor, citizen_issuer=citizen_issuer)
    moved = _move(catalog, old_key, survivor.key, merged_id, merged_issuer, MERGED)
    return PatientChange(
        "merged", survivor.patient_id, survivor.issuer, change.name, merged_id, moved
    )


def change_id(
    catalog: Catalog,
    record: PatientRecord,
    old_id: str,
    old_issuer: str = "",
    *,
    citizen_issuer: str,
) -> PatientChange:
    """A47: the patient known as ``old_id`` is known as ``record.patient_id`` from now
    on.  The new ID must be unused (a patient under it: RecordError, that is a merge);
    the old one stays findable as an identifier."""
    check_patient_id(old_id, "merged_id")
    old_key = patient_key(old_id, old_issuer)
    if old_key == record.key:
        raise RecordError("the new patient identifier is the old one", "patient_id")
    in_use = catalog.fetchone(
        "SELECT 1 FROM his_patients WHERE patient_key = ? AND merged_into = '' UNION ALL "
        "SELECT 1 FROM patients WHERE patient_key = ?",
        (record.key, record.key),
    )
    if in_use is not None:
        raise RecordError(
            "the new patient identifier is already in use: merge the patients (A40)",
            "patient_id",
        )
    change = register(catalog, record, citizen_issuer=citizen_issuer, seed_key=old_key)
    moved = _move(catalog, old_key, record.key, old_id, old_issuer, CHANGED)
    return PatientChange("changed", record.patient_id, record.issuer, change.name, old_id, moved)


def follow_merges(catalog: Catalog) -> int:
    """Move studies filed under a merged-away patient after its merge (images sent under
    the old ID) to the surviving patient; how many studies moved.  In a transaction of
    its own per patient."""
    rows = catalog.fetchall(
        "SELECT h.patient_key, h.patient_id, h.issuer_of_patient_id, h.merged_into "
        "FROM his_patients h JOIN patients p ON p.patient_key = h.patient_key "
        "WHERE h.merged_into <> ''"
    )
    moved = 0
    for old_key, old_id, old_issuer, target in rows:
        final = _surviving(catalog, str(target))
        if final is None or final == old_key:
            log.error("patient merge chain from %s does not end: left as it is", old_key)
            continue
        with catalog.transaction():
            moved += _move(catalog, old_key, final, old_id, old_issuer, MERGED)
    return moved


def surviving_key(catalog: Catalog, key: str) -> str:
    """The key of the patient ``key`` is now filed under (itself unless merged away)."""
    return _surviving(catalog, key) or key


# --- the moves -----------------------------------------------------------------------


def _surviving(catalog: Catalog, key: str) -> str | None:
    for _ in range(_MAX_CHAIN):
        row = catalog.fetchone("SELECT merged_into FROM his_patients WHERE patient_key = ?", (key,))
        if row is None or not row[0]:
            return key
        key = str(row[0])
    return None


def _known_demographics(
    catalog: Catalog, key: str, *, his_first: bool = False
) -> tuple[Any, ...] | None:
    """(name, birth date, sex) the catalog holds for a patient: its images' (and, with
    ``his_first``, the HIS's before them)."""
    statements = ["SELECT patient_name, patient_birth_date, patient_sex FROM patients"]
    if his_first:
        statements.insert(
            0, "SELECT patient_name, patient_birth_date, patient_sex FROM his_patients"
        )
    for statement in statements:
        row = catalog.fetchone(f"{statement} WHERE patient_key = ?", (key,))
        if row is not None:
            return tuple(row)
    return None


def _set_identifiers(
    catalog: Catalog, key: str, record: PatientRecord, citizen_issuer: str
) -> None:
    """The citizen ID and other identifiers the record carries replace those the HIS
    gave before (those a merge or a change left stay)."""
    if record.citizen_id is not None:
        catalog.execute(
            "DELETE FROM patient_identifiers WHERE patient_key = ? AND origin = ?", (key, CITIZEN)
        )
        if record.citizen_id:
            _add_identifier(catalog, key, record.citizen_id, citizen_issuer, CITIZEN)
    if record.other_ids is None:
        return
    catalog.execute(
        "DELETE FROM patient_identifiers WHERE patient_key = ? AND origin = ?", (key, OTHER)
    )
    for identifier, issuer in record.other_ids:
        _add_identifier(catalog, key, identifier, issuer, OTHER)


def _add_identifier(catalog: Catalog, key: str, identifier: str, issuer: str, origin: str) -> None:
    catalog.execute(
        "INSERT INTO patient_identifiers (patient_key, identifier, issuer, origin) "
        "VALUES (?, ?, ?, ?) ON CONFLICT (patient_key, identifier, issuer) DO NOTHING",
        (key, identifier, issuer, origin),
    )


def _move(
    catalog: Catalog, old_key: str, new_key: str, old_id: str, old_issuer: str, origin: str
) -> int:
    """Everything of patient ``old_key`` to ``new_key`` (which the HIS knows): studies,
    pending counter deltas, catalogued Other Patient IDs (as identifiers), identifiers,
    worklist items; the old ID becomes an identifier of the new patient and the old
    patient is marked merged into it.  The number of studies moved."""
    studies = [
        str(uid)
        for (uid,) in catalog.fetchall(
            "SELECT study_uid FROM studies WHERE patient_key = ?", (old_key,)
        )
    ]
    had_row = catalog.fetchone("SELECT 1 FROM patients WHERE patient_key = ?", (old_key,))
    if studies or had_row is not None:
        catalog.execute_batch(
            [
                (
                    "INSERT INTO patients (patient_key, patient_id, issuer_of_patient_id, "
                    "patient_name, patient_name_folded, patient_birth_date, patient_sex) "
                    "SELECT patient_key, patient_id, issuer_of_patient_id, patient_name, "
                    "patient_name_folded, patient_birth_date, patient_sex FROM his_patients "
                    "WHERE patient_key = ? ON CONFLICT (patient_key) DO NOTHING",
                    (new_key,),
                ),
                ("UPDATE studies SET patient_key = ? WHERE patient_key = ?", (new_key, old_key)),
                (
                    "UPDATE instance_deltas SET patient_key = ? WHERE patient_key = ?",
                    (new_key, old_key),
                ),
                (
                    "INSERT INTO patient_identifiers (patient_key, identifier, issuer, origin) "
                    "SELECT ?, v1, v2, ? FROM sequence_items WHERE owner = ? AND sequence = ? "
                    "AND v1 <> '' ON CONFLICT (patient_key, identifier, issuer) DO NOTHING",
                    (new_key, origin, old_key, "OtherPatientIDsSequence"),
                ),
                ("DELETE FROM sequence_items WHERE owner = ?", (old_key,)),
                ("DELETE FROM patients WHERE patient_key = ?", (old_key,)),
            ]
        )
        catalog.recount_patients([new_key])
    old_name = catalog.fetchone(
        "SELECT patient_name, patient_name_folded, patient_birth_date, patient_sex "
        "FROM his_patients WHERE patient_key = ?",
        (old_key,),
    )
    catalog.execute_batch(
        [
            (
                "INSERT INTO patient_identifiers (patient_key, identifier, issuer, origin) "
                "SELECT ?, identifier, issuer, origin FROM patient_identifiers "
                "WHERE patient_key = ? ON CONFLICT (patient_key, identifier, issuer) DO NOTHING",
                (new_key, old_key),
            ),
            ("DELETE FROM patient_identifiers WHERE patient_key = ?", (old_key,)),
            (
                "UPDATE worklist_items SET patient_key = ? WHERE patient_key = ?",
                (new_key, old_key),
            ),
            # a chain: what was merged into the old patient now follows it
            ("UPDATE his_patients SET merged_into = ? WHERE merged_into = ?", (new_key, old_key)),
            (
                "INSERT INTO his_patients (patient_key, patient_id, issuer_of_patient_id, "
                "patient_name, patient_name_folded, patient_birth_date, patient_sex, "
                "merged_into, revision, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?) "
                "ON CONFLICT (patient_key) DO UPDATE SET merged_into = excluded.merged_into, "
                "revision = his_patients.revision + 1, updated_at = excluded.updated_at",
                (
                    old_key,
                    old_id,
                    old_issuer,
                    *(old_name or ("", "", "", "")),
                    new_key,
                    time.time(),
                ),
            ),
            (
                "UPDATE his_patients SET revision = revision + 1 WHERE patient_key = ?",
                (new_key,),
            ),
        ]
    )
    _add_identifier(catalog, new_key, old_id, old_issuer, origin)
    return len(studies)
