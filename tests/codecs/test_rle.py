"""DICOM RLE Lossless: round trips, both ways against pydicom and pylibjpeg-rle, real
files, malformed streams."""

from __future__ import annotations

import glob
import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import generate_frames
from pydicom.pixels import pixel_array
from pydicom.pixels.decoders.rle import _rle_decode_frame
from pydicom.pixels.encoders import RLELosslessEncoder
from rle.utils import decode_pixel_data

from kho.codecs import get_codec, rle
from kho.errors import CodecError

SAMPLES = Path("/work/shared/dicom-samples")
RNG = np.random.default_rng(20261123)


def _geometry(image: np.ndarray) -> dict[str, int]:
    return {
        "rows": image.shape[0],
        "columns": image.shape[1],
        "samples_per_pixel": 1 if image.ndim == 2 else image.shape[2],
        "bits_allocated": image.dtype.itemsize * 8,
    }


def _planar_to_image(raw: bytes | bytearray, image_like: np.ndarray) -> np.ndarray:
    """pydicom / pylibjpeg-rle decode to colour-by-plane little-endian bytes."""
    g = _geometry(image_like)
    dtype = image_like.dtype.newbyteorder("<")
    planes = np.frombuffer(bytes(raw), dtype=dtype).reshape(
        g["samples_per_pixel"], g["rows"], g["columns"]
    )
    out = planes.transpose(1, 2, 0)
    return out[:, :, 0] if image_like.ndim == 2 else out


def _pydicom_decode(data: bytes, image_like: np.ndarray) -> np.ndarray:
    g = _geometry(image_like)
    raw = _rle_decode_frame(
        data, g["rows"], g["columns"], g["samples_per_pixel"], g["bits_allocated"]
    )
    return _planar_to_image(raw, image_like)


def _pylibjpeg_decode(data: bytes, image_like: np.ndarray) -> np.ndarray:
    raw = decode_pixel_data(data, version=2, **_geometry(image_like))
    return _planar_to_image(raw, image_like)


def _pydicom_encode(image: np.ndarray, plugin: str) -> bytes:
    g = _geometry(image)
    return RLELosslessEncoder.encode(
        image,
        encoding_plugin=plugin,
        bits_stored=g["bits_allocated"],
        pixel_representation=0,
        photometric_interpretation="RGB" if g["samples_per_pixel"] == 3 else "MONOCHROME2",
        number_of_frames=1,
        planar_configuration=0,
        **g,
    )


def _runs(length: int, dtype: type, samples: int = 1) -> np.ndarray:
    """One row made of runs of exactly 1, 2, 127, 128, 129, 130, 255, 256, 257 values."""
    row: list[int] = []
    for i, run in enumerate([1, 2, 127, 128, 129, 130, 255, 256, 257, 3]):
        row.extend([i * 37 % 251] * run)
    arr = np.array(row[:length], dtype=dtype)
    if samples > 1:
        arr = np.stack([arr, arr[::-1], (arr + 1).astype(dtype)], axis=-1)
    return arr.reshape(1, length, *([samples] if samples > 1 else []))


def _cases() -> dict[str, np.ndarray]:
    cases = {
        "flat-u8": np.full((33, 47), 200, np.uint8),
        "flat-u16": np.full((16, 300), 0x1234, np.uint16),
        "zero-1x1": np.zeros((1, 1), np.uint8),
        "noise-u8": RNG.integers(0, 256, (37, 53), dtype=np.uint8),
        "noise-u16": RNG.integers(0, 65536, (29, 31), dtype=np.uint16),
        "noise-u32": RNG.integers(0, 2**32, (11, 13), dtype=np.uint32),
        "12bit-u16": RNG.integers(0, 4096, (64, 64), dtype=np.uint16),
        "1xN": RNG.integers(0, 4, (1, 1000), dtype=np.uint8),
        "Nx1": RNG.integers(0, 4, (1000, 1), dtype=np.uint16),
        "rgb-u8": RNG.integers(0, 256, (21, 17, 3), dtype=np.uint8),
        "rgb-u16": RNG.integers(0, 3, (21, 17, 3), dtype=np.uint16) * 1000,
        "rgb-u32": RNG.integers(0, 2**32, (5, 9, 3), dtype=np.uint32),
        "runs-u8": _runs(1288, np.uint8),
        "runs-u16": _runs(1288, np.uint16),
        "runs-rgb": _runs(1288, np.uint8, samples=3),
        "runs-129": np.tile(np.array([5] * 129 + [6] * 130 + [7] * 128, np.uint8), (3, 1)),
        "alternating": np.tile(np.array([0, 1], np.uint8), (4, 400)),
    }
    smooth = np.cumsum(RNG.integers(-2, 3, (90, 70)), axis=1) + 2000
    cases["smooth-u16"] = smooth.astype(np.uint16)
    return cases


CASES = _cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_round_trip_and_reference_decoders(name: str) -> None:
    image = CASES[name]
    stream = rle.encode(image)
    assert len(stream) % 2 == 0
    count, *offsets = struct.unpack_from("<16I", stream)
    samples = 1 if image.ndim == 2 else image.shape[2]
    assert count == samples * image.dtype.itemsize
    assert offsets[0] == 64 and all(o % 2 == 0 for o in offsets[:count])
    assert all(o == 0 for o in offsets[count:])
    decoded = rle.decode(stream, **_geometry(image))
    assert decoded.dtype == image.dtype and decoded.shape == image.shape
    np.testing.assert_array_equal(decoded, image)
    np.testing.assert_array_equal(_pydicom_decode(stream, image), image)
    np.testing.assert_array_equal(_pylibjpeg_decode(stream, image), image)


@pytest.mark.parametrize("plugin", ["pydicom", "pylibjpeg"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_decodes_reference_encoders(name: str, plugin: str) -> None:
    image = CASES[name]
    if image.dtype == np.uint32:
        pytest.skip("pydicom's RLE encoder refuses 32 bits (real 32-bit RLE files are tested)")
    stream = _pydicom_encode(image, plugin)
    np.testing.assert_array_equal(rle.decode(stream, **_geometry(image)), image)


def test_one_sample_3d_input_decodes_2d() -> None:
    image = RNG.integers(0, 256, (10, 12, 1), dtype=np.uint8)
    stream = rle.encode(image)
    assert stream == rle.encode(image[:, :, 0])
    decoded = rle.decode(stream, rows=10, columns=12, samples_per_pixel=1, bits_allocated=8)
    np.testing.assert_array_equal(decoded, image[:, :, 0])


def test_runs_encode_compactly() -> None:
    """A flat row of 1000 bytes takes 8 replicate runs (7 x 128 + 104): 16 bytes."""
    stream = rle.encode(np.full((1, 1000), 9, np.uint8))
    assert len(stream) == 64 + 16
    literal = rle.encode(np.arange(256, dtype=np.uint8).reshape(1, 256))
    assert len(literal) == 64 + 2 * (1 + 128)  # two literal runs of 128


def test_runs_do_not_cross_rows() -> None:
    """PS3.5 G.3.1: each row is encoded separately."""
    image = np.full((2, 3), 4, np.uint8)
    stream = rle.encode(image)
    assert stream[64:] == bytes([254, 4, 254, 4])


def test_signed_data_masked_by_caller() -> None:
    signed = RNG.integers(-2048, 2048, (20, 20)).astype(np.int16)
    image = signed.view(np.uint16) & 0x0FFF
    stream = rle.encode(image, bits_stored=12)
    np.testing.assert_array_equal(rle.decode(stream, **_geometry(image)), image)


def _rle_files() -> list[str]:
    found = set(glob.glob(str(SAMPLES / "*[rR][lL][eE]*.dcm")))
    found.update(f for f in pydicom.data.get_testdata_files() if "rle" in Path(f).name.lower())
    by_name = {Path(f).name: f for f in sorted(found)}
    return sorted(by_name.values())


RLE_FILES = _rle_files()


def test_there_are_rle_samples() -> None:
    assert len(RLE_FILES) >= 10


BYTE_FILES = [f for f in RLE_FILES if pydicom.dcmread(f, stop_before_pixels=True).BitsAllocated > 1]
BIT_FILES = [f for f in RLE_FILES if f not in BYTE_FILES]


@pytest.mark.parametrize("path", BIT_FILES, ids=[Path(f).name for f in BIT_FILES])
def test_one_bit_files_match_their_native_twin(path: str) -> None:
    """dcmtk's 1-bit RLE segmentations (pydicom cannot decode these) against the same
    frames stored natively (liver_rle.dcm vs liver.dcm)."""
    ds = pydicom.dcmread(path)
    native = pydicom.dcmread(path.replace("_rle", "")).pixel_array
    frames = int(ds.NumberOfFrames)
    for index, fragment in enumerate(generate_frames(ds.PixelData, number_of_frames=frames)):
        decoded = rle.decode(
            fragment, rows=ds.Rows, columns=ds.Columns, samples_per_pixel=1, bits_allocated=1
        )
        np.testing.assert_array_equal(decoded, native[index])


@pytest.mark.parametrize("path", BYTE_FILES, ids=[Path(f).name for f in BYTE_FILES])
def test_real_files_match_pydicom_and_reencode(path: str) -> None:
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == rle.TRANSFER_SYNTAX
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    geometry = {
        "rows": ds.Rows,
        "columns": ds.Columns,
        "samples_per_pixel": ds.SamplesPerPixel,
        "bits_allocated": ds.BitsAllocated,
    }
    reference = pixel_array(path, raw=True)
    if frames == 1:
        reference = reference[np.newaxis]
    mask = (1 << ds.BitsStored) - 1
    codec = get_codec(rle.TRANSFER_SYNTAX)
    for index, fragment in enumerate(generate_frames(ds.PixelData, number_of_frames=frames)):
        decoded = codec.decode(fragment, **geometry)
        expected = reference[index]
        assert decoded.shape == expected.shape
        unsigned = expected.view(decoded.dtype) if expected.dtype != decoded.dtype else expected
        # pydicom sign-extends/masks to Bits Stored: compare those bits, and all bits with
        # pydicom's own plain RLE decoder
        np.testing.assert_array_equal(decoded & mask, unsigned & mask)
        np.testing.assert_array_equal(decoded, _pydicom_decode(fragment, decoded))
        again = codec.encode(decoded)
        np.testing.assert_array_equal(_pydicom_decode(again, decoded), decoded)
        np.testing.assert_array_equal(_pylibjpeg_decode(again, decoded), decoded)


# --- malformed input -----------------------------------------------------------------


IMAGE = RNG.integers(0, 3, (12, 40), dtype=np.uint16) * 300
STREAM = rle.encode(IMAGE)
GEOMETRY = _geometry(IMAGE)


def _with_header(count: int, offsets: list[int], body: bytes) -> bytes:
    return struct.pack("<16I", count, *(offsets + [0] * (15 - len(offsets)))) + body


def _segments(stream: bytes) -> list[bytes]:
    count, *offsets = struct.unpack_from("<16I", stream)
    bounds = [*offsets[:count], len(stream)]
    return [stream[bounds[i] : bounds[i + 1]] for i in range(count)]


def test_malformed_headers() -> None:
    first, second = _segments(STREAM)
    body = first + second
    good = _with_header(2, [64, 64 + len(first)], body)
    assert rle.decode(good, **GEOMETRY).tolist() == IMAGE.tolist()
    bad = {
        "too few segments": _with_header(1, [64], body),
        "too many segments": _with_header(3, [64, 64 + len(first), 64 + len(first)], body),
        "first offset not 64": _with_header(2, [66, 64 + len(first)], body),
        "decreasing offsets": _with_header(2, [64 + len(first), 64], body),
        "equal offsets": _with_header(2, [64, 64], body),
        "offset past the end": _with_header(2, [64, 64 + len(body) + 2], body),
        "header only": _with_header(2, [64, 66], b""),
        "short header": STREAM[:40],
        "empty": b"",
    }
    for what, data in bad.items():
        with pytest.raises(CodecError):
            rle.decode(data, **GEOMETRY)
            pytest.fail(what)


def test_segments_of_the_wrong_length() -> None:
    one = {"rows": 2, "columns": 4, "samples_per_pixel": 1, "bits_allocated": 8}
    ok = _with_header(1, [64], bytes([253, 1, 253, 2]))  # 2 runs of 4
    assert rle.decode(ok, **one).tolist() == [[1, 1, 1, 1], [2, 2, 2, 2]]
    noop = _with_header(1, [64], bytes([128, 253, 1, 128, 253, 2, 128, 128]))
    assert rle.decode(noop, **one).tolist() == [[1, 1, 1, 1], [2, 2, 2, 2]]
    padded = _with_header(1, [64], bytes([6, 1, 2, 3, 4, 5, 6, 7, 0, 9, 0]))
    assert rle.decode(padded, **one).ravel().tolist() == [1, 2, 3, 4, 5, 6, 7, 9]
    for body in (
        bytes([253, 1]),  # 4 bytes of 8
        bytes([253, 1, 252, 2]),  # 9 bytes of 8: run overshoots
        bytes([253, 1, 4, 1, 2, 3, 4, 5, 6]),  # literal overshoots
        bytes([253, 1, 253, 2, 253, 3]),  # data after the last pixel
        bytes([253, 1, 5, 1, 2]),  # literal cut short
        bytes([253, 1, 253]),  # replicate run without its value
        bytes([128] * 10),  # nothing but no-ops
    ):
        with pytest.raises(CodecError):
            rle.decode(_with_header(1, [64], body), **one)


def test_absurd_geometry_is_refused_before_allocating() -> None:
    with pytest.raises(CodecError, match="too short"):
        rle.decode(STREAM, rows=60000, columns=60000, samples_per_pixel=1, bits_allocated=16)
    for bad in (
        {"rows": 0},
        {"bits_allocated": 12},
        {"samples_per_pixel": 2},
        {"samples_per_pixel": 3},
        {"bits_allocated": 8},
    ):
        with pytest.raises(CodecError):
            rle.decode(STREAM, **{**GEOMETRY, **bad})


def test_codec_needs_geometry() -> None:
    codec = get_codec(rle.TRANSFER_SYNTAX)
    with pytest.raises(CodecError):
        codec.decode(STREAM)


def test_encode_refuses() -> None:
    for bad in (
        np.zeros((4, 4), np.int16),
        np.zeros((4, 4), np.float32),
        np.zeros((4, 4, 2), np.uint8),
        np.zeros((4, 4, 4), np.uint8),
        np.zeros((0, 4), np.uint8),
        np.zeros((4,), np.uint8),
    ):
        with pytest.raises(CodecError):
            rle.encode(bad)
    with pytest.raises(CodecError):
        rle.encode(np.full((2, 2), 4096, np.uint16), bits_stored=12)
    with pytest.raises(CodecError):
        rle.encode(np.zeros((2, 2), np.uint8), bits_stored=9)
    with pytest.raises(CodecError):
        rle.encode([[1, 2]])  # type: ignore[arg-type]


def test_non_contiguous_and_big_endian_input() -> None:
    base = RNG.integers(0, 65536, (20, 30), dtype=np.uint16)
    view = base[::2, ::3]
    np.testing.assert_array_equal(rle.decode(rle.encode(view), **_geometry(view)), view)
    big = base.astype(">u2")
    decoded = rle.decode(rle.encode(big), **_geometry(base))
    np.testing.assert_array_equal(decoded, base)
    assert rle.encode(big) == rle.encode(base)


def test_accepts_bytes_like() -> None:
    for data in (STREAM, bytearray(STREAM), memoryview(STREAM)):
        np.testing.assert_array_equal(rle.decode(data, **GEOMETRY), IMAGE)
