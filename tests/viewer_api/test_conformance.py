"""Smaller PS3.18 / RFC 9110 points (issue 12, item 8): HEAD wherever GET works, the
default media type of bulk data, and STOW-RS Retrieve URLs that resolve."""

from __future__ import annotations

import httpx
import numpy as np
import pydicom
import pytest

from kho.viewer_api.media import parse_media_type
from kho.viewer_api.multipart import MultipartParser, Part, join_parts
from tests.viewer_api.conftest import Served, fill, get_routes, sample_path, valid_values

EVRLE = "1.2.840.10008.1.2.1"
DICOM_PARTS = 'multipart/related; type="application/dicom"; boundary=XyZ'


def split(response: httpx.Response) -> list[Part]:
    media = parse_media_type(response.headers["content-type"])
    assert media.media == "multipart/related", response.headers["content-type"]
    parser = MultipartParser(media.params["boundary"])
    parts = parser.feed(response.content)
    parser.finish()
    return parts


# --- HEAD -------------------------------------------------------------------------------


def _comparable(response: httpx.Response) -> dict[str, str]:
    """Headers that must agree between GET and HEAD: not the date, and not a multipart
    boundary (a new one per response) nor the framing of a streamed body."""
    headers = {k.lower(): v for k, v in response.headers.items()}
    headers.pop("date", None)
    headers.pop("transfer-encoding", None)
    media = parse_media_type(headers.get("content-type", ""))
    if media.media == "multipart/related":
        params = {k: v for k, v in media.params.items() if k != "boundary"}
        headers["content-type"] = f"{media.media} {sorted(params.items())}"
    return headers


def test_head_answers_like_get_on_every_route(served: Served) -> None:
    values = valid_values(served)
    with httpx.Client(base_url=f"http://127.0.0.1:{served.server.port}") as client:
        for route in get_routes(served):
            path = fill(route, values)
            got, head = client.get(path), client.head(path)
            assert head.status_code == got.status_code == 200, (route, head.status_code)
            assert head.content == b""
            want, headers = _comparable(got), _comparable(head)
            if "content-length" not in want:  # a streamed GET: no size known in advance
                headers.pop("content-length", None)
            assert headers == want, route


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/studies/1.2.3/metadata", 404),
        ("/studies/%20/metadata", 400),
        ("/studies?StudyDate=x", 400),
        ("/studies", 200),
    ],
)
def test_head_gives_the_status_get_gives(served: Served, path: str, status: int) -> None:
    got, head = httpx.get(served.url(path)), httpx.head(served.url(path))
    assert head.status_code == got.status_code == status
    assert head.content == b""
    if "content-length" in got.headers:
        assert head.headers["content-length"] == got.headers["content-length"]


# --- bulk data default ------------------------------------------------------------------


@pytest.mark.parametrize("accept", [None, "*/*"])
@pytest.mark.parametrize("resource", ["/bulkdata/7FE00010", "/frames/1"])
def test_pixel_bulk_data_default_is_uncompressed_little_endian(
    served: Served, accept: str | None, resource: str
) -> None:
    """PS3.18 8.7.3.3 (Table 8.7.3-4): without an Accept (or with ``*/*``), bulk data is
    application/octet-stream in Explicit VR Little Endian, whatever the stored syntax (here
    JPEG-LS at rest)."""
    name = "693_UNCR.dcm"  # native CT, stored as JPEG-LS
    url = served.url(served.instance_path(name) + resource)
    with httpx.Client() as client:
        if accept is None:
            del client.headers["accept"]
        r = client.get(url) if accept is None else client.get(url, headers={"Accept": accept})
    assert r.status_code == 200, r.text
    media = parse_media_type(r.headers["content-type"])
    assert media.params["type"] == "application/octet-stream"
    (part,) = split(r)
    part_type = parse_media_type(part.content_type or "")
    assert part_type.media == "application/octet-stream"
    assert part_type.params["transfer-syntax"] == EVRLE
    expected = served.samples[name].dataset().pixel_array
    decoded = np.frombuffer(part.body, expected.dtype.newbyteorder("<")).reshape(expected.shape)
    assert np.array_equal(decoded, expected)


def test_stored_syntax_is_still_served_when_asked_for(served: Served) -> None:
    url = served.url(served.instance_path("693_UNCR.dcm") + "/bulkdata/7FE00010")
    r = httpx.get(url, headers={"Accept": "*/*, image/jls"})  # the named range wins
    assert r.status_code == 200
    assert parse_media_type(r.headers["content-type"]).media == "image/jls"
    assert r.content[:2] == b"\xff\xd8"  # a JPEG-LS stream (SOI), not decoded pixels


# --- STOW-RS Retrieve URLs --------------------------------------------------------------


def test_stow_retrieve_urls_resolve(fresh: Served) -> None:
    data = sample_path("693_UNCR.dcm").read_bytes()
    ds = pydicom.dcmread(sample_path("693_UNCR.dcm"))
    r = httpx.post(
        fresh.url("/studies"),
        content=join_parts("XyZ", [(data, "application/dicom")]),
        headers={"Content-Type": DICOM_PARTS, "Accept": "application/dicom+json"},
    )
    assert r.status_code == 200, r.text
    (item,) = r.json()["00081199"]["Value"]
    instance_url = item["00081190"]["Value"][0]
    assert instance_url == fresh.url(
        f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )
    got = httpx.get(instance_url)
    assert got.status_code == 200
    assert [p.body for p in split(got)] == [data]
    study_url = r.json()["00081190"]["Value"][0]
    study = httpx.get(study_url)
    assert study.status_code == 200
    assert [p.body for p in split(study)] == [data]
    metadata = httpx.get(instance_url + "/metadata")
    assert metadata.json()[0]["00080018"]["Value"] == [ds.SOPInstanceUID]
