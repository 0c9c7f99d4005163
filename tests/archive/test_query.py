"""The matching engine (kho.archive.query.engine) on a catalog filled by real ingest: the real
samples plus synthetic instances with known attributes; each test runs on SQLite and on
PostgreSQL (a fresh database per run)."""

from __future__ import annotations

import contextlib
import secrets
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from kho.archive.archive import Archive
from kho.archive.catalog import Catalog, open_catalog
from kho.archive.config import Settings
from kho.archive.query import engine as query
from kho.errors import KhoError, QueryError
from tests.conftest import sample_files
from tests.helpers.part10 import part10_bytes

PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
SR = "1.2.840.10008.5.1.4.1.1.88.11"

# (patient id, name, birth date, study key, study date, study time, accession, modality,
#  series count, instances per series)
PATIENTS = {
    "Q1": ("SMITH^JOHN", "19500101", "M"),
    "Q2": ("smith^jane", "19610203", "F"),
    "Q3": ("Müller^Jürgen", "19700304", "M"),
    "Q4": ("O_BRIEN^PAT", "19800405", "F"),
    "Q%5": ("SMYTHE^ANN", "19900506", "F"),
}
STUDIES = [
    # study key, patient, date, time, accession, description, [(modality, sop class, n)]
    ("s1", "Q1", "20200101", "101530", "ACC1", "CHEST", [("CT", CT, 3), ("MR", MR, 2)]),
    ("s2", "Q1", "20200615", "0800", "ACC2", "HEAD", [("MR", MR, 1)]),
    ("s3", "Q2", "20210101", "235959.5", "ACC3", "KNEE", [("SR", SR, 1)]),
    ("s4", "Q3", "20191231", "120000", "ACC4", "ABDOMEN", [("CT", CT, 2)]),
    ("s5", "Q4", "20200301", "093000", "ACC_5", "CHEST^X", [("CT", CT, 1)]),
    ("s6", "Q%5", "", "", "AXC_5", "", [("MR", MR, 1)]),
]


def _instance(patient: str, study: dict[str, Any], series: dict[str, Any], number: int) -> bytes:
    name, birth, sex = PATIENTS[patient]
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientID = patient
    ds.PatientName = name
    ds.PatientBirthDate = birth
    ds.PatientSex = sex
    ds.StudyInstanceUID = study["uid"]
    ds.StudyDate = study["date"]
    ds.StudyTime = study["time"]
    ds.AccessionNumber = study["accession"]
    ds.StudyDescription = study["description"]
    ds.StudyID = study["key"]
    ds.ReferringPhysicianName = "House^Gregory"
    ds.SeriesInstanceUID = series["uid"]
    ds.Modality = series["modality"]
    ds.SeriesNumber = series["number"]
    ds.SOPClassUID = series["sop_class"]
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceNumber = number
    ds.ContentDate = study["date"]
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return part10_bytes(ds)


def _fill(archive: Archive) -> dict[str, Any]:
    """Ingest the synthetic studies and the real samples; return what was made."""
    # queries and retrieval need the catalog rows and the stored bytes, not thumbnails:
    # without derivers these tests do not wait on rendering (nor its JIT compilation)
    archive.derivers = []
    made: dict[str, Any] = {"studies": {}, "series": {}, "instances": {}}
    for key, patient, date, time, accession, description, series_list in STUDIES:
        study = {
            "key": key,
            "uid": generate_uid(),
            "date": date,
            "time": time,
            "accession": accession,
            "description": description,
            "patient": patient,
        }
        made["studies"][key] = study
        for index, (modality, sop_class, count) in enumerate(series_list, 1):
            series = {
                "uid": generate_uid(),
                "modality": modality,
                "sop_class": sop_class,
                "number": index,
                "study": key,
            }
            made["series"][f"{key}.{index}"] = series
            for number in range(1, count + 1):
                result = archive.ingest_part10(_instance(patient, study, series, number))
                made["instances"].setdefault(f"{key}.{index}", []).append(result.sop_uid)
    real = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in sample_files():
            with contextlib.suppress(KhoError):
                archive.ingest_part10(path.read_bytes(), lenient_identity=True)
                real += 1
    made["real"] = real
    return made


@contextlib.contextmanager
def _postgres_database() -> Iterator[str]:
    psycopg = pytest.importorskip("psycopg")
    name = f"kho_test_{secrets.token_hex(6)}"
    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True)
    except psycopg.Error as exc:
        pytest.skip(f"PostgreSQL not reachable: {exc}")
    try:
        admin.execute(f"CREATE DATABASE {name}")
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def filled(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Catalog, dict[str, Any]]]:
    data_dir: Path = tmp_path_factory.mktemp(f"query-{request.param}")
    settings = Settings(data_dir=data_dir)
    with contextlib.ExitStack() as stack:
        catalog = None
        if request.param == "postgresql":
            catalog = open_catalog(stack.enter_context(_postgres_database()))
        archive = Archive(settings, catalog=catalog)
        stack.callback(archive.close)
        made = _fill(archive)
        yield archive.catalog, made


def _find(catalog: Catalog, level: str, filters: dict[str, Any], **kw: Any) -> list[dict[str, Any]]:
    return list(query.find(catalog, level, filters, **kw))


def _synthetic_studies(rows: list[dict[str, Any]], made: dict[str, Any]) -> set[str]:
    """Study keys (s1..s6) of the synthetic studies among results."""
    by_uid = {s["uid"]: k for k, s in made["studies"].items()}
    return {by_uid[r["StudyInstanceUID"]] for r in rows if r["StudyInstanceUID"] in by_uid}


# --- single value, universal, wildcard ----------------------------------------------------


def test_single_value_patient_id_returns_unique_keys_and_requested(filled) -> None:
    catalog, made = filled
    rows = _find(catalog, "STUDY", {"PatientID": "Q1", "StudyDate": ""})
    assert _synthetic_studies(rows, made) == {"s1", "s2"}
    assert all(set(r) == {"StudyInstanceUID", "PatientID", "StudyDate"} for r in rows)
    assert {r["StudyDate"] for r in rows} == {"20200101", "20200615"}
    # patient root model: the patient's unique key comes first
    rows = _find(
        catalog, "STUDY", {"StudyInstanceUID": made["studies"]["s1"]["uid"]}, model="PATIENT"
    )
    assert rows == [{"PatientID": "Q1", "StudyInstanceUID": made["studies"]["s1"]["uid"]}]


def test_universal_matching_returns_every_study(filled) -> None:
    catalog, _made = filled
    everything = _find(catalog, "STUDY", {"PatientName": ""})
    assert len(everything) == catalog.counts()["studies"]
    assert _find(catalog, "STUDY", {"PatientName": "*"}) == everything
    assert _find(catalog, "STUDY", {"PatientName": None}) == everything
    assert query.count(catalog, "STUDY", {}) == len(everything)


def test_wildcards_are_case_sensitive_and_escape_sql_wildcards(filled) -> None:
    catalog, _made = filled
    names = lambda rows: {r["PatientName"] for r in rows}  # noqa: E731
    assert names(_find(catalog, "PATIENT", {"PatientName": "SMI*"})) == {"SMITH^JOHN"}
    assert names(_find(catalog, "PATIENT", {"PatientName": "SM?TH^*"})) == {"SMITH^JOHN"}
    assert names(_find(catalog, "PATIENT", {"PatientName": "SM*"})) == {"SMITH^JOHN", "SMYTHE^ANN"}
    assert names(_find(catalog, "PATIENT", {"PatientName": "smith^jane"})) == {"smith^jane"}
    assert _find(catalog, "PATIENT", {"PatientName": "SMITH"}) == []  # single value is exact
    # SQL's own wildcards are literals in DICOM values
    assert names(_find(catalog, "PATIENT", {"PatientName": "O_BRIEN*"})) == {"O_BRIEN^PAT"}
    assert _find(catalog, "PATIENT", {"PatientName": "O%"}) == []
    assert _find(catalog, "PATIENT", {"PatientID": "Q%5"})[0]["PatientID"] == "Q%5"
    assert {r["PatientID"] for r in _find(catalog, "PATIENT", {"PatientID": "Q%*"})} == {"Q%5"}
    accession = _find(catalog, "STUDY", {"AccessionNumber": "ACC_*"})
    assert {r["AccessionNumber"] for r in accession} == {"ACC_5"}  # '_' is not a wildcard
    accession = _find(catalog, "STUDY", {"AccessionNumber": "A?C_5"})
    assert {r["AccessionNumber"] for r in accession} == {"ACC_5", "AXC_5"}


def test_fuzzy_names_match_case_insensitively(filled) -> None:
    catalog, _made = filled
    rows = _find(catalog, "PATIENT", {"PatientName": "smi*"}, fuzzy_names=True)
    assert {r["PatientName"] for r in rows} == {"SMITH^JOHN", "smith^jane"}
    rows = _find(catalog, "PATIENT", {"PatientName": "müller*"}, fuzzy_names=True)
    assert [r["PatientName"] for r in rows] == ["Müller^Jürgen"]
    rows = _find(catalog, "STUDY", {"ReferringPhysicianName": "house*"}, fuzzy_names=True)
    assert len(rows) == len(STUDIES)
    assert _find(catalog, "STUDY", {"ReferringPhysicianName": "house*"}) == []


# --- ranges ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("20200101", {"s1"}),
        ("20200101-20200615", {"s1", "s2", "s5"}),
        ("20200301-", {"s2", "s3", "s5"}),
        ("-20191231", {"s4"}),
        ("20200102-20200228", set()),
    ],
)
def test_date_matching(filled, value: str, expected: set[str]) -> None:
    catalog, made = filled
    assert _synthetic_studies(_find(catalog, "STUDY", {"StudyDate": value}), made) == expected


def test_time_ranges_include_finer_precision(filled) -> None:
    catalog, made = filled
    pick = {"StudyDate": "20190101-20211231"}
    assert _synthetic_studies(
        _find(catalog, "STUDY", {**pick, "StudyTime": "1000-1100"}), made
    ) == {"s1"}
    assert _synthetic_studies(_find(catalog, "STUDY", {**pick, "StudyTime": "2359-"}), made) == {
        "s3"
    }
    assert _synthetic_studies(_find(catalog, "STUDY", {**pick, "StudyTime": "-0930"}), made) == {
        "s2",
        "s5",
    }
    assert _synthetic_studies(_find(catalog, "STUDY", {**pick, "StudyTime": "08"}), made) == {"s2"}


@pytest.mark.parametrize(
    "bad",
    [
        {"StudyDate": "2020"},
        {"StudyDate": "20200101-2021"},
        {"StudyDate": "-"},
        {"StudyDate": "2020-01-01"},
        {"StudyTime": "25:00:00x"},
        {"StudyInstanceUID": "1.2.*"},
        {"SeriesNumber": "one"},
        {"NoSuchKeyword": "x"},
    ],
)
def test_malformed_values_raise_query_error(filled, bad: dict[str, str]) -> None:
    catalog, _made = filled
    with pytest.raises(QueryError):
        _find(catalog, "SERIES", bad)


@pytest.mark.parametrize(
    ("level", "bad", "offset"),
    [
        ("SERIES", {"SeriesNumber": "9" * 19}, 0),  # beyond 64 bits: was an OverflowError
        ("SERIES", {"SeriesNumber": "-" + "9" * 30}, 0),
        ("SERIES", {"SeriesNumber": "1" * 5000}, 0),  # int() refuses it: was a ValueError
        ("STUDY", {"NumberOfStudyRelatedInstances": "1" * 25}, 0),
        ("SERIES", {}, 1 << 63),  # an offset beyond 64 bits: was an OverflowError
        ("PATIENT", {"PatientName": "SMITH\udcff"}, 0),  # was a UnicodeEncodeError
    ],
)
def test_values_the_engines_cannot_bind_raise_query_error(
    filled, level: str, bad: dict[str, str], offset: int
) -> None:
    """Findings of the QIDO fuzz target (benchmarks/soak/fuzz_targets.py qido)."""
    catalog, _made = filled
    with pytest.raises(QueryError):
        _find(catalog, level, bad, offset=offset)


def test_nul_characters_in_values_are_dropped_as_ingest_drops_them(filled) -> None:
    """PostgreSQL refused a NUL in a text parameter (CatalogError: HTTP 503 for a
    client's bad value); ingest drops NULs from what it catalogues, so the query does."""
    catalog, _made = filled
    plain = _find(catalog, "PATIENT", {"PatientName": "SMITH^JOHN"})
    assert plain
    assert _find(catalog, "PATIENT", {"PatientName": "SMITH^\x00JOHN\x00"}) == plain
    assert _find(catalog, "PATIENT", {"PatientName": "SM*\x00", "PatientID": "Q1\x00"}) == plain
    assert _find(catalog, "SERIES", {"SeriesNumber": "1\x00", "Modality": "\x00"})
    assert _find(catalog, "SERIES", {"SeriesNumber": "0" * 40 + "1"})  # leading zeros


def test_levels_and_keys_outside_the_level_raise_query_error(filled) -> None:
    catalog, _made = filled
    with pytest.raises(QueryError):
        _find(catalog, "FRAME", {})
    with pytest.raises(QueryError):
        _find(catalog, "STUDY", {"Modality": "CT"})  # a series attribute
    with pytest.raises(QueryError):
        _find(catalog, "STUDY", {}, model="WORKLIST")
    with pytest.raises(QueryError):
        _find(catalog, "STUDY", {}, return_keys=["SOPInstanceUID"])
    assert "Modality" in query.supported_keywords("SERIES")
    assert "Modality" not in query.supported_keywords("STUDY")
    assert "PatientName" in query.supported_keywords("IMAGE")


# --- lists, modalities, derived attributes ---------------------------------------------------


def test_uid_lists_as_backslash_text_and_as_python_list(filled) -> None:
    catalog, made = filled
    uids = [made["studies"]["s2"]["uid"], made["studies"]["s4"]["uid"]]
    for value in ("\\".join(uids), uids):
        rows = _find(catalog, "STUDY", {"StudyInstanceUID": value})
        assert _synthetic_studies(rows, made) == {"s2", "s4"}
        assert len(rows) == 2


def test_modalities_in_study_matches_one_element(filled) -> None:
    catalog, made = filled
    rows = _find(catalog, "STUDY", {"ModalitiesInStudy": "MR", "PatientID": "Q*"})
    assert _synthetic_studies(rows, made) == {"s1", "s2", "s6"}
    assert {r["ModalitiesInStudy"] for r in rows if r["PatientID"] == "Q1"} == {"CT\\MR", "MR"}
    rows = _find(catalog, "STUDY", {"ModalitiesInStudy": "SR\\CT", "PatientID": "Q*"})
    assert _synthetic_studies(rows, made) == {"s1", "s3", "s4", "s5"}
    assert _find(catalog, "STUDY", {"ModalitiesInStudy": "C", "PatientID": "Q*"}) == []


def test_derived_counts_agree_with_the_instances(filled) -> None:
    catalog, made = filled
    keys = [
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
        "SOPClassesInStudy",
        "NumberOfPatientRelatedStudies",
        "NumberOfPatientRelatedSeries",
        "NumberOfPatientRelatedInstances",
    ]
    (s1,) = _find(
        catalog, "STUDY", {"StudyInstanceUID": made["studies"]["s1"]["uid"]}, return_keys=keys
    )
    assert s1["NumberOfStudyRelatedSeries"] == 2
    assert s1["NumberOfStudyRelatedInstances"] == 5
    assert s1["SOPClassesInStudy"] == "\\".join(sorted([CT, MR]))
    assert s1["NumberOfPatientRelatedStudies"] == 2
    assert s1["NumberOfPatientRelatedSeries"] == 3
    assert s1["NumberOfPatientRelatedInstances"] == 6
    for row in _find(catalog, "SERIES", {}, return_keys=["NumberOfSeriesRelatedInstances"]):
        images = _find(
            catalog,
            "IMAGE",
            {
                "StudyInstanceUID": row["StudyInstanceUID"],
                "SeriesInstanceUID": row["SeriesInstanceUID"],
            },
        )
        assert row["NumberOfSeriesRelatedInstances"] == len(images)


def test_series_and_image_levels(filled) -> None:
    catalog, made = filled
    study = made["studies"]["s1"]["uid"]
    series = _find(
        catalog, "SERIES", {"StudyInstanceUID": study, "Modality": "", "SeriesNumber": ""}
    )
    assert sorted((r["SeriesNumber"], r["Modality"]) for r in series) == [(1, "CT"), (2, "MR")]
    assert (
        _find(catalog, "SERIES", {"StudyInstanceUID": study, "SeriesNumber": "2", "Modality": ""})[
            0
        ]["Modality"]
        == "MR"
    )
    ct = made["series"]["s1.1"]["uid"]
    images = _find(
        catalog,
        "IMAGE",
        {
            "StudyInstanceUID": study,
            "SeriesInstanceUID": ct,
            "InstanceNumber": "",
            "SOPClassUID": "",
        },
        model="PATIENT",
    )
    assert {r["SOPInstanceUID"] for r in images} == set(made["instances"]["s1.1"])
    assert all(r["PatientID"] == "Q1" and r["SOPClassUID"] == CT for r in images)
    assert sorted(r["InstanceNumber"] for r in images) == [1, 2, 3]
    # attributes of higher levels match at lower levels (relational use, e.g. QIDO-RS)
    images = _find(catalog, "IMAGE", {"PatientName": "SMITH^JOHN", "Modality": "MR"})
    assert len(images) == 3


def test_every_real_sample_is_found_at_each_level(filled) -> None:
    catalog, made = filled
    assert made["real"] >= 50
    counts = catalog.counts()
    for level, table in (
        ("PATIENT", "patients"),
        ("STUDY", "studies"),
        ("SERIES", "series"),
        ("IMAGE", "instances"),
    ):
        assert len(_find(catalog, level, {})) == counts[table], level
    for record in catalog.iter_instances():
        rows = _find(catalog, "IMAGE", {"SOPInstanceUID": record.sop_uid}, return_keys=["Rows"])
        assert rows == [
            {
                "StudyInstanceUID": record.study_uid,
                "SeriesInstanceUID": record.series_uid,
                "SOPInstanceUID": record.sop_uid,
                "Rows": "" if record.rows_ is None else record.rows_,
            }
        ]


def test_limit_and_offset_page_through_stable_order(filled) -> None:
    catalog, _made = filled
    everything = _find(catalog, "SERIES", {}, limit=10_000)
    pages = []
    for offset in range(0, len(everything), 7):
        pages += _find(catalog, "SERIES", {}, limit=7, offset=offset)
    assert pages == everything
    assert _find(catalog, "SERIES", {}, limit=0) == []
    with pytest.raises(QueryError):
        _find(catalog, "SERIES", {}, offset=-1)


def test_instances_for_retrieve(filled) -> None:
    catalog, made = filled
    study = made["studies"]["s1"]["uid"]
    records = query.instances(catalog, "STUDY", {"StudyInstanceUID": study})
    assert len(records) == 5
    series = made["series"]["s1.2"]["uid"]
    records = query.instances(
        catalog, "SERIES", {"StudyInstanceUID": study, "SeriesInstanceUID": series}
    )
    assert [r.sop_uid for r in records] == made["instances"]["s1.2"]
    records = query.instances(catalog, "PATIENT", {"PatientID": "Q1"})
    assert len(records) == 6


def test_sqlite_plans_use_indexes(filled) -> None:
    catalog, _made = filled
    if catalog.dialect != "sqlite":
        pytest.skip("EXPLAIN QUERY PLAN is SQLite's")
    cases = {
        ("STUDY", "PatientID"): {"PatientID": "Q1"},
        ("STUDY", "PatientName"): {"PatientName": "SMI*"},
        ("STUDY", "StudyDate"): {"StudyDate": "20200101-20200131"},
        ("SERIES", "StudyInstanceUID"): {"StudyInstanceUID": "1.2.3"},
        ("IMAGE", "SeriesInstanceUID"): {"StudyInstanceUID": "1.2.3", "SeriesInstanceUID": "1.2"},
    }
    for (level, _key), filters in cases.items():
        plan = query.explain(catalog, level, filters)
        assert not any(line.startswith("SCAN") for line in plan), (level, filters, plan)
        assert any("INDEX" in line for line in plan), (level, filters, plan)


def test_values_are_bound_not_interpolated(filled) -> None:
    catalog, _made = filled
    hostile = "x' OR '1'='1"
    assert _find(catalog, "PATIENT", {"PatientID": hostile}) == []
    assert _find(catalog, "PATIENT", {"PatientName": hostile + "*"}) == []
    assert pydicom.__version__  # pydicom made every instance above
