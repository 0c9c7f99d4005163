"""Issue 12 from the outside, as a PACS engineer tried it: instances sent with dcmtk's
storescu, the index read back with findscu, movescu (to dcmtk's storescp) and QIDO-RS
through dicomweb-client, on both catalog engines.  One study never spans two patients, a
series reused in another study is refused, and a corrected resend is found under the right
patient only."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from kho.archive.config import Settings
from kho.dicom_scp.server import DicomServer
from tests.archive.test_identity import instance
from tests.dicom_scp.test_qr import findscu
from tests.helpers import dcmtk
from tests.helpers.postgres import ENGINES, archive_on
from tests.viewer_api.conftest import serve

ROOT = "1.2.826.0.1.3680043.10.1425.120"


@pytest.fixture(params=ENGINES)
def peers(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """An archive on one engine, served over DICOM and DICOMweb, with a storescp as the
    C-MOVE destination."""
    store_port = dcmtk.free_port()
    settings = Settings(
        data_dir=tmp_path / "data",
        dicom_port=0,
        http_port=0,
        fsync=False,
        move_destinations={"STORESCP": f"127.0.0.1:{store_port}"},
    )
    with archive_on(request.param, settings) as archive:
        archive.derivers = []
        dicom = DicomServer(archive).start()
        http, _base, client = serve(archive)
        try:
            yield {
                "archive": archive,
                "port": dicom.port,
                "client": client,
                "store_port": store_port,
                "tmp": tmp_path,
            }
        finally:
            http.stop()
            dicom.stop()


def send(peers: dict[str, Any], name: str, data: bytes) -> str:
    path = peers["tmp"] / f"{name}.dcm"
    path.write_bytes(data)
    result = dcmtk.storescu(peers["port"], [path], extra=("-v",))
    return result.stdout + result.stderr


def patient_ids(peers: dict[str, Any], level: str, *keys: str) -> list[str]:
    model = "-P" if level == "PATIENT" else "-S"
    answers, log = findscu(
        peers["port"],
        model,
        [f"QueryRetrieveLevel={level}", "PatientID", *keys],
        peers["tmp"] / "find",
    )
    assert "Final Find Response" in log, log
    return sorted(str(a.PatientID) for a in answers)


def test_one_study_under_two_patient_ids(peers: dict[str, Any]) -> None:
    study = f"{ROOT}.1"
    log_a = send(
        peers, "a", instance(f"{study}.1.1", "SPLIT-A", study, f"{study}.1", accession="SPA")
    )
    assert "Success" in log_a, log_a
    log_b = send(
        peers, "b", instance(f"{study}.2.1", "SPLIT-B", study, f"{study}.2", accession="SPB")
    )
    assert "Error: CannotUnderstand" in log_b, log_b  # 0xC410, the conflict named
    assert patient_ids(peers, "PATIENT", "PatientID=SPLIT-B") == []
    assert patient_ids(peers, "STUDY", "PatientID=SPLIT-B") == []
    answers, _log = findscu(
        peers["port"],
        "-S",
        [
            "QueryRetrieveLevel=STUDY",
            f"StudyInstanceUID={study}",
            "AccessionNumber",
            "NumberOfStudyRelatedInstances",
            "PatientID",
        ],
        peers["tmp"] / "find-study",
    )
    [answer] = answers
    assert (answer.PatientID, answer.AccessionNumber) == ("SPLIT-A", "SPA")
    assert int(answer.NumberOfStudyRelatedInstances) == 1
    assert peers["client"].search_for_studies(search_filters={"PatientID": "SPLIT-B"}) == []
    # a patient-level C-MOVE of SPLIT-A sends Anna's image only
    query = peers["tmp"] / "move.dcm"
    ds = pydicom.Dataset()
    ds.QueryRetrieveLevel = "PATIENT"
    ds.PatientID = "SPLIT-A"
    ds.save_as(query, implicit_vr=True, little_endian=True)
    with dcmtk.run_storescp(peers["tmp"] / "moved", port=peers["store_port"]) as scp:
        log = subprocess.run(
            [dcmtk.tool("movescu"), "-P", "-aec", "KHO", "-aem", "STORESCP",
             "127.0.0.1", str(peers["port"]), str(query)],
            capture_output=True, text=True, env=dcmtk.env(), timeout=120,
        )  # fmt: skip
        moved = [pydicom.dcmread(p) for p in scp.files()]
    assert [str(m.PatientID) for m in moved] == ["SPLIT-A"], log.stdout + log.stderr


def test_a_corrected_resend_is_found_under_the_right_patient_only(peers: dict[str, Any]) -> None:
    study = f"{ROOT}.2"
    sop = f"{study}.1.1"
    assert "Success" in send(peers, "wrong", instance(sop, "WRONG01", study, f"{study}.1"))
    assert "Success" in send(peers, "right", instance(sop, "RIGHT01", study, f"{study}.1"))
    assert patient_ids(peers, "STUDY", f"StudyInstanceUID={study}") == ["RIGHT01"]
    assert patient_ids(peers, "PATIENT", "PatientID=WRONG01") == []
    assert patient_ids(peers, "PATIENT", "PatientID=RIGHT01") == ["RIGHT01"]
    client = peers["client"]
    assert client.search_for_studies(search_filters={"PatientID": "WRONG01"}) == []
    [found] = client.search_for_studies(search_filters={"PatientID": "RIGHT01"})
    assert found["0020000D"]["Value"] == [study]
    [meta] = client.retrieve_study_metadata(study)
    assert meta["00100020"]["Value"] == ["RIGHT01"]


def test_a_series_reused_in_another_study_is_refused(peers: dict[str, Any]) -> None:
    series = f"{ROOT}.3.9"
    first, second = f"{ROOT}.3", f"{ROOT}.4"
    assert "Success" in send(peers, "x", instance(f"{series}.1", "P3", first, series))
    log = send(peers, "y", instance(f"{series}.2", "P3", second, series))
    assert "Error: CannotUnderstand" in log, log  # 0xC410
    client = peers["client"]
    assert client.search_for_studies(search_filters={"StudyInstanceUID": second}) == []
    [row] = client.search_for_series(first)
    assert row["00201209"]["Value"] == [1]  # NumberOfSeriesRelatedInstances
    counts = peers["archive"].catalog.counts()
    assert counts["studies"] <= counts["series"]
