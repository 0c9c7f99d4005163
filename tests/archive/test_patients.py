"""Patient management from the HIS on both catalog engines: register and update win over
what images carry (at ingest too, PostgreSQL's one-statement path included), merges and
changes of identifier move studies and counters, the citizen ID finds a person's studies
across local Patient IDs, metadata follows the patient while the bytes stay as received."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from kho.archive import patients
from kho.archive.archive import Archive
from kho.archive.patients import PatientRecord, RecordError
from kho.archive.query import engine as query
from kho.archive.read import metadata
from tests.helpers.postgres import ENGINES, archive_on
from tests.hl7.fixtures import Hl7Settings, instance

NAME = "Nguyễn^Thị Ánh"
CITIZEN = "079190012345"
CCCD = "CCCD"


@pytest.fixture(params=ENGINES)
def archive(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Archive]:
    settings = Hl7Settings(data_dir=tmp_path / "data", dicom_port=0, http_port=0)
    with archive_on(request.param, settings) as arc:
        arc.finisher.stop()
        yield arc


def register(archive: Archive, record: PatientRecord) -> patients.PatientChange:
    with archive.catalog.transaction():
        return patients.register(archive.catalog, record, citizen_issuer=CCCD)


def patient_rows(archive: Archive) -> list[tuple]:
    archive.catalog.fold_counters()  # PostgreSQL: the counter deltas into the rows
    return archive.catalog.fetchall(
        "SELECT patient_id, patient_name, patient_sex, num_studies, num_instances "
        "FROM patients ORDER BY patient_id"
    )


def counted(archive: Archive) -> list[tuple]:
    """The patient counters as query engine counts them (PostgreSQL: with deltas)."""
    rows = query.find(
        archive.catalog,
        "PATIENT",
        {"PatientID": ""},
        return_keys=["NumberOfPatientRelatedStudies", "NumberOfPatientRelatedInstances"],
        model="PATIENT",
    )
    return sorted(
        (r["PatientID"], r["NumberOfPatientRelatedStudies"], r["NumberOfPatientRelatedInstances"])
        for r in rows
    )


def test_citizen_id_shape() -> None:
    assert patients.is_citizen_id(CITIZEN)
    for wrong in ("07919001234", "0791900123456", "07919001234X", "000190012345", "097190012345"):
        assert not patients.is_citizen_id(wrong), wrong
    with pytest.raises(RecordError) as caught:
        PatientRecord("BN1", citizen_id="4455").checked()
    assert caught.value.field == "citizen_id" and "4455" not in str(caught.value)


def test_his_demographics_win_at_ingest(archive: Archive) -> None:
    register(archive, PatientRecord("BN1", name=NAME, birth_date="19900102", sex="F"))
    study = "1.2.826.0.1.3680043.99.1"
    series = "1.2.826.0.1.3680043.99.1.1"
    for _ in range(3):  # the later ones take PostgreSQL's one-statement path
        archive.ingest_part10(
            instance("BN1", "NGUYEN^THI ANH", sex="M", study_uid=study, series_uid=series)
        )
    assert patient_rows(archive) == [("BN1", NAME, "F", 1, 3)]
    assert counted(archive) == [("BN1", 1, 3)]
    # images first, the HIS after: the HIS updates the row
    archive.ingest_part10(instance("BN2", "TRAN^BINH", birth_date="19800101"))
    change = register(archive, PatientRecord("BN2", name="Trần^Văn Bình"))
    assert change.action == "created"
    row = archive.catalog.fetchone(
        "SELECT patient_name, patient_birth_date FROM patients WHERE patient_id = 'BN2'"
    )
    assert row == ("Trần^Văn Bình", "19800101")  # the birth date the HIS left out stays


def test_merge_moves_studies_counters_and_identifiers(archive: Archive) -> None:
    for patient_id in ("BN1", "BN2", "BN2"):
        archive.ingest_part10(instance(patient_id, "X", other_ids=(("INS-" + patient_id, "BHYT"),)))
    with archive.catalog.transaction():
        change = patients.merge(
            archive.catalog,
            PatientRecord("BN1", name=NAME, citizen_id=CITIZEN),
            "BN2",
            citizen_issuer=CCCD,
        )
    assert (change.action, change.previous_id, change.studies_moved) == ("merged", "BN2", 2)
    assert patient_rows(archive) == [("BN1", NAME, "", 3, 3)]
    assert counted(archive) == [("BN1", 3, 3)]
    identifiers = archive.catalog.fetchall(
        "SELECT identifier, issuer, origin FROM patient_identifiers ORDER BY identifier"
    )
    assert identifiers == [
        (CITIZEN, CCCD, "citizen"),
        ("BN2", "", "merged"),
        ("INS-BN2", "BHYT", "merged"),
    ]
    for asked in ("BN2", CITIZEN, "INS-BN1", "INS-BN2"):
        found = list(query.find(archive.catalog, "STUDY", {"PatientID": asked}))
        assert len(found) == 3, asked
    # with the issuer: only identifiers of that issuer
    assert (
        len(
            list(
                query.find(
                    archive.catalog, "STUDY", {"PatientID": CITIZEN, "IssuerOfPatientID": CCCD}
                )
            )
        )
        == 3
    )
    assert (
        list(query.find(archive.catalog, "STUDY", {"PatientID": CITIZEN, "IssuerOfPatientID": "X"}))
        == []
    )
    # wildcards match the own Patient ID only
    assert list(query.find(archive.catalog, "STUDY", {"PatientID": "BN2*"})) == []
    # Other Patient IDs: matched and returned with the HIS's identifiers
    (patient,) = query.find(
        archive.catalog,
        "PATIENT",
        {"PatientID": "BN1", "OtherPatientIDsSequence": {"PatientID": CITIZEN}},
        model="PATIENT",
    )
    assert patient["OtherPatientIDsSequence"] == [{"PatientID": CITIZEN}]
    # a merge of a patient into itself, or a register of the merged-away ID, is refused
    with pytest.raises(RecordError), archive.catalog.transaction():
        patients.merge(archive.catalog, PatientRecord("BN1"), "BN1", citizen_issuer=CCCD)
    with pytest.raises(RecordError):
        register(archive, PatientRecord("BN2", name="again"))


def test_merge_chain_and_late_images(archive: Archive) -> None:
    archive.ingest_part10(instance("A", "X"))
    with archive.catalog.transaction():
        patients.merge(archive.catalog, PatientRecord("B"), "A", citizen_issuer=CCCD)
    with archive.catalog.transaction():
        patients.merge(archive.catalog, PatientRecord("C"), "B", citizen_issuer=CCCD)
    assert patients.surviving_key(archive.catalog, PatientRecord("A").key) == PatientRecord("C").key
    archive.ingest_part10(instance("A", "X"))  # a late image under the first ID
    assert patients.follow_merges(archive.catalog) == 1
    assert counted(archive) == [("C", 2, 2)]
    assert patients.follow_merges(archive.catalog) == 0


def test_change_identifier(archive: Archive) -> None:
    archive.ingest_part10(instance("OLD", "X", birth_date="19700101"))
    with archive.catalog.transaction():
        change = patients.change_id(
            archive.catalog, PatientRecord("NEW"), "OLD", citizen_issuer=CCCD
        )
    assert change.studies_moved == 1
    row = archive.catalog.fetchone("SELECT patient_id, patient_birth_date FROM patients")
    assert row == ("NEW", "19700101")  # seeded from what was known
    archive.ingest_part10(instance("TAKEN", "Y"))
    with pytest.raises(RecordError), archive.catalog.transaction():
        patients.change_id(archive.catalog, PatientRecord("TAKEN"), "NEW", citizen_issuer=CCCD)
    assert counted(archive) == [("NEW", 1, 1), ("TAKEN", 1, 1)]


def test_metadata_follows_the_patient_bytes_stay(archive: Archive) -> None:
    data = instance("BN1", "NGUYEN^THI ANH", charset="ISO_IR 100")
    result = archive.ingest_part10(data)
    record = archive.catalog.require_instance(result.sop_uid)
    before = metadata.documents_key([record], archive)
    version = metadata.series_version(archive, record.study_uid, record.series_uid)
    assert version == before
    register(archive, PatientRecord("BN1", name=NAME, citizen_id=CITIZEN, sex="F"))
    after = metadata.documents_key([record], archive)
    assert after != before
    assert metadata.series_version(archive, record.study_uid, record.series_uid) == after
    document = json.loads(metadata.instance_document(archive, record))
    assert document["00100010"]["Value"] == [{"Alphabetic": NAME}]
    assert document["00080005"]["Value"] == ["ISO_IR 192"]
    assert document["00101002"]["Value"][0]["00100020"]["Value"] == [CITIZEN]
    assert hashlib.sha256(archive.read_part10(record)).digest() == hashlib.sha256(data).digest()
    # on request, a coerced copy (the stored bytes stay)
    overlay = metadata.patient_overlay(archive, record.study_uid)
    assert overlay is not None
    from io import BytesIO

    import pydicom

    coerced = pydicom.dcmread(BytesIO(metadata.coerce_patient(data, overlay)))
    assert str(coerced.PatientName) == NAME and coerced.SpecificCharacterSet == "ISO_IR 192"
    assert coerced.PixelData == pydicom.dcmread(BytesIO(data)).PixelData
    assert archive.read_part10(record) == data


def test_schema_upgrade_from_version_4(tmp_path: Path) -> None:
    """A catalog of the previous schema opens: the new tables are made, the version set."""
    from kho.archive.catalog import open_catalog
    from kho.archive.catalog.schema import SCHEMA_VERSION

    path = tmp_path / "old.sqlite3"
    catalog = open_catalog(path)
    for table in (
        "his_patients",
        "patient_identifiers",
        "hl7_messages",
        "worklist_items",
        "performed_steps",
    ):
        catalog.execute(f"DROP TABLE {table}")
    catalog.execute("UPDATE kho_schema SET version = 4")
    catalog.close()
    catalog = open_catalog(path)
    assert catalog.fetchone("SELECT version FROM kho_schema") == (SCHEMA_VERSION,)
    assert catalog.fetchone("SELECT count(*) FROM worklist_items") == (0,)
    catalog.close()
