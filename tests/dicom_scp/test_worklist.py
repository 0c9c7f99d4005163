"""The Modality Worklist SCP and the MPPS SCP with real peers: dcmtk's ``findscu -W`` as
the modality's worklist query (matching keys, date ranges, empty results, Vietnamese names
in ISO_IR 192), pynetdicom as the modality reporting its steps (N-CREATE, N-SET), and the
whole path HL7 order -> worklist -> findscu -W -> a study made from the answer -> storescu
-> QIDO-RS.  The handlers run in an AE made here (the lead wires them into the server)."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ModalityPerformedProcedureStep,
    ModalityWorklistInformationFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from kho.access.service import Access
from kho.archive.archive import Archive
from kho.dicom_scp import worklist as worklist_scp
from kho.dicom_scp.door import Door
from kho.dicom_scp.server import DicomServer
from kho.hl7.server import Hl7Server
from kho.viewer_api.app import create_app
from tests.helpers import dcmtk
from tests.hl7.fixtures import Hl7Settings, instance
from tests.hl7.mllp_client import MllpClient, message, msa

NAME = "Nguyễn^Thị Ánh"
CITIZEN = "079190012345"


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[Archive]:
    settings = Hl7Settings(data_dir=tmp_path / "data", dicom_port=0, http_port=0, ae_title="KHO")
    with Archive(settings) as arc:
        yield arc


@contextlib.contextmanager
def worklist_ae(archive: Archive) -> Iterator[int]:
    """An AE serving the worklist and MPPS handlers (and, through them, Query/Retrieve
    C-FIND) behind the archive's door; its port."""
    door = Door(archive, Access(archive.settings, archive))
    ae = AE(ae_title="KHO")
    for sop_class in (
        ModalityWorklistInformationFind,
        ModalityPerformedProcedureStep,
        StudyRootQueryRetrieveInformationModelFind,
    ):
        ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
    handlers = [
        (evt.EVT_REQUESTED, door.association_requested),
        (evt.EVT_C_FIND, worklist_scp.handle_find, [door]),
        (evt.EVT_N_CREATE, worklist_scp.handle_n_create, [door]),
        (evt.EVT_N_SET, worklist_scp.handle_n_set, [door]),
    ]
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()


@pytest.fixture
def scp(archive: Archive) -> Iterator[int]:
    with worklist_ae(archive) as port:
        yield port


@pytest.fixture
def hl7(archive: Archive) -> Iterator[MllpClient]:
    with Hl7Server(archive, port=0) as server, MllpClient(server.port) as client:
        yield client


def order(
    client: MllpClient,
    number: str,
    *,
    patient: str = "BN001",
    name: str = NAME,
    modality: str = "CT",
    station: str = "CT01",
    start: str = "20240601090000",
    citizen: str = CITIZEN,
) -> None:
    ids = f"{patient}^^^BV^PI" + (f"~{citizen}^^^CCCD^NI" if citizen else "")
    text = message(
        f"PID|1||{ids}||{name}||19900102|F",
        "PV1|1|O",
        f"ORC|NW|{number}|F{number}||SC||^^^{start}^^R|||||||||||{station}",
        f"OBR|1|{number}|F{number}|P01^Chụp cắt lớp sọ não^BV||||||||||||||ACC{number}|RP{number}"
        f"|SPS{number}||||{modality}",
        kind="ORM^O01",
        version="2.3.1",
    )
    ack = client.send(text)
    assert msa(ack)[1] == "AA", ack


def findscu(port: int, folder: Path, *keys: str) -> list[Dataset]:
    """``findscu -W`` with these keys; the responses it extracted (-X)."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("rsp*.dcm"):
        old.unlink()
    args = [
        dcmtk.tool("findscu"),
        "-W",
        "-aet",
        "MODALITY",
        "-aec",
        "KHO",
        "-X",
        "-od",
        str(folder),
    ]
    for key in keys:
        args += ["-k", key]
    done = subprocess.run(
        [*args, "127.0.0.1", str(port)], capture_output=True, text=True, env=dcmtk.env(), timeout=60
    )
    assert done.returncode == 0, done.stderr
    return [pydicom.dcmread(path) for path in sorted(folder.glob("rsp*.dcm"))]


SPS = "ScheduledProcedureStepSequence[0]"
RETURN = (
    "PatientName",
    "PatientID",
    "AccessionNumber",
    "StudyInstanceUID",
    "OtherPatientIDsSequence",
    f"{SPS}.Modality",
    f"{SPS}.ScheduledStationAETitle",
    f"{SPS}.ScheduledProcedureStepStartDate",
    f"{SPS}.ScheduledProcedureStepStartTime",
    f"{SPS}.ScheduledProcedureStepID",
    f"{SPS}.ScheduledProcedureStepStatus",
)


def with_keys(**match: str) -> list[str]:
    keys = {key: "" for key in RETURN}
    for key, value in match.items():
        keys[key.replace("__", f"{SPS}.")] = value
    return [f"{k}={v}" if v else k for k, v in keys.items()]


def test_findscu_worklist_matching(
    archive: Archive, scp: int, hl7: MllpClient, tmp_path: Path
) -> None:
    order(hl7, "P1", modality="CT", station="CT01", start="20240601090000")
    order(
        hl7,
        "P2",
        modality="MR",
        station="MR01",
        start="20240601143000",
        patient="BN002",
        name="Trần^Văn Bình",
        citizen="",
    )
    order(
        hl7,
        "P3",
        modality="CT",
        station="CT01",
        start="20240602080000",
        patient="BN003",
        name="Lê^Thị Cúc",
        citizen="",
    )
    out = tmp_path / "rsp"

    def accessions(**match: str) -> list[str]:
        return sorted(str(r.AccessionNumber) for r in findscu(scp, out, *with_keys(**match)))

    assert accessions() == ["ACCP1", "ACCP2", "ACCP3"]
    assert accessions(__Modality="CT") == ["ACCP1", "ACCP3"]
    assert accessions(__ScheduledStationAETitle="MR01") == ["ACCP2"]
    assert accessions(__ScheduledProcedureStepStartDate="20240601") == ["ACCP1", "ACCP2"]
    assert accessions(__ScheduledProcedureStepStartDate="20240602-") == ["ACCP3"]
    assert accessions(
        __ScheduledProcedureStepStartDate="20240601-20240601",
        __ScheduledProcedureStepStartTime="1200-1800",
    ) == ["ACCP2"]
    assert accessions(PatientID="BN003") == ["ACCP3"]
    assert accessions(AccessionNumber="ACCP2") == ["ACCP2"]
    # a name beyond ASCII: the query says its character set
    assert accessions(SpecificCharacterSet="ISO_IR 192", PatientName="Trần*") == ["ACCP2"]
    assert accessions(PatientID=CITIZEN) == ["ACCP1"]  # the citizen ID finds the person
    # empty results
    assert accessions(__Modality="US") == []
    assert accessions(__ScheduledProcedureStepStartDate="20250101-20250131") == []
    # the answer: requested keys, the sequence item's keys, UTF-8 declared
    (first,) = findscu(scp, out, *with_keys(AccessionNumber="ACCP1"))
    assert first.SpecificCharacterSet == "ISO_IR 192"
    assert str(first.PatientName) == NAME
    assert first.PatientID == "BN001"
    assert first.OtherPatientIDsSequence[0].PatientID == CITIZEN
    step = first.ScheduledProcedureStepSequence[0]
    assert (step.Modality, step.ScheduledStationAETitle, step.ScheduledProcedureStepStartDate) == (
        "CT",
        "CT01",
        "20240601",
    )
    assert step.ScheduledProcedureStepStatus == "SCHEDULED"
    assert "RequestedProcedureDescription" not in first  # not asked for


def test_query_in_utf8_matches_vietnamese_names(
    archive: Archive, scp: int, hl7: MllpClient
) -> None:
    order(hl7, "P1")
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ModalityWorklistInformationFind)
    assoc = ae.associate("127.0.0.1", scp, ae_title="KHO")
    assert assoc.is_established
    try:
        query = Dataset()
        query.SpecificCharacterSet = "ISO_IR 192"
        query.PatientName = "Nguyễn^Thị*"
        query.PatientID = ""
        query.ScheduledProcedureStepSequence = [Dataset()]
        answers = [
            identifier
            for status, identifier in assoc.send_c_find(query, ModalityWorklistInformationFind)
            if status and status.Status == 0xFF00
        ]
    finally:
        assoc.release()
    assert len(answers) == 1
    assert str(answers[0].PatientName) == NAME
    # an empty sequence key returns the whole item
    assert answers[0].ScheduledProcedureStepSequence[0].ScheduledStationAETitle == "CT01"


def _mpps(assoc: Any, uid: str, accession: str, status: str, create: bool) -> int:
    ds = Dataset()
    ds.PerformedProcedureStepStatus = status
    if create:
        ref = Dataset()
        ref.AccessionNumber = accession
        ref.ScheduledProcedureStepID = f"SPS{accession[3:]}"
        ref.StudyInstanceUID = generate_uid()
        ds.ScheduledStepAttributesSequence = [ref]
        ds.PerformedStationAETitle = "CT01"
        ds.Modality = "CT"
        ds.PerformedProcedureStepStartDate = "20240601"
        ds.PerformedProcedureStepStartTime = "091500"
        ds.PatientName = NAME
        ds.SpecificCharacterSet = "ISO_IR 192"
        answer, _ = assoc.send_n_create(ds, ModalityPerformedProcedureStep, uid)
    else:
        ds.PerformedProcedureStepEndDate = "20240601"
        ds.PerformedProcedureStepEndTime = "093000"
        answer, _ = assoc.send_n_set(ds, ModalityPerformedProcedureStep, uid)
    return int(answer.Status)


def test_mpps_in_progress_then_completed(
    archive: Archive, scp: int, hl7: MllpClient, tmp_path: Path
) -> None:
    order(hl7, "P1")
    order(hl7, "P2", patient="BN002", name="Trần^Văn Bình", citizen="")
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate("127.0.0.1", scp, ae_title="KHO")
    assert assoc.is_established
    first, second = generate_uid(), generate_uid()
    try:
        assert _mpps(assoc, first, "ACCP1", "IN PROGRESS", True) == 0x0000
        assert _mpps(assoc, first, "ACCP1", "IN PROGRESS", True) == 0x0111  # duplicate
        assert _mpps(assoc, second, "ACCP2", "COMPLETED", True) == 0x0106  # must start
        status = {
            r[0]: r[1]
            for r in archive.catalog.fetchall("SELECT accession_number, status FROM worklist_items")
        }
        assert status == {"ACCP1": "STARTED", "ACCP2": "SCHEDULED"}
        assert _mpps(assoc, first, "", "COMPLETED", False) == 0x0000
        assert _mpps(assoc, first, "", "DISCONTINUED", False) == 0x0110  # final
        assert _mpps(assoc, generate_uid(), "", "COMPLETED", False) == 0x0112  # unknown
    finally:
        assoc.release()
    status = {
        r[0]: r[1]
        for r in archive.catalog.fetchall("SELECT accession_number, status FROM worklist_items")
    }
    assert status == {"ACCP1": "COMPLETED", "ACCP2": "SCHEDULED"}
    # done work leaves the worklist; asked for by status, it is there
    rows = findscu(scp, tmp_path / "rsp", *with_keys())
    assert [str(r.AccessionNumber) for r in rows] == ["ACCP2"]
    rows = findscu(scp, tmp_path / "rsp", *with_keys(__ScheduledProcedureStepStatus="COMPLETED"))
    assert [str(r.AccessionNumber) for r in rows] == ["ACCP1"]


def test_hl7_to_worklist_to_study_to_qido(
    archive: Archive, scp: int, hl7: MllpClient, tmp_path: Path
) -> None:
    """Vietnamese names round-trip: HL7 order -> worklist -> findscu -W -> a study stored
    with the answer's values -> QIDO-RS; the step completes when its study arrives."""
    order(hl7, "P7")
    (answer,) = findscu(scp, tmp_path / "rsp", *with_keys(AccessionNumber="ACCP7"))
    assert str(answer.PatientName) == NAME
    # the modality makes its images from the worklist answer
    data = instance(
        str(answer.PatientID),
        str(answer.PatientName),
        study_uid=str(answer.StudyInstanceUID),
        accession=str(answer.AccessionNumber),
        modality=str(answer.ScheduledProcedureStepSequence[0].Modality),
        other_ids=((CITIZEN, "CCCD"),),
    )
    path = tmp_path / "image.dcm"
    path.write_bytes(data)
    server = DicomServer(archive).start()
    try:
        stored = dcmtk.storescu(server.port, [path], aet="CT01")
        assert stored.returncode == 0, stored.stderr
    finally:
        server.stop()
    with TestClient(create_app(archive)) as web:
        for params in ({"PatientName": NAME}, {"PatientID": CITIZEN}, {"AccessionNumber": "ACCP7"}):
            found = web.get("/dicom-web/studies", params={**params, "includefield": "PatientName"})
            assert found.status_code == 200, found.text
            (study,) = found.json()
            assert study["00100010"]["Value"][0]["Alphabetic"] == NAME
            assert study["0020000D"]["Value"] == [str(answer.StudyInstanceUID)]
    assert Hl7Server(archive, port=0).housekeep() == (1, 0)
    assert findscu(scp, tmp_path / "rsp", *with_keys(AccessionNumber="ACCP7")) == []


def test_citizen_id_in_study_cfind(archive: Archive, scp: int, hl7: MllpClient) -> None:
    """C-FIND (Query/Retrieve, through the same C-FIND handler) finds a person's studies
    by the citizen ID across the hospital's local Patient IDs."""
    # two local IDs of one person (two registrations); the HIS gives each the citizen ID
    for patient in ("BN001", "BN005"):
        ack = hl7.send(message(f"PID|1||{patient}^^^BV^PI~{CITIZEN}^^^CCCD^NI||{NAME}||19900102|F"))
        assert msa(ack)[1] == "AA"
        archive.ingest_part10(instance(patient, "X"))
    archive.ingest_part10(instance("BN777", "Y"))  # someone else
    ae = AE(ae_title="WORKSTATION")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", scp, ae_title="KHO")
    try:
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.PatientID = CITIZEN
        query.IssuerOfPatientID = "CCCD"
        query.PatientName = ""
        query.StudyInstanceUID = ""
        answers = [
            identifier
            for status, identifier in assoc.send_c_find(
                query, StudyRootQueryRetrieveInformationModelFind
            )
            if status and status.Status in (0xFF00, 0xFF01)
        ]
    finally:
        assoc.release()
    assert sorted(str(a.PatientID) for a in answers) == ["BN001", "BN005"]
    assert {str(a.PatientName) for a in answers} == {NAME}
