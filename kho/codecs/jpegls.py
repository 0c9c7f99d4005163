"""JPEG-LS lossless (ITU-T T.87, NEAR = 0): the public wrapper around the numba kernels.

``encode`` writes SOI, SOF55, one SOS per scan, EOI: the default thresholds and RESET, so
no LSE segment is needed, and the header precision P is Bits Stored (not the container's
16 bits: that costs up to 16% on 12-bit CT).  ``decode`` reads any lossless JPEG-LS
stream: 2-16 bits, any number of components, interleave none / line / sample, preset
parameters (LSE type 1), restart intervals (DRI, RSTm), APPn/COM segments skipped.
Corrupt, truncated or unsupported streams raise ``CodecError``; the kernels check every
index they use.

Restart intervals (T.87: a DRI segment gives the lines per interval; each interval starts
byte-aligned after an RSTm marker, with fresh contexts and a zero line above) make the
bands of a frame independent: ``decode`` runs them on several threads (the kernels release
the GIL), and ``encode`` writes them where ``restart_interval`` asks (the at-rest codec:
:func:`at_rest_restart_interval`).  The stream stays standard: CharLS decodes it.
"""

from __future__ import annotations

import math
import os
import struct
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import ClassVar

import numpy as np

from kho.codecs import _jpegls_kernels as k
from kho.codecs.base import FrameCodec
from kho.errors import CodecError

TRANSFER_SYNTAX = "1.2.840.10008.1.2.4.80"
_INTERLEAVE = {"none": 0, "line": 1, "sample": 2}
_MAX_SAMPLES = 1 << 30  # refuse to allocate more than this many samples for one frame
SOI, EOI, SOF55, LSE, SOS, DRI = 0xD8, 0xD9, 0xF7, 0xF8, 0xDA, 0xDD
#: the at-rest codec writes restart intervals in frames of at least this many pixels only:
#: a radiograph's single frame takes 100-300 ms to decode on one core, while series of
#: smaller frames decode in parallel across frames (read-ahead, DESIGN.md).  Decoders
#: older than CharLS 2.3 (2021; dcmtk 3.6.7's dcmjpls among them) cannot read restart
#: markers, so frames that do not need them are written without.
RESTART_MIN_FRAME_PIXELS = 1 << 20
#: bands of at least this many pixels (one decodes in about 2 ms: a thread hand-off costs
#: little beside it) ...
RESTART_MIN_PIXELS = 1 << 17
#: ... and at most this many bands per frame.  Each band learns its contexts again, which
#: costs compression (benchmarks/results/dicomweb.md): 0.05-0.08% on 2500x3000 radiographs
#: in 16 bands
RESTART_MAX_BANDS = 16


def at_rest_restart_interval(rows: int, cols: int) -> int:
    """Lines per restart interval for a frame written at rest, 0 for none."""
    if rows * cols < RESTART_MIN_FRAME_PIXELS:
        return 0
    lines = max(math.ceil(RESTART_MIN_PIXELS / max(1, cols)), math.ceil(rows / RESTART_MAX_BANDS))
    return lines if lines < rows else 0


def default_threads() -> int:
    """Threads one frame is decoded on when the caller does not say: every core."""
    return os.cpu_count() or 1


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(
                max_workers=default_threads(), thread_name_prefix="kho-jpegls"
            )
        return _POOL


def _run_bands(work: Callable[[int], None], count: int, threads: int) -> None:
    """``work(0) .. work(count - 1)`` on up to ``threads`` threads.  The calling thread
    takes bands too and helpers from the shared pool take the others once they run: when
    every core is busy with other requests the caller simply does more of its own bands,
    and helpers that never started are cancelled rather than waited for."""
    if threads <= 1 or count <= 1:
        for band in range(count):
            work(band)
        return
    lock = threading.Lock()
    next_band = [0]
    errors: list[BaseException] = []

    def take() -> None:
        while True:
            with lock:
                band = next_band[0]
                if band >= count or errors:
                    return
                next_band[0] = band + 1
            try:
                work(band)
            except BaseException as exc:  # re-raised in the calling thread
                with lock:
                    errors.append(exc)
                return

    helpers: list[Future[None]] = [_pool().submit(take) for _ in range(min(threads, count) - 1)]
    take()
    for helper in helpers:
        if not helper.cancel():
            helper.result()  # it is decoding a band: that band must be done
    if errors:
        raise errors[0]


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
    frame: np.ndarray,
    *,
    bits_stored: int | None = None,
    interleave: str = "sample",
    restart_interval: int = 0,
    threads: int = 1,
) -> bytes:
    """Encode one frame losslessly; ``interleave`` "none" | "line" | "sample" applies to
    colour (several components); one component is always written with ILV = 0.
    ``restart_interval``: lines per restart interval (a DRI segment and RSTm markers),
    0 for none; the intervals are encoded on up to ``threads`` threads."""
    image, bits = _as_image(frame, bits_stored)
    rows, cols, comps = image.shape
    mode_name = interleave or "sample"
    if mode_name not in _INTERLEAVE:
        raise CodecError(f"unknown interleave mode {mode_name!r}")
    if not 0 <= restart_interval <= 65535:
        raise CodecError(f"restart interval {restart_interval} out of range 0..65535")
    band = restart_interval if 0 < restart_interval < rows else rows
    ilv = _INTERLEAVE[mode_name] if comps > 1 else 0
    maxval = (1 << bits) - 1
    t1, t2, t3 = default_thresholds(maxval)
    header = bytearray(b"\xff\xd8")
    header += struct.pack(">BBHBHHB", 0xFF, SOF55, 8 + 3 * comps, bits, rows, cols, comps)
    for c in range(comps):
        header += bytes((c + 1, 0x11, 0))
    if band < rows:
        header += struct.pack(">BBHH", 0xFF, DRI, 4, band)
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
    firsts = list(range(0, rows, band))
    jobs = [(scan, first) for scan in scans for first in firsts]
    coded: list[bytes] = [b""] * len(jobs)
    # the worst case of a band: every sample an escape code, 8/7 for bit stuffing
    per_sample = (2 * (qbpp + max(8, qbpp))) // 7 + 2

    def encode_band(number: int) -> None:
        scan, first = jobs[number]
        lines = samples[first : first + band]
        out = np.empty(lines.shape[0] * cols * len(scan) * per_sample + 64, dtype=np.uint8)
        state = np.zeros(5, dtype=np.int64)
        k.encode_scan(lines, scan, ilv, maxval, t1, t2, t3, 64, out, state)
        if state[4] != k.OK:
            raise CodecError("JPEG-LS encoder output overflow")
        coded[number] = out[: int(state[2])].tobytes()

    _run_bands(encode_band, len(jobs), threads)
    parts = [bytes(header)]
    for number, (scan, first) in enumerate(jobs):
        if first == 0:
            sos = struct.pack(">BBHB", 0xFF, SOS, 6 + 2 * len(scan), len(scan))
            for c in scan:
                sos += bytes((int(c) + 1, 0))
            parts.append(sos + bytes((0, ilv, 0)))  # NEAR = 0, ILV, point transform 0
        else:  # RSTm, m counting the intervals of this scan modulo 8
            parts.append(bytes((0xFF, 0xD0 + (first // band - 1) % 8)))
        parts.append(coded[number])
    parts.append(bytes((0xFF, EOI)))
    return b"".join(parts)


def _markers(data: np.ndarray, start: int) -> np.ndarray:
    """Positions (from ``start``) of the 0xFF that begin a marker or a fill byte: in scan
    data a 0xFF is always followed by a byte below 0x80 (bit stuffing)."""
    tail = data[start:]
    ff = np.flatnonzero(tail[:-1] == 0xFF)  # few: a 0xFF is rare in the data
    return start + ff[tail[ff + 1] >= 0x80]


def decode(
    data: bytes | bytearray | memoryview,
    *,
    threads: int | None = None,
    rows: int | None = None,
    columns: int | None = None,
    components: int | None = None,
) -> np.ndarray:
    """Decode a lossless JPEG-LS stream to (rows, cols) or (rows, cols, components); the
    restart intervals of a scan, if any, on up to ``threads`` threads (None: every core).
    ``rows``, ``columns``, ``components``: the frame the caller expects (its dataset's
    geometry), when known.  A header that says otherwise is refused before its frame is
    allocated: a few bytes of run-mode data can claim a 2 GiB frame."""
    buf = np.frombuffer(data, dtype=np.uint8)
    # read-only always: the kernels are compiled for read-only input only (one specialisation)
    buf.flags.writeable = False
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
            bits, lines, cols, comps = struct.unpack_from(">BHHB", segment)
            if not 2 <= bits <= 16 or lines < 1 or cols < 1 or not 1 <= comps <= 4:
                raise CodecError(f"unsupported frame: P={bits} {lines}x{cols}x{comps}")
            if len(segment) < 6 + 3 * comps or lines * cols * comps > _MAX_SAMPLES:
                raise CodecError("bad SOF55 component list or absurd size")
            for name, found, expected in (
                ("rows", lines, rows),
                ("columns", cols, columns),
                ("samples", comps, components),
            ):
                if expected is not None and found != expected:
                    raise CodecError(f"JPEG-LS frame has {found} {name}, expected {expected}")
            if (size - pos) * 8 < lines:  # every line costs at least one bit
                raise CodecError(f"{size - pos} bytes cannot hold {lines} JPEG-LS lines")
            ids = [segment[6 + 3 * i] for i in range(comps)]
            frame = (bits, lines, cols, comps, ids)
            maxval = maxval or (1 << bits) - 1
            # every sample is written by the scans, or the stream is refused
            image = np.empty((lines, cols, comps), dtype=np.uint16)
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
                buf,
                pos,
                segment,
                frame,
                image,
                (maxval, thresholds, reset, restart),
                decoded,
                default_threads() if threads is None else threads,
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
    parameters: tuple[int, tuple[int, int, int] | None, int, int],
    decoded: set[int],
    threads: int,
) -> int:
    """Decode one scan (its restart intervals on up to ``threads`` threads); the position
    of the marker after it."""
    _bits, _rows, _cols, _comps, ids = frame
    maxval, thresholds, reset, restart = parameters
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
    # where each interval's data lie: one search for the markers of the whole scan
    markers = _markers(buf, pos)
    size = len(buf)
    spans: list[tuple[int, int]] = []
    for number in range(len(range(0, rows, band))):
        if number:
            # an interval ends with RSTm (m = count modulo 8), fill bytes allowed; the next
            # starts byte-aligned with fresh contexts and a zero line above
            while pos < size - 1 and buf[pos] == 0xFF and buf[pos + 1] == 0xFF:
                pos += 1
            if pos + 2 > size or buf[pos] != 0xFF or buf[pos + 1] != 0xD0 + (number - 1) % 8:
                raise CodecError("missing or out-of-order JPEG-LS restart marker")
            pos += 2
        following = int(np.searchsorted(markers, pos))
        end = int(markers[following]) if following < len(markers) else size
        spans.append((pos, end))
        pos = end
    component_indices = np.array(comps, dtype=np.int64)
    statuses = [k.OK] * len(spans)

    def decode_band(number: int) -> None:
        start, end = spans[number]
        first = number * band
        state = np.zeros(6, dtype=np.int64)
        k.decode_scan(
            buf[start:end],
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
        statuses[number] = int(state[4])

    _run_bands(decode_band, len(spans), threads)
    if k.ERR_TRUNCATED in statuses:
        raise CodecError("truncated JPEG-LS scan data")
    if any(status != k.OK for status in statuses):
        raise CodecError("corrupt JPEG-LS scan data")
    decoded.update(comps)
    return pos


class JpegLsCodec(FrameCodec):
    """JPEG-LS lossless, the default at-rest codec (DESIGN.md)."""

    name: ClassVar[str] = "jpeg-ls"
    transfer_syntax_uid: ClassVar[str] = TRANSFER_SYNTAX

    def encode(self, frame: np.ndarray, *, bits_stored: int) -> bytes:
        """With restart intervals on frames large enough to decode faster on several
        threads (:func:`at_rest_restart_interval`), encoded on several threads too."""
        shape: tuple[int, ...] = frame.shape if isinstance(frame, np.ndarray) else ()
        interval = at_rest_restart_interval(shape[0], shape[1]) if len(shape) >= 2 else 0
        return encode(
            frame, bits_stored=bits_stored, restart_interval=interval, threads=default_threads()
        )

    def decode(
        self,
        data: bytes | bytearray | memoryview,
        *,
        rows: int | None = None,
        columns: int | None = None,
        samples_per_pixel: int | None = None,
        bits_allocated: int | None = None,
    ) -> np.ndarray:
        # the geometry is checked against the header before the frame is allocated
        image = decode(data, rows=rows, columns=columns, components=samples_per_pixel)
        if bits_allocated == 16 and image.dtype == np.uint8:
            image = image.astype(np.uint16)
        return image
