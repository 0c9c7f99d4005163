"""``transfer-syntax=*`` in application/octet-stream (OHIF's Cornerstone asks for frames so)
answered decoded when the setting ``viewer_decoded_frame_max_bytes`` allows: only frames
stored losslessly compressed and small enough; everything else as stored."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.data import get_testdata_file

from kho.archive.archive import Archive
from kho.archive.config import Settings
from kho.archive.ingest.pipeline import IngestResult
from kho.viewer_api.app import create_app
from kho.viewer_api.media import EXPLICIT_VR_LITTLE_ENDIAN
from kho.viewer_api.wado import negotiate_frames

CORNERSTONE = "multipart/related; type=application/octet-stream; transfer-syntax=*"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
CT_SMALL = Path(get_testdata_file("CT_small.dcm"))  # 128x128, 16 bits: 32 KiB decoded
JPEG_RGB = Path(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))  # lossy JPEG baseline


def _served(tmp: Path, limit: int) -> tuple[Archive, TestClient]:
    settings = Settings(
        data_dir=tmp / "data",
        fsync=False,
        dicom_port=0,
        http_port=0,
        finish_in_background=False,  # JPEG-LS at rest at once
        viewer_decoded_frame_max_bytes=limit,
    )
    archive = Archive(settings)
    return archive, TestClient(create_app(archive))


@pytest.fixture(params=[0, 32 * 1024 - 1, 32 * 1024], ids=["off", "below", "at"])
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[int, TestClient]]:
    archive, client = _served(tmp_path, request.param)
    with archive, client:
        yield request.param, client


def _frame(client: TestClient, result: IngestResult, accept: str) -> tuple[int, bytes]:
    path = (
        f"/dicom-web/studies/{result.study_uid}/series/{result.series_uid}"
        f"/instances/{result.sop_uid}/frames/1"
    )
    response = client.get(path, headers={"Accept": accept})
    return response.status_code, response.content


def _ingest(client: TestClient, path: Path) -> IngestResult:
    archive: Archive = client.app.state.viewer.root_archive  # type: ignore[attr-defined]
    return archive.ingest_part10(path.read_bytes(), lenient_identity=True)


def test_small_lossless_frame_goes_out_decoded_within_the_limit(
    served: tuple[int, TestClient],
) -> None:
    limit, client = served
    result = _ingest(client, CT_SMALL)
    status, body = _frame(client, result, CORNERSTONE)
    assert status == 200
    decoded = pydicom.dcmread(CT_SMALL).pixel_array.astype("<i2").tobytes()
    if limit >= len(decoded):
        assert f"transfer-syntax={EXPLICIT_VR_LITTLE_ENDIAN}".encode() in body
        assert decoded in body  # the pixel values, native little endian
    else:
        assert f"transfer-syntax={JPEG_LS_LOSSLESS}".encode() in body
        assert decoded not in body


def test_lossy_frames_stay_as_stored(served: tuple[int, TestClient]) -> None:
    _limit, client = served
    result = _ingest(client, JPEG_RGB)
    status, body = _frame(client, result, CORNERSTONE)
    assert status == 200
    assert f"transfer-syntax={JPEG_BASELINE}".encode() in body


def test_a_named_syntax_or_image_media_is_not_overridden() -> None:
    """Only "any syntax in octet-stream" is taken as leave to decode; a client that names
    the stored syntax, or asks for image/jls, gets the stored bytes."""
    stored = JPEG_LS_LOSSLESS
    assert negotiate_frames(CORNERSTONE, stored, 1, decoded_for_any=True) == (
        EXPLICIT_VR_LITTLE_ENDIAN,
        None,
    )
    named = f"multipart/related; type=image/jls; transfer-syntax={stored}"
    assert negotiate_frames(named, stored, 1, decoded_for_any=True) == (stored, None)
    image = "multipart/related; type=image/jls; transfer-syntax=*"
    assert negotiate_frames(image, stored, 1, decoded_for_any=True) == (stored, None)
    single = "application/octet-stream; transfer-syntax=*"
    assert negotiate_frames(single, stored, 1, decoded_for_any=True) == (
        EXPLICIT_VR_LITTLE_ENDIAN,
        "application/octet-stream",
    )
    assert negotiate_frames(CORNERSTONE, stored, 1) == (stored, None)
