"""C-FIND (dcmtk's findscu) on the stored forms of TM and DA, on SQLite and PostgreSQL:
times and dates compare as such (issue 12, item 5); invalid dates and times and value lists
past the limit answer 0xC000 "Unable to process" with an Error Comment naming the key."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)

from kho.archive.config import Settings
from kho.archive.query import engine as query
from kho.dicom_scp.server import DicomServer
from tests.archive.test_query_ranges import (
    AROUND_1015,
    DATE_CASES,
    INVALID,
    PATIENT,
    RANGE_STUDIES,
    TIME_CASES,
    fill_ranges,
)
from tests.dicom_scp.test_qr import _final_status, _still_serving, findscu
from tests.helpers.postgres import ENGINES, archive_on

UNABLE_TO_PROCESS = 0xC000


@pytest.fixture(scope="module", params=ENGINES)
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp(f"find-ranges-{request.param}"),
        dicom_port=0,
        ae_title="KHO",
        fsync=False,
    )
    with archive_on(request.param, settings) as archive:
        made = fill_ranges(archive)
        server = DicomServer(archive).start()
        try:
            yield {"archive": archive, "made": made, "port": server.port}
        finally:
            server.stop()


def _find_keys(served: dict[str, Any], keys: list[str], out: Path) -> set[str]:
    base = ["QueryRetrieveLevel=STUDY", f"PatientID={PATIENT}", "StudyID"]
    answers, log = findscu(served["port"], "-S", [*base, *keys], out)
    assert "Success" in _final_status(log), log[-2000:]
    return {str(a.StudyID) for a in answers}


@pytest.mark.parametrize(("value", "expected"), TIME_CASES)
def test_findscu_time_ranges_compare_times(
    served: dict[str, Any], tmp_path: Path, value: str, expected: set[str]
) -> None:
    assert _find_keys(served, [f"StudyTime={value}"], tmp_path) == expected


@pytest.mark.parametrize(("value", "expected"), DATE_CASES)
def test_findscu_date_ranges_compare_dates(
    served: dict[str, Any], tmp_path: Path, value: str, expected: set[str]
) -> None:
    assert _find_keys(served, [f"StudyDate={value}"], tmp_path) == expected


def test_findscu_returns_stored_forms_and_matches_date_and_time_independently(
    served: dict[str, Any], tmp_path: Path
) -> None:
    keys = ["StudyDate=20230301-20230331", "StudyTime=1000-1100"]
    base = ["QueryRetrieveLevel=STUDY", f"PatientID={PATIENT}", "StudyID"]
    answers, log = findscu(served["port"], "-S", [*base, *keys], tmp_path)
    assert "Success" in _final_status(log), log[-2000:]
    assert {str(a.StudyID): (a.StudyDate, a.StudyTime) for a in answers} == {
        key: RANGE_STUDIES[key] for key in AROUND_1015
    }


def _find_statuses(port: int, identifier: Dataset) -> list[Dataset]:
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="KHO")
    assert assoc.is_established
    try:
        responses = assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind)
        return [status for status, _answer in responses]
    finally:
        assoc.release()


def _identifier(**keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = ""
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(("keyword", "value"), INVALID)
def test_invalid_dates_and_times_answer_unable_to_process(
    served: dict[str, Any], keyword: str, value: str
) -> None:
    (status,) = _find_statuses(served["port"], _identifier(**{keyword: value}))
    assert status.Status == UNABLE_TO_PROCESS
    assert status.ErrorComment.startswith(f"{keyword}: ")
    assert value in status.ErrorComment


def test_findscu_reports_the_failure(served: dict[str, Any], tmp_path: Path) -> None:
    answers, log = findscu(
        served["port"], "-S", ["QueryRetrieveLevel=STUDY", "StudyDate=20241301"], tmp_path
    )
    assert answers == []
    assert "UnableToProcess" in _final_status(log), log[-2000:]
    _still_serving(served["port"])


def test_uid_lists_up_to_the_limit_match_and_past_it_are_refused(
    served: dict[str, Any], tmp_path: Path
) -> None:
    made = served["made"]
    limit = query.MAX_VALUES_PER_KEY
    uids = [f"1.2.826.0.1.3680043.10.{n}" for n in range(limit - 2)] + [made["hh"], made["acr"]]
    answers, log = findscu(
        served["port"],
        "-S",
        ["QueryRetrieveLevel=STUDY", "StudyID", "StudyInstanceUID=" + "\\".join(uids)],
        tmp_path,
    )
    assert "Success" in _final_status(log), log[-2000:]
    assert {str(a.StudyID) for a in answers} == {"hh", "acr"}
    (status,) = _find_statuses(
        served["port"], _identifier(StudyInstanceUID="\\".join([*uids, "1.2.3.4"]))
    )
    assert status.Status == UNABLE_TO_PROCESS
    assert status.ErrorComment == f"StudyInstanceUID: {limit + 1} values, at most {limit} per key"
    _still_serving(served["port"])
