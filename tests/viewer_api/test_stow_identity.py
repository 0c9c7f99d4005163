"""STOW-RS answers for the catalog's identity rules (issue 12, items 1, 4 and 6): an
instance that contradicts the catalog fails with 0xC410 and says why; an instance stored
under a UID the archive invented carries Warning 0xB000, the UID, and a Retrieve URL that
works.  Real ingest, real server, real files."""

from __future__ import annotations

import io
import warnings
import zlib
from collections.abc import Iterator

import httpx
import pydicom
import pytest
from requests import HTTPError

from kho.archive.config import Settings
from kho.viewer_api.multipart import join_parts
from tests.helpers.part10 import part10_bytes
from tests.helpers.postgres import ENGINES, archive_on
from tests.viewer_api.conftest import Served, sample_path, serve

CT = "693_UNCR.dcm"
DICOM_PARTS = 'multipart/related; type="application/dicom"; boundary=XyZ'
ROOT = "1.2.826.0.1.3680043.10.1425.99"
STUDY = f"{ROOT}.1"

IDENTITY_CONFLICT = 0xC410
COERCION = 0xB000


@pytest.fixture(params=ENGINES)
def fresh(request: pytest.FixtureRequest, settings: Settings) -> Iterator[Served]:
    """An empty archive on each catalog engine, with its own server."""
    with archive_on(request.param, settings) as archive:
        server, base, client = serve(archive)
        try:
            yield Served(archive, server, base, client, {})
        finally:
            server.stop()


def instance(
    patient_id: str,
    *,
    study: str | None = STUDY,
    series: str | None = f"{STUDY}.1",
    number: int = 1,
) -> bytes:
    """The CT sample as another instance: its own SOP Instance UID, the given identity
    (None: the attribute is left out, as a careless modality does)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(sample_path(CT))
    ds.PatientID = patient_id
    ds.PatientName = f"{patient_id}^Test"
    sop = f"{ROOT}.{zlib.crc32(repr((patient_id, study, series)).encode())}.{number}"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
    for keyword, value in (("StudyInstanceUID", study), ("SeriesInstanceUID", series)):
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return part10_bytes(ds)


def post(served: Served, *parts: bytes, path: str = "/studies") -> httpx.Response:
    return httpx.post(
        served.url(path),
        content=join_parts("XyZ", [(p, "application/dicom") for p in parts]),
        headers={"Content-Type": DICOM_PARTS, "Accept": "application/dicom+json"},
        timeout=60,
    )


def sequence(response: httpx.Response, tag: str) -> list[dict]:
    return response.json().get(tag, {}).get("Value", [])


def value(item: dict, tag: str) -> object:
    return item[tag]["Value"][0]


def sop_of(data: bytes) -> str:
    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


# --- identity conflicts -----------------------------------------------------------------


def test_study_of_another_patient_fails_with_the_conflict(fresh: Served) -> None:
    first = instance("SPLIT-A", series=f"{STUDY}.1")
    second = instance("SPLIT-B", series=f"{STUDY}.2")
    assert post(fresh, first).status_code == 200
    r = post(fresh, second)
    assert r.status_code == 409, r.text
    (failure,) = sequence(r, "00081198")
    assert value(failure, "00081197") == IDENTITY_CONFLICT
    assert value(failure, "00081155") == sop_of(second)
    comment = str(value(failure, "00000902"))
    # Error Comment is LO (64 characters): the patients first
    assert len(comment) <= 64 and "SPLIT-A" in comment and "SPLIT-B" in comment
    assert "00081199" not in r.json()
    # nothing of it is catalogued: SPLIT-B has no study, SPLIT-A's holds its one instance
    assert httpx.get(fresh.url("/studies"), params={"PatientID": "SPLIT-B"}).json() == []
    (study,) = httpx.get(fresh.url("/studies"), params={"PatientID": "SPLIT-A"}).json()
    assert value(study, "00201208") == 1  # NumberOfStudyRelatedInstances


def test_a_conflict_among_good_parts_is_202(fresh: Served) -> None:
    assert post(fresh, instance("SPLIT-A")).status_code == 200
    good = instance("SPLIT-A", number=2)
    bad = instance("SPLIT-B", series=f"{STUDY}.2")
    r = post(fresh, good, bad)
    assert r.status_code == 202, r.text
    assert [value(i, "00081155") for i in sequence(r, "00081199")] == [sop_of(good)]
    assert [value(i, "00081197") for i in sequence(r, "00081198")] == [IDENTITY_CONFLICT]


def test_series_of_another_study_fails(fresh: Served) -> None:
    series = f"{ROOT}.7.1"
    assert post(fresh, instance("P1", study=f"{ROOT}.7", series=series)).status_code == 200
    r = post(fresh, instance("P1", study=f"{ROOT}.8", series=series))
    assert r.status_code == 409, r.text
    (failure,) = sequence(r, "00081198")
    assert value(failure, "00081197") == IDENTITY_CONFLICT
    assert str(value(failure, "00000902")).startswith("series belongs to study")


def test_dicomweb_client_sees_the_conflict_as_an_error(fresh: Served) -> None:
    assert post(fresh, instance("SPLIT-A")).status_code == 200
    second = pydicom.dcmread(io.BytesIO(instance("SPLIT-B", series=f"{STUDY}.2")))
    with pytest.raises(HTTPError) as raised:
        fresh.client.store_instances([second])
    assert raised.value.response.status_code == 409


# --- coercion ---------------------------------------------------------------------------


def test_missing_series_uid_is_stored_with_a_coercion_warning(fresh: Served) -> None:
    data = instance("P2", study=f"{ROOT}.20", series=None)
    r = post(fresh, data)
    assert r.status_code == 202, r.text  # PS3.18 10.5.3: stored, with a warning
    (item,) = sequence(r, "00081199")
    assert value(item, "00081196") == COERCION
    invented = str(value(item, "0020000E"))
    assert invented.startswith("2.25.")
    assert "0020000D" not in item  # the study UID was the sender's own
    url = str(value(item, "00081190"))
    assert url == fresh.url(f"/studies/{ROOT}.20/series/{invented}/instances/{sop_of(data)}")
    assert httpx.get(url).status_code == 200
    (series,) = httpx.get(fresh.url(f"/studies/{ROOT}.20/series")).json()
    assert value(series, "0020000E") == invented


def test_missing_study_uid_is_reported_and_its_urls_work(fresh: Served) -> None:
    data = instance("P3", study=None, series=f"{ROOT}.30.1")
    r = post(fresh, data)
    assert r.status_code == 202, r.text
    (item,) = sequence(r, "00081199")
    assert value(item, "00081196") == COERCION
    invented = str(value(item, "0020000D"))
    assert invented.startswith("2.25.")
    assert value(r.json(), "00081190") == fresh.url(f"/studies/{invented}")
    for url in (str(value(r.json(), "00081190")), str(value(item, "00081190"))):
        assert httpx.get(url).status_code == 200, url


def test_dicomweb_client_reads_the_warning(fresh: Served) -> None:
    ds = pydicom.dcmread(io.BytesIO(instance("P4", study=f"{ROOT}.40", series=None)))
    response = fresh.client.store_instances([ds])
    (item,) = response.ReferencedSOPSequence
    assert item.WarningReason == COERCION
    assert item.SeriesInstanceUID.startswith("2.25.")
