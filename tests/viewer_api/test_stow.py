"""STOW-RS: real files through archive ingest; PS3.18 responses; nothing kept from a bad part."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests
from requests import HTTPError

from kho.archive.archive import Archive
from kho.archive.config import Settings
from kho.viewer_api.multipart import join_parts
from tests.viewer_api.conftest import Served, sample_path, serve

CT = "693_UNCR.dcm"
MR = "MR2_J2KR.dcm"
DICOM_PARTS = 'multipart/related; type="application/dicom"; boundary=XyZ'


def body(*payloads: bytes) -> bytes:
    return join_parts("XyZ", [(p, "application/dicom") for p in payloads])


def post(
    served: Served, data: bytes, path: str = "/studies", content_type: str = DICOM_PARTS
) -> requests.Response:
    return requests.post(
        served.url(path),
        data=data,
        headers={"Content-Type": content_type, "Accept": "application/dicom+json"},
    )


def failed(response: requests.Response) -> list[dict]:
    return response.json().get("00081198", {}).get("Value", [])


def referenced(response: requests.Response) -> list[dict]:
    return response.json().get("00081199", {}).get("Value", [])


def object_files(archive: Archive) -> list[Path]:
    return [p for p in archive.settings.objects_dir.rglob("*") if p.is_file()]


def test_store_with_dicomweb_client_then_find_and_retrieve(fresh: Served) -> None:
    datasets = [pydicom.dcmread(sample_path(n)) for n in (CT, MR)]
    response = fresh.client.store_instances(datasets)
    refs = response.ReferencedSOPSequence
    assert {r.ReferencedSOPInstanceUID for r in refs} == {d.SOPInstanceUID for d in datasets}
    assert "FailedSOPSequence" not in response
    studies = fresh.client.search_for_studies()
    assert len(studies) == 2
    ct = datasets[0]
    back = fresh.client.retrieve_instance(
        ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.SOPInstanceUID
    )
    assert (back.pixel_array == ct.pixel_array).all()


def test_stored_bytes_are_the_posted_bytes(fresh: Served) -> None:
    data = sample_path(CT).read_bytes()
    r = post(fresh, body(data))
    assert r.status_code == 200, r.text
    (ref,) = referenced(r)
    sop = ref["00081155"]["Value"][0]
    assert ref["00081190"]["Value"][0].endswith(f"/instances/{sop}")
    record = fresh.archive.catalog.require_instance(sop)
    assert record.sha256 == hashlib.sha256(data).hexdigest()
    assert fresh.archive.read_part10(record) == data
    assert r.json()["00081190"]["Value"][0].endswith(f"/studies/{record.study_uid}")


def test_bad_part_fails_alone_and_leaves_nothing(fresh: Served) -> None:
    good = sample_path(CT).read_bytes()
    truncated = sample_path(MR).read_bytes()[:3000]
    r = post(fresh, body(good, b"not dicom at all" * 10, truncated))
    assert r.status_code == 202, r.text
    assert len(referenced(r)) == 1
    reasons = [f["00081197"]["Value"][0] for f in failed(r)]
    assert reasons == [0xC000, 0xC000]
    assert fresh.archive.catalog.counts()["instances"] == 1
    record = fresh.archive.catalog.require_instance(referenced(r)[0]["00081155"]["Value"][0])
    prefix_name = Path(record.object_prefix).name
    assert all(p.name.startswith(prefix_name) for p in object_files(fresh.archive))


def test_all_parts_failing_is_409(fresh: Served) -> None:
    r = post(fresh, body(b"garbage"))
    assert r.status_code == 409
    assert failed(r)[0]["00081197"]["Value"] == [0xC000]
    assert fresh.archive.catalog.counts()["instances"] == 0
    with pytest.raises(HTTPError):
        fresh.client.store_instances([pydicom.dcmread(sample_path(CT))], study_instance_uid="1.2.3")


def test_study_mismatch_is_refused_before_ingest(fresh: Served) -> None:
    r = post(fresh, body(sample_path(CT).read_bytes()), path="/studies/1.2.3.4")
    assert r.status_code == 409
    (failure,) = failed(r)
    assert failure["00081155"]["Value"] == [pydicom.dcmread(sample_path(CT)).SOPInstanceUID]
    assert fresh.archive.catalog.counts()["instances"] == 0
    assert object_files(fresh.archive) == []


@pytest.fixture
def rejecting(tmp_path: Path) -> Iterator[Served]:
    with Archive(Settings(data_dir=tmp_path / "reject", duplicate_policy="reject")) as archive:
        server, base, client = serve(archive)
        try:
            yield Served(archive, server, base, client, {})
        finally:
            server.stop()


def test_duplicate_with_other_bytes_is_409_under_reject(rejecting: Served) -> None:
    data = sample_path(CT).read_bytes()
    assert post(rejecting, body(data)).status_code == 200
    assert post(rejecting, body(data)).status_code == 200  # same bytes: success, nothing new
    changed = data[:-2] + bytes([data[-2] ^ 1, data[-1]])  # one pixel bit differs
    r = post(rejecting, body(changed))
    assert r.status_code == 409
    assert failed(r)[0]["00081197"]["Value"] == [0x0111]
    record = rejecting.archive.catalog.require_instance(
        pydicom.dcmread(sample_path(CT)).SOPInstanceUID
    )
    assert rejecting.archive.read_part10(record) == data


@pytest.mark.parametrize(
    "content_type",
    [
        "application/dicom",
        'multipart/related; type="application/dicom+xml"; boundary=XyZ',
        "text/plain",
    ],
)
def test_wrong_media_type_is_415(fresh: Served, content_type: str) -> None:
    r = post(fresh, body(sample_path(CT).read_bytes()), content_type=content_type)
    assert r.status_code == 415
    assert fresh.archive.catalog.counts()["instances"] == 0


def test_malformed_multipart_is_400(fresh: Served) -> None:
    data = sample_path(CT).read_bytes()
    unterminated = body(data)[:-8]
    assert post(fresh, unterminated).status_code == 400
    assert (
        post(
            fresh, body(data), content_type='multipart/related; type="application/dicom"'
        ).status_code
        == 400
    )
    assert post(fresh, b"--XyZ--\r\n").status_code == 400
    assert fresh.archive.catalog.counts()["instances"] == 0


def test_oversized_upload_is_413(fresh: Served) -> None:
    fresh.server.app.state.viewer.max_upload_bytes = 10_000
    r = post(fresh, body(sample_path(CT).read_bytes()))
    assert r.status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit applies while reading
        data = body(sample_path(CT).read_bytes())
        for i in range(0, len(data), 4096):
            yield data[i : i + 4096]

    streamed = requests.post(
        fresh.url("/studies"), data=chunks(), headers={"Content-Type": DICOM_PARTS}
    )
    assert streamed.status_code == 413
    assert fresh.archive.catalog.counts()["instances"] == 0
