"""Decoded frames (WADO-RS frames as ``application/octet-stream``) equal pydicom's decoding
of the file sent, for every sample and every pydicom test file, in each stored form: the
finisher's work done before the acknowledgement, stored as received (finisher not run
yet), and finished by the background finisher (JPEG-LS at rest).

Native frames carry the pixel values as PS3.5 encodes them natively, in the instance's
own Photometric Interpretation and Planar Configuration (what its metadata tells the
client), so kho's bytes are read that way and compared with pydicom's array decoded with
``raw=True`` (``ds.pixel_array`` would convert YBR to RGB, which a native frame does not).
Bits above Bits Stored are compared as pydicom gives them: masked (and sign-extended),
while kho sends the received words unchanged.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import pixel_array
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)

from kho.archive.archive import Archive
from kho.archive.config import Settings
from kho.archive.ingest.pipeline import IngestResult
from kho.errors import KhoError
from kho.viewer_api.app import create_app
from tests.conftest import pydicom_test_files, sample_files
from tests.helpers.part10 import part10_bytes

OCTET_STREAM = "application/octet-stream"

#: transfer syntaxes whose decoding is not defined to the bit (lossy): kho must answer 200
#: with a frame of the right length, but decoders may differ in the last bits
LOSSY_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.4.50",  # JPEG baseline
        "1.2.840.10008.1.2.4.51",  # JPEG extended
        "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000 (lossy allowed)
        "1.2.840.10008.1.2.4.203",  # HTJ2K (lossy allowed)
    }
)

#: files with pixel data that pydicom itself cannot decode here, and why: nothing to compare
#: kho's frame with (kho decodes what it does not implement through pydicom as well, so
#: it answers 406 for these, never 500)
PYDICOM_CANNOT_DECODE = {
    "JPEG-lossy.dcm": "12-bit JPEG extended: no installed plugin decodes it",
    "JPEG2000-embedded-sequence-delimiter.dcm": "a J2K codestream pydicom's plugins reject",
    "emri_small_jpeg_2k_lossless_too_short.dcm": "no final sequence delimiter: pydicom finds "
    "no pixel data (kho keeps the fragments, whole)",
    "liver_deflate.dcm": "Deflated Image Frame Compression: no pydicom decoder",
    "liver_nonbyte_aligned_deflate.dcm": "Deflated Image Frame Compression: no pydicom decoder",
    "liver_rle.dcm": "1-bit RLE: pydicom's RLE decoders refuse 1-bit segments",
    "liver_nonbyte_aligned_rle.dcm": "1-bit RLE: pydicom's RLE decoders refuse 1-bit segments",
    "badVR.dcm": "a malformed IS value in the header stops pydicom's pixel reader",
}


def _all_files() -> list[Path]:
    """Every sample and pydicom test file, each content once (the samples repeat some of
    pydicom's files byte for byte)."""
    unique: dict[str, Path] = {}
    for path in sample_files() + pydicom_test_files():
        unique.setdefault(hashlib.sha256(path.read_bytes()).hexdigest(), path)
    return list(unique.values())


def _file_id(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


FILES = _all_files()


def read_sent(path: Path) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, force=True)
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        # a bare dataset (no File Meta): decoded in the encoding pydicom read it with
        implicit, little = ds.original_encoding
        if implicit:
            syntax = ImplicitVRLittleEndian
        else:
            syntax = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        ds.file_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = syntax
    return ds


def has_pixel_data(ds: Dataset) -> bool:
    return any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))


def pydicom_frame(ds: Dataset, index: int = 0) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pixel_array(ds, index=index, raw=True)


def kho_as_array(data: bytes, ds: Dataset, expected: np.ndarray) -> np.ndarray:
    """kho's native frame read as PS3.5 lays it out, in pydicom's array layout."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    spp = int(ds.get("SamplesPerPixel", 1))
    syntax = ds.file_meta.TransferSyntaxUID
    if int(ds.BitsAllocated) == 1:  # packed, first pixel in the lowest bit
        assert len(data) == (rows * cols + 7) // 8
        bits = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")
        return bits[: rows * cols].reshape(rows, cols)
    if ds.PhotometricInterpretation == "YBR_FULL_422" and not syntax.is_compressed:
        # native 4:2:2 (PS3.3 C.7.6.3.1.2): Y1 Y2 Cb Cr per pair of pixels, as received
        assert len(data) == rows * cols * 2
        quads = np.frombuffer(data, np.uint8).reshape(-1, 4)
        out = np.empty((rows * cols // 2, 2, 3), np.uint8)
        out[:, :, 0] = quads[:, :2]
        out[:, :, 1] = quads[:, 2:3]
        out[:, :, 2] = quads[:, 3:4]
        return out.reshape(rows, cols, 3)
    assert len(data) == expected.nbytes, (len(data), expected.nbytes)
    got = np.frombuffer(data, dtype=expected.dtype.newbyteorder("<"))
    if spp > 1 and ds.get("PlanarConfiguration", 0) == 1:
        return got.reshape(spp, rows, cols).transpose(1, 2, 0)
    return got.reshape(expected.shape)


def in_bits_stored(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Integer samples reduced to their Bits Stored bits (sign-extended when signed)."""
    if arr.dtype.kind not in "iu":
        return arr
    bits_stored = int(ds.get("BitsStored", arr.dtype.itemsize * 8) or arr.dtype.itemsize * 8)
    if bits_stored >= arr.dtype.itemsize * 8:
        return arr.astype(np.int64)
    values = arr.astype(np.int64) & ((1 << bits_stored) - 1)
    if arr.dtype.kind == "i":
        sign = 1 << (bits_stored - 1)
        values = np.where(values & sign, values - (1 << bits_stored), values)
    return values


def frame_path(result: IngestResult, number: int = 1) -> str:
    return (
        f"/dicom-web/studies/{result.study_uid}/series/{result.series_uid}"
        f"/instances/{result.sop_uid}/frames/{number}"
    )


def check_decoded_frame(client: TestClient, path: Path, result: IngestResult) -> str:
    """Frame 1 as kho decodes it against pydicom's decoding of the file sent; returns what
    was checked ("equal", "length", "no pixels", "pydicom cannot decode")."""
    ds = read_sent(path)
    response = client.get(frame_path(result), headers={"Accept": OCTET_STREAM})
    if path.name in PYDICOM_CANNOT_DECODE:
        assert response.status_code in (200, 406), response.text
        return "pydicom cannot decode"
    if not has_pixel_data(ds):
        assert response.status_code == 404, response.text
        return "no pixels"
    expected = pydicom_frame(ds)  # a new failure here: list the file (and why) above
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(OCTET_STREAM)
    got = kho_as_array(response.content, ds, expected)
    assert got.shape == expected.shape
    if ds.file_meta.TransferSyntaxUID in LOSSY_SYNTAXES:
        return "length"
    np.testing.assert_array_equal(in_bits_stored(got, ds), in_bits_stored(expected, ds))
    return "equal"


def archive_with(tmp_path: Path, **settings: object) -> Archive:
    return Archive(
        Settings(data_dir=tmp_path / "data", fsync=False, dicom_port=0, http_port=0, **settings)
    )


@pytest.fixture(scope="module")
def finished_inline(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Archive, TestClient]]:
    """The finisher's work done before the acknowledgement (JPEG-LS at rest at once)."""
    archive = archive_with(tmp_path_factory.mktemp("inline"), finish_in_background=False)
    with archive, TestClient(create_app(archive)) as client:
        yield archive, client


@pytest.fixture(scope="module")
def finished_later(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Archive, TestClient]]:
    """finish_in_background: the test drains the finisher by hand."""
    archive = archive_with(tmp_path_factory.mktemp("background"), finish_in_background=True)
    archive.finisher.stop()
    with archive, TestClient(create_app(archive)) as client:
        yield archive, client


#: files ingest refuses (tests/archive covers why), so there is no frame to read
REFUSED_AT_INGEST = {
    "MR_truncated.dcm": "the pixel value runs past the end of the file",
    "rtplan_truncated.dcm": "an element runs past the end of the file",
    "no_meta.dcm": "not a DICOM dataset at all",
    "empty_charset_LEI.dcm": "no SOP Class UID",
    "meta_missing_tsyntax.dcm": "no SOP Class UID",
    "nested_priv_SQ.dcm": "no SOP Class UID",
}


def ingest(archive: Archive, path: Path, *, defer: bool | None = None) -> IngestResult:
    """The file ingested (each test ingests its own file, then reads it back: files that
    share a SOP Instance UID replace one another); skipped for the files listed refused."""
    try:
        return archive.ingest_part10(path.read_bytes(), lenient_identity=True, defer=defer)
    except KhoError as exc:
        if path.name in REFUSED_AT_INGEST:
            pytest.skip(f"refused at ingest: {REFUSED_AT_INGEST[path.name]} ({exc})")
        raise


@pytest.mark.parametrize("path", FILES, ids=_file_id)
def test_frame_one_equals_pydicom(finished_inline: tuple[Archive, TestClient], path: Path) -> None:
    archive, client = finished_inline
    result = ingest(archive, path)
    check_decoded_frame(client, path, result)


@pytest.mark.parametrize("path", FILES, ids=_file_id)
def test_frame_one_equals_pydicom_before_and_after_the_finisher(
    finished_later: tuple[Archive, TestClient], path: Path
) -> None:
    archive, client = finished_later
    result = ingest(archive, path, defer=True)
    record = archive.catalog.get_instance(result.sop_uid)
    assert record is not None
    received = check_decoded_frame(client, path, result)
    if record.pixel_format != "none":
        assert record.stored_as_received
    archive.finisher.drain()
    record = archive.catalog.get_instance(result.sop_uid)
    assert record is not None and not record.stored_as_received
    assert check_decoded_frame(client, path, result) == received


# --- the two bugs of issue 13 -------------------------------------------------------------


def test_big_endian_rgb_of_odd_size(finished_inline: tuple[Archive, TestClient]) -> None:
    """8-bit pixel data of VR OW in Explicit VR Big Endian is byte-swapped in 16-bit words;
    an odd-sized value ends in a pad byte that sits before the last pixel."""
    archive, client = finished_inline
    path = Path(get_testdata_file("SC_rgb_small_odd_big_endian.dcm"))
    result = ingest(archive, path)
    response = client.get(frame_path(result), headers={"Accept": OCTET_STREAM})
    assert response.status_code == 200
    expected = read_sent(path).pixel_array
    assert response.content == expected.tobytes()  # 3x3 RGB, colour by pixel
    # the same bytes when the stored syntax (native little endian for raw) is asked
    stored = client.get(
        frame_path(result), headers={"Accept": f"{OCTET_STREAM}; transfer-syntax=*"}
    )
    assert stored.status_code == 200 and stored.content == expected.tobytes()


def big_endian_ow_frames(frames: np.ndarray) -> bytes:
    """A Part 10 RGB image of 8-bit frames in Explicit VR Big Endian, Pixel Data OW."""
    count, rows, cols, _samples = frames.shape
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7.3"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "OT"
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, count
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    value = frames.tobytes() + b"\x00" * (frames.nbytes % 2)
    ds.PixelData = np.frombuffer(value, "<u2").byteswap().tobytes()  # words, big endian
    ds["PixelData"].VR = "OW"
    return part10_bytes(ds, implicit_vr=False, little_endian=False)


@pytest.mark.parametrize("finish", [False, True], ids=["as-received", "finished"])
def test_big_endian_ow_frames_that_start_inside_a_word(
    finished_later: tuple[Archive, TestClient], tmp_path: Path, finish: bool
) -> None:
    """Frames of 27 bytes: frame 2 starts in the middle of a word, frame 3 ends before the
    pad byte; each comes back in pixel order, and the at-rest codec keeps such data raw
    (it would encode the swapped bytes, not the image)."""
    archive, client = finished_later
    frames = np.random.default_rng(7).integers(0, 256, (3, 3, 3, 3), dtype=np.uint8)
    path = tmp_path / "be_ow.dcm"
    path.write_bytes(big_endian_ow_frames(frames))
    result = ingest(archive, path, defer=True)
    if finish:
        archive.finisher.drain()
    record = archive.catalog.get_instance(result.sop_uid)
    assert record is not None and record.pixel_format == "raw"
    assert record.stored_as_received is not finish
    ds = read_sent(path)
    for number in (1, 2, 3):
        response = client.get(frame_path(result, number), headers={"Accept": OCTET_STREAM})
        assert response.status_code == 200
        assert response.content == frames[number - 1].tobytes()
        assert response.content == pydicom_frame(ds, number - 1).tobytes()
    assert archive.read_instance(result.sop_uid)[1] == path.read_bytes()  # as received


@pytest.mark.parametrize("defer", [False, True], ids=["inline", "background"])
def test_deflated_dataset_frames(tmp_path: Path, defer: bool) -> None:
    """A Deflated Explicit VR Little Endian instance is kept whole (its dataset is not
    walked); its frames are decoded from the inflated instance, not answered 404."""
    path = Path(get_testdata_file("image_dfl.dcm"))
    expected = read_sent(path).pixel_array
    with (
        archive_with(tmp_path, finish_in_background=defer) as archive,
        TestClient(create_app(archive)) as client,
    ):
        archive.finisher.stop()
        result = ingest(archive, path, defer=defer)
        archive.finisher.drain()
        response = client.get(frame_path(result), headers={"Accept": OCTET_STREAM})
        assert response.status_code == 200, response.text
        assert response.content == expected.tobytes()
        stored = client.get(frame_path(result), headers={"Accept": "multipart/related; type=*/*"})
        assert stored.status_code == 200
        assert expected.tobytes() in stored.content  # the one part: native little endian
        assert (
            client.get(frame_path(result, 2), headers={"Accept": OCTET_STREAM}).status_code == 404
        )
        instance = frame_path(result).rsplit("/frames/", 1)[0]
        rendered = client.get(instance + "/rendered")
        assert rendered.status_code == 200 and rendered.content[:2] == b"\xff\xd8"
        assert archive.read_instance(result.sop_uid)[1] == path.read_bytes()


def test_an_undecodable_frame_is_406_not_500(finished_inline: tuple[Archive, TestClient]) -> None:
    """A JPEG baseline instance whose fragment is no JPEG stream: stored as received, its
    decoded frame is refused with 406 (nothing can decode it), never a server error."""
    archive, client = finished_inline
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = (generate_uid() for _ in "123")
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([b"\xff\xd8 not a JPEG stream \xff\xd9"])
    ds["PixelData"].VR = "OB"
    result = archive.ingest_part10(part10_bytes(ds, implicit_vr=False, little_endian=True))
    response = client.get(frame_path(result), headers={"Accept": OCTET_STREAM})
    assert response.status_code == 406
    stored = client.get(frame_path(result), headers={"Accept": "image/jpeg"})
    assert stored.status_code == 200 and stored.content.startswith(b"\xff\xd8")
