"""Sequence matching (PS3.4 C.2.2.2.6) on the catalogued sequences, through the matching
engine on both catalog engines, dcmtk's findscu, and QIDO-RS."""

from __future__ import annotations

from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from kho.archive.archive import Archive
from kho.archive.config import Settings
from kho.archive.query import engine as query
from kho.dicom_scp.server import DicomServer
from kho.errors import QueryError
from tests.archive.test_ingest import make_instance
from tests.dicom_scp.test_qr import findscu
from tests.helpers.part10 import part10_bytes
from tests.helpers.postgres import ENGINES, archive_on


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "99KHO", meaning
    return item


def _instance(
    patient: str, codes: list[tuple[str, str]], steps: list[str], others: list[str]
) -> bytes:
    ds = pydicom.dcmread(
        BytesIO(make_instance(study_uid=generate_uid(), series_uid=generate_uid()))
    )
    ds.PatientID = patient
    ds.ProcedureCodeSequence = Sequence([_code(v, m) for v, m in codes])
    ras = []
    for step in steps:
        item = Dataset()
        item.RequestedProcedureID, item.ScheduledProcedureStepID = "RP-" + step, step
        ras.append(item)
    ds.RequestAttributesSequence = Sequence(ras)
    opids = []
    for other in others:
        item = Dataset()
        item.PatientID, item.IssuerOfPatientID = other, "EMR"
        opids.append(item)
    ds.OtherPatientIDsSequence = Sequence(opids)
    return part10_bytes(ds)


def _fill(archive: Archive) -> dict[str, Any]:
    made = {}
    for name, codes, steps, others in [
        ("A", [("CT-CHEST", "CT chest"), ("CT-ABD", "CT abdomen")], ["SPS1"], ["EMR-42"]),
        ("B", [("MR-HEAD", "MR head")], ["SPS2", "SPS3"], ["EMR-7", "OLD-7"]),
        ("C", [], [], []),
    ]:
        result = archive.ingest_part10(_instance(name, codes, steps, others))
        made[name] = result
    return made


@pytest.fixture(params=ENGINES)
def filled(request: pytest.FixtureRequest, settings: Settings) -> Iterator[tuple[Archive, Any]]:
    with archive_on(request.param, settings) as archive:
        yield archive, _fill(archive)


def _find(archive: Archive, level: str, filters: dict[str, Any], **kw: Any) -> list[dict[str, Any]]:
    return list(query.find(archive.catalog, level, filters, **kw))


def test_study_level_matches_any_item_and_returns_the_matching_ones(filled) -> None:
    archive, made = filled
    rows = _find(archive, "STUDY", {"ProcedureCodeSequence": {"CodeValue": "CT-CHEST"}})
    assert [r["StudyInstanceUID"] for r in rows] == [made["A"].study_uid]
    assert rows[0]["ProcedureCodeSequence"] == [{"CodeValue": "CT-CHEST"}]
    # wildcard inside the item, two keys of one item, list of values
    rows = _find(
        archive,
        "STUDY",
        {"ProcedureCodeSequence": {"CodeValue": "CT-*", "CodeMeaning": ""}},
    )
    assert rows[0]["ProcedureCodeSequence"] == [
        {"CodeValue": "CT-CHEST", "CodeMeaning": "CT chest"},
        {"CodeValue": "CT-ABD", "CodeMeaning": "CT abdomen"},
    ]
    rows = _find(archive, "STUDY", {"ProcedureCodeSequence": {"CodeValue": "CT-ABD\\MR-HEAD"}})
    assert {r["StudyInstanceUID"] for r in rows} == {made["A"].study_uid, made["B"].study_uid}
    both = {"CodeValue": "CT-CHEST", "CodeMeaning": "MR head"}  # never in one item
    assert _find(archive, "STUDY", {"ProcedureCodeSequence": both}) == []


def test_empty_item_is_universal_and_returns_every_item(filled) -> None:
    archive, made = filled
    rows = {
        r["StudyInstanceUID"]: r for r in _find(archive, "STUDY", {"ProcedureCodeSequence": {}})
    }
    assert set(rows) == {m.study_uid for m in made.values()}
    assert rows[made["C"].study_uid]["ProcedureCodeSequence"] == []
    assert len(rows[made["A"].study_uid]["ProcedureCodeSequence"]) == 2
    assert set(rows[made["B"].study_uid]["ProcedureCodeSequence"][0]) == {
        "CodeValue",
        "CodingSchemeDesignator",
        "CodingSchemeVersion",
        "CodeMeaning",
    }


def test_patient_and_series_sequences_and_lower_levels(filled) -> None:
    archive, made = filled
    rows = _find(
        archive, "PATIENT", {"OtherPatientIDsSequence": {"PatientID": "EMR-7"}}, model="PATIENT"
    )
    assert [r["PatientID"] for r in rows] == ["B"]
    rows = _find(
        archive,
        "SERIES",
        {
            "RequestAttributesSequence": {
                "ScheduledProcedureStepID": "SPS3",
                "RequestedProcedureID": "",
            }
        },
    )
    assert [r["SeriesInstanceUID"] for r in rows] == [made["B"].series_uid]
    assert rows[0]["RequestAttributesSequence"] == [
        {"ScheduledProcedureStepID": "SPS3", "RequestedProcedureID": "RP-SPS3"}
    ]
    # a study sequence matched from the image level selects the study's instances
    rows = _find(archive, "IMAGE", {"ProcedureCodeSequence": {"CodeValue": "MR-HEAD"}})
    assert [r["SOPInstanceUID"] for r in rows] == [made["B"].sop_uid]


def test_malformed_sequence_keys_are_refused(filled) -> None:
    archive, _made = filled
    with pytest.raises(QueryError):
        _find(archive, "STUDY", {"ProcedureCodeSequence": "CT-CHEST"})
    with pytest.raises(QueryError):
        _find(archive, "STUDY", {"ProcedureCodeSequence": {"PatientName": "X"}})
    with pytest.raises(QueryError):
        _find(archive, "PATIENT", {"ProcedureCodeSequence": {}}, model="PATIENT")


def test_a_later_instance_with_other_items_replaces_them(settings: Settings) -> None:
    with Archive(settings) as archive:
        first = pydicom.dcmread(BytesIO(_instance("D", [("X1", "x")], [], [])))
        archive.ingest_part10(part10_bytes(first))
        first.SOPInstanceUID = first.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        first.ProcedureCodeSequence = Sequence([_code("X2", "y")])
        archive.ingest_part10(part10_bytes(first))
        rows = _find(archive, "STUDY", {"ProcedureCodeSequence": {"CodeValue": ""}})
        assert rows[0]["ProcedureCodeSequence"] == [{"CodeValue": "X2"}]


def test_findscu_sequence_matching(settings: Settings, tmp_path: Path) -> None:
    with Archive(settings) as archive:
        made = _fill(archive)
        server = DicomServer(archive).start()
        try:
            answers, log = findscu(
                server.port,
                "-S",
                [
                    "QueryRetrieveLevel=STUDY",
                    "StudyInstanceUID",
                    "ProcedureCodeSequence[0].CodeValue=CT-*",
                    "ProcedureCodeSequence[0].CodeMeaning",
                ],
                tmp_path / "find",
            )
        finally:
            server.stop()
    assert [str(a.StudyInstanceUID) for a in answers] == [made["A"].study_uid], log[-2000:]
    items = answers[0].ProcedureCodeSequence
    assert [(i.CodeValue, i.CodeMeaning) for i in items] == [
        ("CT-CHEST", "CT chest"),
        ("CT-ABD", "CT abdomen"),
    ]


def test_qido_sequence_matching(archive: Archive) -> None:
    from kho.viewer_api.app import create_app

    made = _fill(archive)
    client = TestClient(create_app(archive))
    response = client.get(
        "/dicom-web/studies",
        params={
            "ProcedureCodeSequence.CodeValue": "MR-HEAD",
            "includefield": "ProcedureCodeSequence",
        },
    )
    assert response.status_code == 200, response.text
    (study,) = response.json()
    assert study["0020000D"]["Value"] == [made["B"].study_uid]
    (item,) = study["00081032"]["Value"]
    assert item["00080100"] == {"vr": "SH", "Value": ["MR-HEAD"]}
    bad = client.get("/dicom-web/studies", params={"PatientName.CodeValue": "x"})
    assert bad.status_code == 400
