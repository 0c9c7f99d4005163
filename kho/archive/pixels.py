"""Pixel data at rest: how a received pixel value becomes the pixel object, and back.

Formats (``instances.pixel_format``):
- ``raw``: a native pixel value exactly as received (also the fallback when the at-rest
  codec cannot represent it exactly);
- ``encapsulated``: compressed fragments exactly as received (item tags, offset table and
  delimiter included), so they go back out untouched;
- a codec name (e.g. ``jpeg-ls``): native frames encoded one by one and concatenated.
The frame index lists, per frame, the ``[offset, length]`` of its fragments in the pixel
object, so a viewer's frame request is one ranged read.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from typing import TYPE_CHECKING, Any

import numpy as np

from kho.archive.attributes import InstanceAttributes
from kho.archive.part10 import ITEM, SEQUENCE_DELIMITER, Part10Layout, dataset_encoding
from kho.errors import CodecError, IntegrityError, InvalidDicomError, KhoError, NotFoundError

if TYPE_CHECKING:
    from kho.archive.archive import Archive
    from kho.archive.catalog import InstanceRecord

FrameIndex = list[list[list[int]]]


@dataclass(frozen=True, slots=True)
class EncodedPixels:
    pixel_format: str
    payload: bytes | memoryview
    frame_index: FrameIndex


def native_frame_length(attrs: InstanceAttributes) -> int | None:
    """Bytes of one native frame, or None when frames are not byte-aligned / unknown."""
    if not (attrs.rows and attrs.columns and attrs.bits_allocated):
        return None
    bits = attrs.rows * attrs.columns * (attrs.samples_per_pixel or 1) * attrs.bits_allocated
    return bits // 8 if bits % 8 == 0 else None


def native_frame_index(value_length: int, attrs: InstanceAttributes) -> FrameIndex:
    frame_length = native_frame_length(attrs)
    frames = attrs.number_of_frames
    if frame_length is None or frame_length * frames > value_length:
        return [[[0, value_length]]]
    return [[[i * frame_length, frame_length]] for i in range(frames)]


def encapsulated_fragments(value: bytes | memoryview) -> tuple[list[int], list[list[int]]]:
    """(Basic Offset Table entries, fragments as [offset, length]) of an encapsulated value.

    Offsets are relative to the start of the value; a fragment's offset is its data's.
    """
    pos, end = 0, len(value)
    items: list[list[int]] = []
    while pos + 8 <= end:
        group, element, length = struct.unpack_from("<HHI", value, pos)
        tag = (group << 16) | element
        if tag == SEQUENCE_DELIMITER:
            break
        if tag != ITEM or pos + 8 + length > end:
            raise InvalidDicomError("malformed encapsulated pixel data")
        items.append([pos + 8, length])
        pos += 8 + length
    if not items:
        raise InvalidDicomError("encapsulated pixel data has no Basic Offset Table item")
    bot_offset, bot_length = items[0]
    table = [struct.unpack_from("<I", value, bot_offset + 4 * i)[0] for i in range(bot_length // 4)]
    return table, items[1:]


def encapsulated_frame_index(value: bytes | memoryview, frames: int) -> FrameIndex:
    """Group fragments into frames: one frame, one fragment per frame, the offset table, or
    (JPEG family) the end-of-image marker, in that order."""
    table, fragments = encapsulated_fragments(value)
    if not fragments:
        return []
    if frames <= 1:
        return [fragments]
    if len(fragments) == frames:
        return [[f] for f in fragments]
    first_item = fragments[0][0] - 8
    if len(table) == frames:
        starts = [first_item + t for t in table]
        grouped: FrameIndex = []
        for i, start in enumerate(starts):
            stop = starts[i + 1] if i + 1 < len(starts) else len(value) + 1
            grouped.append([f for f in fragments if start <= f[0] - 8 < stop])
        if all(grouped):
            return grouped
    grouped, current = [], []
    for frag in fragments:
        current.append(frag)
        end = frag[0] + frag[1]
        # a JPEG frame ends with EOI (FFD9), possibly followed by one padding byte
        tail = bytes(value[max(frag[0], end - 3) : end])
        if tail.endswith(b"\xff\xd9") or tail[:2] == b"\xff\xd9":
            grouped.append(current)
            current = []
    if current:
        grouped.append(current)
    return grouped


def encode_pixels(
    archive: Archive,
    data: bytes,
    layout: Part10Layout,
    attrs: InstanceAttributes,
    *,
    use_codec: bool = True,
) -> EncodedPixels:
    """The pixel object for an instance's pixel value (see the module docstring);
    ``use_codec=False``: native data stays as received (a finisher encodes it later)."""
    pixels = layout.pixels
    assert pixels is not None
    if not use_codec:  # a view: the caller stores the received bytes whole, not this value
        view = memoryview(data)[pixels.value_offset : pixels.value_offset + pixels.value_length]
        if pixels.encapsulated:
            index = encapsulated_frame_index(view, attrs.number_of_frames)
            return EncodedPixels("encapsulated", view, index)
        return EncodedPixels("raw", view, native_frame_index(len(view), attrs))
    value = data[pixels.value_offset : pixels.value_offset + pixels.value_length]
    if pixels.encapsulated:
        return EncodedPixels(
            "encapsulated", value, encapsulated_frame_index(value, attrs.number_of_frames)
        )
    encoded = archive.encode_native(value, layout, attrs)
    if encoded is None and archive.at_rest_codec:
        encoded = encode_at_rest(value, layout.transfer_syntax_uid, attrs)
    if encoded is not None:
        return encoded
    return EncodedPixels("raw", value, native_frame_index(len(value), attrs))


def is_little_endian(transfer_syntax_uid: str) -> bool:
    encoding = dataset_encoding(transfer_syntax_uid)
    return encoding is None or encoding[1]


def pixel_value(archive: Archive, record: InstanceRecord, payload: bytes) -> bytes:
    """The pixel value exactly as received, from the stored pixel object."""
    if record.pixel_format in ("raw", "encapsulated"):
        return payload
    if record.pixel_format in _AT_REST_SYNTAX:
        return decode_at_rest(record, payload)
    return archive.decode_native(record, payload)


# --- the at-rest codec ------------------------------------------------------------------

JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
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
        from kho.codecs import registry  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        return None
    try:
        codec = registry.get_codec(_AT_REST_SYNTAX[name])
    except KhoError:
        return None
    return codec


def encode_at_rest(
    value: bytes, transfer_syntax_uid: str, attrs: InstanceAttributes, *, verify: bool = True
) -> EncodedPixels | None:
    """Native pixel data as JPEG-LS frames, or None where JPEG-LS cannot hold it exactly.

    JPEG-LS holds Bits Stored bits per sample.  Unsigned data must have every bit above
    Bits Stored clear; signed data must have them equal to the sign bit (two's complement
    sign extension), which decoding restores.  Anything else (overlay bits in the high bits,
    odd layouts, 32-bit, YBR 4:2:2) stays raw: never altered.
    """
    bits_allocated = attrs.bits_allocated or 0
    bits_stored = attrs.bits_stored or bits_allocated
    spp = attrs.samples_per_pixel or 1
    frame_length = native_frame_length(attrs)
    frames = attrs.number_of_frames
    if (
        bits_allocated not in (8, 16)
        or not 2 <= bits_stored <= bits_allocated
        or spp not in (1, 3)
        or frame_length is None
        or frame_length * frames != len(value)
        or (
            attrs.photometric_interpretation.startswith("YBR")
            and "422" in attrs.photometric_interpretation
        )
    ):
        return None
    codec = _at_rest_codec("jpeg-ls")
    if codec is None:
        return None
    little = is_little_endian(transfer_syntax_uid)
    stack = _frames_array(value, attrs, little, frames)
    mask = (1 << bits_stored) - 1
    masked = (stack & mask).astype(np.uint8 if bits_allocated == 8 else np.uint16)
    if attrs.pixel_representation == 1 and bits_stored < bits_allocated:
        if not np.array_equal(
            _sign_extend(masked, bits_stored, bits_allocated), stack.astype(masked.dtype)
        ):
            return None
    elif bits_stored < bits_allocated and not np.array_equal(masked, stack):
        return None

    def encode_one(i: int) -> bytes:
        frame = np.ascontiguousarray(masked[i])
        stream: bytes = codec.encode(frame, bits_stored=bits_stored)
        if verify:
            back = codec.decode(stream)
            if not np.array_equal(back.reshape(frame.shape), frame):
                raise IntegrityError("at-rest codec round trip differs; keeping raw")
        return stream

    try:
        streams = [encode_one(0)] if frames == 1 else list(_pool().map(encode_one, range(frames)))
    except (IntegrityError, CodecError):
        return None
    total = sum(len(s) for s in streams)
    if total >= len(value):
        return None  # incompressible (noise): raw is smaller and faster to serve
    index: FrameIndex = []
    offset = 0
    for stream in streams:
        index.append([[offset, len(stream)]])
        offset += len(stream)
    return EncodedPixels("jpeg-ls", b"".join(streams), index)


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
    """One at-rest frame back to raw unsigned sample words (sign extension restored)."""
    ((offset, length),) = fragments
    arr = codec.decode(memoryview(payload)[offset : offset + length])
    bits_allocated = int(record.bits_allocated or 8)
    bits_stored = int(record.bits_stored or bits_allocated)
    arr = arr.astype(np.uint8 if bits_allocated == 8 else np.uint16, copy=False)
    if record.pixel_representation == 1 and bits_stored < bits_allocated:
        arr = _sign_extend(arr, bits_stored, bits_allocated)
    return arr


# --- frames for viewers -----------------------------------------------------------------


def frame_count(record: InstanceRecord) -> int:
    return len(json_frames(record)) if record.pixel_format != "none" else 0


def _check_frame(record: InstanceRecord, frame_number: int) -> list[list[int]]:
    frames = json_frames(record)
    if record.pixel_format == "none" or not 1 <= frame_number <= len(frames):
        raise NotFoundError(f"instance {record.sop_uid} has no frame {frame_number}")
    return frames[frame_number - 1]


def stored_frame(archive: Archive, record: InstanceRecord, frame_number: int) -> tuple[bytes, str]:
    """A frame's bytes as stored (1-based) and their transfer syntax UID.

    JPEG-LS stream for "jpeg-ls"; the received fragments joined for "encapsulated"; native
    little-endian bytes for "raw" (big endian data is byte-swapped).
    """
    fragments = _check_frame(record, frame_number)
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


def frame_array(archive: Archive, record: InstanceRecord, frame_number: int) -> np.ndarray:
    """Decoded pixel values of one frame (1-based): natural dtype (signed where Pixel
    Representation says so), shape (rows, cols) or (rows, cols, samples), colour by pixel,
    colour space as stored (YBR is not converted)."""
    fragments = _check_frame(record, frame_number)
    rows, cols = int(record.rows_ or 0), int(record.columns_ or 0)
    spp = int(record.samples_per_pixel or 1)
    bits = int(record.bits_allocated or 0)
    signed = record.pixel_representation == 1
    if record.pixel_format in _AT_REST_SYNTAX:
        codec = _at_rest_codec(record.pixel_format)
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
    from pydicom.pixels import pixel_array

    data = archive.read_part10(record)
    try:
        arr = pixel_array(BytesIO(data), index=frame_number - 1, raw=True)
    except Exception as exc:
        raise CodecError(f"cannot decode frame {frame_number} of {record.sop_uid}: {exc}") from exc
    if arr.ndim == 3 and spp == 1:
        arr = arr[0]
    return arr


def warm_up_codecs() -> float:
    """Load the numba kernels the archive uses (at-rest codec both ways, rendering) from
    their on-disk cache, or compile them, so the first instance or viewer request does not
    pay for it; seconds taken.  `kho serve` runs it in a background thread at start."""
    import time

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
    return time.perf_counter() - started
