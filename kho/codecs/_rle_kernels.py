"""numba kernels of DICOM RLE Lossless (PS3.5 Annex G): PackBits-style byte segments.

The kernels work on raw bytes.  ``pixels`` is the frame's little-endian bytes viewed as
(pixels, samples * bytes_per_sample); segment ``s * nbytes + b`` holds byte ``b`` (most
significant first) of sample ``s``.  They return negative error codes rather than raise,
so they stay ``nogil``; every read and write is bounds-checked.
"""

from __future__ import annotations

import numpy as np
from numba import njit

OK = 0
ERR_SHORT = -1  # a segment ends before it decoded rows * columns bytes
ERR_LONG = -2  # a run or literal would write past rows * columns bytes
ERR_TRAILING = -3  # more encoded data after the segment is complete (beyond padding)
ERR_OUTPUT = -4  # encoder output buffer too small (a bug: the wrapper sizes it)


@njit(cache=True, nogil=True)
def _encode_row(plane: np.ndarray, first: int, count: int, out: np.ndarray, pos: int) -> int:
    """PackBits-encode ``count`` bytes of one row (plane[first:first+count]).

    Replicate runs of 2..128 bytes; literal runs of 1..128, broken where three equal bytes
    start (a run of two inside a literal costs no more than the literal itself)."""
    end = first + count
    i = first
    limit = out.shape[0]
    while i < end:
        value = plane[i]
        j = i + 1
        while j < end and j - i < 128 and plane[j] == value:
            j += 1
        run = j - i
        if run >= 2:
            if pos + 2 > limit:
                return ERR_OUTPUT
            out[pos] = 257 - run  # -(run - 1) as a signed byte
            out[pos + 1] = value
            pos += 2
            i = j
            continue
        start = i
        i += 1
        while i < end and i - start < 128:
            if i + 2 < end and plane[i] == plane[i + 1] and plane[i] == plane[i + 2]:
                break
            i += 1
        n = i - start
        if pos + 1 + n > limit:
            return ERR_OUTPUT
        out[pos] = n - 1
        pos += 1
        out[pos : pos + n] = plane[start:i]
        pos += n
    return pos


@njit(cache=True, nogil=True)
def encode_frame(
    pixels: np.ndarray, rows: int, cols: int, nbytes: int, out: np.ndarray, offsets: np.ndarray
) -> int:
    """Encode every segment after a 64-byte header space; returns the total length or an
    error code.  ``offsets`` receives each segment's start; the caller writes the header."""
    segments = pixels.shape[1]
    plane = np.empty(pixels.shape[0], dtype=np.uint8)
    pos = 64
    for seg in range(segments):
        sample = seg // nbytes
        byte = seg - sample * nbytes
        column = sample * nbytes + (nbytes - 1 - byte)  # little-endian: MSB is the last byte
        offsets[seg] = pos
        plane[:] = pixels[:, column]  # contiguous copy of this byte of every pixel
        for r in range(rows):
            pos = _encode_row(plane, r * cols, cols, out, pos)
            if pos < 0:
                return pos
        if pos & 1:  # segments have even length: pad with a no-op (-128)
            if pos >= out.shape[0]:
                return ERR_OUTPUT
            out[pos] = 128
            pos += 1
    return pos


@njit(cache=True, nogil=True)
def decode_segment(data: np.ndarray, start: int, end: int, plane: np.ndarray) -> int:
    """Decode data[start:end] into the contiguous byte plane (exactly rows * columns)."""
    total = plane.shape[0]
    if end > data.shape[0] or start < 0 or start > end:
        return ERR_SHORT
    pos = start
    n = 0
    while n < total:
        if pos >= end:
            return ERR_SHORT
        header = int(data[pos])
        pos += 1
        if header < 128:  # literal of header + 1 bytes
            length = header + 1
            if pos + length > end:
                return ERR_SHORT
            if n + length > total:
                return ERR_LONG
            plane[n : n + length] = data[pos : pos + length]
            pos += length
            n += length
        elif header > 128:  # replicate the next byte 257 - header times
            length = 257 - header
            if pos >= end:
                return ERR_SHORT
            if n + length > total:
                return ERR_LONG
            plane[n : n + length] = data[pos]
            pos += 1
            n += length
        # header == 128 (-128): no operation
    # what follows a complete segment may only be padding or no-ops
    while pos < end:
        if data[pos] != 128 and end - pos > 1:
            return ERR_TRAILING
        pos += 1
    return OK


@njit(cache=True, nogil=True)
def decode_frame(
    data: np.ndarray, starts: np.ndarray, ends: np.ndarray, nbytes: int, out: np.ndarray
) -> int:
    """Decode every segment into out (pixels, samples * nbytes) little-endian bytes."""
    segments = starts.shape[0]
    if out.shape[1] != segments:
        return ERR_OUTPUT
    pixels = out.shape[0]
    plane = np.empty(pixels, dtype=np.uint8)
    for seg in range(segments):
        sample = seg // nbytes
        byte = seg - sample * nbytes
        column = sample * nbytes + (nbytes - 1 - byte)
        code = decode_segment(data, starts[seg], ends[seg], plane)
        if code != OK:
            return code
        if segments == 1:
            out[:, 0] = plane
        else:  # interleave the plane into its byte of every pixel
            for i in range(pixels):
                out[i, column] = plane[i]
    return OK
