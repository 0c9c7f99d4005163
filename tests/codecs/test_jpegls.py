"""JPEG-LS lossless: standard streams both ways against CharLS (imagecodecs) and pydicom's
decoders, on real files and synthetic edge cases."""

from __future__ import annotations

import struct

import imagecodecs
import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.encaps import generate_frames

from kho.bench.phantom import ct_slice_hu
from kho.codecs import get_codec, jpegls
from kho.errors import CodecError
from tests.conftest import sample_files

JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"


def _dtype(bits: int) -> type[np.unsignedinteger]:
    return np.uint8 if bits <= 8 else np.uint16


def _roundtrip_everywhere(image: np.ndarray, bits: int, interleave: str = "sample") -> bytes:
    stream = jpegls.encode(image, bits_stored=bits, interleave=interleave)
    assert np.array_equal(jpegls.decode(stream), image)
    charls = imagecodecs.jpegls_decode(stream)
    assert np.array_equal(charls.reshape(image.shape), image)  # CharLS reads kho's stream
    assert np.array_equal(jpegls.decode(imagecodecs.jpegls_encode(image)), image)  # and back
    return stream


def _scan_bytes(stream: bytes) -> bytes:
    start = stream.index(b"\xff\xda")
    (length,) = struct.unpack_from(">H", stream, start + 2)
    body = stream[start + 2 + length :]
    return body[: body.rindex(b"\xff\xd9")]


@pytest.mark.parametrize("bits", range(2, 17))
def test_every_bit_depth_on_structured_and_noisy_images(bits: int) -> None:
    rng = np.random.default_rng(bits)
    rows, cols = 37, 53
    ramp = np.add.outer(np.arange(rows), np.arange(cols)) * ((1 << bits) - 1) // (rows + cols)
    noise = rng.integers(0, 1 << bits, (rows, cols))
    image = np.where(rng.random((rows, cols)) < 0.2, noise, ramp).astype(_dtype(bits))
    _roundtrip_everywhere(image, bits)


@pytest.mark.parametrize(
    ("name", "image"),
    [
        ("flat", np.full((64, 64), 1234, np.uint16)),
        ("zeros-1x1", np.zeros((1, 1), np.uint16)),
        ("max-entropy", np.random.default_rng(1).integers(0, 65536, (64, 64), dtype=np.uint16)),
        ("1xN", np.random.default_rng(2).integers(0, 4096, (1, 300)).astype(np.uint16)),
        ("Nx1", np.random.default_rng(3).integers(0, 4096, (300, 1)).astype(np.uint16)),
        ("all-max", np.full((16, 16), 65535, np.uint16)),
        ("checker-8bit", (np.indices((31, 31)).sum(0) % 2 * 255).astype(np.uint8)),
    ],
)
def test_edge_cases(name: str, image: np.ndarray) -> None:
    bits = 8 if image.dtype == np.uint8 else 16
    _roundtrip_everywhere(image, bits)


def test_masked_signed_ct_values() -> None:
    hu = ct_slice_hu(40, 100, rows=128, cols=128)  # int16 with air at -1000
    image = (hu.astype(np.int32) & 0xFFFF).astype(np.uint16)  # two's complement bits
    _roundtrip_everywhere(image, 16)


@pytest.mark.parametrize("interleave", ["none", "line", "sample"])
@pytest.mark.parametrize("bits", [8, 12, 16])
def test_three_components_in_every_interleave_mode(interleave: str, bits: int) -> None:
    rng = np.random.default_rng(bits)
    base = np.add.outer(np.arange(40), np.arange(30)) * ((1 << bits) - 1) // 70
    image = np.stack([base, base[::-1], np.roll(base, 7, 1)], axis=-1)
    image = np.where(rng.random(image.shape) < 0.1, rng.integers(0, 1 << bits, image.shape), image)
    image[5:15, 5:25] = image[5, 5]  # runs across components
    _roundtrip_everywhere(image.astype(_dtype(bits)), bits, interleave)


def test_scan_bytes_equal_charls_with_the_same_parameters() -> None:
    """imagecodecs' CharLS binding writes P=16 for uint16 (plus SPIFF and LSE segments);
    at P=16 kho's entropy-coded scan is the same bytes."""
    ct = (ct_slice_hu(10, 100).astype(np.int32) + 1024).astype(np.uint16)
    for image, bits in ((ct, 16), ((ct >> 4).astype(np.uint8), 8)):
        ours = jpegls.encode(image, bits_stored=bits)
        theirs = imagecodecs.jpegls_encode(image)
        assert _scan_bytes(ours) == _scan_bytes(theirs)


def test_bits_stored_precision_compresses_better_than_16() -> None:
    ct = (ct_slice_hu(50, 100).astype(np.int32) + 1024).astype(np.uint16)
    at_12 = len(jpegls.encode(ct, bits_stored=12))
    at_16 = len(imagecodecs.jpegls_encode(ct))
    assert at_12 < at_16


def _jpeg_ls_samples() -> list:
    out = []
    for path in sample_files():
        ds = pydicom.dcmread(path, force=True)
        ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
        if ts == JPEG_LS_LOSSLESS:
            out.append(pytest.param(path, id=path.name))
    assert len(out) >= 5
    return out


@pytest.mark.parametrize("path", _jpeg_ls_samples())
def test_decodes_the_jpeg_ls_sample_files_like_pydicom(path) -> None:
    ds = pydicom.dcmread(path, force=True)
    frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1))))
    expected = ds.pixel_array
    if int(ds.get("NumberOfFrames", 1)) == 1:
        expected = expected[np.newaxis]
    for frame, reference in zip(frames, expected, strict=True):
        ours = jpegls.decode(frame)
        if int(ds.PixelRepresentation) == 1:  # pydicom sign-extends; compare the bits
            bits = int(ds.BitsStored)
            reference = reference.astype(np.int64) & ((1 << bits) - 1)
        assert np.array_equal(ours.astype(np.int64), reference.astype(np.int64))


def test_codec_class_is_registered_and_checks_geometry() -> None:
    codec = get_codec(JPEG_LS_LOSSLESS)
    image = np.arange(24, dtype=np.uint16).reshape(4, 6)
    stream = codec.encode(image, bits_stored=5)
    assert np.array_equal(codec.decode(stream, rows=4, columns=6, samples_per_pixel=1), image)
    with pytest.raises(CodecError):
        codec.decode(stream, rows=5)


@pytest.mark.parametrize(
    ("image", "bits"),
    [
        (np.zeros((4, 4), np.int16), 12),  # signed dtype
        (np.zeros((4, 4), np.float32), 12),
        (np.full((4, 4), 4096, np.uint16), 12),  # value above bits_stored
        (np.zeros((4, 4), np.uint16), 17),
        (np.zeros((2, 2, 2, 2), np.uint16), 12),
        (np.zeros((0, 4), np.uint16), 12),
    ],
)
def test_encoder_refuses_bad_input(image: np.ndarray, bits: int) -> None:
    with pytest.raises(CodecError):
        jpegls.encode(image, bits_stored=bits)


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(2, 16),
    rows=st.integers(1, 12),
    cols=st.integers(1, 12),
    comps=st.sampled_from([1, 3]),
    seed=st.integers(0, 2**32 - 1),
    runs=st.booleans(),
)
def test_random_images_roundtrip_with_charls(bits, rows, cols, comps, seed, runs) -> None:
    rng = np.random.default_rng(seed)
    shape = (rows, cols) if comps == 1 else (rows, cols, comps)
    image = rng.integers(0, 1 << bits, shape).astype(_dtype(bits))
    if runs:
        image[:, : cols // 2] = image[0, 0]
    for interleave in ["sample"] if comps == 1 else ["none", "line", "sample"]:
        _roundtrip_everywhere(image, bits, interleave)


def _with_restart_intervals(image: np.ndarray, bits: int, interval: int) -> bytes:
    """A stream with a restart interval: every band of ``interval`` lines is coded like an
    image of its own (fresh contexts, zero line above), bands joined by RST0..RST7."""
    bands = [
        _scan_bytes(jpegls.encode(image[y : y + interval], bits_stored=bits))
        for y in range(0, image.shape[0], interval)
    ]
    whole = jpegls.encode(image, bits_stored=bits)
    sos = whole.index(b"\xff\xda")
    dri = b"\xff\xdd\x00\x04" + struct.pack(">H", interval)
    data = b"".join(
        (b"\xff" + bytes([0xD0 + (i - 1) % 8]) if i else b"") + band for i, band in enumerate(bands)
    )
    sos_length = struct.unpack_from(">H", whole, sos + 2)[0]
    return whole[:sos] + dri + whole[sos : sos + 2 + sos_length] + data + b"\xff\xd9"


def test_restart_markers_are_decoded() -> None:
    image = (ct_slice_hu(30, 100, rows=75, cols=64).astype(np.int32) + 1024).astype(np.uint16)
    stream = _with_restart_intervals(image, 12, 7)  # 11 bands: RST0..RST7 wrap around
    assert stream.count(b"\xff\xd7") >= 1
    assert np.array_equal(jpegls.decode(stream), image)
    broken = stream.replace(b"\xff\xd3", b"\xff\xd4", 1)  # out-of-order marker
    with pytest.raises(CodecError):
        jpegls.decode(broken)


def test_app_and_com_segments_are_skipped() -> None:
    image = np.arange(120, dtype=np.uint8).reshape(10, 12)
    stream = jpegls.encode(image, bits_stored=8)
    extra = b"\xff\xe8\x00\x06SPIF" + b"\xff\xfe\x00\x05hi\x00"
    assert np.array_equal(jpegls.decode(stream[:2] + extra + stream[2:]), image)


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_long_lines_with_long_runs_and_escape_codes(bits: int) -> None:
    """Lines of 40000 samples: runs long enough for J = 15 and many run bits in a row, and
    noise bursts that need escape codes (the bit writer's and reader's refill edges)."""
    rng = np.random.default_rng(bits)
    image = np.full((3, 40000), (1 << bits) // 3, dtype=np.int64)
    image[1, 20000:20500] = rng.integers(0, 1 << bits, 500)
    image[2, ::997] = (1 << bits) - 1
    _roundtrip_everywhere(image.astype(_dtype(bits)), bits)


def test_one_compiled_specialisation_per_kernel() -> None:
    """8 and 16 bit, read-only input, colour in every interleave mode: all run the same
    compiled kernels.  numba compiles a function again for every new argument type (a
    literal constant argument is a type of its own), which once made a fresh-cache compile
    take minutes."""
    from numba.core.registry import CPUDispatcher

    from kho.codecs import _jpegls_kernels as kernels

    gray = np.arange(600, dtype=np.uint16).reshape(20, 30) % 4096
    read_only = np.frombuffer(gray.tobytes(), dtype=np.uint16).reshape(gray.shape)
    rgb = (np.arange(20 * 30 * 3).reshape(20, 30, 3) % 251).astype(np.uint8)
    for image, bits in ((gray, 12), (read_only, 12), (gray.astype(np.uint8), 8), (rgb, 8)):
        for interleave in ("none", "line", "sample"):
            stream = jpegls.encode(image, bits_stored=bits, interleave=interleave)
            assert np.array_equal(jpegls.decode(bytearray(stream)), image)
    kernels_seen = 0
    for name, function in vars(kernels).items():
        if isinstance(function, CPUDispatcher):  # not under NUMBA_DISABLE_JIT=1
            kernels_seen += 1
            assert len(function.signatures) <= 1, (name, function.signatures)
    assert kernels_seen or not hasattr(kernels.decode_scan, "signatures")


# --- restart intervals written by kho, decoded on several threads ------------------------


def _restart_markers(stream: bytes) -> list[int]:
    """The m of every RSTm marker in the scan data, in order."""
    return [
        stream[i + 1] - 0xD0
        for i in range(len(stream) - 1)
        if stream[i] == 0xFF and 0xD0 <= stream[i + 1] <= 0xD7
    ]


@pytest.mark.parametrize(
    ("bits", "comps", "interleave", "interval"),
    [
        (8, 1, "sample", 5),
        (12, 1, "sample", 7),
        (16, 1, "sample", 64),
        (8, 3, "sample", 6),
        (8, 3, "line", 9),
        (12, 3, "none", 10),
        (12, 1, "sample", 1),
    ],
)
def test_restart_intervals_are_standard_and_decode_on_every_thread_count(
    bits: int, comps: int, interleave: str, interval: int
) -> None:
    """A stream kho writes with restart intervals: a DRI segment, RST0..RST7 in order
    (per scan), read to the same pixels by CharLS and by kho on 1, 2 and 8 threads."""
    rows, cols = 73, 41
    hu = ct_slice_hu(12, 40, rows=rows, cols=cols).astype(np.int64) + 1024
    planes = [(hu * (c + 1)) % (1 << bits) for c in range(comps)]
    image = np.stack(planes, axis=-1) if comps > 1 else planes[0]
    image = image.astype(_dtype(bits))
    stream = jpegls.encode(
        image, bits_stored=bits, interleave=interleave, restart_interval=interval
    )
    dri = stream.index(b"\xff\xdd")
    assert stream[dri + 2 : dri + 6] == b"\x00\x04" + struct.pack(">H", interval)
    bands = -(-rows // interval)
    scans = comps if interleave == "none" and comps > 1 else 1
    markers = _restart_markers(stream)
    assert markers == [m % 8 for _ in range(scans) for m in range(bands - 1)]
    assert np.array_equal(imagecodecs.jpegls_decode(stream).reshape(image.shape), image)
    for threads in (1, 2, 8):
        assert np.array_equal(jpegls.decode(stream, threads=threads), image)
    # the same image without restart markers is smaller and decodes to the same pixels
    plain = jpegls.encode(image, bits_stored=bits, interleave=interleave)
    assert b"\xff\xdd" not in plain and len(plain) < len(stream)
    assert np.array_equal(jpegls.decode(plain, threads=2), image)


def test_the_at_rest_codec_writes_restart_intervals_in_radiographs_only() -> None:
    """Frames of a megapixel or more get bands of >= 2**17 pixels, at most 16; smaller
    frames none (older decoders, dcmtk 3.6.7 among them, cannot read restart markers)."""
    assert jpegls.at_rest_restart_interval(512, 512) == 0
    assert jpegls.at_rest_restart_interval(1000, 1000) == 0
    for rows, cols in [(1024, 1024), (2500, 3000), (2614, 3072), (4096, 3328), (1100, 65535)]:
        interval = jpegls.at_rest_restart_interval(rows, cols)
        bands = -(-rows // interval)
        assert 2 <= bands <= jpegls.RESTART_MAX_BANDS, (rows, cols)
        assert interval * cols >= jpegls.RESTART_MIN_PIXELS, (rows, cols)
    codec = get_codec(JPEG_LS_LOSSLESS)
    small = (ct_slice_hu(3, 10, rows=128, cols=128).astype(np.int32) + 1024).astype(np.uint16)
    assert b"\xff\xdd" not in codec.encode(small, bits_stored=12)


def test_restart_intervals_cost_little_compression() -> None:
    """The at-rest bands of a 1200x1100 CT-like frame (10 bands of 120 lines) cost under
    0.5% of its size, and the stream is CharLS-readable."""
    image = (ct_slice_hu(40, 100, rows=1200, cols=1100).astype(np.int32) + 1024).astype(np.uint16)
    banded = get_codec(JPEG_LS_LOSSLESS).encode(image, bits_stored=12)
    plain = jpegls.encode(image, bits_stored=12)
    assert len(_restart_markers(banded)) == 9
    assert len(plain) < len(banded) <= len(plain) * 1.005
    assert np.array_equal(imagecodecs.jpegls_decode(banded), image)
    assert np.array_equal(jpegls.decode(banded), image)


def test_concurrent_decodes_share_the_band_threads() -> None:
    """Many frames decoded at once from many threads (more than the band pool has): each
    comes out whole; a busy pool only means callers decode more of their own bands."""
    from concurrent.futures import ThreadPoolExecutor

    images = [
        (ct_slice_hu(i, 16, rows=90, cols=70).astype(np.int32) + 1024).astype(np.uint16)
        for i in range(16)
    ]
    streams = [jpegls.encode(im, bits_stored=12, restart_interval=8, threads=4) for im in images]
    with ThreadPoolExecutor(max_workers=12) as pool:
        decoded = list(pool.map(lambda s: jpegls.decode(s, threads=4), streams * 3))
    for image, out in zip(images * 3, decoded, strict=True):
        assert np.array_equal(out, image)


def test_a_corrupt_or_missing_band_is_refused_on_threads() -> None:
    image = (ct_slice_hu(5, 10, rows=64, cols=48).astype(np.int32) + 1024).astype(np.uint16)
    stream = jpegls.encode(image, bits_stored=12, restart_interval=8)
    rst3 = stream.index(b"\xff\xd3")
    for broken in (
        stream[:rst3] + stream[rst3 + 2 :],  # RST3 missing: the next marker is out of order
        stream[: rst3 - 40] + stream[rst3:],  # band 3's end cut away
        stream.replace(b"\xff\xd5", b"\xff\xd6", 1),
    ):
        for threads in (1, 4):
            with pytest.raises(CodecError):
                jpegls.decode(broken, threads=threads)
    for cut in range(0, len(stream) - 1, 7):
        with pytest.raises(CodecError):
            jpegls.decode(stream[:cut], threads=4)
