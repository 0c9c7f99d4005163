"""The request shapes OHIF v3's DICOMweb data source and Cornerstone's WADO-RS image loader
send (extensions/default/src/DicomWebDataSource, dicom-image-loader), replayed as is."""

from __future__ import annotations

import numpy as np
import requests

from kho.viewer_api.media import parse_media_type
from kho.viewer_api.multipart import MultipartParser
from tests.viewer_api.conftest import Served

JSON = {"Accept": "application/dicom+json"}
# Cornerstone's loader: unquoted type, any transfer syntax
CORNERSTONE_FRAMES = {
    "Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"
}


def test_study_list_query(served: Served) -> None:
    s = served.samples["MR2_J2KR.dcm"]
    name = str(s.dataset().PatientName)
    r = requests.get(
        served.url(
            "/studies?limit=101&offset=0&fuzzymatching=false"
            f"&includefield=00081030%2C00080060&PatientName=*{name[2:6]}*"
        ),
        headers=JSON,
    )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/dicom+json")
    (study,) = [x for x in r.json() if x["0020000D"]["Value"][0] == s.study]
    for tag in ("00080020", "00080050", "00080061", "00100010", "00100020", "00201208", "00081030"):
        assert tag in study
    # OHIF's date range and modality filters of the study list
    date = s.dataset().StudyDate
    ranged = requests.get(
        served.url(f"/studies?limit=101&offset=0&StudyDate={date}-{date}&ModalitiesInStudy=MR"),
        headers=JSON,
    ).json()
    assert s.study in {x["0020000D"]["Value"][0] for x in ranged}


def test_series_query_and_series_metadata(served: Served) -> None:
    s = served.samples["emri_small_jpeg_ls_lossless.dcm"]
    series = requests.get(served.url(f"/studies/{s.study}/series"), headers=JSON).json()
    assert [x["0020000E"]["Value"][0] for x in series] == [s.series]
    assert series[0]["00080060"]["Value"] == ["MR"]
    metadata = requests.get(
        served.url(f"/studies/{s.study}/series/{s.series}/metadata"), headers=JSON
    ).json()
    (instance,) = metadata
    # what OHIF builds its display sets and image ids from
    for tag in (
        "00080016",
        "00080018",
        "0020000D",
        "0020000E",
        "00280010",
        "00280011",
        "00280100",
        "00280008",
    ):
        assert tag in instance
    assert instance["7FE00010"]["BulkDataURI"].endswith("/bulkdata/7FE00010")


def test_frames_with_any_transfer_syntax(served: Served) -> None:
    for name in ("693_UNCR.dcm", "MR2_J2KR.dcm", "US1_UNCR.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm"):
        s = served.samples[name]
        r = requests.get(
            served.url(served.instance_path(name) + "/frames/1"), headers=CORNERSTONE_FRAMES
        )
        assert r.status_code == 200, (name, r.text)
        media = parse_media_type(r.headers["content-type"])
        parser = MultipartParser(media.params["boundary"])
        (part,) = parser.feed(r.content)
        # the loader reads the part's transfer syntax to pick its decoder
        syntax = parse_media_type(part.content_type).params["transfer-syntax"]
        record = served.archive.catalog.require_instance(s.sop)
        if record.pixel_format == "encapsulated":
            assert syntax == s.dataset().file_meta.TransferSyntaxUID
        assert part.body


def test_thumbnails_as_ohif_asks(served: Served) -> None:
    path = served.instance_path("693_UNCR.dcm")
    # thumbnailRendering 'thumbnail': bulk data request with ?accept=image/jpeg
    direct = requests.get(
        served.url(path + "/thumbnail?accept=image/jpeg"), headers={"Accept": "image/jpeg"}
    )
    assert direct.status_code == 200 and direct.content.startswith(b"\xff\xd8")
    multipart = requests.get(
        served.url(path + "/thumbnail"), headers={"Accept": 'multipart/related; type="image/jpeg"'}
    )
    assert multipart.status_code == 200
    media = parse_media_type(multipart.headers["content-type"])
    (part,) = MultipartParser(media.params["boundary"]).feed(multipart.content)
    assert part.body == direct.content
    # a browser <img src>: its own Accept list
    browser = requests.get(
        served.url(path + "/thumbnail?accept=image/jpeg"),
        headers={"Accept": "image/avif,image/webp,*/*"},
    )
    assert browser.content == direct.content
    # thumbnailRendering 'wadors' renders frame 1 client-side: rendered frame with viewport
    rendered = requests.get(
        served.url(path + "/frames/1/rendered"),
        params={"viewport": "128,128"},
        headers={"Accept": "image/jpeg"},
    )
    assert rendered.status_code == 200


def test_cors_preflight_when_origins_are_configured(served: Served, monkeypatch) -> None:
    from kho.viewer_api.server import HttpServer

    monkeypatch.setattr(served.archive.settings, "cors_origins", ["http://viewer.example"])
    server = HttpServer(served.archive, host="127.0.0.1", port=0).start()
    try:
        url = f"http://127.0.0.1:{server.port}/dicom-web/studies"
        r = requests.options(
            url,
            headers={
                "Origin": "http://viewer.example",
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "accept",
            },
        )
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "http://viewer.example"
        other = requests.get(url, headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers
    finally:
        server.stop()
    assert np.__name__
