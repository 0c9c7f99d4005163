"""JPEG-LS lossless (ITU-T T.87, NEAR = 0): the public wrapper around the numba kernels.

``encode`` writes SOI, SOF55, one SOS per scan, EOI: the default thresholds and RESET, so
no LSE segment is needed, and the header precision P is Bits Stored (not the container's
16 bits: that costs up to 16% on 12-bit CT).  ``decode`` reads any lossless JPEG-LS
stream: 2-16 bits, any number of components, interleave none / line / sample, preset
parameters (LSE type 1), APPn/COM segments skipped.  Corrupt, truncated or unsupported
streams raise ``CodecError``; the kernels check every index they use.
"""

from __future__ import annotations

import struct
from typing import ClassVar

import numpy as np

from kho.codecs import _jpegls_kernels as k
from kho.codecs.base import FrameCodec
from kho.errors import CodecError

TRANSFER_SYNTAX = "1.2.840.10008.1.2.4.80"
_INTERLEAVE = {"none": 0, "line": 1, "sample": 2}
_MAX_SAMPLES = 1 << 30  # refuse to allocate more than this many samples for one frame
SOI, EOI, SOF55, LSE, SOS, DRI = 0xD8, 0xD9, 0xF7, 0xF8, 0xDA, 0xDD


def default_thresholds(maxval: int, near: int = 0) -> tuple[int, int, int]:
    """T1, T2, T3 of T.87 C.2.4.1.1 for this MAXVAL."""

    def clamp(value: int, low: int, high: int) -> int:
        return low if value > high or value < low else value

    if maxval >= 128:
        factor = (min(maxval, 4095) + 128) // 256
        t1 = clamp(factor * (3 - 2) + 2 + 3 * near, near + 1, maxval)
        t2 = clamp(factor * (7 - 3) + 3 + 5 * near, t1, maxval)
        t3 = clamp(factor * (21 - 4) + 4 + 7 * near, t2, maxval)
    else:
        factor = 256 // (maxval + 1)
        t1 = clamp(max(2, 3 // factor + 3 * near), near + 1, maxval)
        t2 = clamp(max(3, 7 // factor + 5 * near), t1, maxval)
        t3 = clamp(max(4, 21 // factor + 7 * near), t2, maxval)
    return t1, t2, t3


def _as_image(frame: np.ndarray, bits_stored: int | None) -> tuple[np.ndarray, int]:
    if not isinstance(frame, np.ndarray):
        raise CodecError("JPEG-LS encode needs a numpy array")
    if frame.dtype not in (np.uint8, np.uint16):
        raise CodecError(f"JPEG-LS encodes uint8 or uint16 samples, not {frame.dtype}")
    if frame.ndim == 2:
        image = frame[:, :, np.newaxis]
    elif frame.ndim == 3 and 1 <= frame.shape[2] <= 4:
        image = frame
    else:
        raise CodecError(f"JPEG-LS encodes (rows, cols) or (rows, cols, 1-4), not {frame.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1 or max(image.shape[:2]) > 65535:
        raise CodecError(f"JPEG-LS image size {image.shape[:2]} out of range 1..65535")
    bits = bits_stored if bits_stored is not None else frame.dtype.itemsize * 8
    if not 2 <= bits <= 16 or bits > frame.dtype.itemsize * 8:
        raise CodecError(f"bits_stored {bits} out of range for {frame.dtype}")
    if image.size and int(image.max()) >> bits:
        raise CodecError(f"sample values exceed {bits} bits")
    return np.ascontiguousarray(image), bits


def encode(
    frame: np.ndarray, *, bits_stored: int | None = None, interleave: str = "sample"
) -> bytes:
    """Encode one frame losslessly; ``interleave`` "none" | "line" | "sample" applies to
    colour (several components); one component is always written with ILV = 0."""
    image, bits = _as_image(frame, bits_stored)
    rows, cols, comps = image.shape
    mode_name = interleave or "sample"
    if mode_name not in _INTERLEAVE:
        raise CodecError(f"unknown interleave mode {mode_name!r}")
    ilv = _INTERLEAVE[mode_name] if comps > 1 else 0
    maxval = (1 << bits) - 1
    t1, t2, t3 = default_thresholds(maxval)
    header = bytearray(b"\xff\xd8")
    header += struct.pack(">BBHBHHB", 0xFF, SOF55, 8 + 3 * comps, bits, rows, cols, comps)
    for c in range(comps):
        header += bytes((c + 1, 0x11, 0))
    qbpp = max(2, bits)
    # one kernel specialisation only: uint16 samples, read-only (a read-only input, e.g.
    # np.frombuffer, would otherwise compile another copy of the kernel on first use)
    samples = image.astype(np.uint16) if image.dtype != np.uint16 else image.view()
    samples.flags.writeable = False
    scans = (
        [np.arange(comps, dtype=np.int64)]
        if ilv
        else [np.array([c], dtype=np.int64) for c in range(comps)]
    )
    # the whole stream in one buffer (the worst case: every sample an escape code, 8/7 for
    # bit stuffing); one copy into the bytes returned
    per_scan = rows * cols * ((2 * (qbpp + max(8, qbpp))) // 7 + 2) * (comps if ilv else 1)
    out = np.empty(len(header) + len(scans) * (per_scan + 64) + 2, dtype=np.uint8)
    out[: len(header)] = np.frombuffer(bytes(header), dtype=np.uint8)
    pos = len(header)
    for scan in scans:
        sos = struct.pack(">BBHB", 0xFF, SOS, 6 + 2 * len(scan), len(scan))
        for c in scan:
            sos += bytes((int(c) + 1, 0))
        sos += bytes((0, ilv, 0))  # NEAR = 0, ILV, point transform 0
        out[pos : pos + len(sos)] = np.frombuffer(sos, dtype=np.uint8)
        pos += len(sos)
        state = np.zeros(5, dtype=np.int64)
        k.encode_scan(samples, scan, ilv, maxval, t1, t2, t3, 64, out[pos:], state)
        if state[4] != k.OK:
            raise CodecError("JPEG-LS encoder output overflow")
        pos += int(state[2])
    out[pos : pos + 2] = (0xFF, EOI)
    return out[: pos + 2].tobytes()


def _scan_end(data: np.ndarray, start: int) -> int:
    """Index of the marker that ends the scan data starting at ``start``."""
    tail = data[start:]
    ff = np.flatnonzero(tail[:-1] == 0xFF)  # few: a 0xFF is rare in the data
    hits = ff[tail[ff + 1] >= 0x80]
    return start + int(hits[0]) if hits.size else len(data)


def decode(data: bytes | bytearray | memoryview) -> np.ndarray:
    """Decode a lossless JPEG-LS stream to (rows, cols) or (rows, cols, components)."""
    buf = np.frombuffer(bytes(data), dtype=np.uint8)
    size = buf.shape[0]
    if size < 4 or buf[0] != 0xFF or buf[1] != SOI:
        raise CodecError("not a JPEG-LS stream: no SOI marker")
    pos = 2
    frame: tuple[int, int, int, int, list[int]] | None = None
    maxval = 0
    thresholds: tuple[int, int, int] | None = None
    reset = 64
    restart = 0
    image: np.ndarray | None = None
    decoded: set[int] = set()
    while True:
        if pos + 2 > size:
            raise CodecError("truncated JPEG-LS stream: no EOI marker")
        if buf[pos] != 0xFF:
            raise CodecError(f"expected a marker at byte {pos}")
        marker = int(buf[pos + 1])
        pos += 2
        if marker == 0xFF:  # fill byte
            pos -= 1
            continue
        if marker == EOI:
            break
        if pos + 2 > size:
            raise CodecError("truncated JPEG-LS marker segment")
        length = (int(buf[pos]) << 8) | int(buf[pos + 1])
        if length < 2 or pos + length > size:
            raise CodecError(f"bad length {length} of marker 0xFF{marker:02X}")
        segment = buf[pos + 2 : pos + length].tobytes()
        pos += length
        if marker == SOF55:
            if frame is not None or len(segment) < 6:
                raise CodecError("bad or repeated SOF55 segment")
            bits, rows, cols, comps = struct.unpack_from(">BHHB", segment)
            if not 2 <= bits <= 16 or rows < 1 or cols < 1 or not 1 <= comps <= 4:
                raise CodecError(f"unsupported frame: P={bits} {rows}x{cols}x{comps}")
            if len(segment) < 6 + 3 * comps or rows * cols * comps > _MAX_SAMPLES:
                raise CodecError("bad SOF55 component list or absurd size")
            if (size - pos) * 8 < rows:  # every line costs at least one bit
                raise CodecError(f"{size - pos} bytes cannot hold {rows} JPEG-LS lines")
            ids = [segment[6 + 3 * i] for i in range(comps)]
            frame = (bits, rows, cols, comps, ids)
            maxval = maxval or (1 << bits) - 1
            image = np.zeros((rows, cols, comps), dtype=np.uint16)
        elif marker == LSE:
            if not segment or segment[0] != 1 or len(segment) < 11:
                raise CodecError("unsupported LSE segment (only preset parameters)")
            mv, t1, t2, t3, rs = struct.unpack_from(">HHHHH", segment, 1)
            if mv:
                maxval = mv
            if rs:
                reset = rs
            if t1 or t2 or t3:
                thresholds = (t1, t2, t3)
        elif marker == DRI:
            if not 2 <= len(segment) <= 4:
                raise CodecError("bad DRI segment")
            restart = int.from_bytes(segment, "big")  # lines per restart interval, 0: none
        elif marker == SOS:
            if frame is None or image is None:
                raise CodecError("SOS before SOF55")
            pos = _decode_scan(
                buf, pos, segment, frame, image, maxval, thresholds, reset, restart, decoded
            )
        elif 0xE0 <= marker <= 0xEF or marker == 0xFE:
            continue  # APPn, COM
        else:
            raise CodecError(f"unsupported JPEG marker 0xFF{marker:02X}")
    if frame is None or image is None:
        raise CodecError("JPEG-LS stream without a frame")
    if len(decoded) != frame[3]:
        raise CodecError("JPEG-LS stream ends before every component was decoded")
    out = image.astype(np.uint8) if frame[0] <= 8 else image
    return out[:, :, 0] if frame[3] == 1 else out


def _decode_scan(
    buf: np.ndarray,
    pos: int,
    segment: bytes,
    frame: tuple[int, int, int, int, list[int]],
    image: np.ndarray,
    maxval: int,
    thresholds: tuple[int, int, int] | None,
    reset: int,
    restart: int,
    decoded: set[int],
) -> int:
    _bits, _rows, _cols, _comps, ids = frame
    if not segment:
        raise CodecError("empty SOS segment")
    count = segment[0]
    if len(segment) < 1 + 2 * count + 3 or not 1 <= count <= len(ids):
        raise CodecError("bad SOS segment")
    comps = []
    for i in range(count):
        cid = segment[1 + 2 * i]
        if cid not in ids:
            raise CodecError(f"SOS names unknown component {cid}")
        comps.append(ids.index(cid))
    near, ilv, _pt = segment[1 + 2 * count : 4 + 2 * count]
    if near != 0:
        raise CodecError("near-lossless JPEG-LS (NEAR > 0) is not supported: kho is lossless")
    if ilv > 2 or (count > 1 and ilv == 0) or (count == 1 and ilv != 0):
        raise CodecError(f"bad interleave mode {ilv} for {count} component(s)")
    if maxval < 1 or maxval >= 1 << 16:
        raise CodecError(f"bad MAXVAL {maxval}")
    t1, t2, t3 = thresholds or default_thresholds(maxval)
    if not 0 < t1 <= t2 <= t3 <= maxval:
        t1, t2, t3 = default_thresholds(maxval)
    rows = image.shape[0]
    band = restart or rows
    component_indices = np.array(comps, dtype=np.int64)
    for number, first in enumerate(range(0, rows, band)):
        if first:
            # a restart interval ends with RSTm (m = count modulo 8), fill bytes allowed;
            # the next interval starts byte-aligned with fresh contexts and a zero line above
            while pos < len(buf) - 1 and buf[pos] == 0xFF and buf[pos + 1] == 0xFF:
                pos += 1
            if pos + 2 > len(buf) or buf[pos] != 0xFF or buf[pos + 1] != 0xD0 + (number - 1) % 8:
                raise CodecError("missing or out-of-order JPEG-LS restart marker")
            pos += 2
        end = _scan_end(buf, pos)
        state = np.zeros(6, dtype=np.int64)
        k.decode_scan(
            buf[pos:end],
            image[first : first + band],
            component_indices,
            ilv,
            maxval,
            t1,
            t2,
            t3,
            reset,
            state,
        )
        if state[4] == k.ERR_TRUNCATED:
            raise CodecError("truncated JPEG-LS scan data")
        if state[4] != k.OK:
            raise CodecError("corrupt JPEG-LS scan data")
        pos = end
    decoded.update(comps)
    return pos


class JpegLsCodec(FrameCodec):
    """JPEG-LS lossless, the default at-rest codec (DESIGN.md)."""

    name: ClassVar[str] = "jpeg-ls"
    transfer_syntax_uid: ClassVar[str] = TRANSFER_SYNTAX

    def encode(self, frame: np.ndarray, *, bits_stored: int) -> bytes:
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
        image = decode(data)
        if rows is not None and image.shape[0] != rows:
            raise CodecError(f"JPEG-LS frame has {image.shape[0]} rows, expected {rows}")
        if columns is not None and image.shape[1] != columns:
            raise CodecError(f"JPEG-LS frame has {image.shape[1]} columns, expected {columns}")
        spp = 1 if image.ndim == 2 else image.shape[2]
        if samples_per_pixel is not None and spp != samples_per_pixel:
            raise CodecError(f"JPEG-LS frame has {spp} samples, expected {samples_per_pixel}")
        if bits_allocated == 16 and image.dtype == np.uint8:
            image = image.astype(np.uint16)
        return image
