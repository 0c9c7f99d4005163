"""WADO-RS with dicomweb-client: retrieve, metadata, frames (Accept negotiation), bulk data."""

from __future__ import annotations

import hashlib
import json

import imagecodecs
import numpy as np
import pytest
import requests

from kho.viewer_api.media import parse_media_type
from kho.viewer_api.multipart import MultipartParser, Part
from tests.viewer_api.conftest import Served

ANY_SYNTAX_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'
ANY_SYNTAX_FRAMES = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
DECODED_FRAMES = 'multipart/related; type="application/octet-stream"'


def split(response: requests.Response) -> list[Part]:
    media = parse_media_type(response.headers["content-type"])
    assert media.media == "multipart/related"
    parser = MultipartParser(media.params["boundary"])
    parts = parser.feed(response.content)
    parser.finish()
    return parts


# --- retrieve ---------------------------------------------------------------------------


def test_retrieve_instance_returns_the_received_bytes(served: Served) -> None:
    for name, s in served.samples.items():
        r = requests.get(
            served.url(served.instance_path(name)), headers={"Accept": ANY_SYNTAX_DICOM}
        )
        assert r.status_code == 200, (name, r.text)
        (part,) = split(r)
        assert part.body == s.data, name
        assert parse_media_type(part.content_type).media == "application/dicom"


def test_retrieve_study_and_series_with_dicomweb_client(served: Served) -> None:
    s = served.samples["MR2_J2KR.dcm"]
    (ds,) = served.client.retrieve_study(s.study)
    assert ds.SOPInstanceUID == s.sop
    (ds,) = served.client.retrieve_series(s.study, s.series)
    assert ds.SOPInstanceUID == s.sop
    ds = served.client.retrieve_instance(s.study, s.series, s.sop)
    assert np.array_equal(ds.pixel_array, s.dataset().pixel_array)


def test_retrieve_study_bytes_match_archive(served: Served) -> None:
    s = served.samples["eCT_Supplemental.dcm"]
    r = requests.get(served.url(f"/studies/{s.study}"), headers={"Accept": ANY_SYNTAX_DICOM})
    parts = split(r)
    record = served.archive.catalog.require_instance(s.sop)
    assert [p.body for p in parts] == [served.archive.read_part10(record)]
    assert hashlib.sha256(parts[0].body).hexdigest() == record.sha256


def test_retrieve_in_another_syntax_is_406(served: Served) -> None:
    s = served.samples["MR2_J2KR.dcm"]
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'
    r = requests.get(served.url(f"/studies/{s.study}"), headers={"Accept": accept})
    assert r.status_code == 406
    assert "1.2.840.10008.1.2.4.90" in r.text


# --- metadata ---------------------------------------------------------------------------


def test_instance_metadata_matches_the_file(served: Served) -> None:
    s = served.samples["693_UNCR.dcm"]
    (meta,) = [served.client.retrieve_instance_metadata(s.study, s.series, s.sop)]
    ds = s.dataset()
    assert meta["00100010"]["Value"][0]["Alphabetic"] == str(ds.PatientName)
    assert meta["00280010"]["Value"] == [ds.Rows]
    assert meta["00281050"]["Value"][0] == pytest.approx(float(ds.WindowCenter))
    expected = {f"{e.tag:08X}" for e in ds if e.tag != 0x7FE00010}
    assert expected <= set(meta)
    assert meta["7FE00010"]["BulkDataURI"].endswith(
        served.instance_path("693_UNCR.dcm") + "/bulkdata/7FE00010"
    )


def test_series_and_study_metadata(served: Served) -> None:
    s = served.samples["emri_small_jpeg_ls_lossless.dcm"]
    series = served.client.retrieve_series_metadata(s.study, s.series)
    study = served.client.retrieve_study_metadata(s.study)
    assert series == study
    assert [m["00080018"]["Value"][0] for m in series] == [s.sop]
    assert series[0]["00280008"]["Value"] == [10]
    # served twice (second from the cache): the same document
    assert served.client.retrieve_series_metadata(s.study, s.series) == series


def test_metadata_is_gzipped_for_clients_that_accept_it(served: Served) -> None:
    s = served.samples["MR-SIEMENS-DICOM-WithOverlays.dcm"]
    url = served.url(f"/studies/{s.study}/series/{s.series}/metadata")
    zipped = requests.get(url, headers={"Accept-Encoding": "gzip"})
    plain = requests.get(url, headers={"Accept-Encoding": "identity"})
    assert zipped.headers.get("content-encoding") == "gzip"
    assert "content-encoding" not in plain.headers
    assert zipped.json() == plain.json()


# --- frames -----------------------------------------------------------------------------


def test_frames_in_stored_syntax_when_any_is_accepted(served: Served) -> None:
    s = served.samples["MR2_J2KR.dcm"]  # received JPEG 2000: fragments go out as received
    (frame,) = served.client.retrieve_instance_frames(
        s.study, s.series, s.sop, [1], media_types=(("application/octet-stream", "*"),)
    )
    assert frame.startswith(b"\xff\x4f\xff\x51")  # J2K codestream (SOC, SIZ)
    assert np.array_equal(imagecodecs.jpeg2k_decode(frame), s.dataset().pixel_array)


def test_native_ct_is_served_as_its_at_rest_jpegls_stream(served: Served) -> None:
    s = served.samples["693_UNCR.dcm"]  # signed 14-bit CT, JPEG-LS at rest
    url = served.url(served.instance_path("693_UNCR.dcm") + "/frames/1")
    r = requests.get(url, headers={"Accept": ANY_SYNTAX_FRAMES})
    (part,) = split(r)
    syntax = parse_media_type(part.content_type).params["transfer-syntax"]
    record = served.archive.catalog.require_instance(s.sop)
    expected = s.dataset().pixel_array
    if record.pixel_format == "jpeg-ls":
        assert syntax == "1.2.840.10008.1.2.4.80"
        assert parse_media_type(part.content_type).media == "image/jls"
        decoded = imagecodecs.jpegls_decode(part.body)
        mask = (1 << 14) - 1
        assert np.array_equal(decoded & mask, expected.astype(np.uint16) & mask)
    else:  # stored raw (at-rest codec unavailable): native bytes
        assert syntax == "1.2.840.10008.1.2.1"
        assert np.array_equal(np.frombuffer(part.body, "<i2").reshape(expected.shape), expected)


@pytest.mark.parametrize(
    "name", ["693_UNCR.dcm", "MR2_J2KR.dcm", "JLSL_16_15_1_1F.dcm", "US1_UNCR.dcm", "JPEG-LL.dcm"]
)
def test_decoded_frames_equal_pydicom_pixels(served: Served, name: str) -> None:
    s = served.samples[name]
    expected = s.dataset().pixel_array
    (frame,) = served.client.retrieve_instance_frames(
        s.study, s.series, s.sop, [1], media_types=("application/octet-stream",)
    )
    decoded = np.frombuffer(frame, expected.dtype.newbyteorder("<")).reshape(expected.shape)
    assert np.array_equal(decoded, expected)


def test_frame_lists_of_multiframe_instances(served: Served) -> None:
    for name, numbers in (
        ("emri_small_jpeg_ls_lossless.dcm", [1, 3, 10]),
        ("SC_rgb_2frame.dcm", [2, 1]),
    ):
        s = served.samples[name]
        expected = s.dataset().pixel_array
        frames = served.client.retrieve_instance_frames(
            s.study, s.series, s.sop, numbers, media_types=("application/octet-stream",)
        )
        assert len(frames) == len(numbers)
        for number, frame in zip(numbers, frames, strict=True):
            want = expected[number - 1]
            got = np.frombuffer(frame, want.dtype.newbyteorder("<")).reshape(want.shape)
            assert np.array_equal(got, want), (name, number)


def test_frames_accept_negotiation(served: Served) -> None:
    path = served.instance_path("emri_small_jpeg_ls_lossless.dcm") + "/frames/2"
    # the stored syntax named explicitly, or its media type: as stored
    named = requests.get(
        served.url(path),
        headers={
            "Accept": 'multipart/related; type="image/jls"; transfer-syntax=1.2.840.10008.1.2.4.80'
        },
    )
    assert named.status_code == 200
    (part,) = split(named)
    assert part.body.startswith(b"\xff\xd8\xff\xf7")  # JPEG-LS SOI, SOF55
    single = requests.get(served.url(path), headers={"Accept": "image/jls"})
    assert single.status_code == 200 and single.content == part.body
    assert single.headers["content-type"].startswith("image/jls")
    # a syntax the frame is not stored in and cannot be produced (lossy JPEG): 406
    baseline = requests.get(
        served.url(path),
        headers={
            "Accept": 'multipart/related; type="image/jpeg"; transfer-syntax=1.2.840.10008.1.2.4.50'
        },
    )
    assert baseline.status_code == 406
    # q-values: the preferred acceptable one wins
    both = requests.get(
        served.url(path),
        headers={"Accept": f"{ANY_SYNTAX_FRAMES};q=0.5, {DECODED_FRAMES}"},
    )
    (decoded,) = split(both)
    assert len(decoded.body) == 64 * 64 * 2


def test_frame_out_of_range_is_404_and_bad_list_400(served: Served) -> None:
    path = served.instance_path("MR2_J2KR.dcm")
    assert requests.get(served.url(path + "/frames/2")).status_code == 404
    assert requests.get(served.url(path + "/frames/0")).status_code == 400
    assert requests.get(served.url(path + "/frames/a,b")).status_code == 400


# --- bulk data --------------------------------------------------------------------------


def test_bulkdata_uris_resolve(served: Served) -> None:
    s = served.samples["MR-SIEMENS-DICOM-WithOverlays.dcm"]
    meta = served.client.retrieve_instance_metadata(s.study, s.series, s.sop)
    overlay = meta["60003000"]["BulkDataURI"]
    # dicomweb-client sends 'Host: 127.0.0.1' without the port: take the path part
    path = overlay[overlay.index("/studies/") :]
    (value,) = served.client.retrieve_bulkdata(served.url(path))
    assert value == s.dataset()[0x60003000].value
    pixels = meta["7FE00010"]["BulkDataURI"]
    frames = served.client.retrieve_bulkdata(
        served.url(pixels[pixels.index("/studies/") :]), media_types=("application/octet-stream",)
    )
    expected = s.dataset().pixel_array
    assert np.array_equal(np.frombuffer(frames[0], "<u2").reshape(expected.shape), expected)


def test_metadata_inlines_small_values(served: Served) -> None:
    s = served.samples["MR-SIEMENS-DICOM-WithOverlays.dcm"]
    meta = served.client.retrieve_instance_metadata(s.study, s.series, s.sop)
    text = json.dumps(meta)
    assert "InlineBinary" not in text or all(
        len(v.get("InlineBinary", "")) <= 1400 for v in meta.values() if isinstance(v, dict)
    )
    assert (
        requests.get(
            served.url(
                served.instance_path("MR-SIEMENS-DICOM-WithOverlays.dcm") + "/bulkdata/00100010"
            )
        ).status_code
        == 404
    )
