"""Pixel data read back: the received value rebuilt from the at-rest encoding,
frames as stored or decoded to arrays, a bounded cache of decoded frames."""

from __future__ import annotations

import json
import os
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Set
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from typing import TYPE_CHECKING, Any

import numpy as np

from kho.archive.dataset.part10 import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    dataset_encoding,
)
from kho.codecs.jpegls import TRANSFER_SYNTAX as JPEG_LS_LOSSLESS
from kho.errors import CodecError, IntegrityError, KhoError, NotFoundError

if TYPE_CHECKING:
    from kho.archive.catalog import InstanceRecord
    from kho.archive.read.source import StoredArchive
from kho.archive.read.objects import read_header_range


def is_little_endian(transfer_syntax_uid: str) -> bool:
    encoding = dataset_encoding(transfer_syntax_uid)
    return encoding is None or encoding[1]


def _stored_ow_bytes_swapped(archive: StoredArchive, record: InstanceRecord) -> bool:
    """kho.archive.finish.pixels._ow_bytes_swapped() of a stored raw record (the VR is read
    from its header, where the pixel element's header ends at ``pixel_split`` in either
    stored layout)."""
    if record.bits_allocated != 8 or is_little_endian(record.transfer_syntax_uid):
        return False
    if record.pixel_split < 8:
        return False

    return read_header_range(archive.store, record.header_key, record.pixel_split - 8, 2) == b"OW"


def _unswap_ow_frame(
    archive: StoredArchive, record: InstanceRecord, offset: int, length: int
) -> bytes:
    """The frame at [offset, offset + length) of a word-swapped 8-bit pixel value, in pixel
    order.  A frame of odd length starts or ends in the middle of a word: the whole words
    are read and swapped, then cut (values have even length, so the last word is whole)."""
    value_start = json_frames(record)[0][0][0]  # frame 1 starts the value, in any layout
    lead = (offset - value_start) % 2
    span = lead + length + (lead + length) % 2
    words = archive.store.get_range(record.pixels_key, offset - lead, span)
    swapped = np.frombuffer(words, dtype="<u2").byteswap().view(np.uint8)
    return swapped[lead : lead + length].tobytes()


def deflated_pixels(record: InstanceRecord) -> bool:
    """Pixel data inside a Deflated Explicit VR Little Endian dataset: the instance is kept
    whole, so its frames are decoded from the inflated instance (pydicom)."""
    return (
        record.pixel_format == "none"
        and record.transfer_syntax_uid == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN
        and bool(record.rows_ and record.columns_)
    )


def has_pixels(record: InstanceRecord) -> bool:
    return record.pixel_format != "none" or deflated_pixels(record)


def native_bytes(arr: np.ndarray, bits_allocated: int, planar: bool = False) -> bytes:
    """A decoded frame (colour by pixel) as native little-endian Pixel Data bytes (PS3.5
    8.1.1, C.7.6.3.1.3): colour by plane where the instance's Planar Configuration is 1, as
    its metadata tells the client; 1-bit data packed eight pixels a byte, the first in the
    lowest bit."""
    if bits_allocated == 1:
        return np.packbits(arr.astype(np.uint8, copy=False).ravel(), bitorder="little").tobytes()
    if planar and arr.ndim == 3:
        arr = arr.transpose(2, 0, 1)
    little = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    return np.ascontiguousarray(little).tobytes()


def _pydicom_frame(data: bytes, index: int) -> np.ndarray:
    """One frame decoded by pydicom (raw: no colour conversion) from a whole instance.

    Its file reader follows the declared transfer syntax and cannot inflate; the dataset
    route follows the bytes (an implicit VR dataset behind an explicit VR syntax, as some
    writers make) and inflates deflated datasets, so it is the fallback."""
    import pydicom
    from pydicom.pixels import pixel_array

    try:
        return pixel_array(BytesIO(data), index=index, raw=True)
    except Exception:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(BytesIO(data), force=True)
            return pixel_array(ds, index=index, raw=True)


def pixel_value(archive: StoredArchive, record: InstanceRecord, payload: bytes) -> bytes:
    """The pixel value exactly as received, from the stored pixel object."""
    if record.pixel_format in ("raw", "encapsulated"):
        return payload
    if record.pixel_format in _AT_REST_SYNTAX:
        return decode_at_rest(record, payload)
    return archive.decode_native(record, payload)


_AT_REST_SYNTAX = {"jpeg-ls": JPEG_LS_LOSSLESS}


_POOL: ThreadPoolExecutor | None = None


_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """Frames of one instance are encoded in parallel (the kernels release the GIL)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(
                max_workers=os.cpu_count() or 1, thread_name_prefix="kho-codec"
            )
        return _POOL


def _native_dtype(bits_allocated: int, signed: bool, little: bool) -> np.dtype[Any]:
    kind = "i" if signed else "u"
    return np.dtype(f"{'<' if little else '>'}{kind}{bits_allocated // 8}")


def _frames_array(
    value: bytes | memoryview, attrs_like: Any, little: bool, frames: int
) -> np.ndarray:
    """Native pixel value as (frames, rows, cols[, samples]), colour-by-pixel."""
    rows, cols = int(attrs_like.rows), int(attrs_like.columns)
    spp = int(attrs_like.samples_per_pixel or 1)
    dtype = _native_dtype(int(attrs_like.bits_allocated), False, little)
    arr = np.frombuffer(value, dtype=dtype, count=frames * rows * cols * spp)
    if spp == 1:
        return arr.reshape(frames, rows, cols)
    if attrs_like.planar_configuration == 1:
        return arr.reshape(frames, spp, rows, cols).transpose(0, 2, 3, 1)
    return arr.reshape(frames, rows, cols, spp)


def _at_rest_codec(name: str) -> Any | None:
    try:
        from kho.codecs import registry
    except ImportError:
        return None
    try:
        codec = registry.get_codec(_AT_REST_SYNTAX[name])
    except KhoError:
        return None
    return codec


def _sign_extend(masked: np.ndarray, bits_stored: int, bits_allocated: int) -> np.ndarray:
    """Two's complement sign extension of ``bits_stored``-bit values, as raw unsigned."""
    sign = 1 << (bits_stored - 1)
    high = ((1 << bits_allocated) - 1) ^ ((1 << bits_stored) - 1)
    out = masked.copy()
    out[(masked & sign) != 0] |= np.array(high, dtype=masked.dtype)
    return out


def decode_at_rest(record: InstanceRecord, payload: bytes) -> bytes:
    """The native pixel value exactly as received, from JPEG-LS frames."""
    codec = _at_rest_codec(record.pixel_format)
    if codec is None:
        raise IntegrityError(f"no codec for stored pixel format {record.pixel_format!r}")
    frames = [decode_stored_array(codec, record, payload, f) for f in json_frames(record)]
    little = is_little_endian(record.transfer_syntax_uid)
    dtype = _native_dtype(int(record.bits_allocated or 8), False, little)
    stack = np.stack(frames).astype(dtype, copy=False)
    if (record.samples_per_pixel or 1) > 1 and record.planar_configuration == 1:
        stack = stack.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(stack).tobytes()


def json_frames(record: InstanceRecord) -> list[list[list[int]]]:
    index: list[list[list[int]]] = json.loads(record.frame_index or "[]")
    return index


def decode_stored_array(
    codec: Any, record: InstanceRecord, payload: bytes | memoryview, fragments: list[list[int]]
) -> np.ndarray:
    """One at-rest frame back to raw unsigned sample words (sign extension restored).
    The stream's header is checked against the row's geometry before the frame is
    allocated: a damaged object must not make a read allocate what its header claims."""
    ((offset, length),) = fragments
    arr = codec.decode(
        memoryview(payload)[offset : offset + length],
        rows=record.rows_ or None,
        columns=record.columns_ or None,
        samples_per_pixel=record.samples_per_pixel or None,
    )
    bits_allocated = int(record.bits_allocated or 8)
    bits_stored = int(record.bits_stored or bits_allocated)
    arr = arr.astype(np.uint8 if bits_allocated == 8 else np.uint16, copy=False)
    if record.pixel_representation == 1 and bits_stored < bits_allocated:
        arr = _sign_extend(arr, bits_stored, bits_allocated)
    return arr


def frame_count(record: InstanceRecord) -> int:
    if deflated_pixels(record):
        return int(record.number_of_frames or 1)
    return len(json_frames(record)) if record.pixel_format != "none" else 0


def _check_frame(record: InstanceRecord, frame_number: int) -> list[list[int]]:
    if deflated_pixels(record) and 1 <= frame_number <= frame_count(record):
        return []  # no fragments: the frame is decoded from the inflated instance
    frames = json_frames(record)
    if record.pixel_format == "none" or not 1 <= frame_number <= len(frames):
        raise NotFoundError(f"instance {record.sop_uid} has no frame {frame_number}")
    return frames[frame_number - 1]


def stored_frame(
    archive: StoredArchive, record: InstanceRecord, frame_number: int
) -> tuple[bytes, str]:
    """A frame's bytes as stored (1-based) and their transfer syntax UID.

    JPEG-LS stream for "jpeg-ls"; the received fragments joined for "encapsulated"; native
    little-endian bytes for "raw" (big endian data is byte-swapped) and for pixel data
    inside a deflated dataset.
    """
    fragments = _check_frame(record, frame_number)
    if deflated_pixels(record):
        arr = frame_array(archive, record, frame_number)
        bits, planar = int(record.bits_allocated or 8), record.planar_configuration == 1
        return native_bytes(arr, bits, planar), EXPLICIT_VR_LITTLE_ENDIAN
    if (
        record.pixel_format == "raw"
        and len(fragments) == 1
        and _stored_ow_bytes_swapped(archive, record)
    ):
        return _unswap_ow_frame(archive, record, *fragments[0]), EXPLICIT_VR_LITTLE_ENDIAN
    key = record.pixels_key
    parts = [archive.store.get_range(key, off, length) for off, length in fragments]
    data = parts[0] if len(parts) == 1 else b"".join(parts)
    if record.pixel_format == "encapsulated":
        return data, record.transfer_syntax_uid
    if record.pixel_format in _AT_REST_SYNTAX:
        return data, _AT_REST_SYNTAX[record.pixel_format]
    bits = int(record.bits_allocated or 8)
    if bits > 8 and not is_little_endian(record.transfer_syntax_uid):
        data = np.frombuffer(data, dtype=f">u{bits // 8}").astype(f"<u{bits // 8}").tobytes()
    return data, EXPLICIT_VR_LITTLE_ENDIAN


def frame_array(
    archive: StoredArchive, record: InstanceRecord, frame_number: int, *, read_ahead: bool = True
) -> np.ndarray:
    """Decoded pixel values of one frame (1-based): natural dtype (signed where Pixel
    Representation says so), shape (rows, cols) or (rows, cols, samples), colour by pixel,
    colour space as stored (YBR is not converted).

    Compressed frames (at rest or as received) come from :data:`FRAME_CACHE` (read-only
    arrays, shared); ``read_ahead``: decode the next frames of the instance or series in
    the background, as a viewer walking it will ask for them next."""
    if record.pixel_format in _AT_REST_SYNTAX or record.pixel_format == "encapsulated":
        _check_frame(record, frame_number)
        return FRAME_CACHE.frame(archive, record, frame_number, read_ahead=read_ahead)
    return decode_frame(archive, record, frame_number)


def decode_frame(archive: StoredArchive, record: InstanceRecord, frame_number: int) -> np.ndarray:
    """:func:`frame_array` without the cache: the frame decoded now."""
    fragments = _check_frame(record, frame_number)
    rows, cols = int(record.rows_ or 0), int(record.columns_ or 0)
    spp = int(record.samples_per_pixel or 1)
    bits = int(record.bits_allocated or 0)
    signed = record.pixel_representation == 1
    if record.pixel_format in _AT_REST_SYNTAX:
        codec = _at_rest_codec(record.pixel_format)
        if codec is None:
            raise IntegrityError(f"no codec for {record.pixel_format!r} ({record.sop_uid})")
        key = record.pixels_key
        ((offset, length),) = fragments
        payload = archive.store.get_range(key, offset, length)
        raw = decode_stored_array(codec, record, payload, [[0, length]])
        return raw.view(np.int8 if bits == 8 else np.int16) if signed else raw
    if record.pixel_format == "raw" and bits in (8, 16, 32) and len(fragments) == 1:
        data, _ts = stored_frame(archive, record, frame_number)
        if len(data) == rows * cols * spp * bits // 8:
            arr = np.frombuffer(data, dtype=_native_dtype(bits, signed, True))
            if spp == 1:
                return arr.reshape(rows, cols)
            if record.planar_configuration == 1:
                return np.ascontiguousarray(arr.reshape(spp, rows, cols).transpose(1, 2, 0))
            return arr.reshape(rows, cols, spp)
    # anything else (compressed syntaxes kho does not implement, 1-bit, odd layouts):
    # pydicom's pixel handlers decode one frame of the reconstructed instance
    data = archive.read_part10(record)
    try:
        arr = _pydicom_frame(data, frame_number - 1)
    except Exception as exc:
        raise CodecError(f"cannot decode frame {frame_number} of {record.sop_uid}: {exc}") from exc
    if arr.ndim == 3 and spp == 1:
        arr = arr[0]
    return arr


#: bytes of decoded frames one process keeps (:class:`DecodedFrameCache`)
FRAME_CACHE_BYTES = 256 * 1024 * 1024


#: frames decoded ahead of a viewer that walks an instance's frames or a series' instances
READ_AHEAD_FRAMES = 4


#: how long a series' instance order is reused for read-ahead (instances may still arrive)
SERIES_ORDER_TTL_S = 10.0


_SERIES_KEPT = 64


FrameKey = tuple[int, str, str, int]


@dataclass(slots=True)
class _SeriesOrder:
    loaded_at: float
    records: list[InstanceRecord]
    position: dict[str, int]


class DecodedFrameCache:
    """Decoded frames of compressed instances, shared by every request of a process; the
    least recently used go first once ``max_bytes`` is exceeded, and a frame larger than a
    quarter of it is decoded for its request only.  Arrays are read-only: callers share them.

    Read-ahead: a viewer scrolling a series asks for one frame after another.  After each
    frame asked for, the next ``read_ahead`` frames of the instance (multi-frame) or frame 1
    of the next instances of the series (by Instance Number) are decoded by background
    threads, so that the next request finds its frame decoded, or being decoded (it then
    waits for that decode instead of starting a second one; one still queued it takes over).
    """

    def __init__(
        self,
        max_bytes: int = FRAME_CACHE_BYTES,
        read_ahead: int = READ_AHEAD_FRAMES,
        workers: int | None = None,
    ) -> None:
        self.max_bytes = max_bytes
        self.read_ahead = read_ahead
        # a viewer walking a series waits for the frame it asks for while the next ones
        # decode beside it: as many frames in flight as cores
        self.workers = workers or os.cpu_count() or 1
        self.hits = 0
        self.misses = 0
        self.read_ahead_decodes = 0
        self._items: OrderedDict[FrameKey, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._pending: dict[FrameKey, Future[np.ndarray | None]] = {}
        self._series: OrderedDict[tuple[int, str], _SeriesOrder] = OrderedDict()
        self._planning: set[tuple[int, str]] = set()  # series looked up, queued or running
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None

    @property
    def held_bytes(self) -> int:
        return self._bytes

    @property
    def entries(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._series.clear()
            self._bytes = 0

    def forget(self, pixels_keys: Set[str], series_uids: Set[str]) -> None:
        """Drop the frames of these pixel objects and the instance order of these series
        (instances withdrawn by a rejection: kho.archive.corrections)."""
        with self._lock:
            for key in [k for k in self._items if k[1] in pixels_keys]:
                self._bytes -= self._items.pop(key).nbytes
            for order in [k for k in self._series if k[1] in series_uids]:
                del self._series[order]

    @staticmethod
    def key(archive: StoredArchive, record: InstanceRecord, frame_number: int) -> FrameKey:
        return (id(archive.store), record.pixels_key, record.sha256, frame_number)

    def cached(self, archive: StoredArchive, record: InstanceRecord, frame_number: int) -> bool:
        with self._lock:
            return self.key(archive, record, frame_number) in self._items

    def frame(
        self,
        archive: StoredArchive,
        record: InstanceRecord,
        frame_number: int,
        *,
        read_ahead: bool = True,
    ) -> np.ndarray:
        key = self.key(archive, record, frame_number)
        with self._lock:
            found = self._items.get(key)
            pending = None
            if found is not None:
                self._items.move_to_end(key)
                self.hits += 1
            else:
                pending = self._pending.get(key)
        if found is None and pending is not None:
            if pending.cancel():  # queued, not started: decoded here, now
                with self._lock:
                    if self._pending.get(key) is pending:
                        del self._pending[key]
            else:
                found = pending.result()  # being decoded: wait (None if it failed)
        if found is None:
            with self._lock:
                self.misses += 1
            found = self._decode(archive, record, frame_number, key)
        if read_ahead and self.read_ahead > 0:
            self._read_ahead(archive, record, frame_number)
        return found

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until no read-ahead is queued or running (tests, benchmarks)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._pending and not self._planning:
                    return True
            time.sleep(0.005)
        return False

    def _decode(
        self, archive: StoredArchive, record: InstanceRecord, frame_number: int, key: FrameKey
    ) -> np.ndarray:
        arr = decode_frame(archive, record, frame_number)
        arr.flags.writeable = False
        if arr.nbytes <= self.max_bytes // 4:
            with self._lock:
                if key not in self._items:
                    self._items[key] = arr
                    self._bytes += arr.nbytes
                    while self._bytes > self.max_bytes and self._items:
                        _old, evicted = self._items.popitem(last=False)
                        self._bytes -= evicted.nbytes
        return arr

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=self.workers, thread_name_prefix="kho-read-ahead"
                )
            return self._executor

    def _read_ahead(
        self, archive: StoredArchive, record: InstanceRecord, frame_number: int
    ) -> None:
        frames = frame_count(record)
        if frames > 1:
            last = min(frames, frame_number + self.read_ahead)
            self._submit(archive, [(record, f) for f in range(frame_number + 1, last + 1)])
            return
        following = self._following(archive, record)
        if following is None:  # the series' order is not known yet: found in the background
            series = (id(archive.store), record.series_uid)
            with self._lock:
                if series in self._planning:
                    return
                self._planning.add(series)
            self._pool().submit(self._load_and_read_ahead, archive, record)
        else:
            self._submit(archive, [(r, 1) for r in following])

    def _following(
        self, archive: StoredArchive, record: InstanceRecord
    ) -> list[InstanceRecord] | None:
        with self._lock:
            order = self._series.get((id(archive.store), record.series_uid))
        if order is None or time.monotonic() - order.loaded_at > SERIES_ORDER_TTL_S:
            return None
        at = order.position.get(record.sop_uid)
        if at is None:
            return None
        return order.records[at + 1 : at + 1 + self.read_ahead]

    def _load_and_read_ahead(self, archive: StoredArchive, record: InstanceRecord) -> None:
        try:
            self._load_series(archive, record)
        except KhoError:  # a catalog outage: no read-ahead this time
            pass
        finally:
            with self._lock:
                self._planning.discard((id(archive.store), record.series_uid))

    def _load_series(self, archive: StoredArchive, record: InstanceRecord) -> None:
        records = archive.catalog.instances_where("series_uid = ?", (record.series_uid,))
        records = [r for r in records if r.study_uid == record.study_uid]
        order = _SeriesOrder(
            time.monotonic(), records, {r.sop_uid: i for i, r in enumerate(records)}
        )
        with self._lock:
            self._series[(id(archive.store), record.series_uid)] = order
            self._series.move_to_end((id(archive.store), record.series_uid))
            while len(self._series) > _SERIES_KEPT:
                self._series.popitem(last=False)
        following = self._following(archive, record)
        if following:
            self._submit(archive, [(r, 1) for r in following])

    def _submit(self, archive: StoredArchive, targets: list[tuple[InstanceRecord, int]]) -> None:
        pool = self._pool()
        for target, number in targets:
            if target.pixel_format not in _AT_REST_SYNTAX and target.pixel_format != "encapsulated":
                continue
            key = self.key(archive, target, number)
            with self._lock:
                # a viewer jumping around faster than frames decode: keep the queue short
                if key in self._items or key in self._pending:
                    continue
                if len(self._pending) >= 2 * self.read_ahead * self.workers:
                    return
                future = pool.submit(self._decode_ahead, archive, target, number, key)
                self._pending[key] = future

    def _decode_ahead(
        self, archive: StoredArchive, record: InstanceRecord, frame_number: int, key: FrameKey
    ) -> np.ndarray | None:
        try:
            arr = self._decode(archive, record, frame_number, key)
            with self._lock:
                self.read_ahead_decodes += 1
            return arr
        except Exception:  # the request that needs it decodes it again and reports the error
            return None
        finally:
            with self._lock:
                self._pending.pop(key, None)


#: the process's cache of decoded frames (frame_array)
FRAME_CACHE = DecodedFrameCache()


def warm_up_codecs() -> float:
    """Load the numba kernels the archive uses (at-rest codec both ways, rendering) from
    their on-disk cache, or compile them, so the first instance or viewer request does not
    pay for it; seconds taken.  `kho serve` runs it in a background thread at start."""
    from kho.codecs import render

    started = time.perf_counter()
    codec = _at_rest_codec("jpeg-ls")
    ramp16 = (np.arange(64 * 64, dtype=np.uint16) % 4096).reshape(64, 64)
    samples: list[np.ndarray] = [ramp16, (ramp16 % 256).astype(np.uint8)]
    samples.append(np.repeat(samples[1][:, :, None], 3, axis=2))
    for image in samples:
        if codec is not None:
            bits = 12 if image.dtype == np.uint16 else 8
            codec.decode(codec.encode(image, bits_stored=bits))
        params = render.RenderParams(
            photometric_interpretation="RGB" if image.ndim == 3 else "MONOCHROME2"
        )
        render.thumbnail(image, params, 16)
        image.flags.writeable = False  # as frames from FRAME_CACHE are: other kernel types
        render.thumbnail(image, params, 16)
        if image.dtype == np.uint8:  # a display image cut from stored levels (rendering)
            render.resize_display(np.ascontiguousarray(image), (0.0, 0.0, 64.0, 64.0), (16, 16))
    return time.perf_counter() - started
