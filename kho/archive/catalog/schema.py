"""The catalog's tables and indexes, one text for both engines (``?`` placeholders and
``ON CONFLICT`` upserts, which SQLite and PostgreSQL both speak), and the columns of the
patient, study and series rows an instance writes."""

from __future__ import annotations

import re
from typing import Any

from kho.archive.catalog.records import InstanceAttributes, fold_name

# 6: rejected_instances; 5: his_patients, patient_identifiers, hl7_messages,
# worklist_items, performed_steps; 4: spool_hosts; 3: instance_deltas; 2: unfinished,
# garbage, sequence_items; the received-object layout.  Every change so far only added
# tables: an older catalog is upgraded by creating them (CREATE ... IF NOT EXISTS) and
# recording the new version.
SCHEMA_VERSION = 6

SCHEMA = """
CREATE TABLE IF NOT EXISTS kho_schema (version BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS patients (
    patient_key TEXT PRIMARY KEY,
    patient_id TEXT NOT NULL,
    issuer_of_patient_id TEXT NOT NULL,
    patient_name TEXT NOT NULL,
    patient_name_folded TEXT NOT NULL,
    patient_birth_date TEXT NOT NULL,
    patient_sex TEXT NOT NULL,
    num_studies BIGINT NOT NULL DEFAULT 0,
    num_instances BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    patient_key TEXT NOT NULL,
    study_date TEXT NOT NULL,
    study_time TEXT NOT NULL,
    accession_number TEXT NOT NULL,
    study_id TEXT NOT NULL,
    study_description TEXT NOT NULL,
    referring_physician_name TEXT NOT NULL,
    modalities_in_study TEXT NOT NULL DEFAULT '',
    num_series BIGINT NOT NULL DEFAULT 0,
    num_instances BIGINT NOT NULL DEFAULT 0,
    updated_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    modality TEXT NOT NULL,
    series_number BIGINT,
    series_description TEXT NOT NULL,
    body_part_examined TEXT NOT NULL,
    series_date TEXT NOT NULL,
    series_time TEXT NOT NULL,
    num_instances BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    instance_number BIGINT,
    rows_ BIGINT,
    columns_ BIGINT,
    number_of_frames BIGINT NOT NULL,
    bits_allocated BIGINT,
    bits_stored BIGINT,
    pixel_representation BIGINT,
    samples_per_pixel BIGINT,
    photometric_interpretation TEXT NOT NULL,
    planar_configuration BIGINT,
    content_date TEXT NOT NULL,
    content_time TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    received_size BIGINT NOT NULL,
    stored_size BIGINT NOT NULL,
    object_prefix TEXT NOT NULL,
    header_size BIGINT NOT NULL,
    pixel_split BIGINT NOT NULL,
    pixel_format TEXT NOT NULL,
    pixel_size BIGINT NOT NULL,
    frame_index TEXT NOT NULL,
    derived TEXT NOT NULL,
    received_at DOUBLE PRECISION NOT NULL,
    source TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS replacements (
    sop_uid TEXT NOT NULL,
    old_sha256 TEXT NOT NULL,
    new_sha256 TEXT NOT NULL,
    replaced_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS pending (
    object_prefix TEXT PRIMARY KEY,
    created_at DOUBLE PRECISION NOT NULL,
    owner TEXT NOT NULL DEFAULT ''
);
-- instances acknowledged as received, awaiting the at-rest codec and derived objects
-- (kho.archive.finish.finisher), claimed by one process at a time for a lease
CREATE TABLE IF NOT EXISTS unfinished (
    sop_uid TEXT PRIMARY KEY,
    object_prefix TEXT NOT NULL,
    queued_at DOUBLE PRECISION NOT NULL,
    owner TEXT NOT NULL DEFAULT '',
    claimed_at DOUBLE PRECISION NOT NULL DEFAULT 0,
    attempts BIGINT NOT NULL DEFAULT 0
);
-- objects no instance references any more, deleted once ``not_before`` has passed (a
-- reader that loaded the old row a moment ago can still fetch them)
CREATE TABLE IF NOT EXISTS garbage (
    object_key TEXT PRIMARY KEY,
    not_before DOUBLE PRECISION NOT NULL
);
-- PostgreSQL: instance counts not yet added to the patient, study and series rows. An
-- ingest inserts one row here instead of updating three rows every ingest of the series
-- shares (and would queue on until its commit). Folded in by fold_counters
CREATE TABLE IF NOT EXISTS instance_deltas (
    patient_key TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    delta BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS ix_instance_deltas_patient ON instance_deltas (patient_key);
CREATE INDEX IF NOT EXISTS ix_instance_deltas_study ON instance_deltas (study_uid);
CREATE INDEX IF NOT EXISTS ix_instance_deltas_series ON instance_deltas (series_uid);
-- where each process's ingest spool is served to the archive's other hosts
-- (kho.storage.peer): segment names start with the stem
CREATE TABLE IF NOT EXISTS spool_hosts (
    stem TEXT PRIMARY KEY,
    peer_url TEXT NOT NULL,
    registered_at DOUBLE PRECISION NOT NULL
);
-- items of the sequences C-FIND and QIDO-RS match on (kho.archive.catalog.sequences)
CREATE TABLE IF NOT EXISTS sequence_items (
    owner TEXT NOT NULL,
    sequence TEXT NOT NULL,
    item BIGINT NOT NULL,
    v1 TEXT NOT NULL DEFAULT '',
    v2 TEXT NOT NULL DEFAULT '',
    v3 TEXT NOT NULL DEFAULT '',
    v4 TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (owner, sequence, item)
);
CREATE INDEX IF NOT EXISTS ix_sequence_items_v1 ON sequence_items (sequence, v1);
-- patients as the hospital information system knows them (HL7 ADT and orders,
-- kho.archive.patients): their demographics win over what images carry, at ingest
-- (Catalog._read_hierarchy) and in retrieved metadata (kho.archive.read.metadata).
-- merged_into: the surviving patient's key once merged (A40) or re-identified (A47)
CREATE TABLE IF NOT EXISTS his_patients (
    patient_key TEXT PRIMARY KEY,
    patient_id TEXT NOT NULL,
    issuer_of_patient_id TEXT NOT NULL,
    patient_name TEXT NOT NULL,
    patient_name_folded TEXT NOT NULL,
    patient_birth_date TEXT NOT NULL,
    patient_sex TEXT NOT NULL,
    merged_into TEXT NOT NULL DEFAULT '',
    revision BIGINT NOT NULL DEFAULT 0,
    updated_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS ix_his_patients_merged ON his_patients (merged_into);
CREATE INDEX IF NOT EXISTS ix_his_patients_id ON his_patients (patient_id);
CREATE INDEX IF NOT EXISTS ix_his_patients_name ON his_patients (patient_name_folded);
-- a patient's other identifiers: the citizen ID, IDs a merge or a change replaced
-- (C-FIND and QIDO-RS match Patient ID against them too: kho.archive.query.engine)
CREATE TABLE IF NOT EXISTS patient_identifiers (
    patient_key TEXT NOT NULL,
    identifier TEXT NOT NULL,
    issuer TEXT NOT NULL,
    origin TEXT NOT NULL,
    PRIMARY KEY (patient_key, identifier, issuer)
);
CREATE INDEX IF NOT EXISTS ix_patient_identifiers_id ON patient_identifiers (identifier);
-- HL7 v2 messages received (kho.hl7), with the ACK answered: a resend gets the same
-- ACK and changes nothing, and they are kept for audit and replay
CREATE TABLE IF NOT EXISTS hl7_messages (
    message_key TEXT PRIMARY KEY,
    sender TEXT NOT NULL,
    control_id TEXT NOT NULL,
    message_type TEXT NOT NULL,
    received_at DOUBLE PRECISION NOT NULL,
    ack_code TEXT NOT NULL,
    ack_text TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    message TEXT NOT NULL,
    ack TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS ix_hl7_messages_received ON hl7_messages (received_at);
-- the Modality Worklist: scheduled procedure steps from the HIS's orders
-- (kho.archive.worklist): the columns are its matching keys, attributes the rest (JSON)
CREATE TABLE IF NOT EXISTS worklist_items (
    item_key TEXT PRIMARY KEY,
    order_number TEXT NOT NULL,
    patient_key TEXT NOT NULL,
    accession_number TEXT NOT NULL,
    requested_procedure_id TEXT NOT NULL,
    sps_id TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    station_ae TEXT NOT NULL,
    station_name TEXT NOT NULL,
    modality TEXT NOT NULL,
    start_date TEXT NOT NULL,
    start_time TEXT NOT NULL,
    performing_physician TEXT NOT NULL,
    status TEXT NOT NULL,
    attributes TEXT NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS ix_worklist_items_start ON worklist_items (start_date, start_time);
CREATE INDEX IF NOT EXISTS ix_worklist_items_status ON worklist_items (status);
CREATE INDEX IF NOT EXISTS ix_worklist_items_order ON worklist_items (order_number);
CREATE INDEX IF NOT EXISTS ix_worklist_items_patient ON worklist_items (patient_key);
CREATE INDEX IF NOT EXISTS ix_worklist_items_accession ON worklist_items (accession_number);
CREATE INDEX IF NOT EXISTS ix_worklist_items_study ON worklist_items (study_uid);
-- Modality Performed Procedure Steps (MPPS N-CREATE, N-SET). item_keys: the worklist
-- items they perform (JSON list), attributes: the last dataset (DICOM JSON)
CREATE TABLE IF NOT EXISTS performed_steps (
    sop_uid TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    item_keys TEXT NOT NULL,
    attributes TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL
);
-- instances a rejection note (kho.archive.corrections) took out of the catalog: no query
-- or retrieval sees them, their objects stay until purge_after, then one transaction sets
-- purged_at and lists them as garbage.  record: the instance row as it was (JSON)
CREATE TABLE IF NOT EXISTS rejected_instances (
    sop_uid TEXT NOT NULL,
    object_prefix TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    record TEXT NOT NULL,
    reason_code TEXT NOT NULL,
    note_uid TEXT NOT NULL,
    rejected_by TEXT NOT NULL,
    rejected_at DOUBLE PRECISION NOT NULL,
    purge_after DOUBLE PRECISION NOT NULL,
    purged_at DOUBLE PRECISION NOT NULL DEFAULT 0,
    PRIMARY KEY (sop_uid, object_prefix)
);
CREATE INDEX IF NOT EXISTS ix_rejected_due ON rejected_instances (purged_at, purge_after);
CREATE INDEX IF NOT EXISTS ix_rejected_prefix ON rejected_instances (object_prefix);
CREATE INDEX IF NOT EXISTS ix_unfinished_queue ON unfinished (queued_at);
CREATE INDEX IF NOT EXISTS ix_garbage_due ON garbage (not_before);
CREATE INDEX IF NOT EXISTS ix_patients_id ON patients (patient_id);
CREATE INDEX IF NOT EXISTS ix_patients_name ON patients (patient_name);
CREATE INDEX IF NOT EXISTS ix_patients_name_folded ON patients (patient_name_folded);
CREATE INDEX IF NOT EXISTS ix_studies_patient ON studies (patient_key);
CREATE INDEX IF NOT EXISTS ix_studies_date ON studies (study_date, study_time);
CREATE INDEX IF NOT EXISTS ix_studies_accession ON studies (accession_number);
CREATE INDEX IF NOT EXISTS ix_series_study ON series (study_uid, series_number);
CREATE INDEX IF NOT EXISTS ix_series_modality ON series (modality);
CREATE INDEX IF NOT EXISTS ix_instances_series ON instances (series_uid, instance_number);
CREATE INDEX IF NOT EXISTS ix_instances_study ON instances (study_uid);
CREATE INDEX IF NOT EXISTS ix_replacements_sop ON replacements (sop_uid);
"""


def column_types(table: str) -> dict[str, str]:
    """A table's column types as SCHEMA declares them (casts for PostgreSQL statements
    whose parameters have no column to take their type from)."""
    body = re.search(rf"CREATE TABLE IF NOT EXISTS {table} \((.*?)\n\);", SCHEMA, re.S)
    assert body is not None, table
    types = {}
    for line in body.group(1).splitlines():
        words = line.split()
        if len(words) >= 2 and words[0].isidentifier():
            types[words[0]] = "DOUBLE PRECISION" if words[1] == "DOUBLE" else words[1].rstrip(",")
    return types


#: the catalogued columns of the patient, study and series rows (after their keys)
HIERARCHY_COLUMNS = (
    (
        "patients",
        "patient_key",
        ("patient_name", "patient_name_folded", "patient_birth_date", "patient_sex"),
    ),
    (
        "studies",
        "study_uid",
        (
            "study_date",
            "study_time",
            "accession_number",
            "study_id",
            "study_description",
            "referring_physician_name",
        ),
    ),
    (
        "series",
        "series_uid",
        (
            "modality",
            "series_number",
            "series_description",
            "body_part_examined",
            "series_date",
            "series_time",
        ),
    ),
)

#: the demographics of a patient the hospital information system manages (his_patients,
#: not merged away), as the patient columns above: they replace an instance's own
HIS_DEMOGRAPHICS = (
    f"SELECT {', '.join(HIERARCHY_COLUMNS[0][2])} FROM his_patients "
    "WHERE patient_key = ? AND merged_into = ''"
)


def hierarchy_values(a: InstanceAttributes) -> tuple[dict[str, Any], ...]:
    """The catalogued values of an instance's patient, study and series rows."""
    derived = {"patient_name_folded": fold_name(a.patient_name)}
    return tuple(
        {c: derived[c] if c in derived else getattr(a, c) for c in columns}
        for _table, _key, columns in HIERARCHY_COLUMNS
    )


def hierarchy_unchanged(
    rows: list[tuple[Any, ...] | None], hierarchy: tuple[dict[str, Any], ...]
) -> bool:
    """Whether every row exists with exactly these values (nothing to write)."""
    return all(
        row is not None and tuple(row) == tuple(values.values())
        for row, values in zip(rows, hierarchy, strict=True)
    )
