"""DICOM RLE Lossless (PS3.5 Annex G; transfer syntax 1.2.840.10008.1.2.5).

One frame is a 64-byte header (the segment count and 15 offsets, little-endian uint32)
followed by segments: one per byte of each sample, most significant byte first, samples in
order (R, G, B for colour: colour-by-plane, whatever the native planar configuration), each
a PackBits byte stream encoded row by row and padded to even length.  The numba kernels
(``_rle_kernels``) do the byte work; this module checks the header and geometry, and every
malformed stream (bad counts, offsets out of range or out of order, segments too short or
too long, truncation) raises ``CodecError``.
"""

from __future__ import annotations

import struct
from typing import Any, ClassVar

import numpy as np

from kho.codecs import _rle_kernels as k
from kho.codecs.base import FrameCodec
from kho.errors import CodecError

TRANSFER_SYNTAX = "1.2.840.10008.1.2.5"
_HEADER = 64
_MAX_SEGMENTS = 15
_DTYPES: dict[int, np.dtype[Any]] = {8: np.dtype("<u1"), 16: np.dtype("<u2"), 32: np.dtype("<u4")}
_ERRORS = {
    k.ERR_SHORT: "an RLE segment ends before it decodes rows * columns bytes",
    k.ERR_LONG: "an RLE segment decodes to more than rows * columns bytes",
    k.ERR_TRAILING: "an RLE segment has encoded data after its last pixel",
    k.ERR_OUTPUT: "RLE encoder output overflow",
}


def _as_image(frame: np.ndarray, bits_stored: int | None) -> np.ndarray:
    if not isinstance(frame, np.ndarray):
        raise CodecError("RLE encode needs a numpy array")
    if frame.dtype.kind != "u" or frame.dtype.itemsize not in (1, 2, 4):
        raise CodecError(f"RLE encodes uint8, uint16 or uint32 samples, not {frame.dtype}")
    if frame.ndim == 2:
        image = frame[:, :, np.newaxis]
    elif frame.ndim == 3 and frame.shape[2] in (1, 3):
        image = frame
    else:
        raise CodecError(f"RLE encodes (rows, cols) or (rows, cols, 1 or 3), not {frame.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise CodecError(f"RLE cannot encode an empty frame {frame.shape}")
    if image.shape[2] * frame.dtype.itemsize > _MAX_SEGMENTS:
        raise CodecError("RLE holds at most 15 segments")
    if bits_stored is not None:
        if not 1 <= bits_stored <= frame.dtype.itemsize * 8:
            raise CodecError(f"bits_stored {bits_stored} out of range for {frame.dtype}")
        if int(image.max()) >> bits_stored:
            raise CodecError(f"sample values exceed {bits_stored} bits")
    return np.ascontiguousarray(image, dtype=frame.dtype.newbyteorder("<"))


def encode(frame: np.ndarray, *, bits_stored: int | None = None) -> bytes:
    """Encode one frame, uint8/uint16/uint32, shape (rows, cols) or (rows, cols, 1 or 3).

    ``bits_stored``, when given, is only checked (every value < 2**bits_stored): RLE
    segments are whole bytes, so a 12-bit image still has two segments per sample.
    """
    image = _as_image(frame, bits_stored)
    rows, cols, samples = image.shape
    nbytes = image.dtype.itemsize
    segments = samples * nbytes
    pixels = image.reshape(rows * cols, samples).view(np.uint8)
    per_segment = rows * (cols + (cols + 127) // 128) + 1  # all-literal worst case + pad
    out = np.empty(_HEADER + segments * per_segment, dtype=np.uint8)
    offsets = np.zeros(_MAX_SEGMENTS, dtype=np.int64)
    length = k.encode_frame(pixels, rows, cols, nbytes, out, offsets)
    if length < 0:
        raise CodecError(_ERRORS.get(length, f"RLE encoder error {length}"))
    header = struct.pack("<16I", segments, *(int(o) for o in offsets))
    out[:_HEADER] = np.frombuffer(header, dtype=np.uint8)
    return out[:length].tobytes()


def decode(
    data: bytes | bytearray | memoryview,
    *,
    rows: int,
    columns: int,
    samples_per_pixel: int,
    bits_allocated: int,
) -> np.ndarray:
    """Decode one frame to (rows, columns) or (rows, columns, samples), uint8/16/32.

    ``bits_allocated=1`` (one segment of packed bits, as dcmtk writes for segmentations)
    decodes to a (rows, columns) uint8 array of 0 and 1."""
    if bits_allocated not in _DTYPES and bits_allocated != 1:
        raise CodecError(f"RLE decodes 1, 8, 16 or 32 bits allocated, not {bits_allocated}")
    if samples_per_pixel not in (1, 3) or (bits_allocated == 1 and samples_per_pixel != 1):
        raise CodecError(f"RLE decodes 1 or 3 samples per pixel, not {samples_per_pixel}")
    if rows < 1 or columns < 1:
        raise CodecError(f"bad RLE frame size {rows} x {columns}")
    if bits_allocated == 1:
        # one segment of the frame's packed bits (first pixel in the lowest bit)
        packed = _decode_segments(data, (rows * columns + 7) // 8, 1, np.dtype(np.uint8), 1)
        bits = np.unpackbits(packed.ravel(), bitorder="little", count=rows * columns)
        return bits.reshape(rows, columns)
    image = _decode_segments(
        data, rows * columns, samples_per_pixel, _DTYPES[bits_allocated], bits_allocated // 8
    ).reshape(rows, columns, samples_per_pixel)
    image = image.astype(image.dtype.newbyteorder("="), copy=False)
    return image[:, :, 0] if samples_per_pixel == 1 else image


def _decode_segments(
    data: bytes | bytearray | memoryview,
    pixels: int,
    samples_per_pixel: int,
    dtype: np.dtype[Any],
    nbytes: int,
) -> np.ndarray:
    """Check the header and decode every segment: (pixels, samples) of ``dtype``."""
    segments = samples_per_pixel * nbytes
    buffer = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    size = buffer.shape[0]
    if size < _HEADER:
        raise CodecError(f"RLE frame of {size} bytes is shorter than its 64-byte header")
    count, *offsets = struct.unpack_from("<16I", buffer[:_HEADER].tobytes())
    if count != segments:
        raise CodecError(f"RLE header has {count} segments; this frame needs {segments}")
    starts = np.array(offsets[:segments], dtype=np.int64)
    ends = np.append(starts[1:], size).astype(np.int64)
    if starts[0] != _HEADER:
        raise CodecError(f"the first RLE segment starts at {starts[0]}, not at 64")
    if np.any(ends <= starts) or ends[-1] > size:
        raise CodecError("RLE segment offsets are out of order or beyond the data")
    # a 2-byte replicate run gives at most 128 bytes: refuse absurd sizes before allocating
    if pixels > 64 * int(np.min(ends - starts)) + 64:
        raise CodecError(f"RLE segments too short for a frame of {pixels} pixels")
    image = np.empty((pixels, samples_per_pixel), dtype=dtype)
    code = k.decode_frame(buffer, starts, ends, nbytes, image.view(np.uint8))
    if code != k.OK:
        raise CodecError(_ERRORS.get(code, f"RLE decoder error {code}"))
    return image


class RleCodec(FrameCodec):
    """DICOM RLE Lossless frames (uint8/16/32, 1 or 3 samples)."""

    name: ClassVar[str] = "rle"
    transfer_syntax_uid: ClassVar[str] = TRANSFER_SYNTAX

    def encode(self, frame: np.ndarray, *, bits_stored: int | None = None) -> bytes:
        return encode(frame, bits_stored=bits_stored)

    def decode(
        self,
        data: bytes | bytearray | memoryview,
        *,
        rows: int | None = None,
        columns: int | None = None,
        samples_per_pixel: int | None = None,
        bits_allocated: int | None = None,
    ) -> np.ndarray:
        if rows is None or columns is None or bits_allocated is None:
            raise CodecError(
                "RLE streams do not carry the geometry: give rows, columns, "
                "bits_allocated (and samples_per_pixel)"
            )
        return decode(
            data,
            rows=rows,
            columns=columns,
            samples_per_pixel=1 if samples_per_pixel is None else samples_per_pixel,
            bits_allocated=bits_allocated,
        )
