"""Date and time matching compares dates and times, not text (issue 12, item 5), invalid
dates and times are refused, and long value lists are bounded (item 8): on the matching
engine and through QIDO-RS, on SQLite, PostgreSQL, and PostgreSQL with a collation that
ignores punctuation (as glibc's en_US does), over instances ingested with every stored
form of TM and DA (HH, HHMM, fractions, ACR-NEMA colons and dots, empty)."""

from __future__ import annotations

import contextlib
import secrets
import warnings
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from kho.archive.archive import Archive
from kho.archive.catalog import Catalog, open_catalog
from kho.archive.config import Settings
from kho.archive.query import engine as query
from kho.errors import QueryError
from kho.viewer_api.server import HttpServer
from tests.helpers.part10 import part10_bytes
from tests.helpers.postgres import ADMIN_URL, archive_on

PATIENT = "RNG"
CT = "1.2.840.10008.5.1.4.1.1.2"
#: study key (its StudyID) -> (StudyDate, StudyTime) exactly as the instance carries them
RANGE_STUDIES = {
    "hh": ("20230310", "10"),
    "hhmm": ("20230310", "1015"),
    "frac": ("20230310", "101530.123"),
    "acr": ("20230310", "10:15"),
    "acr_secs": ("20230310", "09:30:00"),
    "leap": ("20230310", "235960"),
    "empty": ("20230310", ""),
    "dotted": ("2023.03.11", "120000"),
    "dotted_june": ("2023.06.01", "0800"),
    "new_year": ("20221231", "0800"),
}
MARCH_10 = {"hh", "hhmm", "frac", "acr", "acr_secs", "leap", "empty"}
AROUND_1015 = {"hh", "hhmm", "frac", "acr"}
WITH_TIME = set(RANGE_STUDIES) - {"empty"}

TIME_CASES = [
    # the cases: '1015' and '10' denote the spans they cover
    ("101500-101530", AROUND_1015),
    ("100000-110000", AROUND_1015),
    # an upper bound '1000' ends at 10:00:59.999999, inside the span of a stored '10'
    ("0900-1000", {"hh", "acr_secs"}),
    ("0900-095959", {"acr_secs"}),
    ("101531-", {"hh", "hhmm", "acr", "leap", "dotted"}),
    ("-1014", {"hh", "acr_secs", "dotted_june", "new_year"}),
    ("10", AROUND_1015),
    ("1015", AROUND_1015),
    ("101530.2", {"hh", "hhmm", "acr"}),
    ("101530.123", AROUND_1015),
    ("10:15-10:15:30", AROUND_1015),  # the ACR-NEMA form in a query
    ("2359-", {"leap"}),
    ("-2359", WITH_TIME),
    ("13-", {"leap"}),
]
DATE_CASES = [
    ("20230310", MARCH_10),
    ("20230311", {"dotted"}),
    ("20230301-20230331", MARCH_10 | {"dotted"}),
    # 'YYYY.MM.DD' sorts between two years as text: it must not leak into this range
    ("20221201-20230131", {"new_year"}),
    ("20230401-", {"dotted_june"}),
    ("-20221231", {"new_year"}),
]
INVALID = [
    ("StudyDate", "20241301"),  # month 13
    ("StudyDate", "20240230"),
    ("StudyDate", "2024-01-01"),  # not DICOM's format (PS3.18 takes the DA form only)
    ("StudyDate", "2024.01.01"),  # ACR-NEMA form: read in stored values, not in queries
    ("StudyDate", "202401"),
    ("StudyDate", "20240101-20231231"),  # starts after it ends
    ("StudyTime", "256000"),
    ("StudyTime", "2400"),
    ("StudyTime", "1060"),
    ("StudyTime", "101561"),
    ("StudyTime", "101530.1234567"),
    ("StudyTime", "10:1"),
    ("StudyTime", "1a"),
    ("StudyTime", "1200-1100"),
    ("StudyTime", "2200-0600"),  # ranges do not cross midnight (PS3.4 C.2.2.2.5)
    ("PatientBirthDate", "19000229"),  # 1900 is no leap year
]


def range_instance(key: str, date: str, time: str) -> bytes:
    """One CT instance of study ``key`` with StudyDate/StudyTime written as given."""
    ds = Dataset()
    ds.PatientID = PATIENT
    ds.PatientName = "RANGE^TEST"
    ds.StudyInstanceUID = generate_uid()
    ds.StudyID = key
    ds.StudyDate = date
    ds.StudyTime = time
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    with warnings.catch_warnings():  # pydicom warns about the ACR-NEMA forms
        warnings.simplefilter("ignore")
        return part10_bytes(ds)


def fill_ranges(archive: Archive) -> dict[str, str]:
    """Ingest one study per RANGE_STUDIES entry; return study key -> Study Instance UID."""
    archive.derivers = []  # rows and bytes are enough here
    made = {}
    with warnings.catch_warnings():  # pydicom warns about the ACR-NEMA forms it reads
        warnings.simplefilter("ignore")
        for key, (date, time) in RANGE_STUDIES.items():
            made[key] = archive.ingest_part10(range_instance(key, date, time)).study_uid
    return made


@contextlib.contextmanager
def _punctuation_blind_database() -> Iterator[str]:
    """A PostgreSQL database whose collation ignores punctuation at the first level."""
    name = f"kho_test_{secrets.token_hex(6)}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(
            f"CREATE DATABASE {name} TEMPLATE template0 LOCALE_PROVIDER icu "
            "ICU_LOCALE 'en-US-u-ka-shifted' LOCALE 'C.UTF-8'"
        )
        try:
            yield f"postgresql://postgres@127.0.0.1:5432/{name}"
        finally:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextlib.contextmanager
def _archive(engine: str, settings: Settings) -> Iterator[Archive]:
    if engine != "postgresql-icu":
        with archive_on(engine, settings) as archive:
            yield archive
        return
    with (
        _punctuation_blind_database() as url,
        Archive(settings, catalog=open_catalog(url)) as archive,
    ):
        yield archive


@pytest.fixture(scope="module", params=["sqlite", "postgresql", "postgresql-icu"])
def ranges(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp(f"ranges-{request.param}"), fsync=False, http_port=0
    )
    with _archive(request.param, settings) as archive:
        made = fill_ranges(archive)
        server = HttpServer(archive, host="127.0.0.1", port=0).start()
        try:
            yield {
                "archive": archive,
                "made": made,
                "qido": f"http://127.0.0.1:{server.port}/dicom-web/studies",
            }
        finally:
            server.stop()


def _keys(ranges: dict[str, Any], filters: dict[str, Any]) -> set[str]:
    rows = query.find(ranges["archive"].catalog, "STUDY", {"PatientID": PATIENT, **filters})
    by_uid = {uid: key for key, uid in ranges["made"].items()}
    return {by_uid[row["StudyInstanceUID"]] for row in rows}


def _qido(ranges: dict[str, Any], params: list[tuple[str, str]]) -> httpx.Response:
    return httpx.get(ranges["qido"], params=[("PatientID", PATIENT), *params], timeout=60)


def _qido_keys(response: httpx.Response) -> set[str]:
    assert response.status_code == 200, response.text
    return {study["00200010"]["Value"][0] for study in response.json()}


def test_stored_forms_are_catalogued_as_sent(ranges: dict[str, Any]) -> None:
    catalog: Catalog = ranges["archive"].catalog
    for key, (date, time) in RANGE_STUDIES.items():
        row = catalog.fetchone(
            "SELECT study_date, study_time FROM studies WHERE study_uid = ?",
            (ranges["made"][key],),
        )
        assert row is not None and tuple(row) == (date, time), key


@pytest.mark.parametrize(("value", "expected"), TIME_CASES)
def test_time_ranges_compare_times(ranges: dict[str, Any], value: str, expected: set[str]) -> None:
    assert _keys(ranges, {"StudyTime": value}) == expected
    assert query.count(ranges["archive"].catalog, "STUDY", {"StudyTime": value}) == len(expected)
    assert _qido_keys(_qido(ranges, [("StudyTime", value)])) == expected


@pytest.mark.parametrize(("value", "expected"), DATE_CASES)
def test_date_ranges_compare_dates(ranges: dict[str, Any], value: str, expected: set[str]) -> None:
    assert _keys(ranges, {"StudyDate": value}) == expected
    assert _qido_keys(_qido(ranges, [("StudyDate", value)])) == expected


def test_date_and_time_ranges_match_independently(ranges: dict[str, Any]) -> None:
    both = {"StudyDate": "20230301-20230331", "StudyTime": "1000-1100"}
    assert _keys(ranges, both) == AROUND_1015
    assert _qido_keys(_qido(ranges, list(both.items()))) == AROUND_1015
    # a list of times is any of them
    assert _keys(ranges, {"StudyTime": "0930\\2359-"}) == {"acr_secs", "leap"}


@pytest.mark.parametrize(("keyword", "value"), INVALID)
def test_invalid_dates_and_times_are_refused(
    ranges: dict[str, Any], keyword: str, value: str
) -> None:
    with pytest.raises(QueryError, match=keyword):
        _keys(ranges, {keyword: value})
    response = _qido(ranges, [(keyword, value)])
    assert response.status_code == 400
    assert keyword in response.text and value in response.text


# --- bounded lists (item 8: 2,000 PatientID= gave 503 "Expression tree is too large") ----


def test_long_value_lists_up_to_the_limit_work(ranges: dict[str, Any]) -> None:
    catalog: Catalog = ranges["archive"].catalog
    made = ranges["made"]
    limit = query.MAX_VALUES_PER_KEY
    uids = [f"1.2.826.0.1.3680043.10.{n}" for n in range(limit - 2)]
    uids += [made["hh"], made["leap"]]
    rows = list(query.find(catalog, "STUDY", {"StudyInstanceUID": uids}))
    assert {r["StudyInstanceUID"] for r in rows} == {made["hh"], made["leap"]}
    assert query.count(catalog, "STUDY", {"StudyInstanceUID": uids}) == 2
    assert len(query.instances(catalog, "STUDY", {"StudyInstanceUID": uids})) == 2
    # text values (one IN), wildcards (a balanced OR), dates and times (a balanced OR)
    ids = [f"NOBODY{n}" for n in range(limit - 1)] + [PATIENT]
    assert len(list(query.find(catalog, "STUDY", {"PatientID": ids}))) == len(RANGE_STUDIES)
    patterns = [f"NOBODY{n}*" for n in range(limit - 1)] + ["RN?"]
    assert len(list(query.find(catalog, "PATIENT", {"PatientID": patterns}))) == 1
    times = [f"{h:02d}{m:02d}" for h in range(1, 9) for m in range(60)] + ["1015"]
    assert _keys(ranges, {"StudyTime": times}) == AROUND_1015 | {"dotted_june", "new_year"}
    # one value repeated any number of times is one value
    assert len(list(query.find(catalog, "STUDY", {"PatientID": [PATIENT] * 5000}))) == len(
        RANGE_STUDIES
    )


def test_long_value_lists_past_the_limit_are_refused(ranges: dict[str, Any]) -> None:
    catalog: Catalog = ranges["archive"].catalog
    limit = query.MAX_VALUES_PER_KEY
    with pytest.raises(QueryError, match=f"PatientID: {limit + 1} values, at most {limit}"):
        list(query.find(catalog, "STUDY", {"PatientID": [f"P{n}" for n in range(limit + 1)]}))
    uids = "\\".join(f"1.2.3.{n}" for n in range(limit + 1))
    with pytest.raises(QueryError, match="StudyInstanceUID"):
        list(query.find(catalog, "SERIES", {"StudyInstanceUID": uids}))
    with pytest.raises(QueryError, match="StudyInstanceUID"):
        query.instances(catalog, "STUDY", {"StudyInstanceUID": uids})
    many = {k: [f"V{n}" for n in range(900)] for k in ("PatientID", "StudyID", "AccessionNumber")}
    many["StudyDescription"] = [f"D{n}" for n in range(900)]
    many["PatientName"] = [f"N{n}" for n in range(900)]
    with pytest.raises(QueryError, match=f"more than {query.MAX_VALUES_PER_QUERY} values"):
        query.count(catalog, "STUDY", many)


def test_qido_long_lists_answer_400_past_the_limit_and_match_below(
    ranges: dict[str, Any],
) -> None:
    made = ranges["made"]
    limit = query.MAX_VALUES_PER_KEY
    # the request: 2,000 repeated PatientID= parameters
    response = httpx.get(
        ranges["qido"], params=[("PatientID", f"P{n}") for n in range(2000)], timeout=60
    )
    assert response.status_code == 400, response.text[:500]
    assert f"at most {limit}" in response.text
    # repeated identical values fold into one
    response = httpx.get(ranges["qido"], params=[("PatientID", PATIENT)] * 2000, timeout=60)
    assert _qido_keys(response) == set(RANGE_STUDIES)
    # a UID list at the limit (repeated StudyInstanceUID=, PS3.18 UID list matching)
    uids = [f"1.2.826.0.1.3680043.10.{n}" for n in range(limit - 1)] + [made["frac"]]
    response = httpx.get(ranges["qido"], params=[("StudyInstanceUID", u) for u in uids])
    assert _qido_keys(response) == {"frac"}
