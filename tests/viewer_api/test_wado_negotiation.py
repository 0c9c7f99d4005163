"""WADO-RS retrieval by the archive's retrieval rule (kho.archive.read.transcode), with
dicomweb-client and raw httpx against a running server: Explicit VR Little Endian is the
default for application/dicom (PS3.18 8.7.3.4, 8.7.3.5.2), ``transfer-syntax=*`` keeps the
received bytes bit for bit, instances come as JPEG-LS, JPEG 2000 and JPEG lossless, frames
as image/jls, image/jp2 and image/jpeg, each decoded back equal to the original."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import httpx
import imagecodecs
import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import generate_uid

from kho.archive.archive import Archive
from kho.archive.config import Settings
from kho.archive.read import transcode
from kho.archive.read.pixels import stored_frame
from kho.viewer_api.media import parse_media_type
from kho.viewer_api.multipart import MultipartParser, Part
from kho.viewer_api.server import HttpServer
from tests.conftest import SAMPLES_DIR
from tests.helpers.part10 import part10_bytes

EVRLE = "1.2.840.10008.1.2.1"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_SV1 = "1.2.840.10008.1.2.4.70"
JLS = "1.2.840.10008.1.2.4.80"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
DICOM_PARTS = 'multipart/related; type="application/dicom"'

SOURCES = (
    "693_UNCR.dcm",  # native CT, signed 14 bit: JPEG-LS at rest
    "SC_rgb_2frame.dcm",  # native RGB, 2 frames: JPEG-LS at rest
    "emri_small_jpeg_ls_lossless.dcm",  # received JPEG-LS, 10 frames
    "JPEG-LL.dcm",  # received JPEG lossless SV1, signed 16 bit
    "emri_small_jpeg_2k_lossless.dcm",  # received JPEG 2000 lossless, 10 frames
    "SC_rgb_jpeg_dcmtk.dcm",  # received JPEG baseline (lossy; pydicom's test file)
)
LOSSLESS_SOURCES = SOURCES[:-1]


@dataclass(frozen=True)
class Sample:
    name: str
    data: bytes
    sop: str
    series: str
    pixels: np.ndarray  # pydicom's decoding of what was sent
    bits_stored: int


@dataclass
class Served:
    archive: Archive
    base: str
    client: DICOMwebClient
    study: str
    samples: dict[str, Sample]

    def instance_url(self, name: str) -> str:
        s = self.samples[name]
        return f"{self.base}/studies/{self.study}/series/{s.series}/instances/{s.sop}"


def _read(data: bytes | Path) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(data if isinstance(data, Path) else BytesIO(data), force=True)


def _source_path(name: str) -> Path:
    path = SAMPLES_DIR / name
    return path if path.exists() else Path(pydicom.data.get_testdata_file(name))  # type: ignore[arg-type]


def _into_study(path: Path, study: str) -> bytes:
    """The file in one test study with fresh series and instance UIDs, in its own syntax
    (encapsulated pixel data keeps its bytes)."""
    ds = _read(path)
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientID = "WADO-NEGOTIATION"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return part10_bytes(ds)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    data_dir = tmp_path_factory.mktemp("wado-negotiation") / "data"
    settings = Settings(
        data_dir=data_dir, fsync=False, dicom_port=0, http_port=0, finish_in_background=False
    )
    study = generate_uid()
    with Archive(settings) as archive:
        archive.derivers = []
        samples = {}
        for name in SOURCES:
            data = _into_study(_source_path(name), study)
            result = archive.ingest_part10(data, lenient_identity=True)
            ds = _read(data)
            samples[name] = Sample(
                name, data, result.sop_uid, result.series_uid, ds.pixel_array, int(ds.BitsStored)
            )
        assert archive.catalog.require_instance(samples["693_UNCR.dcm"].sop).pixel_format == (
            "jpeg-ls"
        )
        server = HttpServer(archive, host="127.0.0.1", port=0).start()
        base = f"http://127.0.0.1:{server.port}/dicom-web"
        try:
            yield Served(archive, base, DICOMwebClient(base), study, samples)
        finally:
            server.stop()


def split(response: httpx.Response) -> list[Part]:
    media = parse_media_type(response.headers["content-type"])
    assert media.media == "multipart/related", response.headers["content-type"]
    parser = MultipartParser(media.params["boundary"])
    parts = parser.feed(response.content)
    parser.finish()
    return parts


def _syntax_of(content_type: str | None) -> str:
    return parse_media_type(content_type or "").params["transfer-syntax"]


def _by_sop(served: Served) -> dict[str, Sample]:
    return {s.sop: s for s in served.samples.values()}


def _check_instance(sample: Sample, data: bytes, syntax: str) -> Dataset:
    """A retrieved Part 10 file is the sample, in ``syntax``, with the sample's pixels."""
    ds = _read(data)
    assert ds.file_meta.TransferSyntaxUID == syntax, sample.name
    assert ds.SOPInstanceUID == sample.sop
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.testing.assert_array_equal(ds.pixel_array, sample.pixels, err_msg=sample.name)
    return ds


# --- instances ----------------------------------------------------------------------------


@pytest.mark.parametrize("accept", [DICOM_PARTS, None, "*/*"], ids=["dicom", "none", "any"])
def test_default_syntax_is_explicit_vr_little_endian(served: Served, accept: str | None) -> None:
    """PS3.18 8.7.3.5.2: application/dicom without a transfer-syntax (and no Accept, or
    */*, whose default media type it is) is Explicit VR Little Endian, whatever was
    received: compressed instances are decoded, the lossy one flagged so."""
    with httpx.Client(timeout=60) as client:
        if accept is None:
            del client.headers["accept"]
            r = client.get(f"{served.base}/studies/{served.study}")
        else:
            r = client.get(f"{served.base}/studies/{served.study}", headers={"Accept": accept})
    assert r.status_code == 200, r.text
    parts = split(r)
    samples = _by_sop(served)
    seen = set()
    for part in parts:
        assert _syntax_of(part.content_type) == EVRLE
        ds = _read(part.body)
        sample = samples[ds.SOPInstanceUID]
        _check_instance(sample, part.body, EVRLE)
        if sample.name == "SC_rgb_jpeg_dcmtk.dcm":
            assert ds.LossyImageCompression == "01"
        seen.add(sample.name)
    assert seen == set(SOURCES)


def test_single_part_application_dicom_default(served: Served) -> None:
    r = httpx.get(served.instance_url("JPEG-LL.dcm"), headers={"Accept": "application/dicom"})
    assert r.status_code == 200, r.text
    assert parse_media_type(r.headers["content-type"]).media == "application/dicom"
    assert _syntax_of(r.headers["content-type"]) == EVRLE
    _check_instance(served.samples["JPEG-LL.dcm"], r.content, EVRLE)


def test_dicomweb_client_study_retrieve_gets_explicit_vr_little_endian(served: Served) -> None:
    """dicomweb-client's retrieve_study asks for application/dicom with no syntax."""
    datasets = served.client.retrieve_study(served.study)
    samples = _by_sop(served)
    assert {ds.SOPInstanceUID for ds in datasets} == set(samples)
    for ds in datasets:
        assert ds.file_meta.TransferSyntaxUID == EVRLE
        np.testing.assert_array_equal(ds.pixel_array, samples[ds.SOPInstanceUID].pixels)


def test_any_syntax_keeps_the_received_bytes(served: Served) -> None:
    r = httpx.get(
        f"{served.base}/studies/{served.study}",
        headers={"Accept": f"{DICOM_PARTS}; transfer-syntax=*"},
        timeout=60,
    )
    parts = split(r)
    samples = _by_sop(served)
    assert len(parts) == len(samples)
    for part in parts:
        sample = samples[_read(part.body).SOPInstanceUID]
        assert part.body == sample.data, sample.name  # bit for bit
        record = served.archive.catalog.require_instance(sample.sop)
        assert hashlib.sha256(part.body).hexdigest() == record.sha256
        assert _syntax_of(part.content_type) == record.transfer_syntax_uid
    # dicomweb-client's retrieve_instance asks for ("application/dicom", "*") by default
    sample = served.samples["693_UNCR.dcm"]
    ds = served.client.retrieve_instance(served.study, sample.series, sample.sop)
    assert ds.file_meta.TransferSyntaxUID == EVRLE  # as received (native; JPEG-LS at rest)
    assert ds.PixelData == _read(sample.data).PixelData


@pytest.mark.parametrize("syntax", [JLS, J2K_LOSSLESS, JPEG_SV1])
@pytest.mark.parametrize("name", SOURCES)
def test_instance_in_a_lossless_compressed_syntax(served: Served, syntax: str, name: str) -> None:
    """Every instance in JPEG-LS, JPEG 2000 or JPEG lossless (dicomweb-client naming the
    syntax): as received where it is the received one, else transcoded, the same pixels
    (the lossy original's decoded pixels, kept exactly, flagged lossy)."""
    sample = served.samples[name]
    ds = served.client.retrieve_instance(
        served.study, sample.series, sample.sop, media_types=(("application/dicom", syntax),)
    )
    assert ds.file_meta.TransferSyntaxUID == syntax
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.testing.assert_array_equal(ds.pixel_array, sample.pixels, err_msg=name)
    record = served.archive.catalog.require_instance(sample.sop)
    if record.transfer_syntax_uid == syntax:
        assert ds.PixelData == _read(sample.data).PixelData  # as received
    if transcode.is_lossy(record.transfer_syntax_uid):
        assert ds.LossyImageCompression == "01"


def test_jpeg_ls_instance_of_a_native_ct_is_its_at_rest_streams(served: Served) -> None:
    """JPEG-LS asked for a native instance held as JPEG-LS at rest: its streams, re-wrapped
    (no decode), P = Bits Stored as the header says."""
    sample = served.samples["693_UNCR.dcm"]
    r = httpx.get(
        served.instance_url("693_UNCR.dcm"),
        headers={"Accept": f"{DICOM_PARTS}; transfer-syntax={JLS}"},
    )
    (part,) = split(r)
    ds = _check_instance(sample, part.body, JLS)
    record = served.archive.catalog.require_instance(sample.sop)
    (fragment,) = generate_frames(ds.PixelData, number_of_frames=1)
    stream = stored_frame(served.archive, record, 1)[0]
    assert fragment[: len(stream)] == stream and len(fragment) - len(stream) in (0, 1)
    assert fragment[fragment.index(b"\xff\xf7") + 4] == ds.BitsStored == 14


def test_each_part_gets_the_best_syntax_it_can(served: Served) -> None:
    """Accept names JPEG baseline first, then JPEG-LS: the lossy baseline instance goes as
    received, the lossless ones (which kho never encodes lossily) as JPEG-LS."""
    accept = (
        f"{DICOM_PARTS}; transfer-syntax={JPEG_BASELINE}, "
        f"{DICOM_PARTS}; transfer-syntax={JLS};q=0.8"
    )
    r = httpx.get(f"{served.base}/studies/{served.study}", headers={"Accept": accept}, timeout=60)
    assert r.status_code == 200, r.text
    samples = _by_sop(served)
    for part in split(r):
        sample = samples[_read(part.body).SOPInstanceUID]
        expected = JPEG_BASELINE if sample.name == "SC_rgb_jpeg_dcmtk.dcm" else JLS
        assert _syntax_of(part.content_type) == expected
        _check_instance(sample, part.body, expected)


def test_a_syntax_that_cannot_be_produced_is_406(served: Served) -> None:
    r = httpx.get(
        served.instance_url("693_UNCR.dcm"),
        headers={"Accept": f"{DICOM_PARTS}; transfer-syntax={JPEG_BASELINE}"},
    )
    assert r.status_code == 406
    assert EVRLE in r.text  # the received syntax is named


# --- frames -------------------------------------------------------------------------------


def _decode(media: str, data: bytes) -> np.ndarray:
    if media == "image/jls":
        return np.asarray(imagecodecs.jpegls_decode(data))
    if media == "image/jp2":
        return np.asarray(imagecodecs.jpeg2k_decode(data))
    assert media == "image/jpeg"
    return np.asarray(imagecodecs.jpeg8_decode(data))  # libjpeg-turbo 3 reads lossless JPEG


def _assert_same_pixels(decoded: np.ndarray, expected: np.ndarray, bits_stored: int) -> None:
    """Compressed streams hold Bits Stored bits (decoders give unsigned or signed values)."""
    mask = (1 << bits_stored) - 1
    assert decoded.shape == expected.shape
    np.testing.assert_array_equal(decoded.astype(np.int64) & mask, expected.astype(np.int64) & mask)


MEDIA_SYNTAX = {"image/jls": JLS, "image/jp2": J2K_LOSSLESS, "image/jpeg": JPEG_SV1}


@pytest.mark.parametrize("media", sorted(MEDIA_SYNTAX))
@pytest.mark.parametrize("name", LOSSLESS_SOURCES)
def test_frame_as_image_media_type(served: Served, media: str, name: str) -> None:
    """A frame asked as image/jls, image/jp2 or image/jpeg (single part, no syntax named):
    as stored where that is its media type, else encoded losslessly; decoded back equal to
    the original frame."""
    sample = served.samples[name]
    r = httpx.get(served.instance_url(name) + "/frames/1", headers={"Accept": media})
    assert r.status_code == 200, r.text
    content_type = parse_media_type(r.headers["content-type"])
    assert content_type.media == media
    record = served.archive.catalog.require_instance(sample.sop)
    stored_syntax = transcode.stored_frame_syntax(record)
    if MEDIA_SYNTAX[media] == stored_syntax:
        assert content_type.params["transfer-syntax"] == stored_syntax
        assert r.content == stored_frame(served.archive, record, 1)[0]  # as stored
    else:
        assert content_type.params["transfer-syntax"] == MEDIA_SYNTAX[media]
    frames = sample.pixels if int(record.number_of_frames or 1) > 1 else sample.pixels[None]
    _assert_same_pixels(_decode(media, r.content), frames[0], sample.bits_stored)


@pytest.mark.parametrize("media", sorted(MEDIA_SYNTAX))
def test_frames_of_a_multiframe_instance_with_dicomweb_client(served: Served, media: str) -> None:
    sample = served.samples["emri_small_jpeg_2k_lossless.dcm"]
    numbers = [2, 7, 10]
    frames = served.client.retrieve_instance_frames(
        served.study,
        sample.series,
        sample.sop,
        numbers,
        media_types=((media, MEDIA_SYNTAX[media]),),
    )
    assert len(frames) == len(numbers)
    for number, frame in zip(numbers, frames, strict=True):
        _assert_same_pixels(_decode(media, frame), sample.pixels[number - 1], sample.bits_stored)


def test_lossy_frames_as_received_and_never_lossy_encoded(served: Served) -> None:
    """The JPEG baseline frame goes out as received when image/jpeg is asked; a lossless
    frame asked as JPEG baseline cannot be produced: 406."""
    baseline = served.samples["SC_rgb_jpeg_dcmtk.dcm"]
    record = served.archive.catalog.require_instance(baseline.sop)
    r = httpx.get(
        served.instance_url(baseline.name) + "/frames/1", headers={"Accept": "image/jpeg"}
    )
    assert r.status_code == 200
    assert _syntax_of(r.headers["content-type"]) == JPEG_BASELINE
    assert r.content == stored_frame(served.archive, record, 1)[0]
    lossless = served.instance_url("693_UNCR.dcm") + "/frames/1"
    r = httpx.get(lossless, headers={"Accept": f"image/jpeg; transfer-syntax={JPEG_BASELINE}"})
    assert r.status_code == 406


def test_pixel_bulk_data_as_jpeg_ls(served: Served) -> None:
    """The pixel BulkDataURI negotiates like frames: JPEG-LS asked for a JPEG 2000 instance
    gives every frame encoded as JPEG-LS."""
    sample = served.samples["emri_small_jpeg_2k_lossless.dcm"]
    r = httpx.get(
        served.instance_url(sample.name) + "/bulkdata/7FE00010",
        headers={"Accept": 'multipart/related; type="image/jls"'},
    )
    assert r.status_code == 200, r.text
    parts = split(r)
    assert len(parts) == 10
    for part, expected in zip(parts, sample.pixels, strict=True):
        assert _syntax_of(part.content_type) == JLS
        _assert_same_pixels(_decode("image/jls", part.body), expected, sample.bits_stored)
