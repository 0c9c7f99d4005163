"""Corrupt and truncated RLE streams: a clean CodecError, never a crash, a hang or an
out-of-bounds write (the kernels check every index; NUMBA_DISABLE_JIT=1 runs them as
Python, where an out-of-range index would raise IndexError instead of corrupting memory)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kho.codecs import rle
from kho.errors import CodecError

RNG = np.random.default_rng(7)
GREY = (np.cumsum(RNG.integers(-1, 2, (24, 30)), axis=1) + 500).astype(np.uint16)
GREY[5:9] = 77
RGB = RNG.integers(0, 4, (9, 11, 3)).astype(np.uint8) * 60
STREAMS = {
    "grey": (rle.encode(GREY), GREY),
    "rgb": (rle.encode(RGB), RGB),
}


def _geometry(image: np.ndarray) -> dict[str, int]:
    return {
        "rows": image.shape[0],
        "columns": image.shape[1],
        "samples_per_pixel": 1 if image.ndim == 2 else image.shape[2],
        "bits_allocated": image.dtype.itemsize * 8,
    }


def _decode_or_codec_error(data: bytes, image: np.ndarray) -> None:
    try:
        decoded = rle.decode(data, **_geometry(image))
    except CodecError:
        return
    # a corrupt stream may still decode: then to an image of the promised geometry
    assert decoded.shape == image.shape and decoded.dtype == image.dtype


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_every_truncation_is_refused(name: str) -> None:
    stream, image = STREAMS[name]
    for cut in range(len(stream) - 1):  # the last byte may be padding
        with pytest.raises(CodecError):
            rle.decode(stream[:cut], **_geometry(image))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_byte_overwrites(data) -> None:
    stream, image = STREAMS[data.draw(st.sampled_from(sorted(STREAMS)))]
    corrupt = bytearray(stream)
    for _ in range(data.draw(st.integers(1, 8))):
        corrupt[data.draw(st.integers(0, len(corrupt) - 1))] = data.draw(st.integers(0, 255))
    _decode_or_codec_error(bytes(corrupt), image)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 20),
    st.lists(st.integers(0, 2**32 - 1), min_size=15, max_size=15),
    st.binary(max_size=600),
)
def test_random_headers_and_bodies(count: int, offsets: list[int], body: bytes) -> None:
    stream = struct.pack("<16I", count, *offsets) + body
    _decode_or_codec_error(stream, GREY)
    _decode_or_codec_error(stream, RGB)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.integers(1, 40), st.integers(1, 40))
def test_random_segment_after_a_valid_header(body: bytes, rows: int, cols: int) -> None:
    stream = struct.pack("<16I", 1, 64, *[0] * 14) + body
    try:
        decoded = rle.decode(stream, rows=rows, columns=cols, samples_per_pixel=1, bits_allocated=8)
    except CodecError:
        return
    assert decoded.shape == (rows, cols)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_round_trip_random_images(data) -> None:
    dtype = data.draw(st.sampled_from([np.uint8, np.uint16, np.uint32]))
    samples = data.draw(st.sampled_from([1, 3]))
    rows, cols = data.draw(st.integers(1, 12)), data.draw(st.integers(1, 300))
    levels = data.draw(st.sampled_from([1, 2, 3, 256]))
    seed = data.draw(st.integers(0, 2**32 - 1))
    values = np.random.default_rng(seed).integers(0, levels, (rows, cols, samples))
    image = (values * (np.iinfo(dtype).max // max(levels - 1, 1))).astype(dtype)
    if samples == 1:
        image = image[:, :, 0]
    decoded = rle.decode(rle.encode(image), **_geometry(image))
    np.testing.assert_array_equal(decoded, image)
