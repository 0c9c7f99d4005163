"""The worklist service on both catalog engines: scheduled steps written, changed and
cancelled, matched (keys, ranges, status, the HIS's current patient, the citizen ID),
started and ended by MPPS, completed when their study arrives."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from kho.archive import patients, worklist
from kho.archive.archive import Archive
from kho.archive.patients import PatientRecord
from kho.archive.worklist import OrderError, ScheduledStep, mpps
from kho.errors import QueryError
from tests.helpers.postgres import ENGINES, archive_on
from tests.hl7.fixtures import Hl7Settings, instance

CITIZEN = "079190012345"


@pytest.fixture(params=ENGINES)
def archive(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Archive]:
    settings = Hl7Settings(data_dir=tmp_path / "data", dicom_port=0, http_port=0)
    with archive_on(request.param, settings) as arc:
        arc.finisher.stop()
        yield arc


def step(number: str, **values: str) -> ScheduledStep:
    fields = {
        "patient_id": "BN1",
        "accession_number": f"ACC{number}",
        "requested_procedure_id": f"RP{number}",
        "sps_id": f"SPS{number}",
        "study_uid": f"1.2.826.0.1.{number}",
        "station_ae": "CT01",
        "modality": "CT",
        "start_date": "20240601",
        "start_time": "090000",
        **values,
    }
    return ScheduledStep(order_number=f"P{number}", **fields)


def write(archive: Archive, *steps: ScheduledStep, name: str = "Nguyễn^Văn An") -> None:
    with archive.catalog.transaction():
        for patient_id in sorted({s.patient_id for s in steps}):
            patients.register(
                archive.catalog,
                PatientRecord(
                    patient_id, name=name, citizen_id=CITIZEN if patient_id == "BN1" else None
                ),
                citizen_issuer="CCCD",
            )
        worklist.schedule(archive.catalog, list(steps))


def accessions(archive: Archive, keys: dict | None = None, **step_keys: str) -> list[str]:
    found = worklist.find(archive.catalog, keys or {}, step_keys)
    return [entry.step.accession_number for entry in found]


def test_matching_keys_and_ranges(archive: Archive) -> None:
    write(
        archive,
        step("1"),
        step("2", modality="MR", station_ae="MR01", start_time="143000", patient_id="BN2"),
        step("3", start_date="20240602", start_time="0800"),
    )
    assert accessions(archive) == ["ACC1", "ACC2", "ACC3"]  # in start order
    assert accessions(archive, Modality="MR") == ["ACC2"]
    assert accessions(archive, ScheduledStationAETitle="CT*") == ["ACC1", "ACC3"]
    assert accessions(archive, ScheduledProcedureStepStartDate="20240601-20240601") == [
        "ACC1",
        "ACC2",
    ]
    assert accessions(archive, ScheduledProcedureStepStartTime="-1000") == ["ACC1", "ACC3"]
    assert accessions(archive, Modality="CT\\MR", ScheduledProcedureStepStartDate="-20240601") == [
        "ACC1",
        "ACC2",
    ]
    assert accessions(archive, {"PatientID": CITIZEN}) == ["ACC1", "ACC3"]
    assert accessions(archive, {"PatientName": "nguyễn*"}) == []  # case matters
    found = worklist.find(archive.catalog, {"PatientName": "nguyễn*"}, {}, fuzzy_names=True)
    assert len(found) == 3
    assert accessions(archive, {"AccessionNumber": "ACC2"}) == ["ACC2"]
    assert accessions(archive, {"StudyInstanceUID": "1.2.826.0.1.3"}) == ["ACC3"]
    with pytest.raises(QueryError):
        accessions(archive, ScheduledProcedureStepStartDate="2024-06")


def test_change_cancel_and_performed_status(archive: Archive) -> None:
    write(archive, step("1"))
    with archive.catalog.transaction():
        worklist.items.set_status(
            archive.catalog, [step("1").item_key], worklist.STARTED, only=(worklist.SCHEDULED,)
        )
    write(archive, step("1", station_ae="CT02"))  # a change: the modality's status stays
    (entry,) = worklist.find(archive.catalog, {}, {})
    assert (entry.step.station_ae, entry.step.status) == ("CT02", "STARTED")
    with archive.catalog.transaction():
        assert worklist.cancel(archive.catalog, "P1") == 1
    assert accessions(archive) == []
    assert accessions(archive, ScheduledProcedureStepStatus="CANCELED") == ["ACC1"]
    with pytest.raises(OrderError), archive.catalog.transaction():
        worklist.cancel(archive.catalog, "P404")
    with pytest.raises(OrderError), archive.catalog.transaction():
        worklist.schedule(archive.catalog, [step("9", sps_id="")])


def test_item_follows_patient_updates_and_merges(archive: Archive) -> None:
    write(archive, step("1", patient_id="OLD"), name="Sai^Tên")
    with archive.catalog.transaction():
        patients.merge(
            archive.catalog, PatientRecord("BN1", name="Đúng^Tên"), "OLD", citizen_issuer="CCCD"
        )
    (entry,) = worklist.find(archive.catalog, {"PatientID": "BN1"}, {})
    assert (entry.patient_id, entry.patient_name) == ("BN1", "Đúng^Tên")
    item = worklist.item_dataset(entry)
    assert item.SpecificCharacterSet == "ISO_IR 192"
    assert item.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID == "SPS1"
    assert [i.PatientID for i in item.OtherPatientIDsSequence] == ["OLD"]


def _performed(accession: str, status: str = "IN PROGRESS") -> Dataset:
    ds = Dataset()
    ds.PerformedProcedureStepStatus = status
    ref = Dataset()
    ref.AccessionNumber = accession
    ref.ScheduledProcedureStepID = "SPS" + accession[3:]
    ds.ScheduledStepAttributesSequence = [ref]
    return ds


def test_mpps_and_arrivals(archive: Archive) -> None:
    write(archive, step("1"), step("2"), step("3"))
    uid = generate_uid()
    assert mpps.create(archive.catalog, uid, _performed("ACC1"), "CT01") == [step("1").item_key]
    with pytest.raises(worklist.MppsError) as caught:
        mpps.create(archive.catalog, uid, _performed("ACC1"), "CT01")
    assert caught.value.reason == worklist.MppsFailure.DUPLICATE
    done = Dataset()
    done.PerformedProcedureStepStatus = "DISCONTINUED"
    assert mpps.update(archive.catalog, uid, done) == "DISCONTINUED"
    with pytest.raises(worklist.MppsError) as caught:
        mpps.update(archive.catalog, uid, done)
    assert caught.value.reason == worklist.MppsFailure.FINAL
    status, dataset = mpps.get(archive.catalog, uid)
    assert (
        status == "DISCONTINUED"
        and dataset.ScheduledStepAttributesSequence[0].AccessionNumber == "ACC1"
    )
    # studies arrive: step 2 by its accession number, step 3 by its Study Instance UID
    archive.ingest_part10(instance("BN1", "X", accession="ACC2"))
    archive.ingest_part10(instance("BN1", "X", study_uid="1.2.826.0.1.3"))
    assert worklist.complete_arrived(archive.catalog) == 2
    assert worklist.complete_arrived(archive.catalog) == 0
    statuses = dict(archive.catalog.fetchall("SELECT accession_number, status FROM worklist_items"))
    assert statuses == {"ACC1": "DISCONTINUED", "ACC2": "COMPLETED", "ACC3": "COMPLETED"}
