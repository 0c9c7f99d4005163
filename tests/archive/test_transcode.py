"""The retrieval rule and the transcoder (kho.archive.read.transcode) on a real archive: the
order of the rule, the encoder registry, every syntax kho can produce decoded back by
pydicom to the original's pixels (and overlays, palettes), the re-wrapped at-rest JPEG-LS
header, and what happens to pixels JPEG-family streams cannot hold."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import imagecodecs
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from kho.archive.archive import Archive
from kho.archive.catalog import InstanceRecord
from kho.archive.config import Settings
from kho.archive.read import transcode
from kho.archive.read.pixels import stored_frame
from kho.errors import CodecError, CodecUnavailableError
from tests.conftest import SAMPLES_DIR
from tests.helpers.part10 import part10_bytes

EVRLE = "1.2.840.10008.1.2.1"
IVRLE = "1.2.840.10008.1.2"
EVRBE = "1.2.840.10008.1.2.2"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_SV1 = "1.2.840.10008.1.2.4.70"
JLS = "1.2.840.10008.1.2.4.80"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
RLE = "1.2.840.10008.1.2.5"

SAMPLES = (
    "693_UNCR.dcm",  # native CT, signed 14 bit (JPEG-LS at rest)
    "color-pl.dcm",  # native RGB, colour by plane (JPEG-LS at rest)
    "OBXXXX1A_expb.dcm",  # big endian palette colour, OW lookup tables
    "MR-SIEMENS-DICOM-WithOverlays.dcm",  # overlay data (OW)
    "liver.dcm",  # 1-bit segmentation, 3 frames
    "parametric_map_float.dcm",  # float pixel data
    "emri_small_jpeg_2k_lossless.dcm",  # received JPEG 2000, 10 frames
    "SC_rgb_jpeg_dcmtk.dcm",  # received JPEG baseline (pydicom's)
    "rtplan.dcm",  # no pixel data (pydicom's)
)


def _path(name: str) -> Path:
    path = SAMPLES_DIR / name
    return path if path.exists() else Path(pydicom.data.get_testdata_file(name))  # type: ignore[arg-type]


def _read(data: bytes | Path) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(data if isinstance(data, Path) else BytesIO(data), force=True)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("transcode") / "data",
        fsync=False,
        dicom_port=0,
        http_port=0,
        finish_in_background=False,  # native pixels as JPEG-LS at rest at once
    )
    with Archive(settings) as arc:
        arc.derivers = []
        yield arc


@pytest.fixture(scope="module")
def records(archive: Archive) -> dict[str, InstanceRecord]:
    out = {}
    for name in SAMPLES:
        result = archive.ingest_part10(_path(name).read_bytes(), lenient_identity=True)
        out[name] = archive.catalog.require_instance(result.sop_uid)
    return out


def test_the_registry_has_a_lossless_encoder_for_every_syntax_it_names() -> None:
    available = transcode.available_encoders()
    assert set(transcode.PROPOSAL_ORDER) <= set(available)
    assert all(available[uid] for uid in transcode.PROPOSAL_ORDER), available
    assert transcode.encoder_for(JPEG_BASELINE) is None  # lossy: never produced
    assert transcode.encoder_for("1.2.840.10008.1.2.4.201") is None  # HTJ2K: no encoder here


def test_the_rule_in_order(records: dict[str, InstanceRecord]) -> None:
    ct = records["693_UNCR.dcm"]
    j2k = records["emri_small_jpeg_2k_lossless.dcm"]
    baseline = records["SC_rgb_jpeg_dcmtk.dcm"]
    assert ct.pixel_format == "jpeg-ls"
    # 1. as received, wherever the peer lists it
    assert transcode.choose_syntax(ct, [RLE, EVRLE]) == EVRLE
    # 2. the at-rest JPEG-LS frames re-wrapped, before any transcode
    assert transcode.choose_syntax(ct, [RLE, JLS]) == JLS
    # 3. else the peer's order among what can be produced
    assert transcode.choose_syntax(j2k, [RLE, JLS]) == RLE
    assert transcode.syntax_candidates(j2k, [JPEG_BASELINE, JLS, EVRLE]) == [JLS, EVRLE]
    # nothing lossy is produced: a lossless original in JPEG baseline cannot be sent
    assert transcode.choose_syntax(j2k, [JPEG_BASELINE]) is None
    assert transcode.choose_syntax(baseline, [JPEG_BASELINE]) == JPEG_BASELINE
    # 1-bit and float pixels: native syntaxes only
    assert transcode.choose_syntax(records["liver.dcm"], [JLS, J2K_LOSSLESS, RLE]) is None
    assert transcode.producible_syntaxes(records["parametric_map_float.dcm"]) == [
        EVRLE,
        IVRLE,
        "1.2.840.10008.1.2.1.99",
        EVRBE,
    ]


def _pixels(ds: Dataset) -> np.ndarray | None:
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ds.pixel_array


def _cases() -> list[tuple[str, str]]:
    return [(name, syntax) for name in SAMPLES for syntax in transcode.PROPOSAL_ORDER]


@pytest.mark.parametrize(("name", "syntax"), _cases())
def test_every_producible_syntax_decodes_to_the_original(
    archive: Archive, records: dict[str, InstanceRecord], name: str, syntax: str
) -> None:
    record = records[name]
    if not transcode.can_produce(record, syntax):
        # 1-bit and float pixels: no frame encoder takes them; refused, never mangled
        assert name in ("liver.dcm", "parametric_map_float.dcm"), (name, syntax)
        with pytest.raises(CodecUnavailableError):
            transcode.encode_instance(archive, record, syntax)
        return
    data = transcode.encode_part10(archive, record, syntax)
    got = _read(data)
    original = _read(_path(name))
    assert got.file_meta.TransferSyntaxUID == syntax
    assert got.SOPInstanceUID == record.sop_uid
    expected = _pixels(original)
    if expected is not None:
        np.testing.assert_array_equal(_pixels(got), expected)
    if name == "MR-SIEMENS-DICOM-WithOverlays.dcm" and syntax == EVRBE:
        # OW overlay bits go in 16-bit words, byte-swapped in big endian (PS3.5 7.3);
        # pydicom's overlay_array reads bytes whatever the byte order, so compare words
        words = np.frombuffer(got[0x60003000].value, ">u2")
        np.testing.assert_array_equal(words, np.frombuffer(original[0x60003000].value, "<u2"))
    elif name == "MR-SIEMENS-DICOM-WithOverlays.dcm":
        np.testing.assert_array_equal(got.overlay_array(0x6000), original.overlay_array(0x6000))
    if name == "OBXXXX1A_expb.dcm":  # OW palette tables, read big endian, written as asked
        for colour in ("Red", "Green", "Blue"):
            keyword = f"{colour}PaletteColorLookupTableData"
            word = ">u2" if original.file_meta.TransferSyntaxUID == EVRBE else "<u2"
            got_word = ">u2" if syntax == EVRBE else "<u2"
            np.testing.assert_array_equal(
                np.frombuffer(got[keyword].value, got_word),
                np.frombuffer(original[keyword].value, word),
            )
    if name == "rtplan.dcm":  # no pixels: the same elements, whatever the label
        assert got.BeamSequence[0].BeamName == original.BeamSequence[0].BeamName
    if name == "SC_rgb_jpeg_dcmtk.dcm" and syntax != JPEG_BASELINE:
        assert got.LossyImageCompression == "01"  # decoded lossy pixels stay flagged


def test_rewrapped_at_rest_jpeg_ls_keeps_a_consistent_header(
    archive: Archive, records: dict[str, InstanceRecord]
) -> None:
    """Colour by plane received, colour by pixel in the at-rest stream: the re-wrapped
    header says Planar Configuration 0; each stream's P is Bits Stored; the streams are
    the stored ones, unchanged."""
    for name in ("color-pl.dcm", "693_UNCR.dcm"):
        record = records[name]
        assert record.pixel_format == "jpeg-ls"
        got = _read(transcode.encode_part10(archive, record, JLS))
        frames = list(generate_frames(got.PixelData, number_of_frames=record.number_of_frames))
        for number, fragment in enumerate(frames, 1):
            stream = stored_frame(archive, record, number)[0]
            assert fragment[: len(stream)] == stream
            sof = fragment.index(b"\xff\xf7")
            assert fragment[sof + 4] == got.BitsStored  # P
            assert int.from_bytes(fragment[sof + 5 : sof + 7], "big") == got.Rows
        if got.SamplesPerPixel == 3:
            assert got.PlanarConfiguration == 0
        np.testing.assert_array_equal(got.pixel_array, _read(_path(name)).pixel_array)


def test_jpeg_lossless_is_selection_value_1_with_p_bits_stored(
    archive: Archive, records: dict[str, InstanceRecord]
) -> None:
    got = _read(transcode.encode_part10(archive, records["693_UNCR.dcm"], JPEG_SV1))
    (stream,) = generate_frames(got.PixelData, number_of_frames=1)
    sof = stream.index(b"\xff\xc3")  # SOF3: lossless, Huffman
    assert stream[sof + 4] == got.BitsStored == 14
    sos = stream.index(b"\xff\xda")
    assert stream[sos + 5 + 2 * stream[sos + 4]] == 1  # Ss = predictor 1


def _overflowing_instance() -> bytes:
    """12 bits stored, but the top bits of some pixels set (as some modalities write
    overlays): JPEG-family streams of 12 bits cannot hold it, RLE and native can."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID = "OVERFLOW"
    ds.Rows, ds.Columns = 40, 48
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    pixels = (np.arange(40 * 48, dtype=np.uint16) % 4096).reshape(40, 48)
    pixels[::7, ::5] |= 0xF000
    ds.PixelData = pixels.tobytes()
    return part10_bytes(ds)


def test_pixels_above_bits_stored_fall_back_to_a_syntax_that_holds_them(
    archive: Archive,
) -> None:
    data = _overflowing_instance()
    record = archive.catalog.require_instance(archive.ingest_part10(data).sop_uid)
    assert record.pixel_format == "raw"  # the at-rest codec kept it as received, too
    with pytest.raises(CodecError):
        transcode.encode_instance(archive, record, JLS)
    syntax, body = transcode.encode_for(archive, record, [JLS, JPEG_SV1, RLE])
    assert syntax == RLE  # the metadata allowed all three; only RLE holds every bit
    got = _read(transcode.encode_part10(archive, record, RLE))
    # every bit of every pixel, the ones above Bits Stored included
    raw = np.frombuffer(_read(data).PixelData, "<u2").reshape(40, 48)
    decoded = pydicom.pixels.pixel_array(got, raw=True, correct_unused_bits=False)
    np.testing.assert_array_equal(decoded, raw)
    assert body == transcode.encode_instance(archive, record, RLE)
    with pytest.raises(CodecUnavailableError, match="cannot be sent"):
        transcode.encode_for(archive, record, [JLS, JPEG_BASELINE])


def test_frame_rule(archive: Archive, records: dict[str, InstanceRecord]) -> None:
    j2k = records["emri_small_jpeg_2k_lossless.dcm"]
    assert transcode.stored_frame_syntax(j2k) == J2K_LOSSLESS
    assert transcode.frame_syntax_candidates(j2k, [JLS, J2K_LOSSLESS]) == [J2K_LOSSLESS, JLS]
    assert transcode.frame_syntax_candidates(j2k, [JPEG_BASELINE, RLE]) == [RLE]
    assert not transcode.can_produce_frame(records["liver.dcm"], JLS)  # 1 bit
    assert not transcode.can_produce_frame(records["rtplan.dcm"], EVRLE)  # no pixels
    # a frame encoded is the frame: JPEG-LS of frame 4, decoded by CharLS
    stream = transcode.encode_frame(archive, j2k, 4, JLS)
    ds = _read(_path("emri_small_jpeg_2k_lossless.dcm"))
    np.testing.assert_array_equal(imagecodecs.jpegls_decode(stream), ds.pixel_array[3])


def test_large_frames_stored_with_restart_intervals_go_without_them(archive: Archive) -> None:
    """A radiograph's at-rest frame holds restart intervals (decoded on every core here);
    a peer asking for JPEG-LS gets it re-encoded without them, which decoders older than
    CharLS 2.3 (dcmtk 3.6.7's) can read, and the same pixels."""
    rng = np.random.default_rng(12)
    pixels = (rng.normal(2000, 300, (1100, 1000)).clip(0, 4095)).astype(np.uint16)
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality = "RST-1", "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = pixels.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    result = archive.ingest_part10(part10_bytes(ds))
    record = archive.catalog.require_instance(result.sop_uid)
    stored = stored_frame(archive, record, 1)[0]
    assert record.pixel_format == "jpeg-ls" and transcode._has_restart_intervals(stored)
    got = _read(transcode.encode_part10(archive, record, JLS))
    (fragment,) = generate_frames(got.PixelData, number_of_frames=1)
    assert not transcode._has_restart_intervals(fragment)
    np.testing.assert_array_equal(imagecodecs.jpegls_decode(fragment), pixels)
    np.testing.assert_array_equal(got.pixel_array, pixels)
