"""Rendered study and series resources (PS3.18 10.4.1.1.3): multipart/related, one rendered
image per instance with pixel data (its first frame, as the instance's own /rendered),
each part naming that instance's rendered URL; checked with httpx and dicomweb-client."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, generate_uid

from kho.archive.archive import Archive
from kho.archive.config import Settings
from kho.bench.phantom import ct_series_datasets
from kho.viewer_api.server import HttpServer
from tests.helpers.part10 import part10_bytes
from tests.viewer_api.conftest import serve

JPEG = "image/jpeg"
PNG = "image/png"
#: the phantom CT's patient (seed 3): every instance of the study must name the same one
PATIENT = {
    "PatientName": "PHANTOM^CT",
    "PatientID": "PH000003",
    "PatientBirthDate": "19600101",
    "PatientSex": "O",
}


@dataclass
class Study:
    server: HttpServer
    base: str
    client: DICOMwebClient
    study: str
    ct_series: str  # three CT slices
    mixed_series: str  # two CT slices and an instance no decoder reads
    plan_series: str  # an RT Plan only: nothing to render
    #: SOP Instance UIDs of the rendered images, in series then instance number order
    ct_sops: list[str]
    mixed_sops: list[str]
    undecodable_sop: str

    def url(self, path: str) -> str:
        return self.base + path

    def instance_rendered(self, series: str, sop: str) -> str:
        return self.url(f"/studies/{self.study}/series/{series}/instances/{sop}/rendered")


def rehomed(data: bytes, study: str, series: str, number: int) -> bytes:
    """The instance moved into ``study`` / ``series`` with a new SOP Instance UID."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(BytesIO(data), force=True)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.update(PATIENT)
    ds.InstanceNumber = number
    return part10_bytes(ds)


def undecodable_jpeg(study: str, series: str, number: int) -> bytes:
    """A JPEG baseline instance whose one fragment is no JPEG stream."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = study, series, number
    ds.Modality = "OT"
    ds.update(PATIENT)
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([b"\xff\xd8 not a JPEG stream \xff\xd9"])
    ds["PixelData"].VR = "OB"
    return part10_bytes(ds, implicit_vr=False, little_endian=True)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Study]:
    data_dir = tmp_path_factory.mktemp("rendered") / "data"
    archive = Archive(Settings(data_dir=data_dir, fsync=False, dicom_port=0, http_port=0))
    ct = ct_series_datasets(3, rows=160, cols=200, seed=3)
    ct_results = [archive.ingest_part10(data) for data in ct]
    study_uid, ct_series = ct_results[0].study_uid, ct_results[0].series_uid
    mixed_series, plan_series = generate_uid(), generate_uid()
    # instance numbers out of arrival order: the parts come in instance number order
    mixed = [
        rehomed(data, study_uid, mixed_series, n) for data, n in zip(ct[:2], (3, 1), strict=True)
    ]
    broken = undecodable_jpeg(study_uid, mixed_series, 2)
    mixed_results = [archive.ingest_part10(data) for data in [*mixed, broken]]
    plan = Path(get_testdata_file("rtplan.dcm")).read_bytes()
    archive.ingest_part10(rehomed(plan, study_uid, plan_series, 1), lenient_identity=True)
    server, base, client = serve(archive)
    try:
        yield Study(
            server=server,
            base=base,
            client=client,
            study=study_uid,
            ct_series=ct_series,
            mixed_series=mixed_series,
            plan_series=plan_series,
            ct_sops=[r.sop_uid for r in ct_results],
            mixed_sops=[mixed_results[1].sop_uid, mixed_results[0].sop_uid],  # 1 then 3
            undecodable_sop=mixed_results[2].sop_uid,
        )
    finally:
        server.stop()
        archive.close()


def parts_of(body: bytes, boundary: str) -> list[tuple[dict[str, str], bytes]]:
    """(headers, payload) of each part of a multipart/related body (RFC 2046 5.1.1)."""
    delimiter = b"\r\n--" + boundary.encode()
    assert body.startswith(delimiter[2:])
    sections = (b"\r\n" + body).split(delimiter)
    assert sections[0] == b"" and sections[-1].startswith(b"--")
    parts = []
    for section in sections[1:-1]:
        head, _, payload = section.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        parts.append((headers, payload))
    return parts


def boundary_of(content_type: str, inner: str) -> str:
    media, *params = [p.strip() for p in content_type.split(";")]
    assert media == "multipart/related"
    values = dict(p.split("=", 1) for p in params)
    assert values["type"].strip('"') == inner
    return values["boundary"].strip('"')


def rendered_parts(
    response: httpx.Response, inner: str = JPEG
) -> list[tuple[dict[str, str], bytes]]:
    assert response.status_code == 200, response.text
    parts = parts_of(response.content, boundary_of(response.headers["content-type"], inner))
    assert all(headers["content-type"] == inner for headers, _ in parts)
    return parts


def test_rendered_series_holds_each_instances_rendered_image(study: Study) -> None:
    with httpx.Client() as http:
        response = http.get(
            study.url(f"/studies/{study.study}/series/{study.ct_series}/rendered"),
            headers={"Accept": f'multipart/related; type="{JPEG}"'},
        )
        parts = rendered_parts(response)
        expected = [study.instance_rendered(study.ct_series, sop) for sop in study.ct_sops]
        assert [headers["content-location"] for headers, _ in parts] == expected
        for (_headers, image), url in zip(parts, expected, strict=True):
            alone = http.get(url, headers={"Accept": JPEG})
            assert alone.status_code == 200 and image == alone.content
            assert image.startswith(b"\xff\xd8") and image.endswith(b"\xff\xd9")


def test_rendered_study_covers_every_series_and_leaves_out_what_cannot_render(
    study: Study,
) -> None:
    """The RT Plan has no pixel data and the broken JPEG cannot be decoded: both are left
    out, every image of the study is there, in series then instance number order."""
    with httpx.Client() as http:
        parts = rendered_parts(http.get(study.url(f"/studies/{study.study}/rendered")))
        locations = [headers["content-location"] for headers, _ in parts]
        expected = {
            *(study.instance_rendered(study.ct_series, sop) for sop in study.ct_sops),
            *(study.instance_rendered(study.mixed_series, sop) for sop in study.mixed_sops),
        }
        assert len(locations) == 5 and set(locations) == expected
        series_order = [url.split("/series/")[1].split("/")[0] for url in locations]
        assert series_order == sorted(series_order)
        mixed = [url for url in locations if f"/series/{study.mixed_series}/" in url]
        assert mixed == [study.instance_rendered(study.mixed_series, s) for s in study.mixed_sops]
        assert not any(study.undecodable_sop in url for url in locations)
        broken = http.get(study.instance_rendered(study.mixed_series, study.undecodable_sop))
        assert broken.status_code == 406  # on its own, the instance says why


def test_rendering_parameters_apply_to_every_part(study: Study) -> None:
    params = {"window": "40,80", "viewport": "32,32", "quality": "50", "accept": PNG}
    path = f"/studies/{study.study}/series/{study.ct_series}/rendered"
    with httpx.Client() as http:
        parts = rendered_parts(http.get(study.url(path), params=params), PNG)
        assert len(parts) == 3
        for headers, image in parts:
            alone = http.get(headers["content-location"], params=params)
            assert alone.headers["content-type"] == PNG
            assert image == alone.content and image.startswith(b"\x89PNG")
            width, height = int.from_bytes(image[16:20]), int.from_bytes(image[20:24])
            assert (width, height) == (32, 26)  # 200x160 within a 32x32 viewport
        plain = rendered_parts(http.get(study.url(path)))
        assert [p[1] for p in plain] != [p[1] for p in parts]
        # a small JPEG view (which the instance may make from its stored levels)
        small = rendered_parts(http.get(study.url(path), params={"viewport": "64,64"}))
        for headers, image in small:
            alone = http.get(headers["content-location"], params={"viewport": "64,64"})
            assert alone.headers["content-type"] == JPEG and image == alone.content


def test_rendered_resource_statuses(study: Study) -> None:
    series = f"/studies/{study.study}/series/{study.ct_series}/rendered"
    with httpx.Client() as http:
        unknown_study = http.get(study.url(f"/studies/{generate_uid()}/rendered"))
        assert unknown_study.status_code == 404
        unknown_series = http.get(study.url(f"/studies/{study.study}/series/1.2.3/rendered"))
        assert unknown_series.status_code == 404
        nothing_to_render = http.get(
            study.url(f"/studies/{study.study}/series/{study.plan_series}/rendered")
        )
        assert nothing_to_render.status_code == 406
        assert (
            http.get(study.url(series), headers={"Accept": "application/dicom"}).status_code == 406
        )
        assert http.get(study.url(series), params={"window": "40"}).status_code == 400
        assert http.get(study.url(series), params={"quality": "0"}).status_code == 400
        assert http.get(study.url("/studies/*/rendered")).status_code == 400
        head = http.head(study.url(series))
        assert head.status_code == 200 and head.content == b""


def test_rendered_series_with_dicomweb_client(study: Study) -> None:
    """dicomweb-client asks with ``Accept: image/jpeg`` and hands back the body as is; a
    series of several images can only be multipart (PS3.18 8.6: single part is for one)."""
    body = study.client.retrieve_series_rendered(study.study, study.ct_series, media_types=(JPEG,))
    boundary = body.split(b"\r\n", 1)[0].removeprefix(b"--").decode()
    images = [image for _headers, image in parts_of(body, boundary)]
    singles = [
        study.client.retrieve_instance_rendered(
            study.study, study.ct_series, sop, media_types=(JPEG,)
        )
        for sop in study.ct_sops
    ]
    assert images == singles
    # dicomweb-client 0.61 has no retrieve_study_rendered: its HTTP session asks instead
    response = study.client._http_get(
        study.url(f"/studies/{study.study}/rendered"), headers={"Accept": JPEG}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("multipart/related")
    assert response.content.count(b"Content-Type: image/jpeg") == 5
