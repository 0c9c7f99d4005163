"""Identity rules of the catalog (issue 12): a study belongs to one patient, a series to one
study, an instance to one series.  An instance that contradicts the catalog is refused and
leaves nothing behind; a corrected resend moves rows that hold nothing else; rows left empty
disappear; counts follow.  Checked on both catalog engines, then by a property-based test
that sends random instances with colliding UIDs and compares every view with one model."""

from __future__ import annotations

import hashlib
import io
import itertools
import secrets
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import pydicom
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset

from kho.archive.archive import Archive
from kho.archive.config import MissingUidPolicy, Settings
from kho.archive.ingest.pipeline import IngestOutcome
from kho.archive.query.engine import find
from kho.errors import DatasetMismatchError, IdentityConflictError
from kho.viewer_api.app import create_app
from tests.archive.test_ingest import part10_of
from tests.helpers.postgres import ENGINES, archive_on

ROOT = "1.2.826.0.1.3680043.10.1425.12"


def instance(
    sop: str,
    patient_id: str,
    study: str | None,
    series: str | None,
    *,
    name: str = "DOE^JANE",
    accession: str = "",
    pixel: int = 1,
) -> bytes:
    """A small CT instance with exactly these identities (None: the UID is left out)."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = sop
    if study is not None:
        ds.StudyInstanceUID = study
    if series is not None:
        ds.SeriesInstanceUID = series
    ds.PatientID = patient_id
    ds.PatientName = name
    ds.AccessionNumber = accession
    ds.Modality = "CT"
    ds.SeriesNumber = 1
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = struct.pack("<4H", *([pixel] * 4))
    return part10_of(ds)


@pytest.fixture(params=ENGINES)
def archive(request: pytest.FixtureRequest, settings: Settings) -> Iterator[Archive]:
    with archive_on(request.param, settings) as archive:
        archive.derivers = []  # identity, not thumbnails
        yield archive


def one(archive: Archive, level: str, **filters: str) -> list[dict]:
    keys = {
        "PATIENT": ["NumberOfPatientRelatedStudies", "NumberOfPatientRelatedInstances"],
        "STUDY": [
            "PatientID",
            "AccessionNumber",
            "NumberOfStudyRelatedSeries",
            "NumberOfStudyRelatedInstances",
        ],
        "SERIES": ["StudyInstanceUID", "NumberOfSeriesRelatedInstances"],
        "IMAGE": ["StudyInstanceUID", "SeriesInstanceUID"],
    }[level]
    model = "PATIENT" if level == "PATIENT" else "STUDY"
    return list(find(archive.catalog, level, dict(filters), return_keys=keys, model=model))


def test_a_study_under_a_second_patient_is_refused(archive: Archive) -> None:
    study = f"{ROOT}.1"
    archive.ingest_part10(
        instance(
            f"{ROOT}.1.1.1", "SPLIT-A", study, f"{ROOT}.1.1", name="Alpha^Anna", accession="SPA"
        )
    )
    before = archive.catalog.counts()
    with pytest.raises(IdentityConflictError, match="SPLIT-A") as refused:
        archive.ingest_part10(
            instance(
                f"{ROOT}.1.2.1", "SPLIT-B", study, f"{ROOT}.1.2", name="Beta^Bob", accession="SPB"
            )
        )
    assert "SPLIT-B" in str(refused.value)
    assert archive.catalog.counts() == before  # nothing of it stored
    assert archive.catalog.get_instance(f"{ROOT}.1.2.1") is None
    [row] = one(archive, "STUDY", StudyInstanceUID=study)
    assert row["PatientID"] == "SPLIT-A"
    assert row["AccessionNumber"] == "SPA"
    assert row["NumberOfStudyRelatedInstances"] == 1
    assert one(archive, "PATIENT", PatientID="SPLIT-B") == []
    assert one(archive, "STUDY", PatientID="SPLIT-B") == []
    [patient] = one(archive, "PATIENT", PatientID="SPLIT-A")
    assert patient["NumberOfPatientRelatedStudies"] == 1
    assert patient["NumberOfPatientRelatedInstances"] == 1


def test_a_series_in_a_second_study_is_refused(archive: Archive) -> None:
    series = f"{ROOT}.2.9"
    archive.ingest_part10(instance(f"{ROOT}.2.1", "P2", f"{ROOT}.2", series))
    with pytest.raises(IdentityConflictError, match="belongs to study"):
        archive.ingest_part10(instance(f"{ROOT}.2.2", "P2", f"{ROOT}.3", series))
    assert one(archive, "STUDY", StudyInstanceUID=f"{ROOT}.3") == []
    [row] = one(archive, "SERIES", SeriesInstanceUID=series)
    assert row["StudyInstanceUID"] == f"{ROOT}.2"
    assert row["NumberOfSeriesRelatedInstances"] == 1
    counts = archive.catalog.counts()
    assert counts["series"] >= counts["studies"]


def test_later_instances_of_a_series_are_checked_too(archive: Archive) -> None:
    """The one-statement path of PostgreSQL (a new instance of a series the catalog holds
    unchanged) must not take an instance whose patient row exists and matches but whose
    study belongs to someone else."""
    study, series = f"{ROOT}.4", f"{ROOT}.4.1"
    archive.ingest_part10(instance(f"{ROOT}.4.0.1", "OTHER", f"{ROOT}.5", f"{ROOT}.5.1"))
    archive.ingest_part10(instance(f"{ROOT}.4.1.1", "OWNER", study, series))
    archive.ingest_part10(instance(f"{ROOT}.4.1.2", "OWNER", study, series))
    with pytest.raises(IdentityConflictError):
        archive.ingest_part10(instance(f"{ROOT}.4.1.3", "OTHER", study, series))
    [row] = one(archive, "STUDY", StudyInstanceUID=study)
    assert (row["PatientID"], row["NumberOfStudyRelatedInstances"]) == ("OWNER", 2)


def test_a_corrected_resend_moves_the_study_to_the_right_patient(archive: Archive) -> None:
    study, series, sop = f"{ROOT}.6", f"{ROOT}.6.1", f"{ROOT}.6.1.1"
    archive.ingest_part10(instance(sop, "WRONG01", study, series, pixel=1))
    result = archive.ingest_part10(instance(sop, "RIGHT01", study, series, pixel=1))
    assert result.outcome is IngestOutcome.REPLACED
    [row] = one(archive, "STUDY", StudyInstanceUID=study)
    assert row["PatientID"] == "RIGHT01"
    assert one(archive, "PATIENT", PatientID="WRONG01") == []  # no study left: gone
    assert one(archive, "STUDY", PatientID="WRONG01") == []
    [patient] = one(archive, "PATIENT", PatientID="RIGHT01")
    assert patient["NumberOfPatientRelatedStudies"] == 1
    assert patient["NumberOfPatientRelatedInstances"] == 1
    stored = pydicom.dcmread(io.BytesIO(archive.read_part10(archive.catalog.require_instance(sop))))
    assert stored.PatientID == "RIGHT01"


def test_a_corrected_resend_into_a_study_holding_others_is_refused(archive: Archive) -> None:
    study, series = f"{ROOT}.7", f"{ROOT}.7.1"
    archive.ingest_part10(instance(f"{ROOT}.7.1.1", "WRONG02", study, series))
    archive.ingest_part10(instance(f"{ROOT}.7.1.2", "WRONG02", study, series))
    with pytest.raises(IdentityConflictError, match="WRONG02"):
        archive.ingest_part10(instance(f"{ROOT}.7.1.1", "RIGHT02", study, series, pixel=9))
    record = archive.catalog.require_instance(f"{ROOT}.7.1.1")
    assert pydicom.dcmread(io.BytesIO(archive.read_part10(record))).PatientID == ("WRONG02")
    assert one(archive, "PATIENT", PatientID="RIGHT02") == []
    [row] = one(archive, "STUDY", StudyInstanceUID=study)
    assert (row["PatientID"], row["NumberOfStudyRelatedInstances"]) == ("WRONG02", 2)


def test_a_resend_under_another_study_leaves_no_empty_rows(archive: Archive) -> None:
    sop = f"{ROOT}.8.1.1"
    archive.ingest_part10(instance(sop, "P8", f"{ROOT}.8", f"{ROOT}.8.1"))
    archive.ingest_part10(instance(sop, "P8", f"{ROOT}.9", f"{ROOT}.9.1"))
    assert one(archive, "STUDY", StudyInstanceUID=f"{ROOT}.8") == []
    assert one(archive, "SERIES", SeriesInstanceUID=f"{ROOT}.8.1") == []
    [row] = one(archive, "STUDY", StudyInstanceUID=f"{ROOT}.9")
    assert (row["NumberOfStudyRelatedSeries"], row["NumberOfStudyRelatedInstances"]) == (1, 1)
    [patient] = one(archive, "PATIENT", PatientID="P8")
    assert patient["NumberOfPatientRelatedStudies"] == 1
    assert archive.catalog.counts() == {"patients": 1, "studies": 1, "series": 1, "instances": 1}


def test_invented_uids_are_reported_or_refused(archive: Archive) -> None:
    study = f"{ROOT}.10"
    first = archive.ingest_part10(instance(f"{ROOT}.10.1", "P10", study, None))
    second = archive.ingest_part10(instance(f"{ROOT}.10.2", "P10", study, None))
    assert [k for k, _ in first.coerced] == ["SeriesInstanceUID"]
    assert first.series_uid == dict(first.coerced)["SeriesInstanceUID"]
    assert first.series_uid.startswith("2.25.")
    assert second.series_uid == first.series_uid  # one invented series for the study
    no_study = archive.ingest_part10(instance(f"{ROOT}.10.3", "P10", None, f"{ROOT}.10.9"))
    assert dict(no_study.coerced) == {"StudyInstanceUID": no_study.study_uid}
    complete = archive.ingest_part10(instance(f"{ROOT}.10.4", "P10", study, f"{ROOT}.10.8"))
    assert complete.coerced == ()
    archive.settings.missing_uids = MissingUidPolicy.REJECT
    with pytest.raises(DatasetMismatchError, match="missing Series Instance UID"):
        archive.ingest_part10(instance(f"{ROOT}.10.5", "P10", study, None))
    assert archive.catalog.get_instance(f"{ROOT}.10.5") is None


# --- the property: every view agrees with one model ------------------------------------


@dataclass(frozen=True)
class Sent:
    patient: str
    study: str
    series: str
    sha: str


def expected_outcome(model: dict[str, Sent], sop: str, new: Sent) -> str:
    """What the identity rules say of ``new`` given what is stored (``model``)."""
    if sop in model and model[sop].sha == new.sha:
        return "duplicate"
    others = {s: v for s, v in model.items() if s != sop}
    for other in others.values():
        if other.study == new.study and other.patient != new.patient:
            return "conflict"
        if other.series == new.series and other.study != new.study:
            return "conflict"
    return "replaced" if sop in model else "stored"


def check_views(
    archive: Archive, model: dict[str, Sent], namespace: str, web: TestClient | None = None
) -> None:
    patients = {v.patient for v in model.values()}
    studies = {v.study for v in model.values()}
    series = {v.series for v in model.values()}
    for pid in (f"{namespace}-{n}" for n in range(3)):
        rows = one(archive, "PATIENT", PatientID=pid)
        mine = [v for v in model.values() if v.patient == pid]
        if pid not in patients:
            assert rows == [], f"patient {pid} has nothing, yet it is found"
            continue
        [row] = rows
        assert row["NumberOfPatientRelatedStudies"] == len({v.study for v in mine})
        assert row["NumberOfPatientRelatedInstances"] == len(mine)
        # what is reachable under the patient: exactly the instances that carry it
        found = {r["SOPInstanceUID"] for r in one(archive, "IMAGE", PatientID=pid)}
        assert found == {s for s, v in model.items() if v.patient == pid}
    for study in studies:
        [row] = one(archive, "STUDY", StudyInstanceUID=study)
        mine = [v for v in model.values() if v.study == study]
        assert row["PatientID"] == mine[0].patient
        assert row["NumberOfStudyRelatedInstances"] == len(mine)
        assert row["NumberOfStudyRelatedSeries"] == len({v.series for v in mine})
    for uid in series:
        [row] = one(archive, "SERIES", SeriesInstanceUID=uid)
        mine = [v for v in model.values() if v.series == uid]
        assert row["StudyInstanceUID"] == mine[0].study
        assert row["NumberOfSeriesRelatedInstances"] == len(mine)
    if web is not None:  # QIDO-RS and WADO-RS metadata over HTTP
        for pid in (f"{namespace}-{n}" for n in range(3)):
            answer = web.get("/dicom-web/studies", params={"PatientID": pid})
            found = {row["0020000D"]["Value"][0] for row in answer.json()} if answer.text else set()
            assert found == {v.study for v in model.values() if v.patient == pid}
        for study in studies:
            metadata = web.get(f"/dicom-web/studies/{study}/metadata").json()
            shown = {(m["00080018"]["Value"][0], m["00100020"]["Value"][0]) for m in metadata}
            assert shown == {(s, v.patient) for s, v in model.items() if v.study == study}
    for sop, sent in model.items():
        record = archive.catalog.require_instance(sop)
        data = archive.read_part10(record)
        assert hashlib.sha256(data).hexdigest() == sent.sha
        assert (record.study_uid, record.series_uid) == (sent.study, sent.series)
        assert pydicom.dcmread(io.BytesIO(data)).PatientID == sent.patient


SEND = st.tuples(
    st.integers(0, 4),  # SOP Instance UID
    st.integers(0, 2),  # Patient ID
    st.integers(0, 2),  # Study Instance UID
    st.integers(0, 3),  # Series Instance UID
    st.integers(0, 1),  # content (a resend with other pixels is a replacement)
)


@pytest.fixture(params=ENGINES)
def shared_archive(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Archive, TestClient]]:
    """One archive (and its DICOMweb app) for all examples (each example has UIDs of its own)."""
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("identity") / "data",
        fsync=False,
        dicom_port=0,
        http_port=0,
    )
    with archive_on(request.param, settings) as archive:
        archive.derivers = []
        with TestClient(create_app(archive)) as web:
            yield archive, web


@hypothesis_settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(sends=st.lists(SEND, min_size=1, max_size=8))
def test_random_colliding_instances_keep_every_view_consistent(
    shared_archive: tuple[Archive, TestClient], sends: list[tuple[int, int, int, int, int]]
) -> None:
    archive, web = shared_archive
    namespace = f"H{secrets.token_hex(4)}"
    base = f"{ROOT}.99.{int(namespace[1:], 16)}"
    model: dict[str, Sent] = {}
    for step, (sop_n, patient_n, study_n, series_n, pixel) in zip(
        itertools.count(), sends, strict=False
    ):
        sop = f"{base}.1.{sop_n}"
        sent = instance(
            sop,
            f"{namespace}-{patient_n}",
            f"{base}.2.{study_n}",
            f"{base}.3.{series_n}",
            pixel=pixel,
        )
        new = Sent(
            f"{namespace}-{patient_n}",
            f"{base}.2.{study_n}",
            f"{base}.3.{series_n}",
            hashlib.sha256(sent).hexdigest(),
        )
        expected = expected_outcome(model, sop, new)
        if expected == "conflict":
            with pytest.raises(IdentityConflictError):
                archive.ingest_part10(sent)
        else:
            result = archive.ingest_part10(sent)
            assert result.outcome.value == expected, f"step {step}"
            model[sop] = new
        check_views(archive, model, namespace, web)


def test_a_kept_instance_answers_with_the_stored_uids(archive: Archive) -> None:
    """duplicate_policy keep: the newcomer (here under another series, and without a Study
    UID) is dropped, so the answer names the stored instance's UIDs, nothing invented."""
    from kho.archive.config import DuplicatePolicy

    archive.settings.duplicate_policy = DuplicatePolicy.KEEP
    sop = f"{ROOT}.11.1"
    first = archive.ingest_part10(instance(sop, "P11", f"{ROOT}.11", f"{ROOT}.11.5"))
    kept = archive.ingest_part10(instance(sop, "P11", None, f"{ROOT}.11.6", pixel=3))
    assert kept.outcome is IngestOutcome.KEPT
    assert (kept.study_uid, kept.series_uid) == (first.study_uid, first.series_uid)
    assert kept.coerced == ()
