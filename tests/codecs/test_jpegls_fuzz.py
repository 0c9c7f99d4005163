"""Corrupt and truncated JPEG-LS streams: a clean CodecError, never a crash, a hang or an
out-of-bounds write."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kho.bench.phantom import ct_slice_hu
from kho.codecs import jpegls
from kho.codecs.jpegls import JpegLsCodec
from kho.errors import CodecError

IMAGE = (ct_slice_hu(20, 60, rows=24, cols=20).astype(np.int32) + 1024).astype(np.uint16)
STREAM = jpegls.encode(IMAGE, bits_stored=12)
RGB = np.random.default_rng(0).integers(0, 256, (9, 11, 3)).astype(np.uint8)
RGB_STREAM = jpegls.encode(RGB, bits_stored=8, interleave="sample")


def _decode_or_codec_error(data: bytes) -> None:
    try:
        image = jpegls.decode(data)
    except CodecError:
        return
    assert image.ndim in (2, 3)  # a corrupt stream may still decode to *some* image


@pytest.mark.parametrize("stream", [STREAM, RGB_STREAM], ids=["gray", "rgb"])
def test_every_truncation_is_refused(stream: bytes) -> None:
    for cut in range(len(stream) - 1):
        with pytest.raises(CodecError):
            jpegls.decode(stream[:cut])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_bit_flips_and_overwrites(data) -> None:
    stream = bytearray(data.draw(st.sampled_from([STREAM, RGB_STREAM])))
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(stream) - 1))
        stream[pos] = data.draw(st.integers(0, 255))
    _decode_or_codec_error(bytes(stream))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_after_a_valid_header(tail: bytes) -> None:
    header_end = STREAM.index(b"\xff\xda") + 10
    _decode_or_codec_error(STREAM[:header_end] + tail)


@pytest.mark.parametrize(
    "sof",
    [
        b"\xff\xf7\x00\x0b\x0c\xff\xff\xff\xff\x01\x01\x11\x00",  # 65535 x 65535
        b"\xff\xf7\x00\x0b\x0c\x75\x30\x75\x30\x01\x01\x11\x00",  # 30000 x 30000, tiny data
        b"\xff\xf7\x00\x0b\x01\x00\x10\x00\x10\x01\x01\x11\x00",  # P = 1
        b"\xff\xf7\x00\x0b\x0c\x00\x00\x00\x10\x01\x01\x11\x00",  # zero rows
    ],
    ids=["absurd-size", "more-lines-than-bits", "bad-precision", "zero-rows"],
)
def test_absurd_frames_are_refused_before_allocating(sof: bytes) -> None:
    start = STREAM.index(b"\xff\xf7")
    end = start + 2 + int.from_bytes(STREAM[start + 2 : start + 4], "big")
    with pytest.raises(CodecError):
        jpegls.decode(STREAM[:start] + sof + STREAM[end:])


def test_near_lossless_is_refused() -> None:
    sos = STREAM.index(b"\xff\xda")
    near = bytearray(STREAM)
    near[sos + 7] = 2  # NEAR = 2
    with pytest.raises(CodecError, match="near-lossless"):
        jpegls.decode(bytes(near))


@pytest.mark.parametrize("size", [b"\x08\x00\x08\x00", b"\x40\x00\x40\x00"], ids=["2048", "16384"])
def test_a_header_larger_than_the_callers_frame_is_refused_before_allocating(
    size: bytes,
) -> None:
    """A finding of the codecs fuzz target: the codec decoded whatever frame the header
    claimed (up to 2**30 samples; 512 MiB for 16384 x 16384 behind a few KB) and compared
    it with the caller's geometry afterwards."""
    start = STREAM.index(b"\xff\xf7")
    claimed = STREAM[: start + 5] + size + STREAM[start + 9 :] + bytes(4096)
    codec = JpegLsCodec()
    tracemalloc.start()
    try:
        with pytest.raises(CodecError, match="rows, expected 24"):
            codec.decode(claimed, rows=24, columns=20, samples_per_pixel=1, bits_allocated=16)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    image = codec.decode(STREAM, rows=24, columns=20, samples_per_pixel=1, bits_allocated=16)
    assert np.array_equal(image, IMAGE)
